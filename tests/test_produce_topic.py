"""Third-party producers: StreamStart, AudioChunks and StreamEnd published with a stock Kafka
client to a tenant's produce topic go through ingest's doors into the pipeline.

An ingest replica runs in this process too (beside the stack's own, whose login may not read the
produce topics yet): both share group hark-ingest-in, so the streams are served by whichever
holds their partition, and land on the stack's audio topic either way. The producer writes
magic 0 + schema id, the frame a stock Confluent AvroSerializer writes (ids from hark's own
registry until the stack runs one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time

import pytest
import soundfile as sf
from confluent_kafka import KafkaException, Producer
from websockets.asyncio.client import connect

from hark import kafka, records, serde
from hark.runtime import Metrics
from hark.storage import archived_meta
from hark.wer import score
from services.ingest.core import Ingest
from services.ingest.kafka_source import GROUP, KafkaSource

from .conftest import SPEECH
from .helpers import collect, complete_record
from .test_doors import running

pytestmark = pytest.mark.e2e

TENANT = "producer-test"
CHUNK_BYTES = 6400  # 200 ms at 16 kHz


@pytest.fixture(scope="module")
def produced(live_stack):
    settings, _ = live_stack
    serde.configure(settings)  # the stack's records carry its registry's ids
    kafka.ensure_tenant_topics(settings, TENANT)
    topic = settings.produce_topic(TENANT)
    with running(settings) as (server, url):
        _wait_assigned(settings, topic)
        producer = Producer({"bootstrap.servers": settings.bootstrap, **settings.kafka_extra})
        yield settings, server, url, topic, producer
        producer.flush(10)


def _wait_assigned(settings, topic: str, timeout: float = 90.0, stable_s: float = 11.0) -> None:
    """Until the group holds every partition of ``topic``, unchanged for longer than a metadata
    refresh: a stream is not cut by a rebalance halfway through (the stack's ingest finds the
    new topic within one)."""
    adm, everything = kafka.admin(settings), set(range(settings.partitions))
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            held = sorted(tuple(sorted(h)) for h in kafka.group_assignment(adm, GROUP, topic, 5))
        except KafkaException:
            held = []
        if held != last:
            last, since = held, time.monotonic()
        elif set().union(*held) == everything and time.monotonic() - since > stable_s:
            return
        time.sleep(0.5)
    raise AssertionError(f"{topic} not assigned in {GROUP}: {last}")


def _records(sid: str, pcm: bytes, end: bool = True, rate: int = 16000):
    """A stream as a third-party producer writes it; its tenant field names another tenant."""
    now, other = int(time.time() * 1000), "someone-else"
    yield "StreamStart", records.StreamStart(
        stream_id=sid, tenant=other, seq=0, language="en", source_format="raw/pcm_s16le",
        source_name="a producer", sample_rate=rate, source_sample_rate=rate, source_channels=1,
        archive_prefix=None, started_at_ms=now, metadata={}, hotwords=[],
    )  # fmt: skip
    for i, at in enumerate(range(0, len(pcm), CHUNK_BYTES)):
        yield "AudioChunk", records.AudioChunk(
            stream_id=sid, tenant=other, seq=i + 1, offset_samples=at // 2, sample_rate=rate,
            pcm=pcm[at : at + CHUNK_BYTES], published_at_ms=now,
        )  # fmt: skip
    if end:
        yield "StreamEnd", records.StreamEnd(
            stream_id=sid, tenant=other, seq=len(pcm) // CHUNK_BYTES + 2, total_samples=len(pcm) // 2,
            status="COMPLETE", reason=None, ended_at_ms=now,
        )  # fmt: skip


def _produce(producer: Producer, topic: str, sid: str, records) -> None:
    for rtype, rec in records:
        producer.produce(topic, key=sid.encode(), value=serde.encode(rtype, rec))
    assert producer.flush(30) == 0


def _speech(name: str) -> bytes:
    pcm, rate = sf.read(SPEECH / name, dtype="int16")
    assert rate == 16000 and pcm.ndim == 1
    return pcm.tobytes()


def _dead_letters(settings, topic: str, wanted: dict[str, str]) -> dict[str, dict]:
    """The dead letters from ``topic`` of each stream id in ``wanted`` with its error type."""

    def mine(recs):
        return {
            r["stream_id"]: r
            for t, r in recs
            if t == "DeadLetter" and r["source_topic"] == topic and wanted.get(r["stream_id"]) == r["error_type"]
        }

    return mine(collect(settings, settings.deadletter_topic, lambda recs: len(mine(recs)) == len(wanted), 60))


def test_a_produced_recording_is_transcribed_in_the_topics_tenant(produced, references):
    settings, _, _, topic, producer = produced
    sid = f"produced-{time.time_ns()}"
    _produce(producer, topic, sid, _records(sid, _speech("forever_input_2_16k.wav")))
    rec = complete_record(settings, sid, timeout=120)
    assert rec["status"] == "COMPLETE" and rec["tenant"] == TENANT, rec  # the topic's, not the record's
    assert score(references["forever_input_2_16k.wav"], rec["text"]).wer <= 0.5, rec["text"]


def test_bad_records_are_dead_letters_and_a_good_stream_beside_them_completes(produced):
    settings, server, _, topic, producer = produced
    garbage, ghost, good, gone = (f"{n}-{time.time_ns()}" for n in ("garbage", "ghost", "good", "gone"))
    producer.produce(topic, key=garbage.encode(), value=b"\x00\x00\x00\x00\x07 not avro at all")
    chunk = next(r for t, r in _records(ghost, b"\x00" * CHUNK_BYTES) if t == "AudioChunk")
    _produce(producer, topic, ghost, [("AudioChunk", chunk)])
    _produce(producer, topic, gone, _records(gone, b"\x00\x00" * 16000, end=False))  # a producer that vanishes
    _produce(producer, topic, good, _records(good, _speech("goforward.wav")))
    assert "forward" in complete_record(settings, good, timeout=120)["text"]
    letters = _dead_letters(settings, topic, {garbage: "bad_record", ghost: "unknown_stream"})
    assert all(r["reason"] and r["tenant"] == TENANT for r in letters.values()), letters
    assert letters[garbage]["payload"].endswith(b"not avro at all")
    # the vanished producer's stream is ended by ingest's idle timeout (HARK_IDLE_TIMEOUT_S=4 here)
    assert complete_record(settings, gone, timeout=60)["status"] in ("ABORTED", "IDLE_TIMEOUT")
    meta = archived_meta(server.ingest.store, gone)
    assert meta["status"] == "ABORTED" and "idle" in meta["reason"] and meta["total_samples"] == 16000, meta


def test_a_stream_id_taken_by_a_websocket_stream_is_refused_as_stream_exists(produced):
    settings, server, url, topic, producer = produced
    sid = f"taken-{time.time_ns()}"

    async def websocket_stream() -> dict:
        async with connect(f"{url}?stream_id={sid}") as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(b"\x00\x00" * 3200)
            await ws.send(json.dumps({"type": "end"}))
            return json.loads(await ws.recv())

    assert asyncio.run(websocket_stream())["type"] == "done"
    _produce(producer, topic, sid, _records(sid, b"\x00\x00" * 16000))
    letters = _dead_letters(settings, topic, {sid: "stream_exists"})
    assert letters[sid]["tenant"] == TENANT and letters[sid]["reason"]
    meta = archived_meta(server.ingest.store, sid)
    assert meta["tenant"] == "default" and meta["total_samples"] == 3200, meta  # the first owner's, untouched


class _Record:
    """A consumed record as confluent_kafka hands it over, for feeding a source by hand."""

    def __init__(self, topic: str, offset: int, key: bytes | None, value: bytes):
        self._at, self._key, self._value = (topic, 0, offset), key, value

    def topic(self):
        return self._at[0]

    def partition(self):
        return self._at[1]

    def offset(self):
        return self._at[2]

    def key(self):
        return self._key

    def value(self):
        return self._value

    def error(self):
        return None


def _fed(topic: str, records, first: int = 0) -> list[_Record]:
    return [_Record(topic, at, r["stream_id"].encode(), serde.encode(t, r)) for at, (t, r) in enumerate(records, first)]


class _Replica(KafkaSource):
    """A replica's source fed by hand (no consumer); it keeps the kinds of what it refused."""

    def __init__(self, settings):
        super().__init__(Ingest(settings), Metrics("ingest"))
        self.refused: list[str] = []

    def _dead_letter(self, err, msg, tenant, sid):
        self.refused.append(err.kind)
        super()._dead_letter(err, msg, tenant, sid)


