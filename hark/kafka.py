"""Kafka clients with the settings every hark process shares, and hark's topics.

Producers are idempotent with acks=all: a record is acknowledged once every in-sync replica has
it, and librdkafka's retries never write it twice. Consume-transform-produce services use a
transactional producer (``transactional``) and read with read_committed, so an aborted or
unfinished transaction's records are never seen downstream (runtime.py).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from .broker import MAX_MESSAGE_BYTES
from .config import Settings

log = logging.getLogger(__name__)

# online_asr's consumer group: ingest places new streams by its assignment (the busiest pass)
ONLINE_GROUP = "hark-online-asr"


# librdkafka's own log lines ("%3|...|FAIL|... Connect to ... failed") go through Python's logging,
# not straight to stderr: a service writes them into its log as JSON like its own lines, and the
# CLI keeps them off the terminal unless asked (``hark -v``), where a broker stopping at the end of
# a run made them appear in the middle of transcripts.
CLIENT_LOG = logging.getLogger("hark.kafka.client")


def client_log(verbose: bool) -> None:
    """For a command line: the client library's lines shown (``verbose``) or dropped."""
    CLIENT_LOG.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
    if verbose and not logging.getLogger().handlers:
        logging.basicConfig(format="%(name)s %(levelname)s %(message)s")


def _base(settings: Settings) -> dict:
    conf = {"bootstrap.servers": settings.bootstrap, "client.id": "hark", "logger": CLIENT_LOG}
    conf.update(settings.kafka_extra)
    return conf


class ReportingProducer(Producer):
    """A producer that keeps its first delivery failure (and a count), so that a caller checks one
    attribute after ``flush`` before it commits or reports success. Nothing is re-sent by hand:
    the idempotent producer retries inside librdkafka, without duplicates."""

    def __init__(self, conf: dict):
        self.delivery_error: KafkaError | None = None
        self.failures = 0
        # when a connection to the brokers was last lost (monotonic; None: never), as poll() reports it
        self.broker_lost_at: float | None = None
        # the client's error reports are the client library's lines too (most are transient: a
        # broker restarting, one going away at the end of a run); errors that matter raise
        self._error_cb = conf.pop("error_cb", None) or (lambda err: CLIENT_LOG.warning("kafka: %s", err))
        super().__init__({**conf, "on_delivery": self._delivered, "error_cb": self._error})

    def _error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            self.broker_lost_at = time.monotonic()
        self._error_cb(err)

    def _delivered(self, err, _msg) -> None:
        if err is not None:
            self.failures += 1
            if self.delivery_error is None:
                self.delivery_error = err


def producer(settings: Settings, **overrides) -> ReportingProducer:
    conf = _base(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": settings.output_linger_ms,
            "message.max.bytes": MAX_MESSAGE_BYTES,
        }
    )
    conf.update(overrides)
    return ReportingProducer(conf)


def transactional(settings: Settings, transactional_id: str, **overrides) -> ReportingProducer:
    """A producer whose output becomes visible only with the input offsets it was made from.

    ``transactional_id`` is stable per replica: a restarted replica's ``init_transactions`` aborts
    what its dead predecessor left open at once, instead of read_committed readers waiting for
    ``transaction.timeout.ms``. ``retry.backoff.ms`` is short because a transaction begun right
    after a commit is refused (CONCURRENT_TRANSACTIONS) until the broker has written the commit
    markers, and librdkafka waits that long before asking again (measured: 123 ms per
    transaction at the default 100 ms, 41 ms at 5 ms, docs/decisions/exactly-once.md)."""
    return producer(
        settings,
        **{
            "transactional.id": transactional_id,
            "retry.backoff.ms": 5,
            "transaction.timeout.ms": int(settings.transaction_timeout_s * 1000),
            **overrides,
        },
    )


