"""Config, WER, storage and the results merger."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hark import records
from hark.config import Settings
from hark.wer import normalise, score
from services.results.merger import ResultsMerger


def test_settings_from_env_with_kafka_passthrough(tmp_path):
    env = {
        "HARK_BOOTSTRAP": "kafka:9092",
        "HARK_PARTITIONS": "12",
        "HARK_SESSION_TIMEOUT_S": "20",
        "HARK_KEEP_LATTICES": "false",
        "HARK_DATA_DIR": str(tmp_path),
        "HARK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "HARK_KAFKA_SASL_MECHANISM": "PLAIN",
    }
    s = Settings.load(env)
    assert (s.bootstrap, s.partitions, s.session_timeout_s, s.keep_lattices) == ("kafka:9092", 12, 20.0, False)
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
    return records.OnlineTranscript(
        stream_id=sid,
        tenant="t",
        kind=kind,
        utterance_id=utt,
        text=text,
        start_ms=0,
        end_ms=10,
        words=[{"word": w, "start_ms": 0, "end_ms": 1, "confidence": 1.0, "speaker": None} for w in words],
        nbest=[],
        lattice_key=None,
        end_status=end_status,
        audio_seq=1,
        audio_published_at_ms=1,
        emitted_at_ms=2,
        model_name="m",
        model_version="1",
    )


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


def test_merger_memory_is_capped_per_stream():
    m = ResultsMerger(max_words=3, wait_for=("online",))
    m.on_online(_online("FINAL", 0, "a b", ["a", "b"]))
    m.on_online(_online("FINAL", 1, "c d", ["c", "d"]))
    (done,) = m.on_online(_online("STREAM_END", 2, ""))
    assert done["truncated"] and done["text"] == "a b"


def _offline(kind, index, text, start, end, words=(), sid="s"):
    return records.OfflineTranscript(
        stream_id=sid,
        tenant="t",
        kind=kind,
        segment_index=index,
        start_ms=start,
        end_ms=end,
        text=text,
        words=[{"word": w, "start_ms": start, "end_ms": end, "confidence": 0.9, "speaker": None} for w in words],
        nbest=[{"text": text, "score": -0.1}] if kind == "NBEST" else [],
        language="en",
        decode_ms=5,
        end_status="COMPLETE" if kind == "STREAM_END" else None,
        audio_published_at_ms=1,
        emitted_at_ms=2,
        model_name="whisper-base",
        model_version="v",
    )


def test_merger_waits_for_both_passes_and_prefers_offline_text():
    m = ResultsMerger(wait_for=("online", "offline"))
    m.on_online(_online("FINAL", 0, "go forward ten years", ["go", "forward", "ten", "years"]))
    (caption,) = m.on_offline(
        _offline("SEGMENT", 0, "Go forward ten meters.", 0, 2800, ["Go", "forward", "ten", "meters."])
    )
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


def test_merger_shows_provisional_text_until_its_window_s_own_and_never_keeps_it():
    m = ResultsMerger(wait_for=("online", "offline"))
    draft = {**_offline("SEGMENT", 0, "Go forward ten.", 0, 1500, ["Go", "forward", "ten."]), "variant": "provisional"}
    (caption,) = m.on_offline(draft)
    assert caption["kind"] == "FINAL" and caption["source"] == "provisional" and caption["utterance_id"] == 0
    tentative = {**_offline("SEGMENT", 0, "meat", 1500, 2800, ["meat"]), "variant": "tentative"}
    (still,) = m.on_offline(tentative)  # a draft's words that may still change: a PARTIAL
    assert still["kind"] == "PARTIAL" and still["source"] == "provisional" and still["text"] == "meat"
    assert m.on_offline({**_offline("SEGMENT", 0, "x", 0, 1500, ["x"]), "variant": "candidate"}) == []
    m.on_offline(_offline("SEGMENT", 0, "Go forward ten meters.", 0, 2800, ["Go", "forward", "ten", "meters."]))
    assert m.on_offline(draft) == [] and m.on_offline(tentative) == []  # after its window's text: dropped
    m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE"))
    (done,) = m.on_offline(_offline("STREAM_END", 1, "", 2800, 2800))
    assert done["text"] == "Go forward ten meters." and len(done["words"]) == 4  # the draft is not in it
    assert m.on_offline(draft) == [] and not m.is_open("s")  # nor does one reopen a completed stream


def test_merger_stops_online_captions_once_the_offline_pass_found_another_language():
    m = ResultsMerger(wait_for=("online", "offline"))
    assert [r["kind"] for r in m.on_online(_online("FINAL", 0, "a sex test", ["a", "sex", "test"]))] == ["FINAL"]
    (caption,) = m.on_offline(
        {**_offline("SEGMENT", 0, "Hola a todos.", 0, 2800, ["Hola", "a", "todos."]), "language": "es"}
    )
    assert caption["language"] == "es"
    assert m.on_online(_online("FINAL", 1, "the more", ["the", "more"])) == []  # English nonsense: not captioned
    m.on_online(_online("STREAM_END", 2, "", end_status="COMPLETE"))
    (done,) = m.on_offline({**_offline("STREAM_END", 1, "", 2800, 2800), "language": "es"})
    assert done["language"] == "es" and done["text"] == "Hola a todos." and "the more" in done["online_text"]
    # an English stream (declared or detected) keeps its live captions
    m = ResultsMerger(wait_for=("online", "offline"))
    m.on_offline({**_offline("SEGMENT", 0, "Go.", 0, 500, ["Go."]), "language": "en"})
    assert [r["kind"] for r in m.on_online(_online("FINAL", 0, "go", ["go"]))] == ["FINAL"]


def test_an_unsure_language_reaches_the_transcript_as_und_with_its_probability():
    """Detection unsure: the offline records say "und" and the probability; the transcript
    neither takes the decode's fallback language as the stream's nor drops the probability,
    and the online (English) captions go on, since the fallback is English."""
    m = ResultsMerger(wait_for=("online", "offline"))
    unsure = {"language": "und", "language_probability": 0.32}
    (caption,) = m.on_offline({**_offline("SEGMENT", 0, "Bume mou.", 0, 2800, ["Bume", "mou."]), **unsure})
    assert caption["language"] == "und" and caption["language_probability"] == 0.32
    assert [r["kind"] for r in m.on_online(_online("FINAL", 0, "boo moo", ["boo", "moo"]))] == ["FINAL"]
    m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE"))
    (done,) = m.on_offline({**_offline("STREAM_END", 1, "", 2800, 2800), **unsure})
    assert done["language"] == "und" and done["language_probability"] == 0.32
    # with another fallback language the unsure stream's text is in that language: no English captions
    m = ResultsMerger(wait_for=("online", "offline"), fallback_language="de")
    m.on_offline({**_offline("SEGMENT", 0, "Guten Tag.", 0, 2800, ["Guten", "Tag."]), **unsure})
    assert m.on_online(_online("FINAL", 0, "good tag", ["good", "tag"])) == []
    # detected, then: the language and its probability
    m = ResultsMerger(wait_for=("online", "offline"))
    m.on_offline({**_offline("SEGMENT", 0, "Hola.", 0, 500, ["Hola."]), "language": "es", "language_probability": 0.97})
    m.on_online(_online("STREAM_END", 0, "", end_status="COMPLETE"))
    (done,) = m.on_offline({**_offline("STREAM_END", 1, "", 500, 500), "language": "es", "language_probability": 0.97})
    assert (done["language"], done["language_probability"]) == ("es", 0.97)


def test_merger_falls_back_to_online_text_when_offline_is_overdue():
    m = ResultsMerger(wait_for=("online", "offline"), offline_timeout_s=0.0)
    m.on_online(_online("FINAL", 0, "go forward", ["go", "forward"]))
    assert m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE")) == []
    (done,) = m.expire()
    assert done["final_source"] == "online" and done["text"] == "go forward"
    assert done["status"].startswith("COMPLETE (offline pass did not finish")


def _speakers(kind, turns, covered, sid="s"):
    return records.SpeakerTurns(
        stream_id=sid,
        tenant="t",
        kind=kind,
        turns=[{"speaker": spk, "start_ms": a, "end_ms": b} for spk, a, b in turns],
        covered_until_ms=covered,
        num_speakers=len({t[0] for t in turns}),
        end_status="COMPLETE" if kind == "FULL" else None,
        compute_ms=3,
        audio_published_at_ms=1,
        emitted_at_ms=2,
        model_name="d",
        model_version="v",
    )


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
    words = [
        {"word": w, "start_ms": s, "end_ms": e}
        for w, s, e in [
            ("a", 100, 500),
            ("ab", 800, 1200),
            ("b", 2000, 2500),
            ("near", 3300, 3600),
            ("far", 9000, 9500),
        ]
    ]
    assert [w["speaker"] for w in assign_speakers(words, turns)] == ["A", "B", "B", "B", None]


def test_sequence_check_drops_repeats_and_counts_gaps():
    from hark.runtime import Metrics, SequenceCheck

    m = Metrics("t")
    check = SequenceCheck(1, m)
    rec = lambda seq: {"stream_id": "s", "seq": seq}  # noqa: E731
    assert [check.accept(rec(q)) for q in (1, 1, 2, 4, 3, 5)] == [True, False, True, True, False, True]
    assert m.get("duplicate_chunks_total") == 2 and m.get("sequence_gaps_total") == 1


def test_metrics_are_prometheus_counters_and_gauges_labelled_by_service():
    from prometheus_client.parser import text_string_to_metric_families

    from hark.runtime import Metrics

    m = Metrics("online_asr")
    m.inc("records_in_total", topic="hark.audio")
    m.inc("records_in_total", 2, topic="hark.audio")
    m.set("consumer_lag_records", 7, topic="hark.audio", partition=0)
    m.set("consumer_lag_records", 3, topic="hark.audio", partition=1)
    m.total("nbest_dropped_total", 5)
    m.total("nbest_dropped_total", 4)  # a total kept elsewhere never makes the counter go back
    m.drop("consumer_lag_records", topic="hark.audio", partition=1)
    m.drop("consumer_lag_records", topic="hark.audio", partition=9)  # never set: nothing to forget
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert families["hark_records_in"].type == "counter" and families["hark_nbest_dropped"].type == "counter"
    (sample,) = families["hark_records_in"].samples
    assert sample.value == 3 and sample.labels == {"service": "online_asr", "topic": "hark.audio"}
    assert [(s.labels["partition"], s.value) for s in families["hark_consumer_lag_records"].samples] == [("0", 7)]
    assert m.get("nbest_dropped_total") == 5 and m.get("consumer_lag_records", topic="hark.audio", partition=0) == 7
    assert not [f for f in families if f.endswith("_created")]
    with pytest.raises(ValueError):
        m.inc("records_in_total", partition=1)  # a name keeps its label names
    with pytest.raises(ValueError):
        m.set("records_in_total", 1, topic="hark.audio")  # and its kind


def test_merger_ignores_re_sent_finals_and_late_records_of_completed_streams():
    m = ResultsMerger(wait_for=("online",))
    final = _online("FINAL", 0, "hello world", ["hello", "world"])
    assert len(m.on_online(final)) == 1
    assert m.on_online(final) == []  # re-sent after a producer crash: no second caption
    (done,) = m.on_online(_online("STREAM_END", 1, ""))
    assert done["kind"] == "STREAM_COMPLETE" and done["text"] == "hello world"
    assert m.on_online(_online("STREAM_END", 1, "")) == [] and not m.streams


def test_merger_drops_a_stray_stream_without_completing_it():
    m = ResultsMerger(wait_for=("online",), offline_timeout_s=0.05, abandon_after_s=60)
    m.on_online(_online("FINAL", 3, "a re-sent final", ["a"]))  # its stream completed before a restart
    # silent for longer than the offline timeout: still kept (a live stream may pause this long)
    assert m.expire(time.monotonic() + 30) == [] and m.streams
    assert m.expire(time.monotonic() + 61) == [] and not m.streams and m.abandoned == 1


def test_producer_keeps_its_first_delivery_failure():
    from confluent_kafka import KafkaError

    from hark import kafka

    p = kafka.ReportingProducer({"bootstrap.servers": "127.0.0.1:9", "logger": kafka.CLIENT_LOG})  # no broker there
    p._delivered(None, object())
    assert (p.failures, p.delivery_error) == (0, None)
    p._delivered(KafkaError(KafkaError._MSG_TIMED_OUT), object())
    p._delivered(KafkaError(KafkaError._TRANSPORT), object())
    assert p.failures == 2 and p.delivery_error.code() == KafkaError._MSG_TIMED_OUT


def test_broker_node_config_is_loopback_explicit_and_replicated_when_clustered(tmp_path):
    from hark import broker

    node = broker.single_node(tmp_path / "k")
    props = node.properties()
    assert props["listeners"].count("127.0.0.1") == 2 and "0.0.0.0" not in str(props)
    assert props["auto.create.topics.enable"] == "false" and props["log.dirs"] == str(tmp_path / "k" / "log")
    assert props["offsets.topic.replication.factor"] == "1"
    nodes = broker.cluster(tmp_path / "c", 3)
    assert len({n.port for n in nodes}) == 3 and len({n.voters for n in nodes}) == 1
    assert all(n.properties()["min.insync.replicas"] == "2" for n in nodes)
    assert nodes[0].properties()["transaction.state.log.replication.factor"] == "3"
    node.write_config()
    again = broker.load_node(tmp_path / "k")  # a restart reuses the node's identity
    assert (again.cluster_id, again.port) == (node.cluster_id, node.port)


def test_topic_configs_bound_audio_and_compact_results():
    from hark.kafka import topic_config

    s = Settings(replication_factor=3)
    audio, results = topic_config(s, s.audio_topic), topic_config(s, s.results_topic)
    assert int(audio["retention.bytes"]) == int(s.audio_retention_mb * 1024 * 1024)
    assert audio["min.insync.replicas"] == "2" and "cleanup.policy" not in audio
    assert results["cleanup.policy"] == "compact,delete" and "retention.bytes" not in results


def test_partition_placer_spreads_open_streams_and_takes_ties_in_turn():
    from services.ingest.placement import PartitionPlacer

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


def test_partition_placer_balances_the_online_replicas_whatever_their_assignment():
    """Streams go to the online_asr replica with the fewest open streams, by the group's actual
    assignment: contiguous halves (what cooperative-sticky gave a joining replica) split 6 streams
    3/3 from every start, where partitions in turn alone split them 4/2 from 6 of the 8 starts."""
    from services.ingest.placement import PartitionPlacer

    contiguous = [frozenset(range(4)), frozenset(range(4, 8))]
    interleaved = [frozenset(range(0, 8, 2)), frozenset(range(1, 8, 2))]
    three = [frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({6, 7})]
    for owners in (contiguous, interleaved, three):
        for start in range(8):
            placer = PartitionPlacer("balanced", 8, start=start)
            got = [placer.acquire(owners) for _ in range(6)]
            per_member = sorted(sum(p in m for p in got) for m in owners)
            assert per_member == [6 // len(owners)] * len(owners), (owners, start, got)
            assert len(set(got)) == 6  # and within a replica, over its partitions
    blind = [PartitionPlacer("balanced", 8, start=s) for s in range(8)]
    lopsided = [g for g in ([b.acquire() for _ in range(6)] for b in blind) if sum(p < 4 for p in g) != 3]
    assert len(lopsided) == 6  # what the owners fix
    # a released stream frees its replica: the next one goes back there
    placer = PartitionPlacer("balanced", 8, start=0)
    got = [placer.acquire(contiguous) for _ in range(4)]  # 2 on each replica
    freed = next(p for p in got if p in contiguous[1])
    placer.release(freed)
    assert placer.acquire(contiguous) in contiguous[1]
    # mid-rebalance (the first replica gave 0-3 up for a joining one that holds nothing yet):
    # partitions no member holds count as one more replica, not as the first one's nor as last
    for start in range(8):
        placer = PartitionPlacer("balanced", 8, start=start)
        got = [placer.acquire([frozenset(range(4, 8))]) for _ in range(6)]
        assert sum(p >= 4 for p in got) == 3, (start, got)
    # no members at all: partitions alone
    assert PartitionPlacer("balanced", 8, start=3).acquire([]) == 3


def test_assignment_view_asks_at_most_once_per_ttl_and_falls_back_when_it_cannot(caplog):
    from services.ingest.placement import AssignmentView

    calls: list[float] = []

    def describe(timeout: float):
        calls.append(timeout)
        if len(calls) >= 2:
            raise RuntimeError("GROUP_AUTHORIZATION_FAILED")
        return [frozenset({0, 1}), frozenset()]  # a member without partitions is no choice

    view = AssignmentView(describe, ttl=0.2, timeout=1.5)
    assert view.owners() == [frozenset({0, 1})] and view.owners() == [frozenset({0, 1})]
    assert calls == [1.5]
    time.sleep(0.25)
    assert view.owners() is None
    time.sleep(0.25)
    assert view.owners() is None and len(calls) == 3
    assert sum("assignment unavailable" in r.message for r in caplog.records) == 1  # once, not per stream


def test_configuration_reference_is_current():
    """docs/configuration.md's settings table is generated from Settings: regenerate it with
    `python -m hark.config_table` when a setting changes."""
    from pathlib import Path

    from hark.config_table import reference_markdown

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    table = doc.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert table == reference_markdown()


def test_missing_java_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env.update(PATH=str(tmp_path), HARK_DATA_DIR=str(tmp_path / "d"))  # no java on the PATH
    out = subprocess.run([sys.executable, "-m", "hark_cli", "up"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out
    assert out.stderr.strip().count("\n") == 0 and "needs Java 17" in out.stderr, out.stderr


def test_broker_jvm_maps_the_class_archive_only_when_setup_wrote_one(tmp_path, monkeypatch):
    from hark import broker

    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / f"kafka_2.13-{broker.KAFKA_VERSION}.jar").touch()
    monkeypatch.setenv("HARK_KAFKA_LIBS", str(libs))
    node = broker.single_node(tmp_path / "k")
    assert broker.class_archive().parent == libs  # setup's fresh jar folder never keeps a stale one
    cmd = node.command()
    assert not any(a.startswith("-XX:SharedArchiveFile") for a in cmd)  # starts without one, only slower
    broker.class_archive().touch()
    cmd = node.command()
    assert f"-XX:SharedArchiveFile={libs / 'kafka-classes.jsa'}" in cmd
    assert cmd.index(f"-XX:SharedArchiveFile={libs / 'kafka-classes.jsa'}") < cmd.index("kafka.Kafka")


def test_layers_point_one_way_and_modules_stay_small():
    """The library (hark/) imports no service and not the CLI; no module grows past 400 lines."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "hark").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("services", "hark_cli", "bench", "tests"), (path, name)
    for folder in ("hark", "hark_cli", "services"):
        for path in (root / folder).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 400, path


