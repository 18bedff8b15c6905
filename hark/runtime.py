"""What every hark service process shares: logging, health/metrics, dead letters, the loop.

A service subclasses ConsumerService and implements ``handle``. The loop guarantees:
- a record that cannot be read or processed goes to the dead-letter topic with the reason and
  the loop goes on (other streams are untouched);
- offsets are committed only after everything produced for them is acknowledged by the broker,
  and a service may hold commits back further (``hold``) so open streams are rebuilt after a crash;
- no output is produced twice for one input: every commit first writes a checkpoint (object
  store, one small object per partition) with the offsets processed so far. A restarted or new
  owner of the partition replays the records below that mark to rebuild its state with output
  suppressed. A service with cheap state can also checkpoint it (``hold(..., state=)``) and resume
  there instead of re-reading the stream from its start. Outputs produced after the last
  checkpoint of a crashed process are produced again, identically (deterministic decoders,
  records keyed by stream and utterance/segment), and consumers drop them by that identity.
  Kafka transactions would close that window, but Tansu shows aborted records to
  read_committed consumers (README, "Exactly once");
- SIGTERM/SIGINT finish the current batch, flush, commit and leave the group cleanly.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from confluent_kafka import KafkaError, Message, TopicPartition

from . import kafka, serde
from .config import Settings
from .storage import ObjectStore, open_store

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
        out = {"ts": round(record.created, 3), "level": record.levelname, "service": self.service,
               "msg": record.getMessage()}
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
            def do_GET(self):  # noqa: N802
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
    def __init__(self, producer, settings: Settings, service: str, metrics: Metrics):
        self.producer, self.topic, self.service, self.metrics = producer, settings.deadletter_topic, service, metrics

    def send(self, error_type: str, reason: str, *, msg: Message | None = None, stream_id: str | None = None,
             tenant: str | None = None, payload: bytes | None = None, payload_size: int | None = None) -> None:
        if msg is not None and payload is None:
            payload = msg.value()
        size = payload_size if payload_size is not None else (len(payload) if payload else 0)
        record = {
            "service": self.service, "error_type": error_type, "reason": reason[:2000],
            "stream_id": stream_id, "tenant": tenant,
            "source_topic": msg.topic() if msg is not None else None,
            "source_partition": msg.partition() if msg is not None else None,
            "source_offset": msg.offset() if msg is not None else None,
            "key": msg.key() if msg is not None else (stream_id.encode() if stream_id else None),
            "payload": payload[:DEADLETTER_PAYLOAD_CAP] if payload else None,
            "payload_size": size, "failed_at_ms": now_ms(),
        }
        key = record["key"]
        self.producer.produce(self.topic, key=key, value=serde.encode("DeadLetter", record))
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


class ChunkOrder:
    """Puts one stream's AudioChunks back in sequence order.

    A duplicate (a seq already passed or waiting) is dropped; a chunk that arrives early waits
    for the missing ones, but at most ``window`` chunks wait (bounded memory): then the gap is
    accepted and counted. StreamEnd releases whatever waits.

    The window covers a broker outage: a batch the restarted broker acknowledged without writing
    is produced again (``kafka.GuardedProducer``) behind every chunk queued during the outage,
    ~5 s of them in the chaos test, which overflowed a 50-chunk window. 300 chunks (60 s of
    200 ms chunks, ~2 MB) wait at most, and only while a chunk is missing."""

    def __init__(self, next_seq: int, metrics: "Metrics", window: int = 300):
        self.next_seq, self.metrics, self.window = next_seq, metrics, window
        self.waiting: dict[int, tuple[dict, Message]] = {}
        self.last_offset: int | None = None  # of the last chunk released in order
        self.refetched_for: int | None = None  # the missing seq a re-read was asked for

    @property
    def missing(self) -> int | None:
        """The seq that later chunks wait for, if any."""
        return self.next_seq if self.waiting and self.next_seq not in self.waiting else None

    def push(self, rec: dict, msg: Message) -> list[tuple[dict, Message]]:
        seq = rec["seq"]
        if seq < self.next_seq or seq in self.waiting:
            self.metrics.inc("duplicate_chunks_total")
            return []
        if seq > self.next_seq:
            self.metrics.inc("out_of_order_chunks_total")
        self.waiting[seq] = (rec, msg)
        return self._release(force=len(self.waiting) > self.window)

    def drain(self) -> list[tuple[dict, Message]]:
        return self._release(force=True)

    def _release(self, force: bool) -> list[tuple[dict, Message]]:
        out = []
        while self.waiting:
            if self.next_seq not in self.waiting:
                if not force:
                    break
                first = min(self.waiting)
                self.metrics.inc("sequence_gaps_total")
                log.warning("sequence gap", extra=kv(stream_id=self.waiting[first][0]["stream_id"],
                                                     missing=f"{self.next_seq}..{first - 1}"))
                self.next_seq = first
                force = len(self.waiting) > self.window
                continue
            out.append(self.waiting.pop(self.next_seq))
            self.last_offset = out[-1][1].offset()
            self.next_seq += 1
        return out


class Checkpoints:
    """One JSON object per (group, topic, partition) in the object store: the offsets processed and
    acknowledged before the commit that follows it, and the resume states of held streams."""

    def __init__(self, store: ObjectStore, group: str, scope: str = ""):
        self.store, self.prefix = store, f"checkpoints/{scope + '/' if scope else ''}{group}/"

    def key(self, topic: str, partition: int) -> str:
        return f"{self.prefix}{topic}/{partition:05d}.json"

    def load(self, topic: str, partition: int) -> dict:
        try:
            return json.loads(self.store.get(self.key(topic, partition)))
        except KeyError:
            return {}

    def save(self, topic: str, partition: int, text: str) -> None:
        self.store.put(self.key(topic, partition), text.encode())


# ---- the consumer loop ----------------------------------------------------------------------
class ConsumerService:
    name = "service"
    group = "hark-service"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(self.name)
        self.producer = kafka.producer(settings, **{"client.id": f"hark-{self.name}"})
        self.consumer = kafka.consumer(settings, self.group, **{"client.id": f"hark-{self.name}"})
        self.deadletters = DeadLetters(self.producer, settings, self.name, self.metrics)
        self._stop = threading.Event()
        self._positions: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._sought: set[tuple[str, int]] = set()  # re-read this loop: the rest of the batch comes again
        self._last_loop = time.monotonic()
        self._assigned: set[tuple[str, int]] = set()
        # key -> (topic, partition, offset): the earliest record an open stream needs re-read
        # after a crash. Commits never pass it, so stream state is rebuilt, never lost.
        self._holds: dict[str, tuple[str, int, int]] = {}
        self._hold_states: dict[str, dict] = {}  # key -> resume state at its hold (checkpointed)
        self._restored: dict[str, dict] = {}  # key -> {"offset", "state"} read back from a checkpoint
        self._replay_until: dict[tuple[str, int], int] = {}  # outputs below these offsets exist already
        self._was_held: set[str] = set()  # keys open (held) at the checkpoints read back
        self.replaying = False  # the record being handled was processed before: produce nothing
        self.checkpoints = Checkpoints(open_store(settings), self.group, settings.checkpoint_scope)
        self._saved: dict[tuple[str, int], str] = {}  # last checkpoint written per partition
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
    def produce(self, topic: str, key: str, rtype: str, record: dict, last: bool = False) -> None:
        """``last``: the stream's end record on ``topic``. What was produced before it is
        acknowledged first, so a copy the producer re-sends (``kafka.GuardedProducer``) cannot land
        behind the end, where a consumer that closed the stream would drop it."""
        if self.replaying:  # produced (and acknowledged) before the last checkpoint
            self.metrics.inc("outputs_suppressed_total", topic=topic)
            return
        if last:
            self.producer.flush(30)
        self.producer.produce(topic, key=key.encode(), value=serde.encode(rtype, record))
        self.metrics.inc("records_out_total", topic=topic)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read the partition again from ``offset``. The records of it still in this loop's batch
        are skipped: the re-read delivers them again, after the ones before them."""
        self.consumer.seek(TopicPartition(topic, partition, offset))
        self._sought.add((topic, partition))

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
        request). Tansu reports a wrong high watermark when a batch holds several records
        (STACK.md), so on the embedded broker this under-reports; on Apache Kafka it is exact.
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
        log.info("starting", extra=kv(bootstrap=s.bootstrap, topics=self.topics, group=self.group,
                                      health_port=self.health.port))
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        try:
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                msgs = kafka.consume_ready(self.consumer, 200, 0.05)
                for msg in msgs:
                    if (msg.topic(), msg.partition()) not in self._sought:
                        self._process(msg)
                self._sought.clear()
                self.tick()
                if time.monotonic() - self._last_lag >= 5.0:
                    self._last_lag = time.monotonic()
                    self.update_lag()
                if not msgs:
                    self._caught_up_at = time.monotonic()
                    self.idle()
                self.producer.poll(0)
                if msgs and time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
                    self._commit()
        finally:
            self._commit()
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

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        unacknowledged = self.producer.flush(30)
        self.metrics.set("records_resent", self.producer.resent)
        if self.producer.delivery_error is not None:
            # Outputs for these offsets may be lost: do not commit; exit so a restart re-reads them.
            raise RuntimeError(f"produce failed, not committing: {self.producer.delivery_error}")
        if unacknowledged:  # the broker is away: commit once the outputs are acknowledged
            log.warning("outputs not acknowledged yet, not committing", extra=kv(records=unacknowledged))
            return
        positions = self.commit_positions()
        if not positions:
            return
        try:
            self._save_checkpoints()
        except Exception as e:  # no checkpoint, no commit: a restart then replays a little more
            log.warning("checkpoint failed, not committing: %s", e)
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()],
                                 asynchronous=False)
            self._committed.update(positions)
        except Exception as e:  # e.g. a rebalance in progress: the next commit covers it
            log.warning("commit failed: %s", e)

    def _save_checkpoints(self) -> None:
        """Before offsets are committed: what was processed (its outputs are acknowledged) and how
        each held stream resumes. Unchanged partitions are not rewritten."""
        by_tp: dict[tuple[str, int], list[str]] = {}
        for k, (topic, partition, _) in self._holds.items():
            by_tp.setdefault((topic, partition), []).append(k)
        for tp, processed in self._positions.items():
            held = sorted(by_tp.get(tp, ()))
            streams = {k: {"offset": self._holds[k][2], "state": self._hold_states[k]}
                       for k in held if k in self._hold_states}
            text = json.dumps({"processed": processed, "held": held, "streams": streams},
                              sort_keys=True, separators=(",", ":"))
            if self._saved.get(tp) != text:
                self.checkpoints.save(tp[0], tp[1], text)
                self._saved[tp] = text

    def _on_assign(self, consumer, partitions):
        for p in partitions:
            try:
                ck = self.checkpoints.load(p.topic, p.partition)
            except Exception as e:  # without it the partition is re-processed: duplicates, not losses
                log.warning("checkpoint unreadable: %s", e, extra=kv(topic=p.topic, partition=p.partition))
                ck = {}
            if "processed" in ck:
                self._replay_until[(p.topic, p.partition)] = ck["processed"]
            self._restored.update(ck.get("streams", {}))
            self._was_held.update(ck.get("held", []))
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        self.metrics.set("partitions_assigned", len(self._assigned))
        log.info("partitions assigned", extra=kv(partitions=[p.partition for p in partitions]))

    def _on_revoke(self, consumer, partitions):
        gone = [(p.topic, p.partition) for p in partitions]
        self._commit()  # hand the partitions over with everything done so far committed
        self.partitions_revoked(gone)
        gone_set = set(gone)
        self._holds = {k: h for k, h in self._holds.items() if (h[0], h[1]) not in gone_set}
        self._hold_states = {k: v for k, v in self._hold_states.items() if k in self._holds}
        for tp in gone:
            self._assigned.discard(tp)
            self._positions.pop(tp, None)
            self._committed.pop(tp, None)
            self._replay_until.pop(tp, None)
            self._saved.pop(tp, None)
            self.metrics.drop("consumer_lag_records", topic=tp[0], partition=tp[1])
        self.metrics.set("partitions_assigned", len(self._assigned))
        log.info("partitions revoked", extra=kv(partitions=[p for _, p in gone]))


