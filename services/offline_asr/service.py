"""offline_asr: a consumer group of its own on the audio topic; Whisper over pause-cut windows.

Triggers: a window is decoded as soon as the stream has moved past a pause with at least
``offline_min_window_s`` of audio pending (so long streams are improved while they run), and
the rest at StreamEnd (the previous offline text can be the prompt: ``offline_prompt_chars``,
off by default, docs/decisions/stack-choices.md). n-best lists are
computed when the service is otherwise idle (they cost another decode and nobody waits on them).

Audio source: the stream's chunks as they arrive on the audio topic, buffered per stream up to
one window. The archive cannot serve this, because ingest writes its PCM in 30 s segments and
the open one only at stream end; it is the fallback for a stream whose audio this service
never saw (StreamEnd without state), read in bounded windows.

Commits are held at each open stream's first record. A restart re-reads open streams from their
start, but windows whose output was produced before the last checkpoint (runtime ``replaying``)
are only cut, not decoded: the VAD costs milliseconds per audio second. Window cuts depend only
on the audio, so the windows and their indices come out as in an uninterrupted run, and every
window takes an index (one without text leaves a gap) so indices never depend on decoding.

A/B rollout: with ``offline_candidate_model`` set, a stable share of streams
(``offline_candidate_fraction``) is decoded by both models, window by window; the candidate's
records carry ``variant="candidate"`` and its model version, and results keep serving the
primary's text. ``hark compare`` measures the two on archived streams.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections import deque
from dataclasses import dataclass

from confluent_kafka import Message

from hark.config import Settings
from hark.runtime import AudioStreamService, check_chunk, kv, main_for, now_ms
from hark.storage import archived_meta, archived_pcm, open_store

from .decoder import MAX_WINDOW_S, WhisperDecoder, whisper_language
from .windows import StreamWindows, Window

log = logging.getLogger("hark.offline_asr")

NBEST_QUEUE = 8  # windows (<= 30 s of PCM, ~1 MB each) waiting for their n-best; the oldest is dropped beyond


@dataclass
class OfflineStream:
    windows: StreamWindows
    tenant: str
    language: str
    partition: int
    next_seq: int
    last_seen: float
    prompt: str = ""
    segments: int = 0
    last_published_at_ms: int = 0
    candidate: bool = False  # also decoded by the A/B candidate model


def routed_to_candidate(stream_id: str, fraction: float) -> bool:
    """The same answer for a stream id in every replica, restart and replay."""
    return fraction > 0 and zlib.crc32(stream_id.encode()) / 2**32 < fraction


class OfflineASR(AudioStreamService):
    name = "offline_asr"
    group = "hark-offline-asr"

    def __init__(self, settings: Settings, decoder: WhisperDecoder | None = None):
        super().__init__(settings)
        if settings.offline_nice:
            os.nice(settings.offline_nice)
        s = settings
        self.decoder = decoder or WhisperDecoder(
            s.offline_model, s.offline_device, s.offline_compute_type, s.offline_cpu_threads, s.offline_beam_size
        )
        self.candidate: WhisperDecoder | None = None
        if s.offline_candidate_model and s.offline_candidate_fraction > 0:
            self.candidate = WhisperDecoder(
                s.offline_candidate_model,
                s.offline_device,
                s.offline_compute_type,
                s.offline_cpu_threads,
                s.offline_beam_size,
            )
        self.streams: dict[str, OfflineStream] = {}
        self.nbest_jobs: deque = deque()
        self.store = open_store(settings)
        log.info(
            "model loaded",
            extra=kv(
                model=self.decoder.model_name,
                version=self.decoder.model_version,
                candidate=self.candidate.model_name if self.candidate else None,
                candidate_fraction=s.offline_candidate_fraction,
            ),
        )

    def _new_windows(self, start_ms: int) -> StreamWindows:
        s = self.settings
        return StreamWindows(
            start_ms, int(s.offline_min_window_s * 1000), int(min(s.offline_max_window_s, MAX_WINDOW_S) * 1000)
        )

    # -- records ------------------------------------------------------------------------------
    def on_start(self, sid: str, rec: dict, msg: Message) -> None:
        if sid not in self.streams:
            self._open(sid, rec["tenant"], rec["language"], msg, 1, 0)

    def on_chunk(self, sid: str, rec: dict, msg: Message) -> None:
        self._chunk(sid, rec, msg)

    def on_end(self, sid: str, rec: dict, msg: Message) -> None:
        self._close(sid, rec["tenant"], str(rec["status"]))

    def _open(self, sid, tenant, language, msg, next_seq, start_ms) -> OfflineStream:
        st = OfflineStream(
            self._new_windows(start_ms),
            tenant,
            whisper_language(language),
            msg.partition(),
            next_seq,
            time.monotonic(),
            candidate=self._routed(sid),
        )
        self.streams[sid] = st
        self.hold(sid, msg)
        self.metrics.set("open_streams", len(self.streams))
        return st

    def _chunk(self, sid: str, rec: dict, msg: Message) -> None:
        pcm = check_chunk(rec)
        st = self.streams.get(sid)
        if st is None:  # its start was never seen (committed past by an older version): decode from here
            log.warning("stream joined mid-way", extra=kv(stream_id=sid, seq=rec["seq"]))
            st = self._open(sid, rec["tenant"], None, msg, rec["seq"], rec["offset_samples"] // 16)
        st.next_seq = rec["seq"] + 1
        st.last_seen = time.monotonic()
        st.last_published_at_ms = rec["published_at_ms"]
        for window in st.windows.push(pcm):
            self._decode(sid, st, window)

    def _close(self, sid: str, tenant: str, status: str) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            st = self._from_archive(sid, tenant)
        if st is not None:
            for window in st.windows.flush():
                self._decode(sid, st, window)
            tenant = st.tenant
        self.release(sid)
        self.metrics.set("open_streams", len(self.streams))
        end = st.windows.end_ms if st else 0
        for decoder in [self.decoder] + ([self.candidate] if st and st.candidate else []):
            self.produce(
                self.settings.offline_topic,
                sid,
                "OfflineTranscript",
                self._record(
                    sid,
                    tenant,
                    "STREAM_END",
                    st.segments if st else 0,
                    end,
                    end,
                    "",
                    [],
                    [],
                    st.language if st else "en",
                    0,
                    st.last_published_at_ms if st else 0,
                    end_status=status,
                    decoder=decoder,
                ),
            )
        log.info("stream decoded", extra=kv(stream_id=sid, status=status, segments=st.segments if st else 0))

    def _from_archive(self, sid: str, tenant: str) -> OfflineStream | None:
        """A stream this service has no state for: decode it from the archive, if it is there."""
        try:
            meta = archived_meta(self.store, sid)
        except KeyError:
            log.warning("stream ended with no audio seen and none archived", extra=kv(stream_id=sid))
            return None
        st = OfflineStream(
            self._new_windows(0),
            meta.get("tenant", tenant),
            whisper_language(meta.get("language")),
            -1,
            0,
            time.monotonic(),
            candidate=self._routed(sid),
        )
        for pcm in archived_pcm(self.store, sid):  # one 30 s segment in memory at a time
            for window in st.windows.push(pcm):
                self._decode(sid, st, window)
        self.metrics.inc("archive_fallbacks_total")
        return st

    # -- decoding -------------------------------------------------------------------------------
    def _routed(self, sid: str) -> bool:
        return self.candidate is not None and routed_to_candidate(sid, self.settings.offline_candidate_fraction)

    def _decode(self, sid: str, st: OfflineStream, w: Window) -> None:
        index = st.segments
        st.segments = index + 1
        if self.replaying and not self.settings.offline_prompt_chars:
            return  # its records exist already (with a prompt, the text is needed for the next one)
        d = self.decoder.decode(w.pcm, w.start_ms, prompt=self._prompt(st), language=st.language)
        self.observe_decode(d.decode_s, len(w.pcm) / 16000, model=self.decoder.model_name)
        if st.candidate:  # after the primary (whose text users wait for); same window, same index
            c = self.candidate.decode(w.pcm, w.start_ms, prompt=self._prompt(st), language=st.language)
            self.observe_decode(c.decode_s, len(w.pcm) / 16000, model=self.candidate.model_name)
            if c.text:
                self.produce(
                    self.settings.offline_topic,
                    sid,
                    "OfflineTranscript",
                    self._record(
                        sid,
                        st.tenant,
                        "SEGMENT",
                        index,
                        w.start_ms,
                        w.end_ms,
                        c.text,
                        c.words,
                        [],
                        c.language,
                        int(c.decode_s * 1000),
                        st.last_published_at_ms,
                        decoder=self.candidate,
                    ),
                )
        if not d.text:
            return
        self.produce(
            self.settings.offline_topic,
            sid,
            "OfflineTranscript",
            self._record(
                sid,
                st.tenant,
                "SEGMENT",
                index,
                w.start_ms,
                w.end_ms,
                d.text,
                d.words,
                [],
                d.language,
                int(d.decode_s * 1000),
                st.last_published_at_ms,
            ),
        )
        if self.settings.offline_nbest > 1:
            if len(self.nbest_jobs) >= NBEST_QUEUE:
                self.nbest_jobs.popleft()
                self.metrics.inc("nbest_dropped_total")
            self.nbest_jobs.append((sid, st.tenant, index, w, self._prompt(st), st.language))
        if self.settings.offline_prompt_chars:
            st.prompt = (st.prompt + " " + d.text)[-self.settings.offline_prompt_chars :]

    def _prompt(self, st: OfflineStream) -> str | None:
        return st.prompt[-self.settings.offline_prompt_chars :] if self.settings.offline_prompt_chars else None

    def idle(self) -> None:
        super().idle()
        if not self.nbest_jobs:
            return
        sid, tenant, index, w, prompt, language = self.nbest_jobs.popleft()
        t0 = time.perf_counter()
        hyps = self.decoder.nbest(w.pcm, self.settings.offline_nbest, prompt=prompt, language=language)
        self.produce(
            self.settings.offline_topic,
            sid,
            "OfflineTranscript",
            self._record(
                sid,
                tenant,
                "NBEST",
                index,
                w.start_ms,
                w.end_ms,
                hyps[0][0] if hyps else "",
                [],
                [{"text": t, "score": sc} for t, sc in hyps],
                language,
                int((time.perf_counter() - t0) * 1000),
                0,
            ),
        )

    def _record(
        self,
        sid,
        tenant,
        kind,
        index,
        start_ms,
        end_ms,
        text,
        words,
        nbest,
        language,
        decode_ms,
        published_at,
        end_status=None,
        decoder: WhisperDecoder | None = None,
    ) -> dict:
        decoder = decoder or self.decoder
        return {
            "stream_id": sid,
            "tenant": tenant,
            "kind": kind,
            "segment_index": index,
            "start_ms": start_ms,
            "end_ms": end_ms,
            "text": text,
            "words": words,
            "nbest": nbest,
            "language": language,
            "decode_ms": decode_ms,
            "end_status": end_status,
            "audio_published_at_ms": published_at,
            "emitted_at_ms": now_ms(),
            "model_name": decoder.model_name,
            "model_version": decoder.model_version,
            "variant": "primary" if decoder is self.decoder else "candidate",
        }


def main(argv: list[str] | None = None) -> None:
    main_for(OfflineASR, argv)
