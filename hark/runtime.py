"""What every hark service process shares: logging, health/metrics, dead letters, the loop.

A service subclasses ConsumerService and implements ``handle``. The loop guarantees:
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
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from . import kafka, serde
from .config import Settings
from .transactions import Transactions

log = logging.getLogger("hark")

DEADLETTER_PAYLOAD_CAP = 1024 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- logging ------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self.service,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def kv(**fields) -> dict:
    """``log.info("msg", extra=kv(stream_id=...))`` puts fields into the JSON line."""
    return {"fields": fields}


# ---- metrics and health ----------------------------------------------------------------------
class Metrics:
    """Counters and gauges, optionally labelled, rendered in the Prometheus text format."""

    def __init__(self, service: str):
        self.service = service
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}  # (name, labels) -> value
        self._kinds: dict[str, str] = {}  # name -> counter | gauge

    def inc(self, name: str, by: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._kinds.setdefault(name, "counter")
            self._values[key] = self._values.get(key, 0.0) + by

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._kinds.setdefault(name, "gauge")
            self._values[(name, tuple(sorted(labels.items())))] = value

    def drop(self, name: str, **labels) -> None:
        """Forget a labelled series (e.g. the lag of a partition this process no longer owns)."""
        with self._lock:
            self._values.pop((name, tuple(sorted(labels.items()))), None)

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            by_name: dict[str, list] = {}
            for (name, labels), v in sorted(self._values.items(), key=lambda kv_: (kv_[0][0], str(kv_[0][1]))):
                by_name.setdefault(name, []).append((labels, v))
            for name, series in by_name.items():
                full = f"hark_{name}"
                lines.append(f"# TYPE {full} {self._kinds[name]}")
                for labels, v in series:
                    text = ",".join(f'{k}="{_escape(str(val))}"' for k, val in (("service", self.service), *labels))
                    lines.append(f"{full}{{{text}}} {v}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class HealthServer:
    """``/healthz`` (200 when the service says it is healthy, else 503) and ``/metrics``."""

    def __init__(self, host: str, port: int, service: str, healthy, metrics: Metrics):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/healthz"):
                    ok, detail = healthy()
                    body = json.dumps({"service": service, "status": "ok" if ok else "unhealthy", **detail})
                    self._send(200 if ok else 503, body.encode(), "application/json")
                elif self.path.startswith("/metrics"):
                    self._send(200, metrics.render().encode(), "text/plain; version=0.0.4")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        outer._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- dead letters ---------------------------------------------------------------------------
class DeadLetters:
    """``send_record(topic, key, value)`` produces (a transactional service passes its own, so the
    dead letter commits with the offset of the record it replaces); default the producer's."""

    def __init__(self, producer, settings: Settings, service: str, metrics: Metrics, send_record=None):
        self.producer, self.topic, self.service, self.metrics = producer, settings.deadletter_topic, service, metrics
        self.send_record = send_record or (lambda topic, key, value: producer.produce(topic, key=key, value=value))

    def send(
        self,
        error_type: str,
        reason: str,
        *,
        msg: Message | None = None,
        stream_id: str | None = None,
        tenant: str | None = None,
        payload: bytes | None = None,
        payload_size: int | None = None,
    ) -> None:
        if msg is not None and payload is None:
            payload = msg.value()
        size = payload_size if payload_size is not None else (len(payload) if payload else 0)
        record = {
            "service": self.service,
            "error_type": error_type,
            "reason": reason[:2000],
            "stream_id": stream_id,
            "tenant": tenant,
            "source_topic": msg.topic() if msg is not None else None,
            "source_partition": msg.partition() if msg is not None else None,
            "source_offset": msg.offset() if msg is not None else None,
            "key": msg.key() if msg is not None else (stream_id.encode() if stream_id else None),
            "payload": payload[:DEADLETTER_PAYLOAD_CAP] if payload else None,
            "payload_size": size,
            "failed_at_ms": now_ms(),
        }
        self.send_record(self.topic, record["key"], serde.encode("DeadLetter", record))
        self.metrics.inc("deadletters_total")
        log.warning("dead-lettered: %s", reason, extra=kv(error_type=error_type, stream_id=stream_id))


