"""Kafka clients with the settings every hark process shares.

Defaults are chosen to work on both real Kafka and the embedded Tansu broker: group join on
Tansu waits session.timeout.ms/2, so the session timeout is short; fetch waits are short
because Tansu does not wake a waiting fetch when data arrives (STACK.md).
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from .config import Settings

log = logging.getLogger(__name__)

# A 30 s PCM window, a Result carrying a long transcript: keep above the defaults.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def _base(settings: Settings) -> dict:
    conf = {"bootstrap.servers": settings.bootstrap, "client.id": "hark"}
    conf.update(settings.kafka_extra)
    return conf


class GuardedProducer(Producer):
    """An idempotent producer that keeps its delivery failures and re-sends what the broker may
    have acknowledged without writing.

    Callers check ``failures`` after ``flush`` before they commit or report success. Suspect
    acknowledgements: one without an offset (the broker's "duplicate sequence": the batch was
    written before), one at an offset not above the last acknowledged on that partition (offsets
    only grow), and, for two minutes after a lost broker connection, one at offset 0 and the rest
    of a batch that began with a suspect one. Tansu on
    s3:// storage gives all of them after a restart, often a batch "written" at offsets 0..n, and
    the records are then in no partition (measured: 3-4 records lost per 3 restarts; in the chaos
    test a stream's first 33 records). So such a record is produced again, as a new record. Where
    the broker did write it the copy is a duplicate, which every hark consumer drops by the
    record's identity (stream + sequence, utterance or segment index).

    Delivery reports are served by one thread at a time (``poll``, ``flush``). librdkafka hands
    them out in the order the broker acknowledged them, but when two threads serve the queue at
    once (ingest publishes concurrent streams from several threads) their callbacks interleave, a
    later acknowledgement is seen first, and the earlier ones then look lower than it: measured,
    22 needless copies for 13 files published at once to a healthy broker, 255 for 39.
    """

    SUSPECT_AFTER_LOSS_S = 120.0  # how long after a lost broker connection offset 0 is suspect
    LOG_RESTARTED_AFTER = 100  # suspect acknowledgements in a row: the log restarted, adopt its offsets

    def __init__(self, conf: dict):
        self.delivery_error: KafkaError | None = None  # the first failure
        self.failures = 0
        self.resent = 0
        self._last_offset: dict[tuple[str, int], int] = {}  # highest acknowledged, per partition
        self._suspects: dict[tuple[str, int], int] = {}  # suspect acknowledgements in a row
        self._suspect_at: dict[tuple[str, int], int] = {}  # offset of the last suspect one
        self._broker_lost_at: float | None = None
        self._error_cb = conf.pop("error_cb", None)
        self._serving = threading.Lock()  # held while delivery reports are served
        super().__init__({**conf, "on_delivery": self._delivered, "error_cb": self._client_error})

    def poll(self, timeout: float = -1) -> int:
        """As Producer.poll; ``poll(0)`` returns at once if another thread is serving reports."""
        timeout = -1 if timeout is None or timeout < 0 else timeout
        if not self._serving.acquire(timeout=timeout):
            return 0
        try:
            return super().poll(timeout)
        finally:
            self._serving.release()

    def flush(self, timeout: float = -1) -> int:
        """As Producer.flush, in slices so that other threads' flushes and polls get their turn."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            step = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            if self._serving.acquire(timeout=step):
                try:
                    left = super().flush(step)
                finally:
                    self._serving.release()
            else:
                left = len(self)
            if left == 0 or (deadline is not None and time.monotonic() >= deadline):
                return left

    def _client_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._broker_lost_at = time.monotonic()
        if self._error_cb is not None:
            self._error_cb(err)
        else:
            log.warning("kafka: %s", err)

    def _delivered(self, err, msg, copy: bool = False) -> None:
        if err is not None:
            self.failures += 1
            if self.delivery_error is None:
                self.delivery_error = err
            return
        tp, offset = (msg.topic(), msg.partition()), msg.offset()
        last, suspect_at = self._last_offset.get(tp, -1), self._suspect_at.get(tp)
        # offset 0 and a suspect batch's rest are only suspect after a lost connection: a fresh
        # partition is written from 0 by one producer, one record after another
        after_loss = self._broker_lost_at is not None and time.monotonic() - self._broker_lost_at < self.SUSPECT_AFTER_LOSS_S
        continues_suspect = after_loss and suspect_at is not None and offset == suspect_at + 1  # its batch's rest
        if offset is not None and offset > last and not (after_loss and offset == 0) and not continues_suspect:
            self._last_offset[tp] = offset
            self._suspect_at.pop(tp, None)
            self._suspects.pop(tp, None)
            return
        if copy:  # a copy is not copied again
            return
        suspects = self._suspects[tp] = self._suspects.get(tp, 0) + 1
        if suspects > self.LOG_RESTARTED_AFTER and offset is not None and offset >= 0:
            self._last_offset[tp] = offset  # the partition's log itself restarted lower (memory://)
            self._suspect_at.pop(tp, None)
            return
        if offset is not None and offset >= 0:
            self._suspect_at[tp] = offset
        self.resent += 1
        log.warning("broker acknowledged %s[%s] at offset %s after %s: producing the record again",
                    msg.topic(), msg.partition(), offset, last)
        self.produce(msg.topic(), key=msg.key(), value=msg.value(), partition=msg.partition(), headers=msg.headers(),
                     on_delivery=lambda e, m: self._delivered(e, m, copy=True))


def producer(settings: Settings, **overrides) -> GuardedProducer:
    conf = _base(settings)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.output_linger_ms,
        "message.max.bytes": MAX_MESSAGE_BYTES,
    })
    conf.update(overrides)
    return GuardedProducer(conf)


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


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list:
    """The records already fetched (up to ``max_messages``), waiting up to ``timeout`` only while
    there are none. ``Consumer.consume(n, timeout)`` holds records until n arrive or the whole
    timeout passes (measured: one record waited the full 1 s), which added half the loop's
    timeout on average to every hop of the pipeline."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)]


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
