"""Config, WER, storage and the results merger."""
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
    assert normalise("Mr. Dashwood's 21st") == ["mr", "dashwood's", "twenty", "one", "st"]
    s = score("go forward ten meters", "go forward ten years")
    assert (s.errors, s.ref_words, s.wer) == (1, 4, 0.25)
    assert score("a b c", "").wer == 1.0 and score("a b", "x a b").errors == 1


def _online(kind, utt, text, words=(), sid="s", end_status=None):
    return {"stream_id": sid, "tenant": "t", "kind": kind, "utterance_id": utt, "text": text, "start_ms": 0,
            "end_ms": 10, "words": [{"word": w, "start_ms": 0, "end_ms": 1, "confidence": 1.0, "speaker": None}
                                    for w in words], "nbest": [], "lattice_key": None, "end_status": end_status,
            "audio_seq": 1, "audio_published_at_ms": 1, "emitted_at_ms": 2, "model_name": "m", "model_version": "1"}


def test_merger_turns_online_output_into_captions_and_a_transcript():
    m = ResultsMerger()
    assert [r["kind"] for r in m.on_online(_online("PARTIAL", 0, "go"))] == ["PARTIAL"]
    m.on_online(_online("FINAL", 0, "go forward", ["go", "forward"]))
    m.on_online(_online("FINAL", 0, "go forward", ["go", "forward"]))  # a replayed duplicate
    m.on_online(_online("FINAL", 1, "ten meters", ["ten", "meters"]))
    (done,) = m.on_online(_online("STREAM_END", 2, "", end_status="COMPLETE"))
    assert done["kind"] == "STREAM_COMPLETE" and done["status"] == "COMPLETE"
    assert done["text"] == done["online_text"] == "go forward ten meters"
    assert [w["word"] for w in done["words"]] == ["go", "forward", "ten", "meters"]
    assert not m.is_open("s")


def test_merger_memory_is_capped_per_stream():
    m = ResultsMerger(max_words=3)
    m.on_online(_online("FINAL", 0, "a b", ["a", "b"]))
    m.on_online(_online("FINAL", 1, "c d", ["c", "d"]))
    (done,) = m.on_online(_online("STREAM_END", 2, ""))
    assert done["truncated"] and done["text"] == "a b"
