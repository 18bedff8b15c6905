"""The published tier: each tenant's transcripts as plain Confluent-framed Avro on its own topic.

The internal topics stay sealed per stream (hark/serde.py), readable by hark's services only. What
the tenant's own consumers read (a Java team's service, Kafka Connect into a database, ksqlDB) is
``<prefix>published.<tenant>``: magic byte 0, the schema registry's 4-byte id, an Avro body of
``schemas/published/hark.published.Transcript.avsc``; the key is the stream id as UTF-8, so a
stream's records stay in order on one partition. A client login from ``hark clients create
--consume`` reads its tenant's topic and no other (the broker's ACLs).

What is published, per stream, in the order the results topic has it:
- ``FINAL``: a finished segment while the stream runs, from the online pass (``final_source``
  online: seconds after it is spoken), a draft of the offline pass (provisional) or the offline
  pass itself (offline: full context, more accurate). Segments are numbered per source; an
  offline segment supersedes the online and provisional text of the time it covers. These
  records carry the header ``hark.final`` so a sink that wants one row per stream can drop them
  with Kafka Connect's stock Filter and HasHeaderKey.
- ``COMPLETE``: the whole transcript once the stream ended, words with speakers and the turns;
  the last record of its key.
- a tombstone (null value) when the stream is erased (hark/erasure.py).
Partials are left out: they change several times a second, and the captions page and the
results topic serve them live; a compacted topic of them would be churn for every sink.

The topic is compacted (``compact,delete``, HARK_PUBLISHED_COMPACTION_LAG_S bounding the lag):
a late reader finds each closed stream's COMPLETE record, and an erased stream's records go at
the next compaction after its tombstone. Kafka never cleans a partition's active segment, and
rolls it only when a record arrives: a quiet partition would keep an erased stream's plain
transcript for ever. ``Nudges`` closes that gap: a partition that got records and then fell
quiet for the lag gets one empty-keyed tombstone (a no-op for any reader: no stream has an empty
id), which rolls the segment so the cleaner can reach what the tombstone before it erased.

The value is written with confluent-kafka's own AvroSerializer, auto-registration off: the
schema must be the registered one (serde.register_schemas), exactly what a stock client meets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import kafka, serde
from .config import Settings
from .languages import UNDETERMINED

log = logging.getLogger("hark.published")

SUBJECT = "hark.published.Transcript"
FINAL_HEADER = "hark.final"


def record(result: Mapping[str, Any]) -> dict | None:
    """The published record of a Result; None for the kinds that are not published."""
    kind = {"FINAL": "FINAL", "STREAM_COMPLETE": "COMPLETE"}.get(str(result["kind"]))
    if kind is None:
        return None
    complete = kind == "COMPLETE"
    return {
        "stream_id": result["stream_id"],
        "tenant": result["tenant"],
        "kind": kind,
        "utterance_id": result["utterance_id"],
        "text": result["text"],
        "start_ms": result["start_ms"],
        "end_ms": result["end_ms"],
        "words": [
            {k: w.get(k) for k in ("word", "start_ms", "end_ms", "confidence", "speaker")} for w in result["words"]
        ],
        "turns": list(result["turns"]) if complete else [],
        "status": result.get("status") if complete else None,
        # the contract's language is one detected or given: "und" (no speech, an unsure guess) is null
        "language": None if result.get("language") == UNDETERMINED else result.get("language"),
        "final_source": result.get("final_source") if complete else result.get("source"),
        "model_name": result["model_name"],
        "model_version": result["model_version"],
        "audio_published_at_ms": result["audio_published_at_ms"],
        "emitted_at_ms": result["emitted_at_ms"],
        "schema_version": 1,
    }


class Publisher:
    """Turns Results into published messages, for the tenants whose published topic exists: it is
    made by ``hark clients create`` (a tenant with no login has no reader), so no producer that
    names a tenant in open access makes a topic, and tenant names that Kafka would take for the
    same topic (``a.b``, ``a_b``) fail there, at the command, not here. A topic made now is found
    within ``published_topics_s``."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        from confluent_kafka.schema_registry import record_subject_name_strategy
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        self.settings, self._clock = settings, clock
        conf = {
            "auto.register.schemas": False,
            "use.latest.version": False,
            "subject.name.strategy": record_subject_name_strategy,
        }
        schema = serde.schema_json(serde.published_schemas()[SUBJECT])
        self._serialize = AvroSerializer(serde.registry_client(settings), schema, conf=conf)
        self._context = lambda topic: SerializationContext(topic, MessageField.VALUE)
        # the registry's id now, at the service's start, not in the middle of a transaction
        self._serialize(_SAMPLE, self._context(settings.published_topic("-")))
        self._topics: frozenset[str] = frozenset()
        self._listed_at = -settings.published_topics_s

    def message(self, result: Mapping[str, Any]) -> tuple[str, bytes, bytes, list[tuple[str, bytes]]] | None:
        """(topic, key, value, headers) of a Result's published record; None for a kind that is
        not published or a tenant without a published topic."""
        rec = record(result)
        if rec is None:
            return None
        topic = self.settings.published_topic(rec["tenant"])
        if topic not in self.topics():
            return None
        value = self._serialize(rec, self._context(topic))
        assert value is not None
        headers = [(FINAL_HEADER, b"1")] if rec["kind"] == "FINAL" else []
        return topic, rec["stream_id"].encode(), value, headers

    def topics(self) -> frozenset[str]:
        """The published topics that exist (listed at most every ``published_topics_s``; a broker that does not
        answer keeps the last list)."""
        if self._clock() - self._listed_at >= self.settings.published_topics_s:
            self._listed_at = self._clock()
            prefix = self.settings.topic("published.")
            try:
                listed = kafka.admin(self.settings).list_topics(timeout=5).topics
            except Exception as e:  # KafkaException: the next look tries again
                log.warning("cannot list the published topics: %s", e)
            else:
                self._topics = frozenset(t for t in listed if t.startswith(prefix))
        return self._topics