def test_settings_out_of_range_are_refused_naming_the_variable():
    from hark.config import ConfigError

    assert Settings.load(environ={}).chunk_ms == 200  # the defaults are valid
    for env, says in [
        ({"HARK_CHUNK_MS": "0"}, "HARK_CHUNK_MS=0 is outside 20..2000"),
        ({"HARK_MAX_STREAMS": "lots"}, "HARK_MAX_STREAMS='lots' is not a valid int"),
        ({"HARK_OFFLINE_CANDIDATE_FRACTION": "1.5"}, "outside 0..1"),
        ({"HARK_AUDIO_PLACEMENT": "random"}, "is not one of balanced, hash"),
        ({"HARK_RESULTS_WAIT_FOR": "online,typo"}, "HARK_RESULTS_WAIT_FOR"),
        ({"HARK_OFFLINE_MIN_WINDOW_S": "20", "HARK_OFFLINE_MAX_WINDOW_S": "10"}, "above"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            Settings.load(environ=env)


def test_a_bad_setting_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "HARK_SESSION_TIMEOUT_S": "3", "HARK_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "hark_cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and out.stderr.strip() == "hark: HARK_SESSION_TIMEOUT_S=3.0 is outside 6..1800"


def test_a_secured_node_takes_sasl_only_denies_by_default_and_keeps_its_secrets_private(tmp_path):
    from hark import broker, security

    creds = security.Credentials.load(tmp_path / "credentials.json", ["admin", "controller"])
    assert oct((tmp_path / "credentials.json").stat().st_mode & 0o777) == "0o600"
    node = broker.single_node(tmp_path / "k", security={p: creds.passwords[p] for p in ("admin", "controller")})
    props = node.properties()
    assert set(props["listener.security.protocol.map"].split(",")) == {
        "CLIENT:SASL_PLAINTEXT",
        "CONTROLLER:SASL_PLAINTEXT",
    }
    assert props["allow.everyone.if.no.acl.found"] == "false" and "StandardAuthorizer" in props["authorizer.class.name"]
    assert props["super.users"] == "User:admin;User:controller"
    node.write_config()
    for f in ("server.properties", "node.json"):  # both hold passwords
        assert oct((tmp_path / "k" / f).stat().st_mode & 0o777) == "0o600", f
    # every service principal has a grant with something in it, and none may create topics
    grants = security.grants(Settings())
    assert set(grants) == {"ingest", "online_asr", "offline_asr", "diarizer", "results", "captions"}
    ops = {(b.principal, b.operation.name) for b in security.acl_bindings(Settings())}
    assert not any(op in ("ALL", "CREATE", "ALTER", "DELETE") for _, op in ops)
    # a broker log formatted before security is moved aside, not opened to everyone
    plain = broker.single_node(tmp_path / "old")
    plain.write_config()
    (plain.log_dir).mkdir(parents=True)
    (plain.log_dir / "meta.properties").write_text("")
    secured = broker.single_node(tmp_path / "old", security={"admin": "a", "controller": "c"})
    assert secured.security and not (tmp_path / "old").exists() and list(tmp_path.glob("old.before-security-*"))


def test_accurate_text_latency_counts_each_final_word_from_its_audio_to_the_first_whisper_text():
    from hark_cli.session import StreamRun

    run = StreamRun("f.wav", "s", lambda r: None, chunk_ms=200)
    for seq in range(10):  # chunk n holds [200n, 200n + 200) ms, published at 1000 + 200n
        run.on_chunk(seq + 1, seq * 3200, 3200, 1000 + 200 * seq)

    def final(start, end, emitted, words):
        return {
            "kind": "FINAL",
            "source": "offline",
            "start_ms": start,
            "end_ms": end,
            "emitted_at_ms": emitted,
            "words": words,
            "text": " ".join(w["word"] for w in words),
            "utterance_id": 0,
        }

    w1 = {"word": "a", "start_ms": 100, "end_ms": 450, "confidence": 1.0, "speaker": None}
    w2 = {"word": "b", "start_ms": 1200, "end_ms": 1500, "confidence": 1.0, "speaker": None}
    run.on_result(final(0, 1000, 5000, [w1]), 5100)
    run.on_result(final(1000, 2000, 7000, [w2]), 7100)
    run.on_result(final(1000, 2000, 9000, [w2]), 9100)  # a later re-decode of the same range: not first
    run.on_result({**final(1000, 1800, 6000, [w2]), "source": "provisional", "text": "bee"}, 6100)  # a draft
    run.on_result(
        {
            "kind": "STREAM_COMPLETE",
            "final_source": "offline",
            "words": [w1, w2],
            "status": "COMPLETE",
            "text": "a b",
            "online_text": "",
            "turns": [],
            "model_name": "m",
            "model_version": "v",
            "truncated": False,
        },
        9200,
    )
    # a: ends at 450 ms, in chunk 2 published at 1400 -> 5000 - 1400; b: chunk 7 at 2400 -> 7000 - 2400
    # when settled by its window's text, 6000 - 2400 when its draft came first
    assert run.accurate_latency_ms(settled=True) == [3600, 4600]
    assert run.accurate_latency_ms() == [3600, 3600]
    lat = run.summary()["latency"]
    assert lat["accurate_words_measured"] == 2 and lat["accurate_p50_ms"] == 3600.0
    assert lat["settled_p50_ms"] == 4100.0
    assert run.first_text() == "a bee"  # what captions showed first: the draft where there was one
    # finals after close and its parts: the last offline text and the speakers, as they arrived
    run.end_published_ms = 3000
    run.on_result({"kind": "SPEAKERS"}, 8000)
    lat = run.summary()["latency"]
    assert (lat["final_after_close_ms"], lat["offline_after_close_ms"], lat["speakers_after_close_ms"]) == (
        6200,
        6100,
        5000,
    )


def test_every_result_the_merger_builds_has_exactly_the_schema_fields():
    """Built by hand or by result_record, a Result carries the fields of hark.Result.avsc and no
    others (the Avro writer would drop an unknown key silently)."""
    from hark import serde

    fields = {f["name"] for f in serde.registry().by_name("Result").parsed["fields"]} - {
        "schema_version"
    }  # serde stamps it
    m = ResultsMerger(wait_for=("online", "offline", "diarizer"), offline_timeout_s=60)
    out = m.on_online(_online("PARTIAL", 0, "hello", ["hello"]))
    out += m.on_speakers(_speakers("INCREMENTAL", [("SPEAKER_00", 0, 10)], 10))
    out += m.on_online(_online("FINAL", 0, "hello world", ["hello", "world"]))
    out += m.on_offline(_offline("SEGMENT", 0, "hello world", 0, 10, ["hello", "world"]))
    out += m.on_offline(_offline("NBEST", 0, "hello world", 0, 10))
    out += m.on_online(_online("STREAM_END", 1, "", end_status="COMPLETE"))
    out += m.on_offline(_offline("STREAM_END", 1, "", 10, 10))
    out += m.on_speakers(_speakers("FULL", [("SPEAKER_00", 0, 10)], 10))
    kinds = {str(r["kind"]) for r in out}
    assert kinds == {"PARTIAL", "SPEAKERS", "FINAL", "ALTERNATIVES", "STREAM_COMPLETE"}, kinds
    for r in out:
        assert set(r) == fields, (r["kind"], set(r) ^ fields)
        assert serde.decode(serde.encode("Result", r))[1]["kind"] == r["kind"]


def test_a_live_connection_holds_at_most_ingest_buffer_bytes_of_source_audio():
    """The finding: 30 s of source audio per connection before archiving, 1.1 GB at 768 kHz x 24
    channels. Now a segment is cut at ``ingest_buffer_bytes``, in whole frames."""
    from services.ingest.archive import source_segment_bytes

    s = Settings.load({})
    assert source_segment_bytes(s, 16000, 1) == 30 * 16000 * 2  # ordinary input: 30 s segments
    big = source_segment_bytes(s, 768_000, 24)
    assert big <= s.ingest_buffer_bytes == 4 << 20 and big % (24 * 2) == 0
    small = Settings.load({"HARK_INGEST_BUFFER_BYTES": str(64 * 1024)})
    assert source_segment_bytes(small, 768_000, 24) <= 64 * 1024


def test_the_tokens_file_is_reloaded_and_a_broken_one_denies_every_token(tmp_path):
    from hark.tenants import Access, AccessDenied, create_token, revoke_tokens

    path = tmp_path / "tokens"
    a, b = create_token(path, "acme"), create_token(path, "globex")
    access = Access.load(Settings.load({"HARK_TOKENS_FILE": str(path)}))
    access.RECHECK_S = 0
    assert access.tenant_of(a) == "acme" and access.tenant_of(b) == "globex"
    assert revoke_tokens(path, "acme") == 1
    with pytest.raises(AccessDenied):
        access.tenant_of(a)
    assert access.tenant_of(b) == "globex"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    path.write_text("not a line of the tokens file\n")  # a broken edit: fail closed, not open
    os.utime(path, ns=(1, 1))
    with pytest.raises(AccessDenied):
        access.tenant_of(b)


def test_whisper_word_pieces_join_by_the_tokenizers_leading_spaces():
    """The finding: "ill -sposed", "cold -hearted": a piece without a leading space continues
    the word before it."""
    from services.offline_asr.decoder import join_words

    pieces = [(" He", 0, 100, 0.9), (" was", 100, 200, 0.9), (" an", 200, 300, 0.9), (" ill", 300, 400, 0.8)]
    pieces += [
        ("-disposed", 400, 700, 0.6),
        (" man.", 700, 900, 0.9),
        (" Don", 900, 1000, 0.9),
        ("'t", 1000, 1100, 0.7),
    ]
    pieces += [(" well", 1200, 1300, 0.9), ("-", 1300, 1310, 0.5), ("known", 1310, 1500, 0.9), (" ", 1500, 1500, 0.1)]
    words = join_words(pieces)
    assert [w["word"] for w in words] == ["He", "was", "an", "ill-disposed", "man.", "Don't", "well-known"]
    ill = words[3]
    assert (ill["start_ms"], ill["end_ms"], ill["confidence"]) == (300, 700, 0.6)
    assert join_words([("-first", 0, 10, 0.5)])[0]["word"] == "-first"  # a segment's first piece starts a word


def test_a_commit_that_lost_its_broker_is_given_up_once_the_broker_is_back(monkeypatch):
    """librdkafka's send_offsets_to_transaction can hang for good after its coordinator went away
    (librdkafka #5456, #5511): the loop gives a commit up (the process restarts from its last
    commit) once the brokers have answered again for RECONNECTED_S, not only at the deadline."""
    import threading

    from hark import transactions

    class Wedged(Exception):
        pass

    def wedged(_tid, waited):
        raise Wedged(waited)

    class Producer:
        broker_lost_at: float | None = None

        def __init__(self, lost_until: float):
            self.release, self.lost_until = threading.Event(), lost_until

        def begin_transaction(self):
            pass

        def send_offsets_to_transaction(self, *_args):
            self.release.wait()  # the hang

        def commit_transaction(self, _timeout):
            pass

        def poll(self, _timeout):  # error_cb reports a lost connection every poll until it is back
            if time.monotonic() < self.lost_until:
                self.broker_lost_at = time.monotonic()

    monkeypatch.setattr(transactions, "_wedged", wedged)
    monkeypatch.setattr(transactions, "RECONNECTED_S", 0.4)
    monkeypatch.setattr(transactions, "COMMIT_DEADLINE_S", 3.0)

    def given_up_after(p: Producer) -> float:
        tx = transactions.Transactions(p, "t")
        tx.commit(["offset"], None)
        try:
            with pytest.raises(Wedged) as got:
                tx.wait()
        finally:
            p.release.set()
        return got.value.args[0]

    # the connection is lost mid-commit and back 1.2 s later (the loop looks every 0.5 s): given up
    # at the first look 0.4 s after the last loss it saw
    assert 1.2 <= given_up_after(Producer(lost_until=time.monotonic() + 1.2)) < 2.6
    # a broker still away is waited for, up to the deadline
    assert given_up_after(Producer(lost_until=time.monotonic() + 60)) >= 3.0
    # a commit begun just after a loss (its coordinator may be the stale one): RECONNECTED_S after it
    p = Producer(lost_until=0)
    p.broker_lost_at = time.monotonic() - 1.0
    assert 0.4 <= given_up_after(p) < 1.6
    # a slow commit with the brokers there all along is not given up before the deadline
    p = Producer(lost_until=0)
    tx = transactions.Transactions(p, "t-3")
    tx.commit(["offset"], None)
    threading.Timer(1.0, p.release.set).start()
    tx.wait()  # raises Wedged if given up


def test_the_soak_fails_a_cost_that_grows_and_passes_one_that_settles():
    from bench.load import soak_verdict

    def run(cpu: list[float], rss: list[float]) -> dict:
        return soak_verdict(
            {
                "broker_cpu_pct_by_minute": cpu,
                "rss_mb_by_minute": {"broker": rss},
                "partial_p95_ms_by_minute": [500] * len(cpu),
            }
        )

    steady = [100.0] * 60
    assert run([60.0] + [12.0] * 59, steady)["passed"]  # the JVM's warm-up, then flat
    assert not run([60.0] + [12.0] * 59, steady)["broker_cpu_within_20pct"]
    assert not run([11.0] * 30 + [11.0 + i for i in range(30)], steady)["passed"]  # grows with the log
    assert not run([12.0] * 60, [100.0] * 30 + [100.0 + i for i in range(30)])["passed"]  # RSS climbs
    assert not run([12.0] * 15, [100.0] * 15)["passed"]  # too short to tell


def test_counts_from_the_network_are_ascii_digits_in_range_and_nothing_else():
    """The finding: ``/api/search?limit=²`` and a 4,301-digit limit answered 500 (``isdigit``
    admits superscripts, ``int()`` refuses them and more than 4,300 digits)."""
    from hark.params import parse_count
    from services.captions.audio import byte_range

    assert parse_count(None, "limit", 20, 1, 200) == 20  # absent: the default
    assert parse_count("1", "limit", 20, 1, 200) == 1 and parse_count("200", "limit", 20, 1, 200) == 200
    assert parse_count("007", "limit", 20, 1, 200) == 7
    for bad in ("²", "٣", "9" * 4301, "-1", "+5", " 5", "5 ", "5\n", "1_0", "1.5", "0x10", "", "0", "201"):
        with pytest.raises(ValueError, match=r"limit must be a whole number 1\.\.200"):
            parse_count(bad, "limit", 20, 1, 200)
    for bad in ("bytes=٣-", "bytes=-²", f"bytes={'9' * 4301}-", "bytes=+1-2", "bytes=1_0-"):
        with pytest.raises(ValueError):
            byte_range(bad, 1000)
    assert byte_range("bytes=10-19", 1000) == (10, 20)


def _asgi_get(app, path: str, query: str) -> tuple[int, str]:
    """One GET through an ASGI app, without a server."""
    import asyncio

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


def test_the_search_api_answers_a_hostile_limit_with_400_naming_it(tmp_path):
    from services.captions.app import create_app
    from services.captions.follower import Hub
    from services.captions.index import TranscriptIndex

    s = Settings.load({"HARK_DATA_DIR": str(tmp_path)})
    TranscriptIndex(s.index_file).close()
    app = create_app(s, Hub(), None)
    for bad in ("%C2%B2", "9" * 4301, "-1", "", "0", "201", "1_0", "%205"):
        status, body = _asgi_get(app, "/api/search", f"q=x&limit={bad}")
        assert (status, body) == (400, "limit must be a whole number 1..200\n"), bad
    assert _asgi_get(app, "/api/search", "q=x&limit=3")[0] == 200
    assert _asgi_get(app, "/api/search", "q=x")[0] == 200


def test_a_tokens_file_in_the_data_folder_turns_tokens_on_while_the_servers_run(tmp_path, monkeypatch):
    """The finding: `hark token create` wrote <data_dir>/tokens, but the servers enforced tokens
    only with HARK_TOKENS_FILE, so anonymous streams went on after a user created tokens."""
    import types

    from hark import tenants
    from hark.tenants import Access, AccessDenied, create_token, revoke_tokens, tokens_path

    clock = [1000.0]
    monkeypatch.setattr(tenants, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def later():  # one recheck period on: the next request looks at the file again
        clock[0] += Access.RECHECK_S

    s = Settings.load({"HARK_DATA_DIR": str(tmp_path)})
    path = tokens_path(s)
    assert path == tmp_path / "tokens"
    assert tokens_path(Settings.load({"HARK_DATA_DIR": str(tmp_path), "HARK_TOKENS_FILE": "/x/t"})) == Path("/x/t")
    access = Access.load(s)
    assert access.tenant_of(None) is None and access.publishing_tenant(None, "anyone") == "anyone"  # open
    acme, globex = create_token(path, "acme"), create_token(path, "globex")
    later()
    with pytest.raises(AccessDenied):  # a request without a token is refused from now on
        access.tenant_of(None)
    with pytest.raises(AccessDenied):
        access.publishing_tenant(None, "anyone")
    assert access.tenant_of(acme) == "acme"
    assert Access.load(s).tenant_of(globex) == "globex"  # present at start: enforced at once
    assert revoke_tokens(path, acme) == 1
    later()
    with pytest.raises(AccessDenied):  # revoked
        access.tenant_of(acme)
    assert access.tenant_of(globex) == "globex"
    path.unlink()  # gone once enforced: every token refused, access does not fall open
    later()
    for token in (globex, None):
        with pytest.raises(AccessDenied):
            access.tenant_of(token)
    with pytest.raises(FileNotFoundError):  # a named file must exist
        Access.load(Settings.load({"HARK_DATA_DIR": str(tmp_path), "HARK_TOKENS_FILE": str(path)}))


def test_hark_writes_private_files_and_folders_under_its_data_folder(tmp_path):
    """The finding: logs, stack.json and supervisor.log 0644 and archive folders 0755 under the
    data folder. The `hark` command runs with umask 077: folders it makes, parents too, are 0700;
    `hark token create` writes the tokens file the servers of that data folder enforce."""
    from hark.tenants import Access, tokens_path

    data = tmp_path / "a" / "b" / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("HARK_TOKENS_FILE", "HARK_DATA_DIR")}
    cmd = [sys.executable, "-m", "hark_cli", "--data-dir", str(data), "token", "create", "acme"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = Settings.load({"HARK_DATA_DIR": str(data)})
    assert tokens_path(s) == data / "tokens" and Access.load(s).tenant_of(out.stdout.strip()) == "acme"
    for folder in (tmp_path / "a", tmp_path / "a" / "b", data):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder
    assert oct((data / "tokens").stat().st_mode & 0o777) == "0o600"


def test_starting_a_stack_makes_the_data_folder_and_everything_after_private(tmp_path):
    from hark import stack

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as an older version left it
    old = os.umask(0o022)
    try:
        assert stack.private_data_dir(Settings.load({"HARK_DATA_DIR": str(data)})) == data
        assert os.umask(0o077) == 0o077  # what every process the stack starts inherits
        (data / "stacks" / "x").mkdir(parents=True)
        (data / "stacks" / "x" / "supervisor.log").write_text("")
    finally:
        os.umask(old)
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert oct((data / "stacks").stat().st_mode & 0o777) == "0o700"
    assert oct((data / "stacks" / "x" / "supervisor.log").stat().st_mode & 0o777) == "0o600"


def test_a_service_process_starts_with_umask_077(tmp_path, monkeypatch):
    from hark.runtime import entry

    monkeypatch.setattr(entry, "setup_logging", lambda *_a: None)
    monkeypatch.setattr(entry.kafka, "wait_for_broker", lambda *_a, **_k: None)
    monkeypatch.setattr(entry.kafka, "ensure_topics", lambda *_a, **_k: None)
    old = os.umask(0o022)
    try:
        entry.service_settings("results", ["--bootstrap", "127.0.0.1:1", "--data-dir", str(tmp_path)])
        assert os.umask(old) == 0o077
    finally:
        os.umask(old)


def test_replicas_are_counted_strictly():
    from hark.stack import parse_replicas

    assert parse_replicas("online_asr=2, offline_asr=0") == {"online_asr": 2, "offline_asr": 0}
    for bad in ("online_asr=²", "online_asr=0", "online_asr=-1", "online_asr=", "nope=1", f"ingest={'9' * 4301}"):
        with pytest.raises(SystemExit, match="bad --replicas entry"):
            parse_replicas(bad)


def test_ports_chosen_together_are_distinct():
    """The finding: a broker's client and controller listeners got the same port (each chosen
    with its socket closed before the next was asked for), and Kafka refused to format the log."""
    from hark.broker import free_ports

    for _ in range(20):
        ports = free_ports(8)
        assert len(set(ports)) == 8 and all(1024 <= p <= 65535 for p in ports)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of hark, hark_cli and services it imports, anywhere in its body (in a
    function or under TYPE_CHECKING too), relative imports resolved."""
    import ast

    root = Path(__file__).resolve().parent.parent
    mods = {}
    for top in ("hark", "hark_cli", "services"):
        for p in (root / top).rglob("*.py"):
            name = ".".join(p.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - (n.level - 1)] + ([n.module] if n.module else []))
                else:
                    base = n.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in n.names]
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def test_no_import_cycles():
    """No module of hark, hark_cli or services imports itself back through others, not even from
    inside a function: a shared piece belongs in a module below both."""
    graph = _import_graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_over_60_lines():
    """Every function and method of hark, hark_cli and services fits in 60 lines."""
    import ast

    root = Path(__file__).resolve().parent.parent
    long = []
    for top in ("hark", "hark_cli", "services"):
        for p in sorted((root / top).rglob("*.py")):
            for n in ast.walk(ast.parse(p.read_text())):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno is not None:
                    lines = n.end_lineno - n.lineno + 1
                    if lines > 60:
                        long.append(f"{p.relative_to(root)}:{n.lineno} {n.name}: {lines} lines")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_compose_and_the_deployment_doc_follow_the_services_declarations():
    """Each service declares itself once (hark/declaration.py); docker-compose.yml deploys exactly
    the default ones, each run by its declared module, logged in as itself, with the settings it
    declares it needs, and docs/deployment.md names the same services."""
    import yaml

    from hark import declaration, security, serde, stack

    root = Path(__file__).resolve().parent.parent
    specs = declaration.defaults()
    names = [s.name for s in specs]
    assert len(set(names)) == len(names) and {s.name for s in declaration.specs()} >= set(names)
    assert list(stack.SERVICES) == names and {s.name: (s.main, s.splits) for s in specs} == stack.SERVICES
    assert list(security.grants(Settings())) == names
    assert [s.group for s in specs if s.group] == stack.GROUPS
    assert set(declaration.passes()) == {"online", "offline", "diarizer"}  # what the merger joins
    for s in declaration.specs():
        # the module the supervisor (python -m PACKAGE) and `hark service NAME` run, read not imported
        module = root / Path(*s.main.split("."))
        assert re.search(r"^def main\(", module.with_suffix(".py").read_text(), re.M), s.main
        main = (module.parent / "__main__.py").read_text()
        assert f"from .{module.name} import main" in main, s.name
        assert s.transactional in (None, f"{s.group}-"), s.name  # the runtime's ids are <group>-<instance>
        assert set(s.produces) <= set(serde.RECORD_TYPES), s.name
        assert s.splits is None or s.splits in s.reads, s.name
        assert all(hasattr(Settings, r) for r in s.read_prefixes + s.write_prefixes), s.name
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    setup = compose["services"]["kafka-setup"]["environment"]
    deployed = {n: svc for n, svc in compose["services"].items() if svc.get("command") == [n]}
    assert list(deployed) == names  # in start order too
    for s in specs:
        env = deployed[s.name]["environment"]
        assert env["HARK_KAFKA_SASL_USERNAME"] == s.name
        password = env["HARK_KAFKA_SASL_PASSWORD"].split(":?")[0]
        assert password == f"${{HARK_{s.name.upper()}_KAFKA_PASSWORD"
        assert setup[f"HARK_PASSWORD_{s.name.upper()}"].split(":?")[0] == password
        assert set(s.deploy_env) <= set(env), (s.name, sorted(set(s.deploy_env) - set(env)))
        if s.splits:  # scaled by its group: no fixed host port
            assert "ports" not in deployed[s.name], s.name
    assert {k.removeprefix("HARK_PASSWORD_").lower() for k in setup if k.startswith("HARK_PASSWORD_")} == set(names)
    doc = " ".join((root / "docs" / "deployment.md").read_text().split())
    listed = re.search(r"a one-shot `mc` container, and ((?:\w+, )+\w+ and \w+), each", doc)
    assert listed and re.split(r", | and ", listed.group(1)) == names, listed
    braces = re.search(r"HARK_\{([A-Z_,]+)\}_KAFKA_PASSWORD", doc)
    assert braces and braces.group(1).split(",") == [n.upper() for n in names]
