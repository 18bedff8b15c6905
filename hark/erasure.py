"""Forgetting streams: erasure on request (GDPR) and archive retention.

``erase`` removes everything hark keeps of a stream outside the audio log's own retention:
- the archive: source bytes, PCM segments, lattices, meta.json (object store prefix);
- whatever local stores the caller names (the CLI: this installation's transcript index);
- a tombstone (the stream id as key, no value) on the results topic, which is compacted in
  production: Kafka drops the stream's results at the next compaction, and every captions
  server that follows the topic erases the stream from its own index when it reads it;
- an audit line (stream id, tenant, what was removed, when; no content) in
  ``<data_dir>/audit/erasures.jsonl``.
The intermediate topics (audio, transcripts, speakers) are not compacted: their records expire
with the topic retention (``HARK_TOPIC_RETENTION_HOURS``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .config import Settings
from .storage import ObjectStore, archive_prefix

log = logging.getLogger("hark.erasure")


def erase(
    settings: Settings,
    stream_id: str,
    store: ObjectStore,
    producer=None,
    reason: str = "request",
    local: dict[str, Callable[[str], int]] | None = None,
) -> dict:
    """``local``: erasers of stores of this installation beyond the archive (the caller's to know;
    the captions index, from the CLI), each returning how many entries it removed."""
    try:
        meta = json.loads(store.get(archive_prefix(stream_id) + "meta.json"))
    except KeyError:
        meta = {}
    objects = store.delete_prefix(archive_prefix(stream_id))
    removed = {name: eraser(stream_id) for name, eraser in (local or {}).items()}
    tombstones = []
    if producer is not None:
        producer.produce(settings.results_topic, key=stream_id.encode(), value=None)
        if producer.flush(10) != 0:
            raise RuntimeError(f"the tombstone for {stream_id} was not delivered")
        tombstones.append(settings.results_topic)
    entry = {
        "stream_id": stream_id,
        "tenant": meta.get("tenant"),
        "reason": reason,
        "erased_at_ms": int(time.time() * 1000),
        "archive_objects": objects,
        **removed,
        "tombstones": tombstones,
    }
    audit = Path(settings.data_dir) / "audit" / "erasures.jsonl"
    audit.parent.mkdir(parents=True, exist_ok=True)
    with open(audit, "a") as f:
        f.write(json.dumps(entry) + "\n")
    log.info("stream erased", extra={"fields": entry})
    return entry


def expired_streams(store: ObjectStore, days: float, now_ms: int | None = None) -> list[str]:
    """Archived streams that ended (or, if never ended, started) more than ``days`` ago."""
    if days <= 0:
        return []
    cutoff = (now_ms or int(time.time() * 1000)) - int(days * 86_400_000)
    out = []
    for key in store.list("streams/"):
        if not key.endswith("/meta.json") or key.count("/") != 2:
            continue
        try:
            meta = json.loads(store.get(key))
        except (KeyError, ValueError):
            continue
        when = meta.get("ended_at_ms") or meta.get("started_at_ms")
        if when is not None and when < cutoff:
            out.append(key.split("/")[1])
    return out


def retention_sweep(settings: Settings, store: ObjectStore, producer=None, now_ms: int | None = None) -> list[dict]:
    """Erase every archived stream older than ``archive_retention_days`` (0: keep forever)."""
    return [
        erase(settings, sid, store, producer, reason=f"retention {settings.archive_retention_days:g} days")
        for sid in expired_streams(store, settings.archive_retention_days, now_ms)
    ]