_SAMPLE = {
    "stream_id": "-", "tenant": "-", "kind": "COMPLETE", "utterance_id": -1, "text": "", "start_ms": 0,
    "end_ms": 0, "words": [], "turns": [], "status": None, "language": None, "final_source": None,
    "model_name": "", "model_version": "", "audio_published_at_ms": 0, "emitted_at_ms": 0, "schema_version": 1,
}  # fmt: skip


Partition = tuple[str, int]


class Nudges:
    """Which published partitions need an empty-keyed tombstone now (module doc). ``ends`` reads
    every published partition's end offset; this class keeps two numbers per partition."""

    def __init__(self, lag_s: float, ends: Callable[[], dict[Partition, int]], clock=time.monotonic):
        self.lag_s, self._ends, self._clock = lag_s, ends, clock
        self._seen: dict[Partition, tuple[int, float]] = {}  # end offset, when it last moved
        self._nudged: dict[Partition, int] = {}  # the end offset our last nudge made (sent unbatched,
        # outside any transaction: exactly one offset, no commit marker)

    def due(self) -> list[Partition]:
        now, out = self._clock(), []
        ends = self._ends()
        for tp, end in ends.items():
            last = self._seen.get(tp)
            if last is None or last[0] != end:
                self._seen[tp] = (end, now)
                continue
            if now - last[1] >= self.lag_s and end > 0 and self._nudged.get(tp) != end:
                out.append(tp)
                self._nudged[tp] = end + 1  # what our nudge (one plain record) leaves: not a reason for another
        for tp in [tp for tp in self._seen if tp not in ends]:  # deleted topics
            self._seen.pop(tp)
            self._nudged.pop(tp, None)
        return out


def end_offsets(settings: Settings, timeout: float = 10.0) -> dict[Partition, int]:
    """The partition end offsets of every tenant topic, published and produce (both compacted
    with a bounded lag): one metadata and one ListOffsets call."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    adm = kafka.admin(settings)
    prefixes = (settings.topic("published."), settings.topic("audio-in."))
    md = adm.list_topics(timeout=timeout)
    tps = [TopicPartition(t, p) for t, tm in md.topics.items() if t.startswith(prefixes) for p in tm.partitions]
    if not tps:
        return {}
    futures = adm.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout)
    return {(tp.topic, tp.partition): fut.result().offset for tp, fut in futures.items()}


def enabled(settings: Settings) -> bool:
    """The tier needs a registry: its ids are what a stock client looks up."""
    return bool(settings.schema_registry_url)
