"""online_asr: a consumer group on the audio topic; finals onto the online topic (for the results
service to merge), partial captions straight onto the results topic.

State per stream is one StreamRecognizer (a pooled decoder plus a sub-frame buffer): bounded
by ``max_streams`` and by the recognizer's utterance cap, released at StreamEnd or after
``idle_timeout_s`` without audio (a client that vanished must not pin a decoder forever).

Commits are held (runtime ``hold``) at the point each open stream could be resumed from: its
start, or the chunk of its last end of speech, where the recognizer's state (positions, next
utterance id, cepstral mean: ~300 bytes) goes into the checkpoint. A crash or rebalance restores
that state and re-decodes only the open utterance, with the same utterance ids and the same text
as an uninterrupted run (tests/test_recognizer.py checks this).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import Message

from hark.config import Settings
from hark.records import result_record
from hark.runtime import AudioStreamService, InputError, check_chunk, kv, main_for, now_ms
from hark.storage import open_store

from .recognizer import MODEL_NAME, MODEL_VERSION, CapacityError, DecoderPool, Event, StreamRecognizer

log = logging.getLogger("hark.online_asr")


@dataclass
class StreamState:
    recognizer: StreamRecognizer
    tenant: str
    partition: int
    next_seq: int
    last_seen: float
    last_chunk_published_at_ms: int = 0


class OnlineASR(AudioStreamService):
    name = "online_asr"
    group = "hark-online-asr"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.pool = DecoderPool(settings.max_streams, settings.online_max_hmm_per_frame)
        self.pool.prewarm(settings.prewarm_decoders)
        self.streams: dict[str, StreamState] = {}
        self.store = open_store(settings) if settings.keep_lattices else None

    # -- records ------------------------------------------------------------------------------
    def on_start(self, sid: str, rec: dict, msg: Message) -> None:
        if sid not in self.streams:
            self._open(sid, rec["tenant"], msg, next_seq=1)

    def on_chunk(self, sid: str, rec: dict, msg: Message) -> None:
        self._chunk(sid, rec, msg)

    def on_end(self, sid: str, rec: dict, msg: Message) -> None:
        self._close(sid, rec["tenant"], str(rec["status"]), rec["seq"])

    def _open(self, sid: str, tenant: str, msg: Message, next_seq: int, base_ms: int = 0) -> StreamState:
        try:
            decoder = self.pool.acquire()
        except CapacityError as e:
            raise InputError("capacity", f"online_asr at capacity ({e}); scale out with more replicas") from None
        s = self.settings
        rec = StreamRecognizer(
            decoder,
            base_ms=base_ms,
            partial_interval_ms=s.partial_interval_ms,
            nbest=s.nbest,
            keep_lattice=s.keep_lattices,
        )
        st = StreamState(rec, tenant, msg.partition(), next_seq, time.monotonic())
        self.streams[sid] = st
        self.hold(sid, msg)
        self.metrics.set("open_streams", len(self.streams))
        log.info("stream opened", extra=kv(stream_id=sid, partition=msg.partition(), seq=next_seq))
        return st

    def _chunk(self, sid: str, rec: dict, msg: Message) -> None:
        pcm = check_chunk(rec)
        st = self.streams.get(sid)
        if st is None:  # resumed mid-stream after a restart/rebalance
            st = self._resume(sid, rec, msg)
        st.next_seq = rec["seq"] + 1
        st.last_seen = time.monotonic()
        st.last_chunk_published_at_ms = rec["published_at_ms"]
        t0 = time.perf_counter()
        events = st.recognizer.feed(pcm)
        self.observe_decode(time.perf_counter() - t0, len(pcm) / 32000)
        self._emit(sid, st, events, rec["seq"])
        boundary = st.recognizer.boundary
        if boundary is not None:
            # an end of speech in this chunk: resumable from this chunk with this state
            self.hold(
                sid,
                msg,
                msg.offset(),
                state={**boundary, "next_seq": rec["seq"], "published_at_ms": st.last_chunk_published_at_ms},
            )

    def _resume(self, sid: str, rec: dict, msg: Message) -> StreamState:
        restored = self.restored(sid)
        self.forget_restored(sid)
        if restored is None:  # no checkpoint (lost, or the stream's start was never seen): decode from here
            log.warning("stream joined mid-way without a checkpoint", extra=kv(stream_id=sid, seq=rec["seq"]))
            return self._open(sid, rec["tenant"], msg, next_seq=rec["seq"], base_ms=rec["offset_samples"] // 16)
        state = restored["state"]
        st = self._open(sid, rec["tenant"], msg, next_seq=state["next_seq"])
        st.recognizer.restore(state)
        st.last_chunk_published_at_ms = state["published_at_ms"]
        self.hold(sid, msg, restored["offset"], state=state)
        log.info("stream resumed from its committed state", extra=kv(stream_id=sid, utterance_id=state["utterance_id"]))
        return st

    def _close(self, sid: str, tenant: str, status: str, seq: int) -> None:
        st = self.streams.pop(sid, None)
        self.release(sid)
        if st is not None:
            self._emit(sid, st, st.recognizer.finish(), seq)
            self.pool.release(st.recognizer.decoder)
            tenant = st.tenant
            utterances = st.recognizer.utterance_id
            position = st.recognizer.position_ms
        else:
            utterances, position = 0, 0
        self.metrics.set("open_streams", len(self.streams))
        self.produce(
            self.settings.online_topic,
            sid,
            "OnlineTranscript",
            self._record(sid, tenant, "STREAM_END", utterances, "", position, position, seq, 0, end_status=status),
        )
        log.info("stream closed", extra=kv(stream_id=sid, status=status, utterances=utterances))

    # -- output ---------------------------------------------------------------------------------
    def _emit(self, sid: str, st: StreamState, events: list[Event], seq: int) -> None:
        for ev in events:
            lattice_key = None
            if ev.lattice and self.store is not None:
                lattice_key = f"streams/{sid}/lattices/{ev.utterance_id:06d}.lat"
                self.store.put(lattice_key, ev.lattice)
            rec = self._record(
                sid,
                st.tenant,
                ev.kind,
                ev.utterance_id,
                ev.text,
                ev.start_ms,
                ev.end_ms,
                seq,
                st.last_chunk_published_at_ms,
                words=[w.as_record() for w in ev.words],
                nbest=[{"text": t, "score": sc} for t, sc in ev.nbest],
                lattice_key=lattice_key,
            )
            if ev.kind == "PARTIAL":
                # a partial needs no merging: straight to the captions, a broker hop sooner
                self.produce(
                    self.settings.results_topic, sid, "Result", result_record(rec, "PARTIAL", "online", ev.utterance_id)
                )
                self.metrics.inc("partials_total")
            else:
                self.produce(self.settings.online_topic, sid, "OnlineTranscript", rec)
                self.metrics.inc("finals_total")

    @staticmethod
    def _record(
        sid,
        tenant,
        kind,
        utt,
        text,
        start_ms,
        end_ms,
        seq,
        published_at,
        *,
        words=(),
        nbest=(),
        lattice_key=None,
        end_status=None,
    ) -> dict:
        return {
            "stream_id": sid,
            "tenant": tenant,
            "kind": kind,
            "utterance_id": utt,
            "text": text,
            "start_ms": start_ms,
            "end_ms": end_ms,
            "words": list(words),
            "nbest": list(nbest),
            "lattice_key": lattice_key,
            "end_status": end_status,
            "audio_seq": seq,
            "audio_published_at_ms": published_at,
            "emitted_at_ms": now_ms(),
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
        }

    # -- housekeeping ---------------------------------------------------------------------------
    def tick(self) -> None:
        if not self.sweep_due():
            return
        for sid in self.idle_streams(self.streams):
            log.warning("closing idle stream", extra=kv(stream_id=sid))
            self._close(sid, self.streams[sid].tenant, "IDLE_TIMEOUT", self.streams[sid].next_seq)
        self.forget_closed()
        self.metrics.set("decoders_pooled", self.pool.size)

    def partitions_revoked(self, partitions: list[tuple[str, int]]) -> None:
        gone = {p for _, p in partitions}
        for sid, st in list(self.streams.items()):
            if st.partition in gone:  # the new owner re-decodes it from the committed offset
                self.pool.release(self.streams.pop(sid).recognizer.decoder)
        self.forget_closed()
        self.metrics.set("open_streams", len(self.streams))


def main(argv: list[str] | None = None) -> None:
    main_for(OnlineASR, argv)
