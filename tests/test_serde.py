import io
import json
import struct

import fastavro
import pytest

from hark import serde
from hark.serde import SCHEMA_DIR

WORD = {"word": "ten", "start_ms": 10, "end_ms": 300, "confidence": 0.5, "speaker": None}
SAMPLES = {
    "StreamStart": {
        "stream_id": "s1",
        "tenant": "t",
        "seq": 0,
        "language": "en-US",
        "source_format": "wav/pcm_s16le",
        "source_name": "a.wav",
        "sample_rate": 16000,
        "source_sample_rate": 44100,
        "source_channels": 2,
        "archive_prefix": "streams/s1/",
        "started_at_ms": 1,
        "metadata": {"num_speakers": "2"},
        "hotwords": ["metoprolol", "lisinopril"],
    },
    "AudioChunk": {
        "stream_id": "s1",
        "tenant": "t",
        "seq": 1,
        "offset_samples": 0,
        "sample_rate": 16000,
        "pcm": b"\x01\x00" * 1600,
        "published_at_ms": 5,
    },
    "StreamEnd": {
        "stream_id": "s1",
        "tenant": "t",
        "seq": 2,
        "total_samples": 1600,
        "status": "COMPLETE",
        "reason": None,
        "ended_at_ms": 9,
    },
    "StreamAlive": {"stream_id": "s1", "tenant": "t", "seq": 3, "silent_ms": 10000, "published_at_ms": 9},
    "OnlineTranscript": {
        "stream_id": "s1",
        "tenant": "t",
        "kind": "FINAL",
        "utterance_id": 0,
        "text": "ten",
        "start_ms": 0,
        "end_ms": 300,
        "words": [WORD],
        "nbest": [{"text": "ten", "score": -1.5}],
        "lattice_key": "streams/s1/lattices/000000.lat",
        "end_status": None,
        "audio_seq": 3,
        "audio_published_at_ms": 5,
        "emitted_at_ms": 6,
        "model_name": "m",
        "model_version": "1",
    },
    "OfflineTranscript": {
        "stream_id": "s1",
        "tenant": "t",
        "kind": "SEGMENT",
        "segment_index": 0,
        "start_ms": 0,
        "end_ms": 11340,
        "text": "Ten.",
        "words": [WORD],
        "nbest": [],
        "language": "en",
        "language_probability": 0.5,
        "decode_ms": 900,
        "end_status": None,
        "audio_published_at_ms": 5,
        "emitted_at_ms": 6,
        "model_name": "whisper-base",
        "model_version": "x",
        "variant": "primary",
    },
    "SpeakerTurns": {
        "stream_id": "s1",
        "tenant": "t",
        "kind": "INCREMENTAL",
        "turns": [{"speaker": "SPEAKER_00", "start_ms": 0, "end_ms": 300}],
        "covered_until_ms": 6000,
        "num_speakers": 1,
        "end_status": None,
        "compute_ms": 40,
        "audio_published_at_ms": 5,
        "emitted_at_ms": 7,
        "model_name": "m",
        "model_version": "1",
    },
    "Result": {
        "stream_id": "s1",
        "tenant": "t",
        "kind": "STREAM_COMPLETE",
        "source": "online",
        "utterance_id": -1,
        "text": "ten",
        "start_ms": 0,
        "end_ms": 300,
        "words": [WORD],
        "nbest": [],
        "online_text": "ten",
        "turns": [{"speaker": "A", "start_ms": 0, "end_ms": 300}],
        "status": "COMPLETE",
        "language": "en",
        "language_probability": 0.5,
        "final_source": "online",
        "truncated": False,
        "audio_published_at_ms": 5,
        "emitted_at_ms": 7,
        "model_name": "m",
        "model_version": "1",
    },
    "DeadLetter": {
        "service": "ingest",
        "error_type": "empty",
        "reason": "input is empty",
        "stream_id": None,
        "tenant": None,
        "source_topic": None,
        "source_partition": None,
        "source_offset": None,
        "key": None,
        "payload": None,
        "payload_size": 0,
        "failed_at_ms": 1,
    },
}


@pytest.mark.parametrize("name", serde.RECORD_TYPES)
def test_round_trip_every_record_type(name):
    data = serde.encode(name, SAMPLES[name])
    rtype, record = serde.decode(data)
    assert rtype == name
    assert record == {**SAMPLES[name], "schema_version": serde.registry().by_name(name).version}


def test_confluent_wire_format_header():
    data = serde.encode("AudioChunk", SAMPLES["AudioChunk"])
    magic, schema_id = struct.unpack(">bI", data[:5])
    assert magic == 0
    assert schema_id == serde.registry().write_id("AudioChunk")  # the registry's, once a stack configured one


def test_every_record_type_has_its_own_schema_id_and_a_version_field():
    ids = {serde.registry().by_name(n).id for n in serde.RECORD_TYPES}
    assert len(ids) == len(serde.RECORD_TYPES)
    for name in serde.RECORD_TYPES:
        schema = json.loads((SCHEMA_DIR / f"hark.{name}.avsc").read_text())
        assert "schema_version" in [f["name"] for f in schema["fields"]]


def test_model_outputs_name_their_model():
    for name in ("OnlineTranscript", "OfflineTranscript", "Result"):
        fields = [f["name"] for f in json.loads((SCHEMA_DIR / f"hark.{name}.avsc").read_text())["fields"]]
        assert {"model_name", "model_version"} <= set(fields)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "too short"),
        (b"\x02\x00\x00\x00\x01abc", "bad magic"),
        (b"\x00\x7f\xff\xff\xfe" + b"x" * 10, "unknown schema id"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(data, match):
    with pytest.raises(serde.SerdeError, match=match):
        serde.decode(data)


def test_truncated_and_padded_bodies_are_rejected():
    good = serde.encode("StreamEnd", SAMPLES["StreamEnd"])
    with pytest.raises(serde.SerdeError, match="corrupt"):
        serde.decode(good[:8])
    with pytest.raises(serde.SerdeError, match="trailing"):
        serde.decode(good + b"\x00\x00")


def test_encoding_a_bad_record_raises_serde_error():
    with pytest.raises(serde.SerdeError):
        serde.encode("AudioChunk", {**SAMPLES["AudioChunk"], "seq": "not a number"})


def test_records_written_with_an_older_schema_version_still_decode():
    """A record already in the log, written before OfflineTranscript gained ``variant`` (v2) and
    ``language_probability`` (v3)."""
    versions = serde.registry().versions("OfflineTranscript")
    old, current = versions[0], versions[-1]
    assert (old.version, current.version) == (1, 3) and old.id != current.id
    new_fields = ("variant", "language_probability")
    record = {k: v for k, v in SAMPLES["OfflineTranscript"].items() if k not in new_fields}
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, old.id))
    fastavro.schemaless_writer(buf, old.parsed, record)
    rtype, decoded = serde.decode(buf.getvalue())
    assert rtype == "OfflineTranscript"
    # the new fields' defaults
    assert decoded == {**record, "variant": "primary", "language_probability": None, "schema_version": 1}
