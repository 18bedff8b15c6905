"""Forgetting streams: erasure on request (GDPR) and archive retention.

``erase`` makes everything hark kept of a stream unreadable, and removes what it can:
- the stream's data key (hark/keys.py): every record of it in every topic, dead letters included,
  and every archived object was sealed with it, so every copy (replicas, backups) is ciphertext
  without a key from here on; the id is marked erased and refused if published again;
- an ERASED end on the stream's audio partition: a live stream stops (ingest refuses its next
  audio within a second), and the services drop what they hold of it, publishing nothing more;
- the archive: source bytes, PCM segments, lattices, meta.json (object store prefix);
- whatever local stores the caller names (the CLI: this installation's transcript index);
- a tombstone (the stream id as key, no value) on the results topic, which is compacted in
  production: Kafka drops the stream's results at the next compaction, and every captions
  server that follows the topic erases the stream from its own index when it reads it;
- a tombstone on the tenant's published topic (hark/published.py), compacted with a bounded lag
  (HARK_PUBLISHED_COMPACTION_LAG_S): the plain copies go at the next compaction, and a sink
  that deletes on tombstones (Kafka Connect's JDBC sink with delete.enabled) deletes its row.
  The same on the tenant's produce topic, where its own producer's plain audio is compacted
  away after HARK_PRODUCE_COMPACTION_LAG_S. The tenant comes from the archive's meta.json; a
  stream whose archive is gone gets no tombstone there (writing one on every tenant's topic would
  show its id to all of them);
- an audit line (stream id, tenant, what was removed, when; no content) in
  ``<data_dir>/audit/erasures.jsonl``.
The intermediate topics (audio, transcripts, speakers) are not compacted: their sealed records
expire with the topic retention (``HARK_TOPIC_RETENTION_HOURS``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from . import records, serde
from .config import Settings
from .keys import Keyring, StreamErased
from .storage import ObjectStore, archive_prefix

log = logging.getLogger("hark.erasure")


def erase(
    settings: Settings,
    stream_id: str,
    store: ObjectStore,
    producer=None,
    reason: str = "request",
    local: dict[str, Callable[[str], int]] | None = None,
    keys: Keyring | None = None,
) -> dict:
    """``store``: the archive (sealed or not: meta.json is read through it). ``local``: erasers of
    stores of this installation beyond the archive (the caller's to know; the captions index, from
    the CLI), each returning how many entries it removed."""
    keys = keys or Keyring.for_settings(settings)
    try:
        meta = json.loads(store.get(archive_prefix(stream_id) + "meta.json"))
    except (KeyError, StreamErased, ValueError):
        meta = {}
    key_deleted = keys.erase(stream_id)  # from here on every sealed copy is unreadable
    objects = store.delete_prefix(archive_prefix(stream_id))
    removed = {name: eraser(stream_id) for name, eraser in (local or {}).items()}
    tombstones = []
    if producer is not None:
        _announce(settings, producer, stream_id, meta)
        tombstones = [settings.results_topic, *_tenant_topics(settings, producer, meta.get("tenant"))]
        for topic in tombstones:
            for partition in _partitions(settings, producer, topic, meta):
                producer.produce(topic, key=stream_id.encode(), value=None, partition=partition)
        if producer.flush(10) != 0:
            raise RuntimeError(f"the erasure of {stream_id} was not delivered to the broker")
    entry = {
        "kind": "stream",  # the audit log also records voiceprints erased (hark/voices.py)
        "stream_id": stream_id,
        "tenant": meta.get("tenant"),
        "reason": reason,
        "erased_at_ms": records.now_ms(),
        "key_deleted": key_deleted,
        "archive_objects": objects,
        **removed,
        "tombstones": tombstones,
    }
    audit(settings, entry)
    log.info("stream erased", extra={"fields": entry})
    return entry


def _partitions(settings: Settings, producer, topic: str, meta: dict) -> list[int]:
    """Where the stream's records are on ``topic``: hark's own (results, published) by this
    client's partitioner (-1); a tenant's produce topic by the partition ingest read the stream's
    start from, since its producer's partitioner may be another (Java's murmur2), else all."""
    if not topic.startswith(settings.topic("audio-in.")):
        return [-1]
    origin = str((meta.get("metadata") or {}).get("kafka_origin") or "")
    if origin.startswith(topic + ":"):
        return [int(origin[len(topic) + 1 :].split(":")[0])]
    md = producer.list_topics(topic, timeout=10).topics[topic]
    return sorted(md.partitions)


def _tenant_topics(settings: Settings, producer, tenant: str | None) -> list[str]:
    """The tenant's published and produce topics, where they exist (nothing of the stream is on
    one that does not)."""
    out = []
    for topic in [settings.published_topic(tenant), settings.produce_topic(tenant)] if tenant else []:
        md = producer.list_topics(topic, timeout=10).topics.get(topic)
        if md is not None and md.error is None and md.partitions:
            out.append(topic)
    return out


def audit(settings: Settings, entry: dict) -> None:
    """One line, without content, in ``<data_dir>/audit/erasures.jsonl`` (streams and voices)."""
    path = Path(settings.data_dir) / "audit" / "erasures.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _announce(settings: Settings, producer, stream_id: str, meta: dict) -> None:
    """The ERASED end, unsealed (the key is gone; it says only that the stream ended), on the
    stream's audio partition, after its last chunk (-1: the key's hash, as ingest placed it); on
    every partition when that is unknown."""
    record = records.StreamEnd(
        stream_id=stream_id,
        tenant=meta.get("tenant") or "",
        seq=0,
        total_samples=0,
        status="ERASED",
        reason="erased",
        ended_at_ms=records.now_ms(),
    )
    value = serde.encode("StreamEnd", record)
    if "audio_partition" not in meta:
        md = producer.list_topics(settings.audio_topic, timeout=10).topics.get(settings.audio_topic)
        partitions = sorted(md.partitions) if md is not None and md.partitions else [-1]
    else:
        partitions = [int(meta["audio_partition"])]
    for p in partitions:
        producer.produce(settings.audio_topic, key=stream_id.encode(), value=value, partition=p)


def expired_streams(store: ObjectStore, days: float, now_ms: int | None = None) -> list[str]:
    """Archived streams that ended (or, if never ended, started) more than ``days`` ago."""
    if days <= 0:
        return []
    cutoff = (now_ms or records.now_ms()) - int(days * 86_400_000)
    out = []
    for key in store.list("streams/"):
        if not key.endswith("/meta.json") or key.count("/") != 2:
            continue
        try:
            meta = json.loads(store.get(key))
        except (KeyError, ValueError, StreamErased):
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
