"""The published tier's logic without a broker: which Results are published, and which quiet
partitions get a nudge so compaction can reach an erased stream."""

from __future__ import annotations

import io
import json

import fastavro

from hark import published, serde
from hark.records import Result, result_record


def transcript(kind: str = "FINAL") -> Result:
    rec = {
        "stream_id": "s-1", "tenant": "acme", "text": "hello there", "start_ms": 0, "end_ms": 900,
        "words": [{"word": "hello", "start_ms": 0, "end_ms": 400, "confidence": 0.5, "speaker": None}],
        "nbest": [], "language": "en", "audio_published_at_ms": 5, "model_name": "m", "model_version": "1",
    }  # fmt: skip
    return result_record(rec, kind, "online", 3)


def test_partials_alternatives_and_speakers_are_not_published():
    for kind in ("PARTIAL", "ALTERNATIVES", "SPEAKERS"):
        assert published.record(transcript(kind)) is None


def test_a_final_and_a_complete_transcript_fit_the_published_schema():
    schema = serde.published_schemas()[published.SUBJECT]
    final = published.record(transcript("FINAL"))
    assert final is not None
    assert final["kind"] == "FINAL" and final["final_source"] == "online" and final["turns"] == []
    assert final["status"] is None and final["utterance_id"] == 3
    done = transcript("STREAM_COMPLETE")
    done.update(final_source="offline", status="COMPLETE", turns=[{"speaker": "A", "start_ms": 0, "end_ms": 900}])
    complete = published.record(done)
    assert complete is not None
    assert complete["kind"] == "COMPLETE" and complete["final_source"] == "offline" and complete["turns"]
    for rec in (final, complete):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, rec)
        buf.seek(0)
        assert fastavro.schemaless_reader(buf, schema) == rec


def test_the_published_schema_is_self_contained_with_a_doc_for_every_field():
    """Other teams read it from the registry alone: nothing may refer to hark's internal types."""
    text = serde.schema_json(serde.published_schemas()[published.SUBJECT])
    assert "hark.Word" not in text and "hark.Turn" not in text
    fields = json.loads(text)["fields"]
    assert all(f.get("doc") for f in fields)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_partition_is_nudged_once_after_it_falls_quiet_for_the_lag():
    clock, ends = Clock(), {("t", 0): 5, ("t", 1): 0}
    nudges = published.Nudges(10.0, lambda: dict(ends), clock)
    assert nudges.due() == []  # first look
    clock.now = 9.9
    assert nudges.due() == []
    clock.now = 10.0
    assert nudges.due() == [("t", 0)]  # the empty partition never needs one
    ends[("t", 0)] = 6  # what the nudge itself wrote
    for clock.now in (11.0, 30.0, 60.0):
        assert nudges.due() == []


def test_new_records_after_a_nudge_earn_another_and_a_busy_partition_none():
    clock, ends = Clock(), {("t", 0): 5}
    nudges = published.Nudges(10.0, lambda: dict(ends), clock)
    nudges.due()
    clock.now = 10.0
    assert nudges.due() == [("t", 0)]
    ends[("t", 0)] = 8  # the nudge and two records more
    for step in range(1, 6):  # records keep coming: the segment rolls by itself
        clock.now = 10.0 + step * 5
        ends[("t", 0)] += 1
        assert nudges.due() == []
    clock.now += 10
    assert nudges.due() == [("t", 0)]


def test_a_deleted_topic_is_forgotten():
    clock, ends = Clock(), {("t", 0): 5, ("u", 0): 2}
    nudges = published.Nudges(10.0, lambda: dict(ends), clock)
    nudges.due()
    del ends[("u", 0)]
    clock.now = 10.0
    assert nudges.due() == [("t", 0)]
    assert ("u", 0) not in nudges._seen
