"""Config, WER, storage and the results merger."""
import time

import pytest

from hark.config import Settings
from hark.wer import normalise, score
from services.results.merger import ResultsMerger


def test_settings_from_env_with_kafka_passthrough(tmp_path):
    env = {"HARK_BOOTSTRAP": "kafka:9092", "HARK_PARTITIONS": "12", "HARK_FETCH_WAIT_MS": "20",
           "HARK_KEEP_LATTICES": "false", "HARK_DATA_DIR": str(tmp_path),
           "HARK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "HARK_KAFKA_SASL_MECHANISM": "PLAIN"}
    s = Settings.load(env)
    assert (s.bootstrap, s.partitions, s.fetch_wait_ms, s.keep_lattices) == ("kafka:9092", 12, 20, False)
    assert s.kafka_extra == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    assert s.archive == (tmp_path / "archive").as_uri()
    assert Settings.load(s.to_env()) == s


def test_cli_overrides_beat_env():
    assert Settings.load({"HARK_BOOTSTRAP": "a:1"}, bootstrap="b:2").bootstrap == "b:2"
    with pytest.raises(TypeError):
        Settings.load({}, no_such_setting=1)


def test_wer_normalisation_and_score():
    assert normalise("Go forward, 10 meters!") == ["go", "forward", "ten", "meters"]
    assert normalise("Mr. Dashwood's 21st") == ["mister", "dashwood's", "twenty", "one", "st"]
    s = score("go forward ten meters", "go forward ten years")
    assert (s.errors, s.ref_words, s.wer) == (1, 4, 0.25)
    assert score("a b c", "").wer == 1.0 and score("a b", "x a b").errors == 1


def _online(kind, utt, text, words=(), sid="s", end_status=None):
    return {"stream_id": sid, "tenant": "t", "kind": kind, "utterance_id": utt, "text": text, "start_ms": 0,
            "end_ms": 10, "words": [{"word": w, "start_ms": 0, "end_ms": 1, "confidence": 1.0, "speaker": None}
                                    for w in words], "nbest": [], "lattice_key": None, "end_status": end_status,
            "audio_seq": 1, "audio_published_at_ms": 1, "emitted_at_ms": 2, "model_name": "m", "model_version": "1"}


def test_merger_turns_online_output_into_captions_and_a_transcript():
    m = ResultsMerger(wait_for=("online",))
    assert [r["kind"] for r in m.on_online(_online("PARTIAL", 0, "go"))] == ["PARTIAL"]
    m.on_online(_online("FINAL", 0, "go forward", ["go", "forward"]))
    m.on_online(_online("FINAL", 0, "go forward", ["go", "forward"]))  # a replayed duplicate
    m.on_online(_online("FINAL", 1, "ten meters", ["ten", "meters"]))
    (done,) = m.on_online(_online("STREAM_END", 2, "", end_status="COMPLETE"))
    assert done["kind"] == "STREAM_COMPLETE" and done["status"] == "COMPLETE" and done["final_source"] == "online"
    assert done["text"] == done["online_text"] == "go forward ten meters"
    assert [w["word"] for w in done["words"]] == ["go", "forward", "ten", "meters"]
    assert not m.is_open("s")


def test_partials_behind_their_final_are_stale():
    """Partials reach the results topic from online_asr, finals through the results service: a
    re-sent partial can land after its utterance's final, and readers drop it."""
    from hark.records import FinalsSeen, result_record

    def res(kind, utt, sid="s", source="online"):
        return result_record(_online("FINAL", utt, "x", sid=sid), kind, source, utt)

    seen = FinalsSeen(max_streams=2)
    assert seen.update(res("PARTIAL", 0)) and seen.update(res("PARTIAL", 0))
    assert seen.update(res("FINAL", 0))
    assert not seen.update(res("PARTIAL", 0))  # behind its final
    assert seen.update(res("PARTIAL", 1))
    assert seen.update(res("FINAL", 5, source="offline")) and seen.update(res("PARTIAL", 1))  # offline: other numbering
    assert seen.update(res("PARTIAL", 0, sid="other"))  # streams are independent
    assert seen.update(res("STREAM_COMPLETE", -1))
    assert not seen.update(res("PARTIAL", 7))  # behind the stream's end
    seen.update(res("FINAL", 3, sid="b")), seen.update(res("FINAL", 3, sid="c"))  # bounded: "s" is forgotten
    assert seen.update(res("PARTIAL", 7)) and len(seen._last_final) == 2


def test_merger_memory_is_capped_per_stream():
    m = ResultsMerger(max_words=3, wait_for=("online",))
    m.on_online(_online("FINAL", 0, "a b", ["a", "b"]))
    m.on_online(_online("FINAL", 1, "c d", ["c", "d"]))
    (done,) = m.on_online(_online("STREAM_END", 2, ""))
    assert done["truncated"] and done["text"] == "a b"


def _offline(kind, index, text, start, end, words=(), sid="s"):
    return {"stream_id": sid, "tenant": "t", "kind": kind, "segment_index": index, "start_ms": start, "end_ms": end,
            "text": text, "words": [{"word": w, "start_ms": start, "end_ms": end, "confidence": 0.9, "speaker": None}
                                    for w in words], "nbest": [{"text": text, "score": -0.1}] if kind == "NBEST" else [],
            "language": "en", "decode_ms": 5, "end_status": "COMPLETE" if kind == "STREAM_END" else None,
            "audio_published_at_ms": 1, "emitted_at_ms": 2, "model_name": "whisper-base", "model_version": "v"}


def test_merger_waits_for_both_passes_and_prefers_offline_text():
    m = ResultsMerger(wait_for=("online", "offline"))
    m.on_online(_online("FINAL", 0, "go forward ten years", ["go", "forward", "ten", "years"]))
    (caption,) = m.on_offline(_offline("SEGMENT", 0, "Go forward ten meters.", 0, 2800, ["Go", "forward", "ten", "meters."]))
    assert caption["kind"] == "FINAL" and caption["source"] == "offline" and caption["end_ms"] == 2800
    assert m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE")) == []  # offline still running
    (alt,) = m.on_offline(_offline("NBEST", 0, "Go forward ten meters.", 0, 2800))
    assert alt["kind"] == "ALTERNATIVES" and alt["nbest"][0]["text"] == "Go forward ten meters."
    (done,) = m.on_offline(_offline("STREAM_END", 1, "", 2800, 2800))
    assert done["final_source"] == "offline" and done["text"] == "Go forward ten meters."
    assert done["online_text"] == "go forward ten years" and done["model_name"] == "whisper-base"
    assert [w["word"] for w in done["words"]] == ["Go", "forward", "ten", "meters."]
    assert not m.is_open("s")
    # n-best computed after completion still reaches consumers
    assert m.on_offline(_offline("NBEST", 0, "x", 0, 1))[0]["kind"] == "ALTERNATIVES" and not m.is_open("s")


def test_merger_falls_back_to_online_text_when_offline_is_overdue():
    m = ResultsMerger(wait_for=("online", "offline"), offline_timeout_s=0.0)
    m.on_online(_online("FINAL", 0, "go forward", ["go", "forward"]))
    assert m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE")) == []
    (done,) = m.expire()
    assert done["final_source"] == "online" and done["text"] == "go forward"
    assert done["status"].startswith("COMPLETE (offline pass did not finish")


def _speakers(kind, turns, covered, sid="s"):
    return {"stream_id": sid, "tenant": "t", "kind": kind,
            "turns": [{"speaker": spk, "start_ms": a, "end_ms": b} for spk, a, b in turns], "covered_until_ms": covered,
            "num_speakers": len({t[0] for t in turns}), "end_status": "COMPLETE" if kind == "FULL" else None,
            "compute_ms": 3, "audio_published_at_ms": 1, "emitted_at_ms": 2, "model_name": "d", "model_version": "v"}


def test_merger_labels_words_with_speakers_and_waits_for_the_diarizer():
    m = ResultsMerger()  # online, offline and diarizer
    (spk,) = m.on_speakers(_speakers("INCREMENTAL", [("A", 0, 1400), ("B", 1500, 2800)], 3000))
    assert spk["kind"] == "SPEAKERS" and [t["speaker"] for t in spk["turns"]] == ["A", "B"]
    words = ["go", "forward", "ten", "meters"]
    rec = _online("FINAL", 0, "go forward ten meters", words)
    for i, w in enumerate(rec["words"]):
        w["start_ms"], w["end_ms"] = i * 700, i * 700 + 600
    (final,) = m.on_online(rec)
    assert [w["speaker"] for w in final["words"]] == ["A", "A", "B", "B"]
    m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE"))
    m.on_offline(_offline("SEGMENT", 0, "Go forward.", 0, 1400, ["Go", "forward."]))
    assert m.on_offline(_offline("STREAM_END", 1, "", 2800, 2800)) == []  # the diarizer has not ended
    (done,) = m.on_speakers(_speakers("FULL", [("SPEAKER_00", 0, 1400), ("SPEAKER_01", 1500, 2800)], 3000))
    assert [w["speaker"] for w in done["words"]] == ["SPEAKER_00", "SPEAKER_00"]
    assert [t["speaker"] for t in done["turns"]] == ["SPEAKER_00", "SPEAKER_01"]


def test_assign_speakers_prefers_overlap_then_the_nearest_turn():
    from services.results.merger import assign_speakers

    turns = [{"speaker": "A", "start_ms": 0, "end_ms": 1000}, {"speaker": "B", "start_ms": 900, "end_ms": 3000}]
    words = [{"word": w, "start_ms": s, "end_ms": e} for w, s, e in
             [("a", 100, 500), ("ab", 800, 1200), ("b", 2000, 2500), ("near", 3300, 3600), ("far", 9000, 9500)]]
    assert [w["speaker"] for w in assign_speakers(words, turns)] == ["A", "B", "B", "B", None]


def test_chunk_order_drops_duplicates_reorders_and_bounds_waiting():
    from hark.runtime import ChunkOrder, Metrics

    class Msg:  # the Kafka message a chunk came in: only its offset matters here
        def __init__(self, offset):
            self._offset = offset

        def offset(self):
            return self._offset

    m = Metrics("t")
    order = ChunkOrder(1, m, window=3)
    rec = lambda seq: {"stream_id": "s", "seq": seq}  # noqa: E731
    out = lambda pairs: [r["seq"] for r, _ in pairs]  # noqa: E731
    assert out(order.push(rec(1), Msg(1))) == [1]
    assert out(order.push(rec(1), Msg(1))) == []  # duplicate
    assert out(order.push(rec(3), Msg(3))) == []  # early: waits for 2
    assert order.missing == 2 and order.last_offset == 1
    assert out(order.push(rec(2), Msg(2))) == [2, 3]
    assert out(order.push(rec(2), Msg(2))) == []
    for seq in (5, 6, 7):
        assert out(order.push(rec(seq), Msg(seq))) == []
    assert out(order.push(rec(8), Msg(8))) == [5, 6, 7, 8]  # 4 waiting > window 3: the gap (4) is given up
    assert out(order.push(rec(4), Msg(4))) == []  # too late now: dropped as a duplicate
    assert out(order.push(rec(10), Msg(10))) == [] and out(order.drain()) == [10]
    assert m.get("duplicate_chunks_total") == 3 and m.get("sequence_gaps_total") == 2


def test_merger_ignores_re_sent_finals_and_late_records_of_completed_streams():
    m = ResultsMerger(wait_for=("online",))
    final = _online("FINAL", 0, "hello world", ["hello", "world"])
    assert len(m.on_online(final)) == 1
    assert m.on_online(final) == []  # re-sent after a producer crash: no second caption
    (done,) = m.on_online(_online("STREAM_END", 1, ""))
    assert done["kind"] == "STREAM_COMPLETE" and done["text"] == "hello world"
    assert m.on_online(_online("STREAM_END", 1, "")) == [] and not m.streams


def test_merger_drops_a_stray_stream_without_completing_it():
    m = ResultsMerger(wait_for=("online",), offline_timeout_s=0.05)
    m.on_online(_online("FINAL", 3, "a re-sent final", ["a"]))  # its stream completed before a restart
    time.sleep(0.1)
    assert m.expire() == [] and not m.streams and m.abandoned == 1


def test_checkpoints_of_a_memory_broker_do_not_outlive_it(tmp_path):
    """The archive outlives an embedded memory:// broker whose log restarts at offset 0: a second
    stack must not take the first one's marks (it skipped the start of every stream as replayed)."""
    from hark.runtime import Checkpoints
    from hark.stack import checkpoint_scope
    from hark.storage import open_store

    first, second = checkpoint_scope("memory://tansu/"), checkpoint_scope("memory://tansu/")
    assert first != second
    assert checkpoint_scope("s3://tansu/") == checkpoint_scope("s3://tansu/")  # durable: restarts resume
    store = open_store(Settings(archive_uri=tmp_path.as_uri()))
    Checkpoints(store, "g", first).save("hark.audio", 0, '{"processed": 36}')
    assert Checkpoints(store, "g", first).load("hark.audio", 0) == {"processed": 36}
    assert Checkpoints(store, "g", second).load("hark.audio", 0) == {}


class _Delivered:
    """What librdkafka hands a delivery callback, for the producer's own logic."""

    def __init__(self, offset, partition=0):
        self._offset, self._partition = offset, partition

    def offset(self):
        return self._offset

    def partition(self):
        return self._partition

    def topic(self):
        return "hark.audio"

    def key(self):
        return b"s1"

    def value(self):
        return b"record"

    def headers(self):
        return None


def test_producer_resends_what_the_broker_may_not_have_written_and_keeps_failures():
    from confluent_kafka import KafkaError

    from hark import kafka

    class Recording(kafka.GuardedProducer):
        def produce(self, topic, key=None, value=None, partition=-1, headers=None, on_delivery=None):
            sent.append((topic, partition, key, value))

    sent = []
    p = Recording({"bootstrap.servers": "127.0.0.1:9"})
    for offset in (16, 17):  # written in order: nothing to do
        p._delivered(None, _Delivered(offset))
    p._delivered(None, _Delivered(3, partition=1))  # offsets are per partition
    assert (p.resent, sent, p.failures) == (0, [], 0)
    p._delivered(None, _Delivered(None))  # "duplicate sequence": maybe written before, maybe not
    p._delivered(None, _Delivered(5))  # a batch of two acknowledged below offsets already written
    p._delivered(None, _Delivered(6))
    # each produced again, as new, to its own partition (ingest places streams, not the key's hash)
    assert p.resent == 3 and sent == [("hark.audio", 0, b"s1", b"record")] * 3
    p._delivered(None, _Delivered(18))
    p._delivered(None, _Delivered(19, partition=1))
    assert p.resent == 3
    p._delivered(None, _Delivered(2), copy=True)  # a copy is never copied again
    assert p.resent == 3
    for offset in (0, 1):  # a new partition, written from 0
        p._delivered(None, _Delivered(offset, partition=3))
    assert p.resent == 3
    p._client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))  # then the broker restarts
    for offset in (0, 1, 2):  # a batch "written" at 0.. on a partition this producer knows nothing of
        p._delivered(None, _Delivered(offset, partition=2))
    assert p.resent == 6
    p._delivered(None, _Delivered(40, partition=2))  # the next batch, where the log really ends
    p._delivered(None, _Delivered(41, partition=2))
    assert p.resent == 6
    p._delivered(None, _Delivered(5000))
    for offset in range(kafka.GuardedProducer.LOG_RESTARTED_AFTER + 5):  # the log restarted at 0
        p._delivered(None, _Delivered(offset))
    assert p.resent == 6 + kafka.GuardedProducer.LOG_RESTARTED_AFTER  # bounded, then its offsets are adopted
    p._delivered(KafkaError(KafkaError._MSG_TIMED_OUT), _Delivered(None))
    p._delivered(KafkaError(KafkaError._TRANSPORT), _Delivered(None))
    assert p.failures == 2 and p.delivery_error.code() == KafkaError._MSG_TIMED_OUT