@pytest.fixture(scope="module")
def private(live_stack):
    """The stack's settings with topics of their own that no decoder reads."""
    s = dataclasses.replace(live_stack[0], topic_prefix=f"hark-produced-{os.getpid()}.", tenant_max_connections=1)
    kafka.ensure_topics(s)
    return s


def test_records_read_again_after_a_crash_are_taken_at_most_once(private):
    topic = private.produce_topic(TENANT)
    done, cut = f"done-{time.time_ns()}", f"cut-{time.time_ns()}"
    log = {done: _fed(topic, _records(done, b"\x00" * 32000)), cut: _fed(topic, _records(cut, b"\x00" * 32000), 7)}
    first = _Replica(private)
    for m in log[done] + log[cut][:3]:  # then it crashes, before any commit: all of it is read again
        first._record(m)
    assert not first.refused and archived_meta(first.ingest.store, done)["status"] == "COMPLETE"
    second = _Replica(private)
    for m in log[done]:
        second._record(m)
    assert not second.refused and not second.open  # taken before: skipped, nothing published twice
    for m in log[cut]:
        second._record(m)
    assert second.refused == ["stream_ended"] * len(log[cut]) and not second.open  # interrupted: refused
    assert archived_meta(first.ingest.store, done)["total_samples"] == 16000
    first.open[cut].close("ABORTED", "the test's crashed replica")