class InputError(ValueError):
    """A record that is well-formed Avro but cannot be processed (bad PCM, wrong rate...)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


MAX_CHUNK_BYTES = 16000 * 2 * 10  # 10 s; a chunk is 200 ms by default, anything this big is an error


def check_chunk(rec: dict) -> bytes:
    """The PCM of an AudioChunk record, or InputError saying what is wrong with it."""
    pcm = rec["pcm"]
    if rec["sample_rate"] != 16000:
        raise InputError("bad_sample_rate", f"chunk sample rate {rec['sample_rate']} (expected 16000)")
    if len(pcm) % 2:
        raise InputError("bad_pcm", f"chunk has an odd byte count ({len(pcm)}) for 16-bit PCM")
    if len(pcm) > MAX_CHUNK_BYTES:
        raise InputError("chunk_too_large", f"chunk of {len(pcm)} bytes exceeds {MAX_CHUNK_BYTES}")
    return pcm


class RecentIds:
    """The last ``size`` ids added, oldest forgotten first: enough to drop late copies of records
    of finished streams without remembering every stream forever."""

    def __init__(self, size: int):
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._ids[key] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._ids


class SequenceCheck:
    """One stream's chunk sequence numbers. The log holds a stream's chunks in order, once each
    (one partition, an idempotent producer), so a number out of line is a producer's fault: a
    repeated chunk is dropped, a missing one counted and logged, and the stream goes on."""

    def __init__(self, next_seq: int, metrics: Metrics):
        self.next_seq, self.metrics = next_seq, metrics

    def accept(self, rec: dict) -> bool:
        seq = rec["seq"]
        if seq < self.next_seq:
            self.metrics.inc("duplicate_chunks_total")
            return False
        if seq > self.next_seq:
            self.metrics.inc("sequence_gaps_total")
            log.warning("sequence gap", extra=kv(stream_id=rec["stream_id"], missing=f"{self.next_seq}..{seq - 1}"))
        self.next_seq = seq + 1
        return True


# ---- the consumer loop ----------------------------------------------------------------------
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
        self.deadletters = DeadLetters(
            self.producer, settings, self.name, self.metrics, send_record=self.transactions.send
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
        self._holds[key] = (msg.topic(), msg.partition(), msg.offset() if offset is None else offset)
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
    def produce(self, topic: str, key: str, rtype: str, record: dict) -> None:
        if self.replaying:  # committed before, with the offsets it was made from
            self.metrics.inc("outputs_suppressed_total", topic=topic)
            return
        self.transactions.send(topic, key.encode(), serde.encode(rtype, record))
        self.metrics.inc("records_out_total", topic=topic)

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
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", msg.error())
            return
        self.metrics.inc("records_in_total", topic=msg.topic())
        tp = (msg.topic(), msg.partition())
        if msg.value() is None:  # a tombstone (erasure) on a compacted topic: nothing to process
            self.metrics.inc("tombstones_total", topic=msg.topic())
            self._positions[tp] = msg.offset() + 1
            return
        self.replaying = msg.offset() < self._replay_until.get(tp, -1)
        try:
            self.guarded(msg, lambda: self.handle(*serde.decode(msg.value()), msg))
        finally:
            self.replaying = False
        self._positions[tp] = max(self._positions.get(tp, 0), msg.offset() + 1)  # a re-read never moves it back

    def guarded(self, msg: Message, work) -> None:
        """Run ``work`` for ``msg``; whatever it fails with goes to the dead-letter topic as msg's
        failure (unless replaying: it was dead-lettered before the last checkpoint already)."""
        try:
            work()
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
        self._forget([(p.topic, p.partition) for p in partitions])

    def _on_lost(self, consumer, partitions):
        # Another member owns them already: this transaction would be fenced. Restart clean.
        raise RuntimeError(f"partitions lost to the group: {[p.partition for p in partitions]}")

    def _forget(self, gone: list[tuple[str, int]]) -> None:
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


class AudioStreamService(ConsumerService):
    """A consumer of the audio topic: checks each record's key and chunk sequence and routes
    records by stream event. A stream resumed from a commit's metadata skips its records before
    its resume offset (another stream's hold on the partition may start earlier)."""

    ENDED_REMEMBERED = 10_000  # stream ids (~1 MB)

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self._order: dict[str, SequenceCheck] = {}
        # A partition is re-read from its oldest hold after a restart, so streams that ended
        # after that point come again; their records after the end are not a new stream.
        self._ended = RecentIds(self.ENDED_REMEMBERED)

    @property
    def topics(self) -> list[str]:
        return [self.settings.audio_topic]

    def handle(self, rtype: str, rec: dict, msg: Message) -> None:
        sid = rec["stream_id"]
        if msg.key() is not None and msg.key() != sid.encode():
            raise InputError("key_mismatch", f"record key {msg.key()!r} differs from stream id {sid!r}")
        if rtype not in ("StreamStart", "AudioChunk", "StreamEnd"):
            raise InputError("unexpected_record", f"{rtype} does not belong on the audio topic")
        restored = self.restored(sid)
        if restored is not None and msg.offset() < restored["offset"]:
            return  # covered by the committed state the stream resumes from
        if self.finished_before_checkpoint(sid):
            return
        if sid in self._ended or (rtype == "StreamStart" and sid in self._order):
            self.metrics.inc("duplicate_records_total")
            return
        if rtype == "StreamStart":
            self._order[sid] = SequenceCheck(1, self.metrics)
            self.on_start(sid, rec, msg)
        elif rtype == "AudioChunk":
            # How far behind real time this consumer reads, from ingest's publish time: what a live
            # caption waits for (the offset lag counts records, not seconds).
            self.metrics.set("audio_delay_seconds", max(0.0, (now_ms() - rec["published_at_ms"]) / 1000))
            order = self._order.get(sid)
            if order is None:  # joined mid-stream (a resume): this chunk's seq comes next
                order = self._order[sid] = SequenceCheck(rec["seq"], self.metrics)
            if order.accept(rec):
                self.on_chunk(sid, rec, msg)
        else:
            self._order.pop(sid, None)
            self._ended.add(sid)
            self.on_end(sid, rec, msg)

    def idle(self) -> None:
        self.metrics.set("audio_delay_seconds", 0.0)  # everything read: not behind (the last chunk's age would stick)

    def on_start(self, sid: str, rec: dict, msg: Message) -> None:
        raise NotImplementedError

    def on_chunk(self, sid: str, rec: dict, msg: Message) -> None:
        raise NotImplementedError

    def on_end(self, sid: str, rec: dict, msg: Message) -> None:
        raise NotImplementedError

    # Per-stream state lives in ``self.streams`` (values with tenant, partition and last_seen);
    # ``_close(sid, tenant, status)`` ends a stream. The defaults below time out idle streams and
    # drop the streams of revoked partitions (their new owner rebuilds them from the held offsets).
    streams: dict

    def _close(self, sid: str, tenant: str, status: str) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        if self.sweep_due():
            for sid in self.idle_streams(self.streams):
                self._close(sid, self.streams[sid].tenant, "IDLE_TIMEOUT")
            self.forget_closed()

    def forget_closed(self) -> None:
        for sid in [s for s in self._order if s not in self.streams]:
            del self._order[sid]

    def partitions_revoked(self, partitions: list[tuple[str, int]]) -> None:
        gone = {p for _, p in partitions}
        for sid in [s for s, st in self.streams.items() if st.partition in gone]:
            del self.streams[sid]
        self.forget_closed()
        self.metrics.set("open_streams", len(self.streams))


def key_of(msg: Message) -> str | None:
    k = msg.key()
    try:
        return k.decode() if k else None
    except UnicodeDecodeError:
        return None


def service_settings(name: str, argv: list[str] | None = None, listen: str | None = None) -> Settings:
    """Start-up of ``python -m services.<name>``: flags override HARK_* variables, logging is set
    up, the broker is waited for and the topics exist. ``listen`` names the settings prefix of a
    service that serves its own port (``ingest``: --host/--port set ingest_host/ingest_port)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m services.{name}")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port (env HARK_BOOTSTRAP)")
    p.add_argument("--health-port", type=int, help="port for /healthz and /metrics (0 = any)")
    p.add_argument("--data-dir", help="data folder (archive default), env HARK_DATA_DIR")
    if listen:
        p.add_argument("--host")
        p.add_argument("--port", type=int)
    a = p.parse_args(argv)
    extra = {f"{listen}_host": a.host, f"{listen}_port": a.port} if listen else {}
    settings = Settings.load(bootstrap=a.bootstrap, health_port=a.health_port, data_dir=a.data_dir, **extra)
    setup_logging(name, settings.log_level)
    kafka.wait_for_broker(settings, timeout=60)
    kafka.ensure_topics(settings)
    return settings


def main_for(service_cls, argv: list[str] | None = None) -> None:
    """Entry point of a consumer service."""
    service_cls(service_settings(service_cls.name, argv)).run()
