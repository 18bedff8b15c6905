"""A broker-free driver for hark's consumer loop, in the spirit of Kafka Streams' TopologyTestDriver.

``Cluster`` is a set of in-memory topics with the parts of Kafka the loop's guarantees rest on:
- transactions: a record takes its offset when produced and is visible to read_committed readers
  once its transaction commits (a marker then takes an offset of its own on each partition it
  wrote); an aborted one is skipped; an open one holds readers back at its first offset (the
  last stable offset) until it ends; a new producer with the same transactional id aborts what
  its predecessor left open and fences it;
- consumer groups: committed offsets with their metadata, committed only by a member of the
  current generation for partitions it owns (a zombie's commit fails, as ILLEGAL_GENERATION
  does); cooperative-sticky rebalances (hark's consumers' strategy: only partitions that move are
  revoked and assigned, callbacks run inside the member's own poll), or eager ones on request;
  a crashed member's partitions handed over without a revoke.
Its clients implement the part of confluent-kafka's Producer and Consumer API that
ConsumerService uses, so the real loop, the StreamRunner, the checkpoints and a service's
processors run unchanged, in one thread, in milliseconds (tests/test_runtime.py). What it does
not model (network faults, librdkafka's timing, the broker's own bugs) the end-to-end and chaos
tests cover on a real broker.

    cluster = Cluster(settings)
    runner = cluster.start(lambda clients: StreamRunner(settings, MyProcessors(), clients))
    cluster.publish(settings.audio_topic, "StreamStart", {...})
    cluster.run_until_idle(runner)
    cluster.read(my_topic)  # [(rtype, record)] as a read_committed reader sees them
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from .. import serde
from ..config import Settings
from ..keys import Keyring

TP = tuple[str, int]
Headers = list[tuple[str, bytes]] | None
COMMITTED, ABORTED, OPEN, MARKER = "committed", "aborted", "open", "marker"


@dataclass
class Message:
    """A record in a partition, with confluent-kafka Message's accessors (``state``: where its
    transaction stands; markers are never handed to a consumer)."""

    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _headers: Headers = None
    state: str = COMMITTED

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Headers:
        return self._headers

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


@dataclass
class Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    committed: dict[TP, tuple[int, str | None]] = field(default_factory=dict)  # offset, metadata
    generation: int = 0


class Cluster:
    def __init__(self, settings: Settings, partitions: int | None = None, eager: bool = False):
        self.settings, self.eager = settings, eager
        self.partitions = partitions or settings.partitions
        self.logs: dict[str, list[list[Message]]] = {}
        self.groups: dict[str, Group] = {}
        self.epochs: dict[str, int] = {}  # transactional id -> current producer epoch
        self.open: dict[str, list[Message]] = {}  # transactional id -> its open transaction's records
        self.keys = Keyring.for_settings(settings)
        self.lock = threading.RLock()  # commits run on the services' committer threads

    # -- topics ---------------------------------------------------------------------------------
    def log(self, topic: str) -> list[list[Message]]:
        if topic not in self.logs:
            self.logs[topic] = [[] for _ in range(self.partitions)]
        return self.logs[topic]

    def partition_of(self, topic: str, key: bytes | None) -> int:
        return zlib.crc32(key or b"") % len(self.log(topic))

    def append(self, topic, partition, key, value, headers=None, state=COMMITTED) -> Message:
        with self.lock:
            p = self.partition_of(topic, key) if partition is None else partition
            part = self.log(topic)[p]
            m = Message(topic, p, len(part), key, value, headers, state)
            part.append(m)
            return m

    def end_transaction(self, transactional_id: str, state: str) -> None:
        """Commit or abort a producer's open transaction: its records' fate, and a marker on
        every partition it wrote."""
        with self.lock:
            records = self.open.pop(transactional_id, [])
            for m in records:
                m.state = state
            for topic, partition in sorted({(m.topic(), m.partition()) for m in records}):
                self.append(topic, partition, None, None, state=MARKER)

    def stable(self, tp: TP) -> int:
        """The last stable offset: read_committed readers stop before the first open record."""
        part = self.log(tp[0])[tp[1]]
        return next((m.offset() for m in part if m.state == OPEN), len(part))

    def publish(self, topic: str, rtype: str, record: Mapping[str, Any], sealed: bool = True) -> None:
        """A record as ingest writes it: keyed by its stream id, sealed with the stream's key."""
        sid = record["stream_id"]
        value = serde.encode(rtype, record, keys=self.keys if sealed else None, stream_id=sid)
        self.append(topic, None, sid.encode(), value)

    def read(self, topic: str) -> list[tuple[str, dict]]:
        """Every committed record of ``topic``, decoded, partition by partition; a sealed record
        of an erased stream, unreadable now, as ("Erased", {"stream_id": ...})."""
        out = []
        for part in self.log(topic):
            for m in part:
                if m.state != COMMITTED or m.value() is None:
                    continue
                try:
                    out.append(serde.decode_message(m, self.keys))
                except serde.Erased as e:
                    out.append(("Erased", {"stream_id": e.stream_id}))
        return out

    # -- services -------------------------------------------------------------------------------
    def clients(self) -> MemoryClients:
        return MemoryClients(self)

    def start(self, build: Callable[[MemoryClients], Any]) -> Any:
        """A service made with this cluster's clients, started (fenced and subscribed)."""
        service = build(self.clients())
        service.start()
        return service

    def run_until_idle(self, *services, max_passes: int = 10_000) -> None:
        """Poll each service in turn until none reads anything more, then commit each."""
        for _ in range(max_passes):
            if not sum(s.poll_once(0) for s in services):
                break
        else:
            raise RuntimeError(f"still reading after {max_passes} passes")
        for s in services:
            s._commit()
            s.transactions.wait()

    def crash(self, service) -> None:
        """SIGKILL: the process is gone mid-batch. A commit already handed to the broker completes;
        the open transaction stays open (holding read_committed readers back) until a producer
        with the same transactional id starts; the partitions go to the other members without a
        revoke (the group's session timed out)."""
        service.transactions.wait()
        consumer: MemoryConsumer = service.consumer
        consumer.crashed = True
        self.leave(consumer, revoke=False)

    # -- groups ---------------------------------------------------------------------------------
    def join(self, consumer: MemoryConsumer) -> None:
        group = self.groups.setdefault(consumer.group, Group())
        group.members.append(consumer)
        self._rebalance(group)

    def leave(self, consumer: MemoryConsumer, revoke: bool = True) -> None:
        group = self.groups[consumer.group]
        if consumer in group.members:
            if revoke:
                consumer.revoke(list(consumer.assignment))
            group.members.remove(consumer)
            self._rebalance(group)

    def _rebalance(self, group: Group) -> None:
        """A new generation. Cooperative-sticky: each member keeps what it owns up to its share and
        the rest is dealt to those below it; a member is told what it loses and what it gains on
        its next poll. Eager: every member gives up everything first."""
        group.generation += 1
        members = group.members
        topics = sorted({t for m in members for t in m.topics})
        tps = [(t, p) for t in topics for p in range(len(self.log(t)))]
        share = {id(m): len(tps) // len(members) + (i < len(tps) % len(members)) for i, m in enumerate(members)}
        owned: dict[int, list[TP]] = {id(m): [] for m in members}
        if not self.eager:
            for m in members:
                keep = [tp for tp in m.target if tp in tps][: share[id(m)]]
                owned[id(m)] = keep
        free = [tp for tp in tps if not any(tp in v for v in owned.values())]
        for m in members:
            while len(owned[id(m)]) < share[id(m)] and free:
                owned[id(m)].append(free.pop(0))
            m.target = owned[id(m)]
            m.generation = group.generation

    def committed(self, group: str, tp: TP) -> tuple[int, str | None] | None:
        return self.groups.setdefault(group, Group()).committed.get(tp)

    def commit_offsets(self, group_metadata: tuple[str, int, int], offsets: list[TopicPartition]) -> None:
        """Offsets sent in a transaction: only a current member's, for partitions it owns."""
        name, generation, member = group_metadata
        group = self.groups.setdefault(name, Group())
        owner = next((m for m in group.members if id(m) == member), None)
        if owner is None or generation != group.generation:
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "not a member of the current generation"))
        for tp in offsets:
            if (tp.topic, tp.partition) not in owner.assignment:
                raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, f"{tp} is not this member's"))
        for tp in offsets:
            group.committed[(tp.topic, tp.partition)] = (tp.offset, tp.metadata)


