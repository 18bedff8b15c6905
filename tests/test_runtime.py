"""The consumer loop's exactly-once rules, without a broker (hark.runtime.testing's in-memory topics).

The real ConsumerService, StreamRunner and checkpoints run against a cluster that commits records
with their offsets all or nothing, so each case here is one a crash or rebalance makes on a real
broker: tests/test_chaos.py and tests/test_e2e.py run the same cases there, with real services.

The processor is a counter: one record per chunk (the chunk's time span) and, at the end, one
record listing every chunk the stream had, which is right only if the stream's state survived.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from hark import records
from hark.config import Settings
from hark.keys import Keyring
from hark.runtime import ERASED, Chunk, Output, Processors, StreamInfo, StreamProcessor, StreamRunner
from hark.runtime.checkpoints import Checkpoints
from hark.runtime.testing import Cluster

OUT = "test.spans"
CHUNK_SAMPLES = 1600  # 0.1 s


class Spans(StreamProcessor):
    def __init__(self, owner: SpanProcessors, info: StreamInfo, spans: list | None = None):
        self.owner, self.info, self.spans = owner, info, spans or []

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        self.owner.fed.append((self.info.stream_id, chunk.seq, replay))
        span = [chunk.offset_samples, chunk.offset_samples + len(chunk.pcm) // 2]
        self.spans.append(span)
        return [self.owner.record(self.info, "INCREMENTAL", [span])]

    def snapshot(self) -> dict | None:
        every = self.owner.snapshot_every
        return {"spans": self.spans[:-1]} if every and len(self.spans) % every == 0 else None

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        return [self.owner.record(self.info, "FULL", self.spans, status)]

    def discard(self) -> None:
        self.owner.discarded.append(self.info.stream_id)


class SpanProcessors(Processors):
    name = "spans"
    group = "test-spans"

    def __init__(self, snapshot_every: int = 0):
        self.snapshot_every = snapshot_every
        self.fed: list[tuple[str, int, bool]] = []
        self.discarded: list[str] = []
        self.resumed: list[tuple[str, int]] = []

    def open(self, stream: StreamInfo) -> Spans:
        return Spans(self, stream)

    def resume(self, stream: StreamInfo, state: dict) -> Spans:
        self.resumed.append((stream.stream_id, len(state["spans"])))
        return Spans(self, stream, [list(s) for s in state["spans"]])

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        return [self.record(stream, "FULL", [], status)]

    def record(self, info: StreamInfo, kind: str, spans: list, status: str | None = None) -> Output:
        turns = [records.Turn(speaker="S", start_ms=a // 16, end_ms=b // 16) for a, b in spans]
        return Output(
            OUT,
            "SpeakerTurns",
            records.SpeakerTurns(
                stream_id=info.stream_id,
                tenant=info.tenant,
                kind=kind,
                turns=turns,
                covered_until_ms=max((t["end_ms"] for t in turns), default=0),
                num_speakers=1,
                end_status=status,
                compute_ms=0,
                audio_published_at_ms=0,
                emitted_at_ms=0,
                model_name="spans",
                model_version="1",
            ),
        )


@pytest.fixture
def settings(tmp_path) -> Settings:
    # commits only where a test says (run_until_idle, a revoke), never on the clock
    return Settings(data_dir=tmp_path, partitions=2, commit_interval_s=3600.0, idle_timeout_s=3600.0)


class Audio:
    """Streams as ingest writes them onto the audio topic: sealed, keyed by stream id."""

    def __init__(self, cluster: Cluster, settings: Settings):
        self.cluster, self.topic = cluster, settings.audio_topic
        self.keys = Keyring.for_settings(settings)
        self.next_seq: dict[str, int] = {}
        self.ended: dict[str, bool] = {}

    def start(self, sid: str, tenant: str = "t1") -> None:
        self.keys.create(sid)
        self.next_seq[sid] = 1
        self.cluster.publish(
            self.topic,
            "StreamStart",
            records.StreamStart(
                stream_id=sid,
                tenant=tenant,
                seq=0,
                language="en",
                source_format="pcm",
                sample_rate=16000,
                source_sample_rate=16000,
                source_channels=1,
                started_at_ms=0,
            ),
        )

    def chunks(self, sid: str, n: int, tenant: str = "t1") -> None:
        for _ in range(n):
            seq = self.next_seq[sid]
            self.next_seq[sid] = seq + 1
            rec = records.AudioChunk(
                stream_id=sid,
                tenant=tenant,
                seq=seq,
                offset_samples=(seq - 1) * CHUNK_SAMPLES,
                sample_rate=16000,
                pcm=b"\x01\x00" * CHUNK_SAMPLES,
                published_at_ms=0,
            )
            self.cluster.publish(self.topic, "AudioChunk", rec)

    def end(self, sid: str, tenant: str = "t1", status: str = "COMPLETE") -> None:
        seq = self.next_seq[sid]
        self.ended[sid] = True
        self.cluster.publish(
            self.topic,
            "StreamEnd",
            records.StreamEnd(
                stream_id=sid,
                tenant=tenant,
                seq=seq,
                total_samples=(seq - 1) * CHUNK_SAMPLES,
                status=status,
                ended_at_ms=0,
            ),
            sealed=status != ERASED,
        )


def runner(cluster: Cluster, settings: Settings, procs: SpanProcessors) -> StreamRunner:
    return cluster.start(lambda clients: StreamRunner(settings, procs, clients))


def outputs(cluster: Cluster) -> dict[str, list[tuple[str, tuple]]]:
    """Per stream: (kind, spans) of every committed output record, in order."""
    out: dict[str, list[tuple[str, tuple]]] = {}
    for rtype, rec in cluster.read(OUT):
        if rtype == "Erased":
            out.setdefault(rec["stream_id"], []).append(("unreadable", ()))
            continue
        assert rtype == "SpeakerTurns"
        spans = tuple((t["start_ms"], t["end_ms"]) for t in rec["turns"])
        out.setdefault(rec["stream_id"], []).append((rec["kind"], spans))
    return out


def expected(n_chunks: int) -> list[tuple[str, tuple]]:
    spans = [(i * 100, (i + 1) * 100) for i in range(n_chunks)]
    return [("INCREMENTAL", (s,)) for s in spans] + [("FULL", tuple(spans))]


def exactly_once(cluster: Cluster, streams: dict[str, int]) -> None:
    got = outputs(cluster)
    for sid, n in streams.items():
        records = got.get(sid, [])
        dupes = [r for r, c in Counter(records).items() if c > 1]
        assert not dupes, f"{sid}: duplicated {dupes[:3]}"
        assert records == expected(n), f"{sid}: {records}"


def test_a_fault_free_run_publishes_each_output_once(settings):
    cluster, procs = Cluster(settings), SpanProcessors()
    audio, r = Audio(cluster, settings), runner(cluster, settings, procs)
    for sid in ("a", "b", "c"):
        audio.start(sid)
        audio.chunks(sid, 5)
        audio.end(sid)
    cluster.run_until_idle(r)
    exactly_once(cluster, {"a": 5, "b": 5, "c": 5})
    assert not any(replay for _, _, replay in procs.fed)


def test_a_crash_before_the_commit_leaves_nothing_and_the_next_owner_redoes_it(settings):
    cluster = Cluster(settings)
    audio, first = Audio(cluster, settings), runner(cluster, settings, SpanProcessors())
    audio.start("a")
    audio.chunks("a", 4)
    cluster.run_until_idle(first)  # committed: 4 outputs, the stream held at its start
    audio.chunks("a", 3)
    while first.poll_once(0):
        pass  # processed and produced, not committed
    assert first.transactions._open
    cluster.crash(first)
    assert len(outputs(cluster)["a"]) == 4  # the crashed transaction left nothing visible
    procs = SpanProcessors()
    second = runner(cluster, settings, procs)
    audio.end("a")
    cluster.run_until_idle(second)
    exactly_once(cluster, {"a": 7})
    # rebuilt from its start: the 4 committed chunks replayed silently, the 3 lost ones redone
    assert [(seq, replay) for _, seq, replay in procs.fed] == [(s, s <= 4) for s in range(1, 8)]


def test_a_resume_starts_at_the_last_snapshot_not_the_stream_start(settings):
    cluster = Cluster(settings)
    audio, first = Audio(cluster, settings), runner(cluster, settings, SpanProcessors(snapshot_every=3))
    audio.start("a")
    audio.chunks("a", 7)
    cluster.run_until_idle(first)
    (commit,) = [c for tp, c in cluster.groups["test-spans"].committed.items() if c[1] and '"a"' in c[1]]
    assert '"spans"' in str(commit[1])  # the snapshot travels in the commit's metadata
    cluster.crash(first)
    procs = SpanProcessors(snapshot_every=3)
    second = runner(cluster, settings, procs)
    audio.end("a")
    cluster.run_until_idle(second)
    exactly_once(cluster, {"a": 7})
    # the snapshot after chunk 6 holds chunks 1-5; chunk 6 is fed again (replayed), 7 too
    assert procs.resumed == [("a", 5)]
    assert [(seq, replay) for _, seq, replay in procs.fed] == [(6, True), (7, True)]


def on(cluster: Cluster, runner_: StreamRunner, topic: str, sids: list[str]) -> set[str]:
    """The streams whose audio partition ``runner_`` owns."""
    owned = runner_.consumer.assignment
    return {sid for sid in sids if (topic, cluster.partition_of(topic, sid.encode())) in owned}


@pytest.mark.parametrize("eager", [False, True], ids=["cooperative", "eager"])
def test_a_rebalance_mid_stream_hands_streams_over_without_loss_or_duplicates(settings, eager):
    """A second replica joins while six streams are open. Cooperative-sticky (hark's consumers'
    strategy): the first keeps its other partition and its streams there untouched; the streams
    of the partition that moves are discarded (never closed) and resumed by the new owner from
    their snapshots. Eager: every partition is revoked and reassigned, so every stream is resumed."""
    cluster, topic = Cluster(settings, partitions=4, eager=eager), settings.audio_topic
    audio, procs_a = Audio(cluster, settings), SpanProcessors(snapshot_every=2)
    a = runner(cluster, settings, procs_a)
    sids = [f"s{i}" for i in range(8)]
    for sid in sids:
        audio.start(sid)
        audio.chunks(sid, 3)
    cluster.run_until_idle(a)
    procs_b = SpanProcessors(snapshot_every=2)
    b = runner(cluster, dataclasses.replace(settings, instance_id="b"), procs_b)
    for sid in sids:
        audio.chunks(sid, 2)
        audio.end(sid)
    cluster.run_until_idle(a, b)
    exactly_once(cluster, dict.fromkeys(sids, 5))
    kept, moved = on(cluster, a, topic, sids), on(cluster, b, topic, sids)
    assert kept and moved and kept | moved == set(sids)
    assert sorted(sid for sid, _ in procs_b.resumed) == sorted(moved)  # from the snapshot after chunk 2
    assert all(n == 1 for _, n in procs_b.resumed)
    if eager:
        assert sorted(procs_a.discarded) == sids and sorted(s for s, _ in procs_a.resumed) == sorted(kept)
    else:
        assert sorted(procs_a.discarded) == sorted(moved) and procs_a.resumed == []


def test_a_stream_that_ended_before_the_checkpoint_is_not_rebuilt_by_the_replay(settings):
    """Stream a stays open, so the partition is replayed from a's start; b started and ended after
    it, before the crash: its replayed records must not open it again (only part of it is there
    to replay, and it would never end)."""
    cluster = Cluster(settings, partitions=1)
    audio, first = Audio(cluster, settings), runner(cluster, settings, SpanProcessors())
    audio.start("a")
    audio.chunks("a", 2)
    audio.start("b")
    audio.chunks("b", 2)
    audio.end("b")
    cluster.run_until_idle(first)
    cluster.crash(first)
    procs = SpanProcessors()
    second = runner(cluster, settings, procs)
    audio.chunks("a", 1)
    audio.end("a")
    cluster.run_until_idle(second)
    exactly_once(cluster, {"a": 3, "b": 2})
    assert [f for f in procs.fed if f[0] == "b"] == []


def test_a_replica_dropped_from_the_group_cannot_commit_over_its_successor(settings):
    """A zombie: its session timed out (it was not told) and another replica took its partitions.
    Its next commit fails, as ILLEGAL_GENERATION does on a broker, so the loop stops (its
    process restarts); what it made since the last commit never becomes visible."""
    cluster = Cluster(settings, partitions=1)
    audio, zombie = Audio(cluster, settings), runner(cluster, settings, SpanProcessors())
    audio.start("a")
    audio.chunks("a", 2)
    cluster.run_until_idle(zombie)
    cluster.leave(zombie.consumer, revoke=False)  # the session timed out
    successor = runner(cluster, dataclasses.replace(settings, instance_id="b"), SpanProcessors())
    audio.chunks("a", 2)
    cluster.run_until_idle(successor)
    audio.chunks("a", 1)
    zombie.poll_once(0)
    with pytest.raises(RuntimeError, match="transaction failed"):
        zombie._commit()
        zombie.transactions.wait()
    audio.end("a")
    cluster.run_until_idle(successor)
    exactly_once(cluster, {"a": 5})


@pytest.mark.parametrize("seed", range(12))
def test_crashes_at_any_point_lose_and_duplicate_nothing(settings, seed):
    """Commits on every record (as when a batch takes longer than the commit interval), and a
    crash after a random number of passes, three times over, with streams starting and ending
    throughout: every stream's output once, its end record listing every chunk."""
    rng = random.Random(seed)
    settings = dataclasses.replace(settings, commit_interval_s=0.0)
    cluster = Cluster(settings, partitions=2)
    audio, counts = Audio(cluster, settings), {}
    svc = runner(cluster, settings, SpanProcessors(snapshot_every=rng.choice([0, 2, 3])))
    for round_ in range(4):
        for i in range(3):
            sid = f"r{round_}s{i}"
            audio.start(sid)
            counts[sid] = rng.randint(1, 5)
            audio.chunks(sid, counts[sid])
            if rng.random() < 0.7:
                audio.end(sid)
        for _ in range(rng.randint(0, 6)):
            svc.poll_once(0)
        cluster.crash(svc)
        svc = runner(cluster, settings, SpanProcessors(snapshot_every=rng.choice([0, 2, 3])))
    for sid in [s for s in counts if not audio.ended.get(s)]:
        audio.end(sid)
    cluster.run_until_idle(svc)
    exactly_once(cluster, counts)