def test_partition_placer_spreads_open_streams_and_takes_ties_in_turn():
    from services.ingest.publisher import PartitionPlacer

    placer = PartitionPlacer("balanced", 8, start=0)
    first = [placer.acquire() for _ in range(12)]  # 12 streams at once: 0..7, then 0..3 again
    assert first == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    # two replicas of a group own 0,2,4,6 and 1,3,5,7 (round-robin assignment): 6 streams each
    assert sum(p % 2 == 0 for p in first) == 6
    placer.release(5)
    placer.release(6)
    assert [placer.acquire(), placer.acquire()] == [5, 6]  # freed partitions are the least loaded
    assert placer.acquire() == 7  # then ties again, in turn after the last one taken
    # one stream after another does not pile onto one partition
    placer, sequential = PartitionPlacer("balanced", 8), []
    for _ in range(8):
        sequential.append(placer.acquire())
        placer.release(sequential[-1])
    assert sorted(sequential) == list(range(8))
    # placers that know only their own streams (ingest replicas, an Ingest per stream) do not all
    # put their first stream on partition 0: 10 of them on one partition by chance is 8**-9
    assert len({PartitionPlacer("balanced", 8).acquire() for _ in range(10)}) > 1
    assert PartitionPlacer("hash", 8).acquire() is None  # the producer hashes the key
    with pytest.raises(ValueError):
        PartitionPlacer("random", 8)