class MemoryClients:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def producer(self, transactional_id: str, client_id: str) -> MemoryProducer:
        return MemoryProducer(self.cluster, transactional_id)

    def consumer(self, group: str, client_id: str, instance: str | None) -> MemoryConsumer:
        return MemoryConsumer(self.cluster, group)


class MemoryProducer:
    """A transactional producer (the broker's side of its transactions is the cluster's)."""

    def __init__(self, cluster: Cluster, transactional_id: str):
        self.cluster, self.tid = cluster, transactional_id
        self.epoch = -1
        self.in_txn = False
        self.offsets: tuple[tuple[str, int, int], list[TopicPartition]] | None = None

    def _check_fenced(self) -> None:
        if self.cluster.epochs.get(self.tid) != self.epoch:
            raise KafkaException(KafkaError(KafkaError._FENCED, "producer fenced by a newer instance"))

    def init_transactions(self, timeout: float = 0) -> None:
        self.cluster.end_transaction(self.tid, ABORTED)  # what a predecessor left open
        self.epoch = self.cluster.epochs.get(self.tid, -1) + 1
        self.cluster.epochs[self.tid] = self.epoch

    def begin_transaction(self) -> None:
        self._check_fenced()
        assert not self.in_txn, "a transaction is already open"
        self.in_txn, self.offsets = True, None

    def produce(self, topic, key=None, value=None, headers=None, partition=None, **_kw) -> None:
        assert self.in_txn, "produce outside a transaction"
        self._check_fenced()
        m = self.cluster.append(topic, partition, key, value, headers, state=OPEN)
        self.cluster.open.setdefault(self.tid, []).append(m)

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], group_metadata, timeout=0) -> None:
        assert self.in_txn
        self.offsets = (group_metadata, offsets)

    def commit_transaction(self, timeout: float = 0) -> None:
        with self.cluster.lock:
            self._check_fenced()
            if self.offsets is not None:
                try:
                    self.cluster.commit_offsets(*self.offsets)
                except KafkaException:
                    self.cluster.end_transaction(self.tid, ABORTED)
                    self.in_txn = False
                    raise
            self.cluster.end_transaction(self.tid, COMMITTED)
            self.in_txn, self.offsets = False, None

    def abort_transaction(self, timeout: float = 0) -> None:
        self.cluster.end_transaction(self.tid, ABORTED)
        self.in_txn, self.offsets = False, None

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