def test_a_stream_erased_before_a_replay_is_dropped_and_its_neighbours_go_on(settings):
    cluster = Cluster(settings)
    audio, first = Audio(cluster, settings), runner(cluster, settings, SpanProcessors())
    for sid in ("gone", "kept"):
        audio.start(sid)
        audio.chunks(sid, 3)
    cluster.run_until_idle(first)
    cluster.crash(first)
    Keyring.for_settings(settings).erase("gone")  # `hark erase`: its key is gone everywhere
    audio.end("gone", status=ERASED)
    audio.chunks("kept", 2)
    audio.end("kept")
    procs = SpanProcessors()
    second = runner(cluster, settings, procs)
    cluster.run_until_idle(second)
    exactly_once(cluster, {"kept": 5})
    got = outputs(cluster)["gone"]
    # what was committed before the erasure stays on the topic, sealed and unreadable; after it
    # only the content-free end, and nothing of its audio was replayed
    assert got == [("unreadable", ())] * 3 + [("FULL", ())]
    assert not [f for f in procs.fed if f[0] == "gone"]


def test_a_bad_chunk_is_dead_lettered_once_even_when_replayed(settings):
    cluster = Cluster(settings)
    audio, first = Audio(cluster, settings), runner(cluster, settings, SpanProcessors())
    audio.start("a")
    audio.chunks("a", 2)
    bad = records.AudioChunk(
        stream_id="a",
        tenant="t1",
        seq=3,
        offset_samples=3200,
        sample_rate=8000,
        pcm=b"\x00\x00",
        published_at_ms=0,
    )
    cluster.publish(settings.audio_topic, "AudioChunk", bad)
    audio.next_seq["a"] = 3
    audio.chunks("a", 1)
    cluster.run_until_idle(first)
    cluster.crash(first)
    second = runner(cluster, settings, SpanProcessors())
    audio.end("a")
    cluster.run_until_idle(second)
    letters = cluster.read(settings.deadletter_topic)
    assert [(t, r["error_type"]) for t, r in letters] == [("DeadLetter", "bad_sample_rate")]
    exactly_once(cluster, {"a": 3})