def consumer(settings: Settings, group: str, **overrides) -> Consumer:
    conf = _base(settings)
    conf.update(
        {
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
            "heartbeat.interval.ms": 3000,
            # a decode between two polls (a 30 s offline window, an archive fallback) is far shorter
            "max.poll.interval.ms": 600_000,
            # librdkafka prefetches up to 64 MB by default: a consumer slower than its input (the offline
            # pass on a fast-published stream) would hold that much audio. 16 MB is ~80 s of chunks;
            # a single larger message is still fetched (the fetch size grows to fit it).
            "queued.max.messages.kbytes": 16384,
            "fetch.message.max.bytes": 1024 * 1024,
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    conf.update(overrides)
    return Consumer(conf)


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record (always set on one without an error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None, "not a consumed record"
    return topic, partition, offset


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list:
    """The records already fetched (up to ``max_messages``), waiting up to ``timeout`` only while
    there are none. ``Consumer.consume(n, timeout)`` holds records until n arrive or the whole
    timeout passes, which would add up to the timeout to every hop of the pipeline."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)]


def tail_consumer(
    settings: Settings, topic: str, from_beginning: bool = False, offsets: dict[int, int] | None = None
) -> Consumer:
    """A group-less read_committed reader of every partition, positioned at the end (or the
    beginning) before anything is published. ``offsets`` (partition -> next offset) resumes where
    a reader that stores its own positions stopped; partitions not in it start at the beginning."""
    c = Consumer(
        {
            **_base(settings),
            "group.id": f"hark-tail-{time.time_ns()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
        }
    )
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
    """Every topic expires by time; audio, the bulk, also by size per partition. The results topic
    is keyed by stream and compacted too, so an erasure tombstone removes the stream's results."""
    conf = {
        "retention.ms": str(int(settings.topic_retention_hours * 3_600_000)),
        "max.message.bytes": str(MAX_MESSAGE_BYTES),
        "min.insync.replicas": str(min(2, settings.replication_factor)),
    }
    if topic == settings.audio_topic and settings.audio_retention_mb > 0:
        conf["retention.bytes"] = str(int(settings.audio_retention_mb * 1024 * 1024))
    if topic == settings.results_topic:
        conf["cleanup.policy"] = "compact,delete"
    return conf


def tenant_topic_config(settings: Settings, topic: str) -> dict[str, str]:
    """A tenant's topics are keyed by stream and compacted with a bounded lag, so an erasure
    tombstone removes the stream's plain records (segments roll at that age too: compaction never
    touches the active one). The published tier's lag is short (HARK_PUBLISHED_COMPACTION_LAG_S);
    the produce topic's is also its minimum (HARK_PRODUCE_COMPACTION_LAG_S), since compaction
    keeps one record per key and ingest must read every chunk of a stream before that."""
    produce = topic.startswith(settings.topic("audio-in."))
    conf = topic_config(settings, settings.audio_topic if produce else topic)
    lag_s = settings.produce_compaction_lag_s if produce else settings.published_compaction_lag_s
    lag_ms = str(int(lag_s * 1000))
    conf.update({"cleanup.policy": "compact,delete", "max.compaction.lag.ms": lag_ms, "segment.ms": lag_ms})
    if produce:
        conf["min.compaction.lag.ms"] = lag_ms
    return conf


def ensure_tenant_topics(settings: Settings, tenant: str, produce: bool = True, timeout: float = 30.0) -> None:
    """Create a tenant's published topic (and its produce topic) unless they exist."""
    topics = [settings.published_topic(tenant)] + ([settings.produce_topic(tenant)] if produce else [])
    _create(settings, topics, lambda t: tenant_topic_config(settings, t), timeout)


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create hark's topics explicitly (the broker does not auto-create them). A principal without
    the right to create (a service on a secured broker, which sees only its own topics) leaves
    that to the stack's owner, who creates them before any service starts."""
    _create(settings, settings.all_topics, lambda t: topic_config(settings, t), timeout)


def _create(settings: Settings, topics: list[str], config, timeout: float) -> None:
    adm = admin(settings)
    existing = set(adm.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(
            t, num_partitions=settings.partitions, replication_factor=settings.replication_factor, config=config(t)
        )
        for t in topics
        if t not in existing
    ]
    if not new:
        return
    for _topic, fut in adm.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result()
        except KafkaException as e:
            if e.args[0].code() not in (KafkaError.TOPIC_ALREADY_EXISTS, KafkaError.TOPIC_AUTHORIZATION_FAILED):
                raise


def topic_partitions(settings: Settings, timeout: float = 5.0) -> dict[str, int]:
    md = admin(settings).list_topics(timeout=timeout)
    return {t: len(md.topics[t].partitions) for t in settings.all_topics if t in md.topics}


def group_lag(settings: Settings, groups: list[str], timeout: float = 10.0) -> dict[str, dict]:
    """Per consumer group: its committed offset, the partition's end and the lag, per partition of
    every topic it has committed on (read_committed ends: what a member can read)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, IsolationLevel
    from confluent_kafka.admin import OffsetSpec

    adm = admin(settings)
    out: dict[str, dict] = {}
    for group in groups:  # the admin API takes one group per request
        try:
            fut = adm.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=timeout)[group]
            committed = [tp for tp in fut.result().topic_partitions if tp.offset >= 0]
        except KafkaException as e:
            out[group] = {"error": str(e)}
            continue
        if not committed:
            out[group] = {"partitions": [], "lag": 0}
            continue
        ends = adm.list_offsets(
            {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in committed},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=timeout,
        )
        rows = []
        for tp in committed:
            end = ends[TopicPartition(tp.topic, tp.partition)].result().offset
            rows.append(
                {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "committed": tp.offset,
                    "end": end,
                    "lag": max(0, end - tp.offset),
                }
            )
        out[group] = {
            "partitions": sorted(rows, key=lambda r: (r["topic"], r["partition"])),
            "lag": sum(r["lag"] for r in rows),
        }
    return out


def group_assignment(adm: AdminClient, group: str, topic: str, timeout: float) -> list[frozenset[int]]:
    """The partitions of ``topic`` that each member of a consumer group holds now (an empty list:
    no members yet, or a rebalance under way). Raises KafkaException."""
    desc = adm.describe_consumer_groups([group], request_timeout=timeout)[group].result()
    members = [m.assignment.topic_partitions if m.assignment else [] for m in desc.members]
    return [frozenset(tp.partition for tp in tps if tp.topic == topic) for tps in members]


def wait_for_broker(settings: Settings, timeout: float = 30.0, brokers: int = 1) -> None:
    """Until the cluster answers metadata requests with at least ``brokers`` registered brokers."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            md = admin(settings).list_topics(timeout=2)
            if len(md.brokers) >= brokers:
                return
        except KafkaException as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"no Kafka broker at {settings.bootstrap}: {last}")