class MemoryConsumer:
    """A read_committed group member; rebalance callbacks run inside its ``poll``, as librdkafka's do."""

    def __init__(self, cluster: Cluster, group: str):
        self.cluster, self.group = cluster, group
        self.topics: list[str] = []
        self.assignment: list[TP] = []  # what it owns and reads
        self.target: list[TP] = []  # what the group gave it in the latest generation
        self.generation = 0
        self.followed = 0  # the generation whose assignment it has taken
        self.fetch: dict[TP, int] = {}
        self.callbacks: dict[str, Callable] = {}
        self.crashed = False

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        self.topics = list(topics)
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.cluster.join(self)

    def revoke(self, tps: list[TP]) -> None:
        if tps and self.callbacks.get("revoke"):
            self.callbacks["revoke"](self, [TopicPartition(t, p) for t, p in tps])
        self.assignment = [tp for tp in self.assignment if tp not in tps]
        for tp in tps:
            self.fetch.pop(tp, None)

    def _follow_rebalance(self) -> None:
        """Give up what the latest generation took away (eager: everything, once per generation),
        then take what it gave, each partition only once its previous owner has given it up (the
        cooperative protocol's second round): no partition has two owners at once."""
        if self.cluster.eager and self.followed != self.generation:
            lost = list(self.assignment)
        else:
            lost = [tp for tp in self.assignment if tp not in self.target]
        self.followed = self.generation
        if lost:
            self.revoke(lost)
        members = self.cluster.groups[self.group].members
        held = {tp for m in members if m is not self for tp in m.assignment}
        gained = [tp for tp in self.target if tp not in self.assignment and tp not in held]
        if not gained:
            return
        self.assignment += gained
        for tp in gained:
            c = self.cluster.committed(self.group, tp)
            self.fetch[tp] = c[0] if c else 0  # auto.offset.reset=earliest
        if self.callbacks.get("assign"):
            self.callbacks["assign"](self, [TopicPartition(t, p) for t, p in gained])

    def poll(self, timeout: float | None = None) -> Message | None:
        got = self.consume(1, 0)
        return got[0] if got else None

    def consume(self, num_messages: int = 1, timeout: float | None = None) -> list[Message]:
        self._follow_rebalance()
        out: list[Message] = []
        with self.cluster.lock:
            for tp in self.assignment:
                part, stable = self.cluster.log(tp[0])[tp[1]], self.cluster.stable(tp)
                while self.fetch[tp] < stable and len(out) < num_messages:
                    m = part[self.fetch[tp]]
                    self.fetch[tp] += 1
                    if m.state == COMMITTED:
                        out.append(m)
        return out

    def committed(self, partitions: list[TopicPartition], timeout: float | None = None) -> list[TopicPartition]:
        out = []
        for p in partitions:
            c = self.cluster.committed(self.group, (p.topic, p.partition))
            offset, meta = c if c else (-1001, None)
            out.append(TopicPartition(p.topic, p.partition, offset, metadata=meta or ""))
        return out

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.fetch.get((p.topic, p.partition), -1001)) for p in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, timeout=None, cached=False) -> tuple[int, int]:
        return 0, len(self.cluster.log(tp.topic)[tp.partition])

    def consumer_group_metadata(self) -> tuple[str, int, int]:
        return (self.group, self.generation, id(self))

    def close(self) -> None:
        if not self.crashed:
            self.cluster.leave(self)