def test_checkpoints_never_commit_past_a_hold_and_carry_resume_state():
    ck = Checkpoints()
    ck.assign([(("audio", 0), None), (("audio", 1), None)])
    for off in range(10):
        ck.processed(("audio", 0), off)
    ck.processed(("audio", 1), 4)
    ck.hold("s1", ("audio", 0), 3)
    ck.hold("s2", ("audio", 0), 6, state={"at": 6})
    assert ck.commit_positions() == {("audio", 0): 3, ("audio", 1): 5}
    pending = {(c.topic, c.partition): c for c in ck.pending()}
    meta = pending[("audio", 0)].metadata
    # the format older and newer replicas read back from each other's commits: exactly this
    assert meta == '{"held":["s1","s2"],"processed":10,"streams":{"s2":{"offset":6,"state":{"at":6}}}}'
    assert pending[("audio", 1)].metadata == '{"held":[],"processed":5,"streams":{}}'
    ck.sent(list(pending.values()))
    assert ck.pending() == []  # nothing moved: nothing to commit
    ck.release("s1")
    assert [(c.partition, c.offset) for c in ck.pending()] == [(0, 6)]
    ck.processed(("audio", 0), 2)  # a re-read never moves a position back
    assert ck.positions[("audio", 0)] == 10

    after = Checkpoints()  # the next owner reads the commit back
    after.assign([(("audio", 0), meta), (("audio", 1), None)])
    assert after.replays(("audio", 0), 9) and not after.replays(("audio", 0), 10)
    assert after.restored("s2") == {"offset": 6, "state": {"at": 6}} and after.restored("s1") is None
    assert after.was_held("s1") and not after.was_held("s3")  # s3: finished before the checkpoint
    after.processed(("audio", 0), 6)
    after.processed(("audio", 1), 0)
    after.hold("s2", ("audio", 0), 6)
    after.revoke([("audio", 0)])  # what it read back of partition 0 goes with it
    assert after.commit_positions() == {("audio", 1): 1} and after.holds() == {}
    assert not after.replays(("audio", 0), 9) and after.restored("s2") is None and not after.was_held("s1")