def test_a_producers_records_meet_the_websocket_doors(private):
    acme, globex = private.produce_topic("acme"), private.produce_topic("globex")
    sid, other, third = (f"{n}-{time.time_ns()}" for n in ("doors", "other", "third"))
    start, chunk = (r for _, r in _records(sid, b"\x00" * 1600, rate=8000, end=False))
    replica = _Replica(private)
    feed = [
        _fed(acme, [("StreamStart", start), ("AudioChunk", chunk)]),  # 8 kHz, resampled: taken
        _fed(globex, [("AudioChunk", chunk), ("StreamStart", start)], 2),  # another tenant's id
        _fed(acme, [("AudioChunk", {**chunk, "sample_rate": 16000}), ("AudioChunk", chunk)], 4),  # not the start's rate
        [_Record(acme, 6, None, _fed(acme, [("AudioChunk", chunk)])[0].value())],  # no key
        [_Record(acme, 7, b"huge", b"\x00" * (private.max_ws_message_bytes + 8192))],
        _fed(acme, [("StreamStart", {**start, "stream_id": n}) for n in (other, third)], 8),  # 1 stream a tenant here
    ]
    for m in (m for batch in feed for m in batch):
        replica._record(m)
    assert replica.refused == [
        *("unknown_stream", "stream_exists", "bad_sample_rate", "stream_ended", "bad_key", "too_large", "tenant_limit")
    ]
    meta = archived_meta(replica.ingest.store, sid)
    assert meta["tenant"] == "acme" and meta["source_sample_rate"] == 8000, meta
    assert meta["status"] == "ERROR" and "differs from the start's 8000" in meta["reason"], meta
    replica.open[other].close("ABORTED", "the test is over")
