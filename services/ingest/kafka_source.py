"""Audio that tenants' own Kafka producers publish, through the same doors as a WebSocket stream.

A tenant's producer (any stock client, its login from `hark clients create --produce`) writes
StreamStart, AudioChunk (mono s16le at the start's rate), optional StreamAlive and StreamEnd
records, Confluent-framed Avro keyed by stream id, to ``<prefix>audio-in.<tenant>``. Every ingest
replica reads those topics in group ``hark-ingest-in`` (subscribed by pattern, so a new tenant's
topic is found within a metadata refresh), so a tenant's streams split over replicas by partition.

- The tenant is the topic's: a record's own ``tenant`` field is ignored.
- A StreamStart meets a WebSocket stream's doors: admission (streams per replica, per tenant, the
  tenant's hourly audio), the stream id claimed once in the key store (``stream_exists``, whoever
  holds it), language, hotwords, rate; then the stream is opened, sealed with its own key and
  archived as live.py does. A chunk is checked against its start (rate, whole samples), counted
  against the stream's maximum (audio and wall clock, as a live stream) and the tenant's quota.
- Not paced. A producer's log is its own back-pressure: ingest reads as fast as it publishes, and
  a backlog read after ingest restarts or lags would look like a flood to a wall-clock pacer (the
  WebSocket path's ``too_fast``). Like an upload, a recording published fast is bounded by the
  tenant's hourly quota and the stream maximum, not by a pace.
- Refusals (undecodable, no key, too large, a record for a stream not open here, another
  tenant's id) go to the dead-letter topic with their reason and the record; the others go on.
- A stream whose producer sends nothing (StreamAlive counts) for two thirds of ``idle_timeout_s``
  is ended ABORTED by ingest, before the pipeline's own idle timeout would close it.

Delivery: at least once, and a stream at most once. Offsets are committed each second, once what
was done for the records before them is durable: a finished stream's records (StreamEnd's flush)
and dead letters (flushed before the commit). After a crash the records since the last commit
are read again: a StreamStart read again finds its own stream (the archive records where its
start was read, ``kafka_origin``) and takes nothing twice: a finished stream's records are
skipped, an interrupted one's dead-lettered (``stream_ended``). A stream open when its replica
stops or loses its partition (rebalance) is ended ABORTED, and the records of it that follow are
dead letters on the partition's next owner: a stream is never resumed halfway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from hark import kafka, serde
from hark.audio import AudioError
from hark.runtime import Metrics, kv

from .core import Ingest
from .produced import ProducedStream

log = logging.getLogger("hark.ingest")

GROUP = "hark-ingest-in"
POLL_S = 0.25
BATCH = 100  # records per poll; a poll that returns fewer drained what was fetched: caught up
COMMIT_S = 1.0
IDLE_FRACTION = 2 / 3  # of idle_timeout_s: ingest's end arrives before the pipeline times the stream out
# Streams ended or refused here whose later records are told apart from a stream never seen
CLOSED_REMEMBERED = 4096
# A record larger than a WebSocket message plus a record's own fields is refused unread
RECORD_OVERHEAD = 4096
ERROR_LOG_S = 60.0  # a consumer error (no ACL yet, a broker away) is logged once a minute


def produce_pattern(prefix: str) -> str:
    """The subscription's regex: topic names hold letters, digits, '_', '-' and '.', of which
    only '.' means anything in a regex."""
    return "^" + prefix.replace(".", "\\.") + ".+"


class KafkaSource:
    """Reads the produce topics on a thread of its own: a slow store stalls these streams only."""

    def __init__(self, ingest: Ingest, metrics: Metrics):
        self.ingest, self.settings, self.metrics = ingest, ingest.settings, metrics
        self.prefix = self.settings.produce_topic("")
        self.open: dict[str, ProducedStream] = {}
        # (topic, stream id) -> why it ended (None: taken before a crash, its records skipped)
        self._closed: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._positions: dict[tuple[str, int], int] = {}  # next offset, once its record is handled
        self._committed: dict[tuple[str, int], int] = {}
        self._unflushed = False  # dead letters sent since the last flush
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._caught_up = self._last_commit = time.monotonic()
        self._errors_logged: dict[int, float] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="kafka-source", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        consumer = kafka.consumer(
            self.settings, GROUP, **{"client.id": "hark-ingest-in", "topic.metadata.refresh.interval.ms": 10_000}
        )
        consumer.subscribe([produce_pattern(self.prefix)], on_revoke=self._revoked, on_lost=self._lost)
        try:
            while not self._stop.is_set():
                self._step(consumer)
        finally:
            self._end_where(lambda s: True, "ABORTED", "ingest stopped while it was open; republish under a new id")
            self._commit(consumer, self._positions)
            consumer.close()

    def _step(self, consumer: Consumer) -> None:
        try:
            msgs = kafka.consume_ready(consumer, BATCH, POLL_S)
            if len(msgs) < BATCH:
                self._caught_up = time.monotonic()
            for msg in msgs:
                if msg.error():
                    self._consumer_error(msg.error())
                else:
                    self._record(msg)
            self._expire_idle()
            if time.monotonic() - self._last_commit >= COMMIT_S:
                self._commit(consumer, self._positions)
        except Exception:  # a defect of ingest's: logged, and the other streams go on
            log.exception("produce topics: the consumer loop failed")
            self.metrics.inc("internal_errors_total")
            self._stop.wait(1.0)

    def _record(self, msg: Message) -> None:
        topic, partition, offset = kafka.position(msg)
        tenant = topic[len(self.prefix) :]
        key = msg.key()
        try:
            sid = key.decode() if key else None
        except UnicodeDecodeError:
            sid = None
        try:
            self._take(msg, tenant, sid, (topic, partition, offset))
        except AudioError as e:
            self._refuse(e, msg, tenant, sid)
        except Exception as e:  # a defect of ingest's: the stream ends, the record is kept
            log.exception("produce topics: a record failed", extra=kv(stream_id=sid))
            self.metrics.inc("internal_errors_total")
            self._refuse(AudioError("internal", f"ingest failed on this record ({type(e).__name__})"), msg, tenant, sid)
        self._positions[(topic, partition)] = offset + 1

    def _take(self, msg: Message, tenant: str, sid: str | None, origin: tuple[str, int, int]) -> None:
        value = msg.value()
        if value is None:  # a tombstone: an erasure, or the empty-keyed nudge that lets compaction run
            return
        limit = self.settings.max_ws_message_bytes + RECORD_OVERHEAD
        if value is not None and len(value) > limit:
            raise AudioError("too_large", f"a record of {len(value)} bytes is above the {limit}-byte maximum")
        if sid is None:
            raise AudioError("bad_key", "a record's key is its stream id, in UTF-8")
        try:
            rtype, rec = serde.decode(value)
        except serde.SerdeError as e:
            raise AudioError("bad_record", f"not a hark record in the Confluent wire format: {e}") from None
        if rec.get("stream_id") != sid:
            raise AudioError("bad_key", f"the record's key {sid!r} is not its stream_id {rec.get('stream_id')!r}")
        if rtype == "StreamStart":
            self._start(msg, tenant, origin, rec)
            return
        if rtype not in ("AudioChunk", "StreamAlive", "StreamEnd"):
            raise AudioError(
                "bad_record", f"a producer publishes StreamStart, AudioChunk, StreamAlive, StreamEnd; not {rtype}"
            )
        stream = self._stream_of(sid, origin[0], origin[1])
        if stream is None:
            return
        if rtype == "AudioChunk":
            stream.push(rec)
        elif rtype == "StreamAlive":
            stream.keep_alive()
        else:
            self._finish(stream, rec)

    def _start(self, msg: Message, tenant: str, origin: tuple[str, int, int], rec: dict) -> None:
        """Opens the stream; a refusal is dead-lettered and never touches a stream open already."""
        sid: str = rec["stream_id"]
        try:
            if sid in self.open:
                raise AudioError("stream_exists", f"stream {sid!r} exists already; choose another id")
            # a produced stream is what a connection is on the WebSocket path: capped per tenant alike
            cap = self.settings.tenant_max_connections
            if cap and sum(s.tenant == tenant for s in self.open.values()) >= cap:
                raise AudioError("tenant_limit", f"tenant {tenant!r} has {cap} produced streams open here, its limit")
            stream = ProducedStream(self.ingest, tenant, origin, rec)
            try:
                stream.start()
            except AudioError as e:
                if e.kind == "stream_exists" and (status := stream.redelivered()) is not None:
                    self._redelivered(msg, tenant, stream, status)
                    return
                raise
        except AudioError as e:
            self._remember(origin[0], sid, f"refused at its start: {e.kind}")
            self._dead_letter(e, msg, tenant, sid)
            return
        self.open[sid] = stream
        self.metrics.inc("produced_streams_total")
        log.info("produced stream opened", extra=kv(stream_id=sid, tenant=tenant, origin=stream.origin))

    def _redelivered(self, msg: Message, tenant: str, stream: ProducedStream, status: str) -> None:
        """This StreamStart was taken before ingest's last crash (its commit was lost)."""
        if status != "OPEN":  # it finished then: its records were taken, and are skipped now
            self._remember(stream.topic, stream.stream_id, None)
            return
        reason = "interrupted: its ingest replica stopped while it was open; republish under a new id"
        self._remember(stream.topic, stream.stream_id, reason)
        self._dead_letter(AudioError("stream_ended", reason), msg, tenant, stream.stream_id)

    def _stream_of(self, sid: str, topic: str, partition: int) -> ProducedStream | None:
        """The open stream a record belongs to; None: skip it; AudioError: refuse it."""
        stream = self.open.get(sid)
        if stream is not None and (stream.topic, stream.partition) == (topic, partition):
            return stream
        if (topic, sid) in self._closed:
            why = self._closed[(topic, sid)]
            if why is None:
                return None
            raise AudioError("stream_ended", f"stream {sid!r} ended ({why}); its later records are refused")
        raise AudioError(
            "unknown_stream",
            f"no stream {sid!r} is open on this topic: it never started here, or the ingest replica "
            "serving it stopped (republish under a new id)",
        )

    def _finish(self, stream: ProducedStream, end: dict) -> None:
        if end["status"] == "COMPLETE":
            stream.complete()  # AudioError (not acknowledged, erased...): _refuse ends it ERROR
            why = "its StreamEnd"
        else:
            why = f"the producer ended it {end['status']}: {end['reason'] or 'no reason given'}"[:500]
            stream.close("ABORTED", why)
        self._drop(stream, why)

    def _refuse(self, err: AudioError, msg: Message, tenant: str, sid: str | None) -> None:
        topic, partition, _ = kafka.position(msg)
        stream = self.open.get(sid) if sid else None
        if stream is not None and (stream.topic, stream.partition) == (topic, partition):
            stream.close("ERROR", err.reason)
            self._drop(stream, f"refused: {err.kind}")
        self._dead_letter(err, msg, tenant, sid)

    def _dead_letter(self, err: AudioError, msg: Message, tenant: str, sid: str | None) -> None:
        self.metrics.inc("refused_records_total", reason=err.kind)
        try:
            while True:
                try:
                    self.ingest.deadletters.send(err.kind, err.reason, msg=msg, stream_id=sid, tenant=tenant)
                    break
                except BufferError:  # the producer's queue is full: wait for deliveries, not more memory
                    self.ingest.producer.poll(0.05)
            self._unflushed = True
        except Exception:  # its offset still advances: one lost dead letter, not a stuck partition
            log.exception("could not dead-letter a refused record", extra=kv(stream_id=sid))

    def _drop(self, stream: ProducedStream, why: str) -> None:
        if self.open.get(stream.stream_id) is stream:
            del self.open[stream.stream_id]
        self._remember(stream.topic, stream.stream_id, why)

    def _remember(self, topic: str, sid: str, why: str | None) -> None:
        self._closed[(topic, sid)] = why
        self._closed.move_to_end((topic, sid))
        while len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)

    def _end_where(self, which: Callable[[ProducedStream], bool], status: str, reason: str) -> None:
        for stream in [s for s in self.open.values() if which(s)]:
            stream.close(status, reason)
            self._drop(stream, reason)

    def _expire_idle(self) -> None:
        """Measured up to the last poll that caught up, not to now: a stream whose records wait
        in a backlog is not idle."""
        limit = self.settings.idle_timeout_s * IDLE_FRACTION
        reason = f"idle: its producer sent nothing for {limit:g} s"
        self._end_where(lambda s: self._caught_up - s.last_seen > limit, "ABORTED", reason)

    def _commit(self, consumer: Consumer, positions: dict[tuple[str, int], int]) -> None:
        self._last_commit = time.monotonic()
        due = {tp: at for tp, at in positions.items() if self._committed.get(tp) != at}
        if not due:
            return
        if self._unflushed:  # a record's dead letter is durable before the record's offset is committed
            if self.ingest.producer.flush(10):
                log.warning("produce topics: dead letters not acknowledged; commit deferred")
                return
            self._unflushed = False
        try:
            consumer.commit(offsets=[TopicPartition(t, p, at) for (t, p), at in due.items()], asynchronous=False)
            self._committed.update(due)
        except KafkaException as e:  # read again after a restart, and taken at most once (module doc)
            log.warning("produce topics: commit failed: %s", e)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions moving to another replica: their open streams end, their positions commit."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._end_where(
            lambda s: (s.topic, s.partition) in gone, "ABORTED", "ingest's partition moved to another replica"
        )
        self._commit(consumer, {tp: at for tp, at in self._positions.items() if tp in gone})
        self._forget(gone)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._end_where(lambda s: (s.topic, s.partition) in gone, "ABORTED", "ingest lost its partition")
        self._forget(gone)

    def _forget(self, gone: set[tuple[str, int]]) -> None:
        for tp in gone:
            self._positions.pop(tp, None)
            self._committed.pop(tp, None)

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:  # the pattern matches no tenant's topic yet
            return
        self.metrics.inc("consumer_errors_total")
        now = time.monotonic()
        if now - self._errors_logged.get(err.code(), -ERROR_LOG_S) >= ERROR_LOG_S:
            self._errors_logged[err.code()] = now
            log.warning("produce topics: %s", err)
