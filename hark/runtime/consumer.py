"""The consume-transform-produce loop every hark consumer service runs.

A service subclasses ConsumerService and implements ``handle`` (StreamRunner does, for the
processors of the audio topic). The loop guarantees:
- a record that cannot be read or processed goes to the dead-letter topic with the reason and
  the loop goes on (other streams are untouched);
- exactly once: the output produced for a batch of input (and its dead letters) is committed in
  one Kafka transaction with the input offsets (``send_offsets_to_transaction``); readers use
  read_committed, so a crash mid-batch leaves nothing visible and the batch is processed again;
- open streams survive a crash: a service holds its commits back (``hold``) at the earliest
  record an open stream needs, and the commit's metadata (the same transaction) says how far
  input was processed and how each held stream resumes (checkpoints.py). The next owner of the
  partition reads from the hold, rebuilds state from the records below the processed mark with
  output suppressed (``replaying``: that output is committed already), and goes on;
- SIGTERM/SIGINT finish the current batch, commit and leave the group cleanly.

The Kafka clients come from a ``Clients`` factory: ``KafkaClients`` in a service,
``hark.runtime.testing``'s in-memory topics in unit tests of the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from .. import kafka, serde
from ..config import Settings
from ..keys import KeyMissing, Keyring, StreamErased
from ..transactions import Transactions
from .checkpoints import Checkpoints
from .deadletters import DeadLetters, InputError
from .observe import HealthServer, Metrics, kv

log = logging.getLogger("hark")


class Clients(Protocol):
    """Where a service's two clients come from (confluent-kafka's Producer and Consumer API)."""

    def producer(self, transactional_id: str, client_id: str): ...

    def consumer(self, group: str, client_id: str, instance: str | None): ...


class KafkaClients:
    def __init__(self, settings: Settings):
        self.settings = settings

    def producer(self, transactional_id: str, client_id: str):
        return kafka.transactional(self.settings, transactional_id, **{"client.id": client_id})

    def consumer(self, group: str, client_id: str, instance: str | None):
        static = {"group.instance.id": instance} if instance else {}
        return kafka.consumer(self.settings, group, **{"client.id": client_id}, **static)


def instance_ids(settings: Settings) -> tuple[str, str | None]:
    """(this replica's stable name, its static group membership id or None)."""
    instance = settings.instance_id
    if instance == "@hostname":
        instance = socket.gethostname()
    if instance:
        return instance, instance
    return f"{socket.gethostname()}-{os.getpid()}", None


class ConsumerService:
    name = "service"
    group = "hark-service"

    def __init__(
        self,
        settings: Settings,
        *,
        name: str | None = None,
        group: str | None = None,
        clients: Clients | None = None,
    ):
        self.settings = settings
        self.name, self.group = name or self.name, group or self.group
        self.metrics = Metrics(self.name)
        instance, static = instance_ids(settings)
        self.transactional_id = f"{self.group}-{instance}"
        clients = clients or KafkaClients(settings)
        self.producer = clients.producer(self.transactional_id, f"hark-{self.name}")
        self.consumer = clients.consumer(self.group, f"hark-{self.name}", static)
        self.transactions = Transactions(self.producer, self.transactional_id)
        self.keys = Keyring.for_settings(settings)
        self.deadletters = DeadLetters(
            self.producer, settings, self.name, self.metrics, send_record=self.transactions.send, keys=self.keys
        )
        self.checkpoints = Checkpoints()
        self._stop = threading.Event()
        self._last_loop = time.monotonic()
        self.replaying = False  # the record being handled was processed before: produce nothing
        self._last_commit = 0.0
        self._last_sweep = time.monotonic()
        self._caught_up_at = time.monotonic()  # last poll that returned nothing: all input read
        self._last_lag = 0.0
        self.health: HealthServer | None = None

    # -- to implement -------------------------------------------------------------------------
    @property
    def topics(self) -> list[str]:
        raise NotImplementedError

    def handle(self, rtype: str, record: dict, msg: Message) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Called every loop iteration (timeouts, periodic work)."""

    def idle(self) -> None:
        """Called when a poll found nothing: a place for deferrable work."""

    def partitions_revoked(self, partitions: list[tuple[str, int]]) -> None:
        """Drop state for partitions this process no longer owns."""

    def stream_erased(self, stream_id: str) -> None:
        """The stream was erased (its key is gone): drop whatever is kept of it, publish nothing."""

    # -- for subclasses -------------------------------------------------------------------------
    @property
    def _assigned(self) -> set[tuple[str, int]]:
        return self.checkpoints.assigned

    def sweep_due(self, period_s: float = 1.0) -> bool:
        """True at most once per ``period_s``: for periodic work done from ``tick``."""
        now = time.monotonic()
        if now - self._last_sweep < period_s:
            return False
        self._last_sweep = now
        return True

    def idle_streams(self, streams: dict) -> list[str]:
        """Ids of streams (values with ``last_seen``) without audio for longer than idle_timeout_s.

        Measured up to the last poll that found nothing to read, not to now: a service busy
        decoding falls behind its input, and a stream whose chunks are still queued is not idle."""
        caught_up = self._caught_up_at
        return [sid for sid, st in streams.items() if caught_up - st.last_seen > self.settings.idle_timeout_s]

    def hold(self, key: str, msg: Message, offset: int | None = None, state: dict | None = None) -> None:
        """Keep commits on msg's partition at or before ``offset`` (default msg's) while ``key`` is open.

        ``state`` (JSON-able) is what the service needs to resume ``key`` from that offset; it goes
        into the partition's checkpoint and comes back through ``restored``."""
        topic, partition, at = kafka.position(msg)
        self.checkpoints.hold(key, (topic, partition), at if offset is None else offset, state)

    def release(self, key: str) -> None:
        self.checkpoints.release(key)

    def restored(self, key: str) -> dict | None:
        """The checkpointed resume point of ``key`` after a restart or rebalance: {"offset", "state"}."""
        return self.checkpoints.restored(key)

    def forget_restored(self, key: str) -> None:
        self.checkpoints.forget_restored(key)

    def finished_before_checkpoint(self, key: str) -> bool:
        """While replaying: ``key`` was not open at the checkpoint, so it completed before it
        (anything opened before the checkpoint and still open was held). Its replayed records
        must not rebuild state: only part of the stream is replayed, and it would never end."""
        return self.replaying and not self.checkpoints.was_held(key)

    def produce(self, topic: str, key: str, rtype: str, record: Mapping[str, Any], sealed: bool = True) -> bool:
        """``key`` is the stream id, whose key seals the record; ``sealed=False`` only for a
        content-free notice about an erased stream (its key is gone). True when the record was
        sent (not suppressed in a replay, not of an erased stream)."""
        if self.replaying:  # committed before, with the offsets it was made from
            self.metrics.inc("outputs_suppressed_total", topic=topic)
            return False
        try:
            value = serde.encode(rtype, record, keys=self.keys if sealed else None, stream_id=key)
        except StreamErased:
            self.metrics.inc("outputs_of_erased_streams_total", topic=topic)
            self.stream_erased(key)
            return False
        except KeyMissing:  # input that came unsealed (hand-made, or older than keys): no key to use
            value = serde.encode(rtype, record)
            self.metrics.inc("records_unsealed_total", topic=topic)
        self.transactions.send(topic, key.encode(), value)
        self.metrics.inc("records_out_total", topic=topic)
        return True

    def observe_decode(self, decode_s: float, audio_s: float, **labels) -> None:
        """Decoder time against audio time: counters, and their ratio as the ``decode_rtf`` gauge."""
        self.metrics.inc("decode_seconds_total", decode_s, **labels)
        self.metrics.inc("audio_seconds_total", audio_s, **labels)
        audio = self.metrics.get("audio_seconds_total", **labels)
        if audio > 0:
            self.metrics.set("decode_rtf", self.metrics.get("decode_seconds_total", **labels) / audio, **labels)

    def update_lag(self) -> None:
        """Records between the committed offset and the end of each owned partition.

        The high watermark is librdkafka's cached one (updated by every fetch response, no extra
        request). The committed offset stays at the hold of a partition's oldest open stream, so
        this counts what a crash would make the next owner read again, not only unread records.
        """
        ck = self.checkpoints
        unknown = [TopicPartition(t, p) for t, p in sorted(ck.assigned) if (t, p) not in ck.committed]
        if unknown:  # partitions this process has not committed yet: ask the group coordinator once
            try:
                for tp in self.consumer.committed(unknown, timeout=2):
                    ck.committed[(tp.topic, tp.partition)] = tp.offset
            except Exception as e:
                log.debug("committed offsets unavailable: %s", e)
        for topic, partition in sorted(ck.assigned):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except Exception:
                continue
            committed = ck.committed.get((topic, partition))
            if high is None or high < 0 or committed is None:
                continue
            if committed < 0:  # the group never committed here: everything retained is unread
                committed = max(low, 0)
            self.metrics.set("consumer_lag_records", max(0, high - committed), topic=topic, partition=partition)

    def healthy(self) -> tuple[bool, dict]:
        stalled = time.monotonic() - self._last_loop
        return stalled < 15.0, {"loop_stalled_s": round(stalled, 2), "partitions": len(self.checkpoints.assigned)}

    def stop(self, *_args) -> None:
        self._stop.set()

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        s = self.settings
        self.health = HealthServer(s.health_host, s.health_port, self.name, self.healthy, self.metrics)
        log.info(
            "starting",
            extra=kv(bootstrap=s.bootstrap, topics=self.topics, group=self.group, health_port=self.health.port),
        )
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        try:
            self.start()
            while not self._stop.is_set():
                self.poll_once()
            self._commit()
            self.transactions.wait()
        finally:
            self.close()
            log.info("stopped")

    def start(self) -> None:
        """Fence this replica's predecessor and join the group."""
        self.transactions.init()
        self._last_commit = time.monotonic()  # nothing to commit before the first pass
        self.consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def poll_once(self, timeout: float = 0.05) -> int:
        """One pass of the loop: read what is there (waiting up to ``timeout`` for the first
        record), process it, run the periodic work, commit when due. The number of records read."""
        self._last_loop = time.monotonic()
        msgs = kafka.consume_ready(self.consumer, 200, timeout)
        for msg in msgs:
            self._process(msg)
            if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
                self._commit(batch_done=False)  # a long batch's output is not held back
        self.tick()
        if time.monotonic() - self._last_lag >= 5.0:
            self._last_lag = time.monotonic()
            self.update_lag()
        if not msgs:
            self._caught_up_at = time.monotonic()
            self.idle()
        self.producer.poll(0)
        if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
            self._commit()
        return len(msgs)

    def close(self) -> None:
        self.transactions.close()
        self.consumer.close()
        if self.health is not None:
            self.health.close()

    def _process(self, msg: Message) -> None:
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error)
            return
        topic, partition, offset = kafka.position(msg)
        self.metrics.inc("records_in_total", topic=topic)
        tp = (topic, partition)
        if msg.value() is None:  # a tombstone (erasure) on a compacted topic: nothing to process
            self.metrics.inc("tombstones_total", topic=topic)
            self.checkpoints.processed(tp, offset)
            return
        self.replaying = self.checkpoints.replays(tp, offset)
        try:
            self.guarded(msg, lambda: self.handle(*serde.decode_message(msg, self.keys), msg))
        finally:
            self.replaying = False
        self.checkpoints.processed(tp, offset)

    def guarded(self, msg: Message, work: Callable[[], None]) -> None:
        """Run ``work`` for ``msg``; whatever it fails with goes to the dead-letter topic as msg's
        failure (unless replaying: it was dead-lettered before the last checkpoint already)."""
        try:
            work()
            return
        except serde.Erased as e:  # unreadable by design: nothing to keep, nothing to process
            self.metrics.inc("records_of_erased_streams_total", topic=msg.topic())
            self.stream_erased(e.stream_id)
            return
        except serde.SerdeError as e:
            kind, reason = "malformed_record", str(e)
        except InputError as e:
            kind, reason = e.kind, e.reason
        except Exception as e:  # a bug must not stop other streams; the record is kept in the DLQ
            log.exception("failed to process record")
            kind, reason = "internal_error", f"{type(e).__name__}: {e}"
        if not self.replaying:
            self.deadletters.send(kind, reason, msg=msg, stream_id=key_of(msg))

    def _commit(self, batch_done: bool = True) -> None:
        """Start committing the output produced since the last commit with the input offsets it
        came from and the resume metadata, all or nothing (hark/transactions.py). ``batch_done``:
        every record delivered so far is processed."""
        self._last_commit = time.monotonic()
        ck = self.checkpoints
        if batch_done and ck.positions:
            for p in self.consumer.position([TopicPartition(t, n) for t, n in ck.positions]):
                ck.advance((p.topic, p.partition), p.offset)
        pending = ck.pending()
        offsets = [TopicPartition(c.topic, c.partition, c.offset, metadata=c.metadata) for c in pending]
        if not self.transactions.commit(offsets, self.consumer.consumer_group_metadata()):
            return
        ck.sent(pending)
        self.metrics.inc("transactions_total")  # started; a failed one ends the process

    def _on_assign(self, consumer, partitions):
        try:
            committed = consumer.committed(partitions, timeout=30)
        except KafkaException as e:  # without the metadata the open streams cannot be resumed
            raise RuntimeError(f"committed offsets unavailable: {e}") from e
        self.checkpoints.assign([((p.topic, p.partition), p.metadata) for p in committed])
        self.metrics.set("partitions_assigned", len(self.checkpoints.assigned))
        log.info("partitions assigned", extra=kv(partitions=[p.partition for p in partitions]))

    def _on_revoke(self, consumer, partitions):
        self._commit()  # hand the partitions over with everything done so far committed
        self.transactions.wait()
        self._drop_partitions([(p.topic, p.partition) for p in partitions])

    def _on_lost(self, consumer, partitions):
        # Another member owns them already: this transaction would be fenced. Restart clean.
        raise RuntimeError(f"partitions lost to the group: {[p.partition for p in partitions]}")

    def _drop_partitions(self, gone: list[tuple[str, int]]) -> None:
        self.partitions_revoked(gone)
        self.checkpoints.revoke(gone)
        for topic, partition in gone:
            self.metrics.drop("consumer_lag_records", topic=topic, partition=partition)
        self.metrics.set("partitions_assigned", len(self.checkpoints.assigned))
        log.info("partitions revoked", extra=kv(partitions=[p for _, p in gone]))


def key_of(msg: Message) -> str | None:
    k = msg.key()
    try:
        return k.decode() if k else None
    except UnicodeDecodeError:
        return None
