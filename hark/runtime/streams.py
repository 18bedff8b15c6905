"""StreamRunner: one service's processors on the audio topic, with everything Kafka around them.

The runner reads the audio topic in its consumer group and, per stream: checks each record's key
and chunk (sequence, format), opens, feeds and closes the stream's processor, publishes what it
returns in the batch's transaction, holds commits at the stream's resume point (its start, or the
processor's last snapshot), times out streams without audio, drops streams whose partition moved
to another process, and dead-letters what a processor refuses. A crash or rebalance replays each
open stream from its resume point (consumer.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from confluent_kafka import Message

from .. import kafka
from ..config import Settings
from ..pcm import SAMPLES_PER_MS
from ..records import now_ms
from .consumer import Clients, ConsumerService
from .deadletters import InputError, check_chunk
from .observe import Metrics, kv
from .processor import ERASED, REFUSED, Chunk, Output, Processors, StreamInfo, StreamProcessor

log = logging.getLogger("hark")


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


@dataclass
class OpenStream:
    processor: StreamProcessor
    tenant: str
    partition: int
    order: SequenceCheck
    last_seen: float  # monotonic, for the idle timeout


class StreamRunner(ConsumerService):
    """Runs ``processors`` on the audio topic (see the module docstring)."""

    ENDED_REMEMBERED = 10_000  # stream ids (~1 MB)
    STATS_PERIOD_S = 1.0

    def __init__(self, settings: Settings, processors: Processors, clients: Clients | None = None):
        super().__init__(settings, name=processors.name, group=processors.group, clients=clients)
        self.processors = processors
        self.streams: dict[str, OpenStream] = {}
        # A partition is re-read from its oldest hold after a restart, so streams that ended
        # after that point come again; their records after the end are not a new stream.
        self._ended = RecentIds(self.ENDED_REMEMBERED)

    @property
    def topics(self) -> list[str]:
        return [self.settings.audio_topic]

    # -- records ------------------------------------------------------------------------------
    def handle(self, rtype: str, record: dict, msg: Message) -> None:
        sid = record["stream_id"]
        if msg.key() is not None and msg.key() != sid.encode():
            raise InputError("key_mismatch", f"record key {msg.key()!r} differs from stream id {sid!r}")
        if rtype not in ("StreamStart", "AudioChunk", "StreamAlive", "StreamEnd"):
            raise InputError("unexpected_record", f"{rtype} does not belong on the audio topic")
        restored = self.restored(sid)
        if restored is not None and kafka.position(msg)[2] < restored["offset"]:
            return  # covered by the committed state the stream resumes from
        if self.finished_before_checkpoint(sid):
            return
        if rtype == "StreamEnd" and str(record["status"]) == ERASED:
            self._erased(sid, record["tenant"], record["seq"])
            return
        if sid in self._ended or (rtype == "StreamStart" and sid in self.streams):
            self.metrics.inc("duplicate_records_total")
            return
        if rtype == "StreamStart":
            info = StreamInfo(
                sid,
                record["tenant"],
                record.get("language"),
                dict(record.get("metadata") or {}),
                hotwords=tuple(record.get("hotwords") or ()),
            )
            self._open(info, msg, next_seq=1)
        elif rtype == "AudioChunk":
            self._chunk(sid, record, msg)
        elif rtype == "StreamAlive":  # its client is pausing: not idle (a stream not open here stays so)
            if sid in self.streams:
                self.streams[sid].last_seen = time.monotonic()
        else:
            self._ended.add(sid)
            self._close(sid, record["tenant"], str(record["status"]), record["seq"])
            self.keys.forget(sid)

    def _open(self, info: StreamInfo, msg: Message, next_seq: int, state: dict | None = None) -> OpenStream:
        if len(self.streams) >= self.settings.max_streams:
            # refused once, said downstream (results marks the stream DEGRADED, never COMPLETE),
            # and its later records dropped rather than each dead-lettered
            self._ended.add(info.stream_id)
            self.publish(self.processors.end_unseen(info, REFUSED, next_seq))
            self.metrics.inc("streams_refused_total")
            raise InputError(
                "capacity", f"{self.name} at capacity ({self.settings.max_streams} streams); add a replica"
            )
        proc = self.processors.open(info) if state is None else self.processors.resume(info, state)
        _, partition, _ = kafka.position(msg)
        st = self.streams[info.stream_id] = OpenStream(
            proc, info.tenant, partition, SequenceCheck(next_seq, self.metrics), time.monotonic()
        )
        self.hold(info.stream_id, msg)
        self.metrics.set("open_streams", len(self.streams))
        return st

    def _join(self, sid: str, rec: dict, msg: Message) -> OpenStream:
        """A chunk of a stream without a processor here: resume it from its committed snapshot,
        or (none: its start was never seen) process it from this chunk on."""
        info = StreamInfo(sid, rec["tenant"], start_ms=rec["offset_samples"] // SAMPLES_PER_MS)
        restored = self.restored(sid)
        self.forget_restored(sid)
        if restored is None:
            log.warning("stream joined mid-way without a checkpoint", extra=kv(stream_id=sid, seq=rec["seq"]))
            return self._open(info, msg, rec["seq"])
        st = self._open(info, msg, rec["seq"], state=restored["state"])
        self.hold(sid, msg, restored["offset"], state=restored["state"])
        log.info("stream resumed from its committed state", extra=kv(stream_id=sid, seq=rec["seq"]))
        return st

    def _chunk(self, sid: str, rec: dict, msg: Message) -> None:
        pcm = check_chunk(rec)
        # How far behind real time this consumer reads, from ingest's publish time: what a live
        # caption waits for (the offset lag counts records, not seconds).
        self.metrics.set("audio_delay_seconds", max(0.0, (now_ms() - rec["published_at_ms"]) / 1000))
        st = self.streams.get(sid) or self._join(sid, rec, msg)
        if not st.order.accept(rec):
            return
        st.last_seen = time.monotonic()
        chunk = Chunk(rec["seq"], pcm, rec["offset_samples"], rec["published_at_ms"])
        t0 = time.perf_counter()
        outputs = st.processor.feed(chunk, replay=self.replaying)
        self.observe_decode(time.perf_counter() - t0, chunk.seconds)
        self.publish(outputs)
        state = st.processor.snapshot()
        if state is not None:  # resumable from this chunk with this state
            self.hold(sid, msg, state=state)

    def _close(self, sid: str, tenant: str, status: str, seq: int) -> None:
        st = self.streams.pop(sid, None)
        self.release(sid)
        self.metrics.set("open_streams", len(self.streams))
        t0 = time.perf_counter()
        if st is None:
            outputs = self.processors.end_unseen(StreamInfo(sid, tenant), status, seq)
        else:
            outputs = st.processor.close(status, seq, replay=self.replaying)
        self.observe_decode(time.perf_counter() - t0, 0.0)
        self.publish(outputs)
        log.info("stream closed", extra=kv(stream_id=sid, status=status, seen=st is not None))

    def _erased(self, sid: str, tenant: str, seq: int) -> None:
        """``hark erase`` ended the stream: what was decoded of it is dropped unpublished, and the
        service's own end record (content-free, as for a stream never seen) tells the next stage,
        unsealed: the key is gone."""
        self.stream_erased(sid)
        if sid in self._ended:
            return
        self._ended.add(sid)
        for out in self.processors.end_unseen(StreamInfo(sid, tenant), ERASED, seq):
            self.produce(out.topic, out.key, out.rtype, out.record, sealed=False)
        log.info("stream erased", extra=kv(stream_id=sid))

    def stream_erased(self, stream_id: str) -> None:
        st = self.streams.pop(stream_id, None)
        if st is not None:
            st.processor.discard()
            self.release(stream_id)
            self.metrics.set("open_streams", len(self.streams))
        self.keys.forget(stream_id)

    def publish(self, outputs: list[Output]) -> None:
        for out in outputs:
            self.produce(out.topic, out.key, out.rtype, out.record)
            if not self.replaying:
                self.metrics.inc("outputs_total", rtype=out.rtype, kind=out.record.get("kind", ""))

    # -- housekeeping ---------------------------------------------------------------------------
    def open_processors(self) -> dict[str, StreamProcessor]:
        return {sid: st.processor for sid, st in self.streams.items()}

    def tick(self) -> None:
        self.publish(self.processors.every_pass(self.open_processors()))
        if not self.sweep_due(self.STATS_PERIOD_S):
            return
        for sid in self.idle_streams(self.streams):
            st = self.streams[sid]
            log.warning("closing idle stream", extra=kv(stream_id=sid))
            self._close(sid, st.tenant, "IDLE_TIMEOUT", st.order.next_seq)
        for name, value in self.processors.stats().items():
            if name.endswith("_total"):
                self.metrics.total(name, value)
            else:
                self.metrics.set(name, value)

    def idle(self) -> None:
        self.metrics.set("audio_delay_seconds", 0.0)  # everything read: not behind (the last chunk's age would stick)
        self.publish(self.processors.when_caught_up(self.open_processors()))

    def partitions_revoked(self, partitions: list[tuple[str, int]]) -> None:
        gone = {p for _, p in partitions}
        for sid in [s for s, st in self.streams.items() if st.partition in gone]:
            self.streams.pop(sid).processor.discard()  # the new owner rebuilds it from the held offset
        self.metrics.set("open_streams", len(self.streams))
