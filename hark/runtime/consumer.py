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
  input was processed and how each held stream resumes. The next owner of the partition reads
  from the hold, rebuilds state from the records below the processed mark with output
  suppressed (``replaying``: that output is committed already), and goes on;
- SIGTERM/SIGINT finish the current batch, commit and leave the group cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from .. import kafka, serde
from ..config import Settings
from ..keys import KeyMissing, Keyring, StreamErased
from ..transactions import Transactions
from .deadletters import DeadLetters, InputError
from .observe import HealthServer, Metrics, kv

log = logging.getLogger("hark")


class ConsumerService:
    name = "service"
    group = "hark-service"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(self.name)
        instance = settings.instance_id
        static = bool(instance)
        if instance == "@hostname":
            instance = socket.gethostname()
        elif not instance:
            instance = f"{socket.gethostname()}-{os.getpid()}"
        self.transactional_id = f"{self.group}-{instance}"
        self.producer = kafka.transactional(settings, self.transactional_id, **{"client.id": f"hark-{self.name}"})
        self.consumer = kafka.consumer(
            settings,
            self.group,
            **{"client.id": f"hark-{self.name}"},
            **({"group.instance.id": instance} if static else {}),
        )
        self.transactions = Transactions(self.producer, self.transactional_id)
        self.keys = Keyring.for_settings(settings)
        self.deadletters = DeadLetters(
            self.producer, settings, self.name, self.metrics, send_record=self.transactions.send, keys=self.keys
        )
        self._stop = threading.Event()
        self._positions: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._last_loop = time.monotonic()
        self._assigned: set[tuple[str, int]] = set()
        # key -> (topic, partition, offset): the earliest record an open stream needs re-read
        # after a crash. Commits never pass it, so stream state is rebuilt, never lost.
        self._holds: dict[str, tuple[str, int, int]] = {}
        self._hold_states: dict[str, dict] = {}  # key -> resume state at its hold (in the commit metadata)
        self._restored: dict[str, dict] = {}  # key -> {"offset", "state"} read back from a commit
        self._replay_until: dict[tuple[str, int], int] = {}  # outputs below these offsets are committed
        self._was_held: set[str] = set()  # keys open (held) at the commits read back
        self.replaying = False  # the record being handled was processed before: produce nothing
        self._sent: dict[tuple[str, int], tuple[int, str]] = {}  # last offset + metadata committed per partition
        self._last_commit = 0.0
        self._last_sweep = time.monotonic()
        self._caught_up_at = time.monotonic()  # last poll that returned nothing: all input read
        self._committed: dict[tuple[str, int], int] = {}
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
        self._holds[key] = (topic, partition, at if offset is None else offset)
        if state is not None:
            self._hold_states[key] = state
        else:
            self._hold_states.pop(key, None)

    def release(self, key: str) -> None:
        self._holds.pop(key, None)
        self._hold_states.pop(key, None)

    def restored(self, key: str) -> dict | None:
        """The checkpointed resume point of ``key`` after a restart or rebalance: {"offset", "state"}."""
        return self._restored.get(key)

    def forget_restored(self, key: str) -> None:
        self._restored.pop(key, None)

    def finished_before_checkpoint(self, key: str) -> bool:
        """While replaying: ``key`` was not open at the checkpoint, so it completed before it
        (anything opened before the checkpoint and still open was held). Its replayed records
        must not rebuild state: only part of the stream is replayed, and it would never end."""
        return self.replaying and key not in self._was_held

    def commit_positions(self) -> dict[tuple[str, int], int]:
        """Offsets safe to commit: everything processed, but never past a hold."""
        positions = dict(self._positions)
        for topic, partition, offset in self._holds.values():
            tp = (topic, partition)
            if tp in positions:
                positions[tp] = min(positions[tp], offset)
        return positions

    # -- helpers --------------------------------------------------------------------------------
    def produce(self, topic: str, key: str, rtype: str, record: dict, sealed: bool = True) -> bool:
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
        unknown = [TopicPartition(t, p) for t, p in sorted(self._assigned) if (t, p) not in self._committed]
        if unknown:  # partitions this process has not committed yet: ask the group coordinator once
            try:
                for tp in self.consumer.committed(unknown, timeout=2):
                    self._committed[(tp.topic, tp.partition)] = tp.offset
            except Exception as e:
                log.debug("committed offsets unavailable: %s", e)
        for topic, partition in sorted(self._assigned):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except Exception:
                continue
            committed = self._committed.get((topic, partition))
            if high is None or high < 0 or committed is None:
                continue
            if committed < 0:  # the group never committed here: everything retained is unread
                committed = max(low, 0)
            self.metrics.set("consumer_lag_records", max(0, high - committed), topic=topic, partition=partition)

    def healthy(self) -> tuple[bool, dict]:
        stalled = time.monotonic() - self._last_loop
        return stalled < 15.0, {"loop_stalled_s": round(stalled, 2), "partitions": len(self._assigned)}

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
        self.transactions.init()
        self.consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                msgs = kafka.consume_ready(self.consumer, 200, 0.05)
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
            self._commit()
            self.transactions.wait()
        finally:
            self.transactions.close()
            self.consumer.close()
            self.health.close()
            log.info("stopped")

    def _process(self, msg: Message) -> None:
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error)
            return
        topic, partition, offset = kafka.position(msg)
        self.metrics.inc("records_in_total", topic=topic)
        tp = (topic, partition)
        value = msg.value()
        if value is None:  # a tombstone (erasure) on a compacted topic: nothing to process
            self.metrics.inc("tombstones_total", topic=topic)
            self._positions[tp] = offset + 1
            return
        self.replaying = offset < self._replay_until.get(tp, -1)
        try:
            self.guarded(msg, lambda: self.handle(*serde.decode_message(msg, self.keys), msg))
        finally:
            self.replaying = False
        self._positions[tp] = max(self._positions.get(tp, 0), offset + 1)  # a re-read never moves it back

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

    def _metadata(self, tp: tuple[str, int], held: list[str]) -> str:
        """What the next owner of ``tp`` needs beside the committed offset: how far input was
        processed (its output is in this transaction) and how each held stream resumes."""
        streams = {
            k: {"offset": self._holds[k][2], "state": self._hold_states[k]} for k in held if k in self._hold_states
        }
        return json.dumps(
            {"processed": self._positions[tp], "held": held, "streams": streams}, sort_keys=True, separators=(",", ":")
        )

    def _commit(self, batch_done: bool = True) -> None:
        """Start committing the output produced since the last commit with the input offsets it
        came from and the resume metadata, all or nothing (hark/transactions.py). ``batch_done``:
        every record delivered so far is processed."""
        self._last_commit = time.monotonic()
        if batch_done and self._positions:
            # librdkafka's position steps over transaction markers that follow the last record
            # read; committing it (not last offset + 1) lets a caught-up group show lag 0
            for p in self.consumer.position([TopicPartition(t, n) for t, n in self._positions]):
                if p.offset > self._positions.get((p.topic, p.partition), p.offset):
                    self._positions[(p.topic, p.partition)] = p.offset
        by_tp: dict[tuple[str, int], list[str]] = {}
        for k, (topic, partition, _) in self._holds.items():
            by_tp.setdefault((topic, partition), []).append(k)
        offsets, sent = [], {}
        for tp, offset in self.commit_positions().items():
            meta = self._metadata(tp, sorted(by_tp.get(tp, ())))
            if self._sent.get(tp) != (offset, meta):
                offsets.append(TopicPartition(tp[0], tp[1], offset, metadata=meta))
                sent[tp] = (offset, meta)
        if not self.transactions.commit(offsets, self.consumer.consumer_group_metadata()):
            return
        self._sent.update(sent)  # a failed commit ends the process, so what is sent counts as done
        for tp, (offset, _) in sent.items():
            self._committed[tp] = offset
        self.metrics.inc("transactions_total")  # started; a failed one ends the process

    def _on_assign(self, consumer, partitions):
        try:
            committed = consumer.committed(partitions, timeout=30)
        except KafkaException as e:  # without the metadata the open streams cannot be resumed
            raise RuntimeError(f"committed offsets unavailable: {e}") from e
        for p in committed:
            ck = json.loads(p.metadata) if p.metadata and p.metadata.startswith("{") else {}
            if "processed" in ck:
                self._replay_until[(p.topic, p.partition)] = ck["processed"]
            self._restored.update(ck.get("streams", {}))
            self._was_held.update(ck.get("held", []))
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        self.metrics.set("partitions_assigned", len(self._assigned))
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
        gone_set = set(gone)
        self._holds = {k: h for k, h in self._holds.items() if (h[0], h[1]) not in gone_set}
        self._hold_states = {k: v for k, v in self._hold_states.items() if k in self._holds}
        for tp in gone:
            self._assigned.discard(tp)
            self._positions.pop(tp, None)
            self._committed.pop(tp, None)
            self._replay_until.pop(tp, None)
            self._sent.pop(tp, None)
            self.metrics.drop("consumer_lag_records", topic=tp[0], partition=tp[1])
        self.metrics.set("partitions_assigned", len(self._assigned))
        log.info("partitions revoked", extra=kv(partitions=[p for _, p in gone]))


def key_of(msg: Message) -> str | None:
    k = msg.key()
    try:
        return k.decode() if k else None
    except UnicodeDecodeError:
        return None
