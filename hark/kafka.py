"""Kafka clients with the settings every hark process shares.

Defaults are chosen to work on both real Kafka and the embedded Tansu broker: group join on
Tansu waits session.timeout.ms/2, so the session timeout is short; fetch waits are short
because Tansu does not wake a waiting fetch when data arrives (STACK.md).
"""
from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from .config import Settings

# A 30 s PCM window, a Result carrying a long transcript: keep above the defaults.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def _base(settings: Settings) -> dict:
    conf = {"bootstrap.servers": settings.bootstrap, "client.id": "hark"}
    conf.update(settings.kafka_extra)
    return conf


def producer(settings: Settings, **overrides) -> Producer:
    conf = _base(settings)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.max.bytes": MAX_MESSAGE_BYTES,
    })
    conf.update(overrides)
    return Producer(conf)


def consumer(settings: Settings, group: str, **overrides) -> Consumer:
    conf = _base(settings)
    conf.update({
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "fetch.wait.max.ms": settings.fetch_wait_ms,
        # librdkafka prefetches up to 64 MB by default: a consumer slower than its input (the offline
        # pass on a fast-published stream) would hold that much audio. 16 MB is ~80 s of chunks;
        # a single larger message is still fetched (the fetch size grows to fit it).
        "queued.max.messages.kbytes": 16384,
        "fetch.message.max.bytes": 1024 * 1024,
        "partition.assignment.strategy": "cooperative-sticky",
    })
    conf.update(overrides)
    return Consumer(conf)


def tail_consumer(settings: Settings, topic: str, from_beginning: bool = False,
                  offsets: dict[int, int] | None = None) -> Consumer:
    """A group-less reader of every partition, positioned at the end (or the beginning).

    Used by `hark tail` and `hark run`: it must be positioned before anything is published,
    and a group join would take seconds on Tansu. Tansu reports a high watermark that can lag
    the true end, so "end" may replay a few older records; callers filter by stream id.
    ``offsets`` (partition -> next offset) resumes where a reader that stores its own positions
    stopped; partitions not in it start at the beginning.
    """
    c = Consumer({**_base(settings), "group.id": f"hark-tail-{time.time_ns()}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": settings.fetch_wait_ms,
                  "fetch.message.max.bytes": MAX_MESSAGE_BYTES})
    md = c.list_topics(topic, timeout=10)
    parts = md.topics[topic].partitions
    if not parts:
        raise KafkaException(f"topic {topic} has no partitions (is the stack up?)")
    tps = []
    for p in parts:
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if offsets is not None:
            tps.append(TopicPartition(topic, p, max(lo, offsets.get(p, lo))))
        else:
            tps.append(TopicPartition(topic, p, lo if from_beginning else hi))
    c.assign(tps)
    return c


def admin(settings: Settings) -> AdminClient:
    return AdminClient(_base(settings))


def topic_config(settings: Settings, topic: str) -> dict[str, str]:
    """Retention for every topic; the results topic, keyed by stream, is also compacted so that an
    erasure tombstone removes the stream's results (Tansu accepts but does not enforce these)."""
    conf = {"retention.ms": str(int(settings.topic_retention_hours * 3_600_000)),
            "max.message.bytes": str(MAX_MESSAGE_BYTES)}
    if topic == settings.results_topic:
        conf["cleanup.policy"] = "compact,delete"
    return conf


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create hark's topics explicitly (auto-creation would give the broker's default partitions)."""
    adm = admin(settings)
    existing = set(adm.list_topics(timeout=timeout).topics)
    new = [NewTopic(t, num_partitions=settings.partitions, replication_factor=settings.replication_factor,
                    config=topic_config(settings, t))
           for t in settings.all_topics if t not in existing]
    if not new:
        return
    for topic, fut in adm.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result()
        except KafkaException as e:
            if e.args[0].code() != e.args[0].TOPIC_ALREADY_EXISTS:
                raise


def topic_partitions(settings: Settings, timeout: float = 5.0) -> dict[str, int]:
    md = admin(settings).list_topics(timeout=timeout)
    return {t: len(md.topics[t].partitions) for t in settings.all_topics if t in md.topics}


def wait_for_broker(settings: Settings, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin(settings).list_topics(timeout=2)
            return
        except KafkaException as e:
            last = e
            time.sleep(0.1)
    raise TimeoutError(f"no Kafka broker at {settings.bootstrap}: {last}")