class AudioStreamService(ConsumerService):
    """A consumer of the audio topic: checks each record's key, puts chunks in sequence order
    (``ChunkOrder``) and routes records by stream event. A stream restored from a checkpoint
    skips its records before the checkpointed offset (another stream's hold may start earlier)."""

    ENDED_REMEMBERED = 10_000  # stream ids (~1 MB)

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self._order: dict[str, ChunkOrder] = {}
        self._rereading: dict[tuple[str, int], str] = {}  # partition -> the stream a re-read repairs
        self._ended = RecentIds(self.ENDED_REMEMBERED)  # streams whose StreamEnd came: later copies are dropped

    @property
    def topics(self) -> list[str]:
        return [self.settings.audio_topic]

    def handle(self, rtype: str, rec: dict, msg: Message) -> None:
        sid = rec["stream_id"]
        if msg.key() is not None and msg.key() != sid.encode():
            raise InputError("key_mismatch", f"record key {msg.key()!r} differs from stream id {sid!r}")
        if rtype not in ("StreamStart", "AudioChunk", "StreamEnd"):
            raise InputError("unexpected_record", f"{rtype} does not belong on the audio topic")
        tp = (msg.topic(), msg.partition())
        if tp in self._rereading:
            if msg.offset() < self._positions.get(tp, 0):  # read before: only the repaired stream's chunks
                if rtype != "AudioChunk" or sid != self._rereading[tp]:
                    return
            else:
                del self._rereading[tp]
        restored = self.restored(sid)
        if restored is not None and msg.offset() < restored["offset"]:
            return  # covered by the checkpointed state the stream resumes from
        if self.finished_before_checkpoint(sid):
            return
        if sid in self._ended or (rtype == "StreamStart" and sid in self._order):
            self.metrics.inc("duplicate_records_total")  # a producer's copy (kafka.GuardedProducer)
            return
        if rtype == "StreamStart":
            self._order[sid] = ChunkOrder(1, self.metrics)
            self.on_start(sid, rec, msg)
            return
        if rtype == "AudioChunk":
            # How far behind real time this consumer reads, from ingest's publish time: unlike the
            # offset lag it is right on Tansu too, and it is what a live caption waits for.
            self.metrics.set("audio_delay_seconds", max(0.0, (now_ms() - rec["published_at_ms"]) / 1000))
            order = self._order.get(sid)
            if order is None:  # joined mid-stream (a resume): this chunk's seq comes next
                order = self._order[sid] = ChunkOrder(rec["seq"], self.metrics)
            released = order.push(rec, msg)
            self._reread_if_skipped(sid, order, msg)
        else:
            order = self._order.pop(sid, None)
            released = order.drain() if order else []
        for r, m in released:  # a bad chunk is dead-lettered as itself; the ones after it still run
            self.guarded(m, lambda r=r, m=m: self.on_chunk(sid, r, m))
        if rtype == "StreamEnd":
            self._ended.add(sid)
            self.on_end(sid, rec, msg)

    def _reread_if_skipped(self, sid: str, order: ChunkOrder, msg: Message) -> None:
        """A chunk is missing although later ones of its stream arrived (one partition holds a
        stream in order). Either the fetch skipped it (seen on Tansu across a broker restart) or
        its copy comes later (re-sent by the producer, ``kafka.GuardedProducer``). Read the
        partition again from after the stream's last in-order chunk, once per missing chunk; what
        was read before is skipped (duplicate chunks are dropped by ChunkOrder). A chunk that is
        really gone is given up after ``window`` chunks."""
        tp = (msg.topic(), msg.partition())
        missing = order.missing
        if missing is None or missing == order.refetched_for or order.last_offset is None or tp in self._rereading:
            return
        order.refetched_for = missing
        self._rereading[tp] = sid
        self.metrics.inc("rereads_total")
        log.warning("chunk missing from the fetch, re-reading the partition",
                    extra=kv(stream_id=sid, seq=missing, partition=msg.partition(), offset=order.last_offset + 1))
        self.seek(msg.topic(), msg.partition(), order.last_offset + 1)

    def idle(self) -> None:
        self.metrics.set("audio_delay_seconds", 0.0)  # everything read: not behind (the last chunk's age would stick)

    def reordering(self, sid: str) -> bool:
        """True while chunks of ``sid`` wait for a missing one (a hold must not move past them)."""
        order = self._order.get(sid)
        return bool(order and order.waiting)

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
