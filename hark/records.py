"""hark's records, one class per Avro schema in schemas/, and the facts every record shares (ids,
clocks).

Each class is a TypedDict: built with keywords (``Turn(speaker="A", start_ms=0, end_ms=900)``),
it is the plain dict that serde encodes and every reader decodes, and mypy checks its fields
where it is built. A field with a default in its schema is NotRequired (Avro writes the
default). tests/test_serde.py checks every class against its .avsc: same fields, same order,
same types, the same ones optional.

Results come from ``result_record``: the results service merges finals, speaker turns and the
offline pass, and online_asr writes its PARTIAL caption updates itself (docs/architecture.md);
both build them there, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict


class Word(TypedDict):
    """schemas/hark.Word.avsc: One recognised word with stream-relative times."""

    word: str
    start_ms: int
    end_ms: int
    confidence: float
    speaker: NotRequired[str | None]


class Turn(TypedDict):
    """schemas/hark.Turn.avsc: A speaker turn."""

    speaker: str
    start_ms: int
    end_ms: int


class Hypothesis(TypedDict):
    """schemas/hark.Hypothesis.avsc: One entry of an n-best list."""

    text: str
    score: float


class StreamStart(TypedDict):
    """schemas/hark.StreamStart.avsc: First record of a stream on the audio topic."""

    stream_id: str
    tenant: str
    seq: int
    language: NotRequired[str]
    source_format: str
    source_name: NotRequired[str | None]
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    archive_prefix: NotRequired[str | None]
    started_at_ms: int
    metadata: NotRequired[dict[str, str]]
    hotwords: NotRequired[list[str]]
    schema_version: NotRequired[int]


class AudioChunk(TypedDict):
    """schemas/hark.AudioChunk.avsc: A slice of 16 kHz mono s16le PCM."""

    stream_id: str
    tenant: str
    seq: int
    offset_samples: int
    sample_rate: int
    pcm: bytes
    published_at_ms: int
    schema_version: NotRequired[int]


class StreamAlive(TypedDict):
    """schemas/hark.StreamAlive.avsc: A live stream is still open while its client sends no audio (a pause): keeps the services from closing it as idle."""

    stream_id: str
    tenant: str
    seq: int
    silent_ms: int
    published_at_ms: int
    schema_version: NotRequired[int]


class StreamEnd(TypedDict):
    """schemas/hark.StreamEnd.avsc: Last record of a stream on the audio topic."""

    stream_id: str
    tenant: str
    seq: int
    total_samples: int
    status: str
    reason: NotRequired[str | None]
    ended_at_ms: int
    schema_version: NotRequired[int]


class OnlineTranscript(TypedDict):
    """schemas/hark.OnlineTranscript.avsc: Streaming decoder output for one utterance."""

    stream_id: str
    tenant: str
    kind: str
    utterance_id: int
    text: str
    start_ms: int
    end_ms: int
    words: NotRequired[list[Word]]
    nbest: NotRequired[list[Hypothesis]]
    lattice_key: NotRequired[str | None]
    end_status: NotRequired[str | None]
    audio_seq: int
    audio_published_at_ms: int
    emitted_at_ms: int
    model_name: str
    model_version: str
    schema_version: NotRequired[int]


class OfflineTranscript(TypedDict):
    """schemas/hark.OfflineTranscript.avsc: Full-context decoder output for one window of a stream."""

    stream_id: str
    tenant: str
    kind: str
    segment_index: int
    start_ms: int
    end_ms: int
    text: str
    words: NotRequired[list[Word]]
    nbest: NotRequired[list[Hypothesis]]
    language: str
    language_probability: NotRequired[float | None]
    decode_ms: int
    end_status: NotRequired[str | None]
    audio_published_at_ms: int
    emitted_at_ms: int
    model_name: str
    model_version: str
    variant: NotRequired[str]
    schema_version: NotRequired[int]


class SpeakerTurns(TypedDict):
    """schemas/hark.SpeakerTurns.avsc: Who spoke when in a stream, from the diarizer."""

    stream_id: str
    tenant: str
    kind: str
    turns: NotRequired[list[Turn]]
    covered_until_ms: int
    num_speakers: int
    end_status: NotRequired[str | None]
    compute_ms: int
    audio_published_at_ms: int
    emitted_at_ms: int
    model_name: str
    model_version: str
    schema_version: NotRequired[int]


class Result(TypedDict):
    """schemas/hark.Result.avsc: Everything known about a stream, merged; what downstream consumers read."""

    stream_id: str
    tenant: str
    kind: str
    source: str
    utterance_id: int
    text: str
    start_ms: int
    end_ms: int
    words: NotRequired[list[Word]]
    nbest: NotRequired[list[Hypothesis]]
    online_text: NotRequired[str | None]
    turns: NotRequired[list[Turn]]
    status: NotRequired[str | None]
    final_source: NotRequired[str | None]
    language: NotRequired[str | None]
    language_probability: NotRequired[float | None]
    truncated: NotRequired[bool]
    audio_published_at_ms: int
    emitted_at_ms: int
    model_name: str
    model_version: str
    schema_version: NotRequired[int]


class DeadLetter(TypedDict):
    """schemas/hark.DeadLetter.avsc: A record or input that could not be processed, with the reason."""

    service: str
    error_type: str
    reason: str
    stream_id: NotRequired[str | None]
    tenant: NotRequired[str | None]
    source_topic: NotRequired[str | None]
    source_partition: NotRequired[int | None]
    source_offset: NotRequired[int | None]
    key: NotRequired[bytes | None]
    payload: NotRequired[bytes | None]
    payload_size: int
    failed_at_ms: int
    schema_version: NotRequired[int]


def now_ms() -> int:
    """Wall-clock milliseconds: the time base of every *_at_ms field."""
    return time.time_ns() // 1_000_000


# What a stream id may be: ingest refuses any other, and the key store and archive name files by it.
STREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_stream_id(hint: str = "stream") -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._")[:80] or "stream"
    return f"{base}-{uuid.uuid4().hex[:8]}"


def result_record(rec: Mapping[str, Any], kind: str, source: str, index: int, **fields) -> Result:
    """A Result (kind, source, utterance/segment ``index``) from an Online/OfflineTranscript
    record; ``fields`` (Result's own field names) override what it takes from ``rec``."""
    unknown = set(fields) - set(Result.__annotations__)
    if unknown:
        raise TypeError(f"not fields of Result: {sorted(unknown)}")
    out = Result(
        stream_id=rec["stream_id"],
        tenant=rec["tenant"],
        kind=kind,
        source=source,
        utterance_id=index,
        text=rec["text"],
        start_ms=rec["start_ms"],
        end_ms=rec["end_ms"],
        words=rec["words"],
        nbest=rec["nbest"],
        online_text=None,
        turns=[],
        status=None,
        final_source=None,
        language=rec.get("language"),
        language_probability=rec.get("language_probability"),
        truncated=False,
        audio_published_at_ms=rec["audio_published_at_ms"],
        emitted_at_ms=now_ms(),
        model_name=rec["model_name"],
        model_version=rec["model_version"],
    )
    out.update(fields)  # type: ignore[typeddict-item]
    return out
