import io
import json
import struct

import fastavro
import pytest

from hark import records, serde
from hark.serde import SCHEMA_DIR

WORD = records.Word(word="ten", start_ms=10, end_ms=300, confidence=0.5, speaker=None)
SAMPLES = {
    "StreamStart": records.StreamStart(
        stream_id="s1",
        tenant="t",
        seq=0,
        language="en-US",
        source_format="wav/pcm_s16le",
        source_name="a.wav",
        sample_rate=16000,
        source_sample_rate=44100,
        source_channels=2,
        archive_prefix="streams/s1/",
        started_at_ms=1,
        metadata={"num_speakers": "2"},
        hotwords=["metoprolol", "lisinopril"],
    ),
    "AudioChunk": records.AudioChunk(
        stream_id="s1",
        tenant="t",
        seq=1,
        offset_samples=0,
        sample_rate=16000,
        pcm=b"\x01\x00" * 1600,
        published_at_ms=5,
    ),
    "StreamEnd": records.StreamEnd(
        stream_id="s1",
        tenant="t",
        seq=2,
        total_samples=1600,
        status="COMPLETE",
        reason=None,
        ended_at_ms=9,
    ),
    "StreamAlive": records.StreamAlive(stream_id="s1", tenant="t", seq=3, silent_ms=10000, published_at_ms=9),
    "OnlineTranscript": records.OnlineTranscript(
        stream_id="s1",
        tenant="t",
        kind="FINAL",
        utterance_id=0,
        text="ten",
        start_ms=0,
        end_ms=300,
        words=[WORD],
        nbest=[{"text": "ten", "score": -1.5}],
        lattice_key="streams/s1/lattices/000000.lat",
        end_status=None,
        audio_seq=3,
        audio_published_at_ms=5,
        emitted_at_ms=6,
        model_name="m",
        model_version="1",
    ),
    "OfflineTranscript": records.OfflineTranscript(
        stream_id="s1",
        tenant="t",
        kind="SEGMENT",
        segment_index=0,
        start_ms=0,
        end_ms=11340,
        text="Ten.",
        words=[WORD],
        nbest=[],
        language="en",
        language_probability=0.5,
        decode_ms=900,
        end_status=None,
        audio_published_at_ms=5,
        emitted_at_ms=6,
        model_name="whisper-base",
        model_version="x",
        variant="primary",
    ),
    "SpeakerTurns": records.SpeakerTurns(
        stream_id="s1",
        tenant="t",
        kind="INCREMENTAL",
        turns=[{"speaker": "SPEAKER_00", "start_ms": 0, "end_ms": 300}],
        covered_until_ms=6000,
        num_speakers=1,
        end_status=None,
        compute_ms=40,
        audio_published_at_ms=5,
        emitted_at_ms=7,
        model_name="m",
        model_version="1",
    ),
    "Result": records.Result(
        stream_id="s1",
        tenant="t",
        kind="STREAM_COMPLETE",
        source="online",
        utterance_id=-1,
        text="ten",
        start_ms=0,
        end_ms=300,
        words=[WORD],
        nbest=[],
        online_text="ten",
        turns=[{"speaker": "A", "start_ms": 0, "end_ms": 300}],
        status="COMPLETE",
        language="en",
        language_probability=0.5,
        final_source="online",
        truncated=False,
        audio_published_at_ms=5,
        emitted_at_ms=7,
        model_name="m",
        model_version="1",
    ),
    "DeadLetter": records.DeadLetter(
        service="ingest",
        error_type="empty",
        reason="input is empty",
        stream_id=None,
        tenant=None,
        source_topic=None,
        source_partition=None,
        source_offset=None,
        key=None,
        payload=None,
        payload_size=0,
        failed_at_ms=1,
    ),
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


AVRO_PY = {"string": "str", "long": "int", "int": "int", "float": "float", "double": "float", "boolean": "bool"}


def _py_type(t) -> str:
    """The Python annotation hark.records writes for an Avro type."""
    if isinstance(t, list):
        (inner,) = [x for x in t if x != "null"]
        return f"{_py_type(inner)} | None"
    if isinstance(t, dict):
        if t["type"] == "enum":
            return "str"
        if t["type"] == "array":
            items = t["items"]
            return f"list[{items.removeprefix('hark.') if items.startswith('hark.') else _py_type(items)}]"
        if t["type"] == "map":
            return f"dict[str, {_py_type(t['values'])}]"
    return AVRO_PY.get(t, t)


def test_every_schema_has_its_typed_record_with_the_same_fields():
    """hark.records has one class per schema: the same fields in the same order, the same types,
    and a field is optional there (NotRequired) exactly where its schema gives a default."""
    from hark import records

    names = sorted(p.name.removeprefix("hark.").removesuffix(".avsc") for p in SCHEMA_DIR.glob("hark.*.avsc"))
    assert len(names) >= 12
    for name in names:
        schema = json.loads((SCHEMA_DIR / f"hark.{name}.avsc").read_text())
        cls = getattr(records, name)
        want = {}
        for f in schema["fields"]:
            t = _py_type(f["type"])
            want[f["name"]] = f"NotRequired[{t}]" if "default" in f else t
        have = {k: getattr(v, "__forward_arg__", v) for k, v in cls.__annotations__.items()}
        assert have == want, name
        assert list(have) == list(want), name


def test_a_typed_record_encodes_and_reads_back():
    from hark.records import SpeakerTurns, Turn

    rec = SpeakerTurns(
        stream_id="s1",
        tenant="t1",
        kind="FULL",
        turns=[Turn(speaker="A", start_ms=0, end_ms=900)],
        covered_until_ms=900,
        num_speakers=1,
        compute_ms=3,
        audio_published_at_ms=0,
        emitted_at_ms=1,
        model_name="m",
        model_version="1",
    )
    rtype, back = serde.decode(serde.encode("SpeakerTurns", dict(rec)))
    assert rtype == "SpeakerTurns" and back == {**rec, "end_status": None, "schema_version": 1}
