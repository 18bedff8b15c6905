"""Facts every record shares (ids, clocks) and the Result records that more than one service
writes onto the results topic.

The results service merges finals, speaker turns and the offline pass; online_asr writes its
PARTIAL caption updates there itself (docs/architecture.md). Both build them here so the two
cannot drift apart.
"""

from __future__ import annotations

import re
import time
import uuid


def now_ms() -> int:
    """Wall-clock milliseconds: the time base of every *_at_ms field."""
    return time.time_ns() // 1_000_000


# What a stream id may be: ingest refuses any other, and the key store and archive name files by it.
STREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_stream_id(hint: str = "stream") -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._")[:80] or "stream"
    return f"{base}-{uuid.uuid4().hex[:8]}"


def result_record(rec: dict, kind: str, source: str, index: int, **fields) -> dict:
    """A Result (kind, source, utterance/segment ``index``) from an Online/OfflineTranscript record."""
    out = {
        "stream_id": rec["stream_id"],
        "tenant": rec["tenant"],
        "kind": kind,
        "source": source,
        "utterance_id": index,
        "text": rec["text"],
        "start_ms": rec["start_ms"],
        "end_ms": rec["end_ms"],
        "words": rec["words"],
        "nbest": rec["nbest"],
        "online_text": None,
        "turns": [],
        "status": None,
        "final_source": None,
        "language": rec.get("language"),
        "language_probability": rec.get("language_probability"),
        "truncated": False,
        "audio_published_at_ms": rec["audio_published_at_ms"],
        "emitted_at_ms": now_ms(),
        "model_name": rec["model_name"],
        "model_version": rec["model_version"],
    }
    out.update(fields)
    return out
