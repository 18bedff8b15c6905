"""offline_asr: Whisper over pause-cut windows, as a processor on the audio topic.

Triggers: a window is decoded as soon as the stream has moved past a pause with at least
``offline_min_window_s`` of audio pending (so long streams are improved while they run), and
the rest at StreamEnd (the previous offline text can be the prompt: ``offline_prompt_chars``,
off by default, docs/decisions/stack-choices.md). n-best lists are
computed when the service is otherwise idle (they cost another decode and nobody waits on them).

Drafts: while a window grows, its undrafted audio is decoded in idle moments once
``offline_provisional_s`` of it is pending, up to its latest pause or, inside speech, up to the
words ending 0.5 s before the cut (drafts.py): SEGMENTs with ``variant="provisional"`` that captions
show until the window's own text replaces them (docs/architecture.md#drafts-whisper-text-before-a-window-ends).
They depend on timing, so they are not snapshotted or replayed, and nothing else depends on them.

Audio source: the stream's chunks as they arrive on the audio topic, buffered per stream up to
one window. The archive cannot serve this, because ingest writes its PCM in 30 s segments and
the open one only at stream end; it is the fallback for a stream whose audio this service
never saw (StreamEnd without state), read in bounded windows.

Resume point: the last window cut at a pause (windows.py), where the state is the cut's time,
the next window's index and the stream's language (~110 bytes); a restart re-reads the stream from
the chunk of that cut, not from its start. Chunks fed again with ``replay`` (their output was
committed before the crash) are only cut, not decoded. Window cuts depend only on the audio, so
the windows and their indices come out as in an uninterrupted run, and every window takes an
index (one without text leaves a gap) so indices never depend on decoding. A stream with hotwords, or
with the previous text as its prompt, takes no snapshot and is re-read from its start: the
commit metadata that carries snapshots is not sealed, and those are the stream's own words.

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

from hark.config import Settings
from hark.keys import open_archive
from hark.languages import AUTO, UNDETERMINED
from hark.records import now_ms
from hark.runtime import NOTICES, Chunk, Output, StreamInfo, StreamRunner, kv, main_for
from hark.storage import archived_meta, archived_pcm

from .decoder import MAX_WINDOW_S, WhisperDecoder, whisper_language
from .drafts import Drafter
from .windows import StreamWindows, Window

log = logging.getLogger("hark.offline_asr")

NBEST_QUEUE = 8  # windows (<= 30 s of PCM, ~1 MB each) waiting for their n-best; the oldest is dropped beyond


DETECT_SURE = 0.5  # a prior, not tuned: Whisper's guess is kept once it is more likely than not
DETECT_WINDOWS = 3  # windows with speech asked before the stream settles on English


def routed_to_candidate(stream_id: str, fraction: float) -> bool:
    """The same answer for a stream id in every replica, restart and replay."""
    return fraction > 0 and zlib.crc32(stream_id.encode()) / 2**32 < fraction


class OfflineStream:
    """One stream's windows and decoding: a StreamProcessor."""

    def __init__(self, owner: OfflineProcessors, info: StreamInfo, candidate: bool):
        self.owner, self.info, self.candidate = owner, info, candidate
        # "auto": detected on the first window with speech (hark/languages.py), then kept
        self.language: str | None = None if info.language == AUTO else whisper_language(info.language)
        self.detections = 0
        self.windows = owner.new_windows(info.start_ms)
        self.prompt = ""
        self.segments = 0
        self.published_at_ms = 0
        self.drafts = Drafter(int(owner.settings.offline_provisional_s * 1000), info.start_ms)

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        self.published_at_ms = chunk.published_at_ms
        return self.push(chunk.pcm, replay)

    def push(self, pcm: bytes, replay: bool = False) -> list[Output]:
        return [o for w in self.windows.push(pcm) for o in self._decode(w, replay)]

    def undrafted_ms(self) -> int:
        return self.drafts.undrafted_ms(self.windows)

    def _gone(self) -> None:
        if self.owner.live.get(self.info.stream_id) is self:  # not a later stream of the same id
            del self.owner.live[self.info.stream_id]

    def snapshot(self) -> dict | None:
        cut = self.windows.boundary  # set by a feed whose last cut fell at a pause in its chunk
        if cut is None or self.info.hotwords or self.owner.settings.offline_prompt_chars:
            return None
        return cut | {
            "segments": self.segments,
            "language": self.language,
            "detections": self.detections,
            "declared": self.info.language,
        }

    def restore(self, state: dict) -> None:
        self.windows = self.owner.new_windows(state["start_ms"], resume=state)
        self.segments, self.language, self.detections = state["segments"], state["language"], state["detections"]

    def discard(self) -> None:
        self._gone()

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        self._gone()
        out = [o for w in self.windows.flush() for o in self._decode(w, replay)]
        end = self.windows.end_ms
        decoders = [self.owner.decoder] + ([self.owner.candidate] if self.candidate and self.owner.candidate else [])
        for decoder in decoders:
            out.append(
                self.owner.record(
                    self.info,
                    "STREAM_END",
                    self.segments,
                    end,
                    end,
                    "",
                    [],
                    [],
                    self.language or UNDETERMINED,
                    0,
                    self.published_at_ms,
                    end_status=status,
                    decoder=decoder,
                )
            )
        log.info("stream decoded", extra=kv(stream_id=self.info.stream_id, status=status, segments=self.segments))
        return out

    def _decode(self, w: Window, replay: bool) -> list[Output]:
        o, s, info = self.owner, self.owner.settings, self.info
        index = self.segments
        self.segments = index + 1
        language = self._language(w)  # also while replaying: the stream must keep what it said before
        if replay and not s.offline_prompt_chars:
            return []  # its records exist already (with a prompt, the text is needed for the next one)
        out = []
        prompt = self._prompt()
        d = o.decoder.decode(w.pcm, w.start_ms, prompt=prompt, language=language, hotwords=self.info.hotwords)
        if self.candidate and o.candidate:  # after the primary (whose text users wait for); same window, same index
            c = o.candidate.decode(w.pcm, w.start_ms, prompt=prompt, language=language, hotwords=self.info.hotwords)
            if c.text:
                out.append(self._segment(index, w, c, o.candidate))
        if not d.text:
            return out
        out.append(self._segment(index, w, d, o.decoder))
        if s.offline_nbest > 1:
            o.queue_nbest(info, index, w, prompt, language)
        if s.offline_prompt_chars:
            self.prompt = (self.prompt + " " + d.text)[-s.offline_prompt_chars :]
        return out

    def _language(self, w: Window) -> str:
        """The stream's language. For "auto": Whisper's guess on this window once it is sure
        (probability >= DETECT_SURE), kept for the rest of the stream; while it is not, the window
        is decoded as English (the default) and the next window asked again, DETECT_WINDOWS at most."""
        if self.language is not None:
            return self.language
        lang, prob = self.owner.decoder.detect(w.pcm)
        self.detections += 1
        if prob < DETECT_SURE and self.detections < DETECT_WINDOWS:
            return "en"
        self.language = lang if prob >= DETECT_SURE else "en"
        log.info("language detected", extra=kv(stream_id=self.info.stream_id, language=lang, p=round(prob, 3)))
        return self.language

    def _segment(self, index: int, w: Window, d, decoder: WhisperDecoder) -> Output:
        return self.owner.record(
            self.info,
            "SEGMENT",
            index,
            w.start_ms,
            w.end_ms,
            d.text,
            d.words,
            [],
            d.language,
            int(d.decode_s * 1000),
            self.published_at_ms,
            decoder=decoder,
        )

    def draft(self) -> list[Output]:
        """Whisper's text for the next stretch of the window still growing (drafts.py): a
        SEGMENT with ``variant`` "provisional" and the index the window will take."""
        stretch = self.drafts.stretch(self.windows, int(MAX_WINDOW_S * 1000))
        if stretch is None:
            return []
        w, language = stretch.window, self.language
        if language is None:  # not settled yet: Whisper's guess on the draft, kept for it alone (the
            language, sure = self.owner.decoder.detect(w.pcm)  # stream's comes from its real windows)
            if sure < DETECT_SURE:
                return []
        d = self.owner.decoder.decode(
            w.pcm, w.start_ms, prompt=self._prompt(), language=language, hotwords=self.info.hotwords
        )
        kept = self.drafts.keep(stretch, d.words)
        if not kept:
            return []
        if not stretch.at_pause:
            d.text, d.words = " ".join(x["word"] for x in kept), kept
        rec = self._segment(self.segments, w, d, self.owner.decoder)
        rec.record["variant"] = "provisional"
        return [rec]

    def _prompt(self) -> str | None:
        chars = self.owner.settings.offline_prompt_chars
        return self.prompt[-chars:] if chars else None


class OfflineProcessors:
    name = "offline_asr"
    group = "hark-offline-asr"

    def __init__(self, settings: Settings, decoder: WhisperDecoder | None = None):
        self.settings = s = settings
        if s.offline_nice:
            os.nice(s.offline_nice)
        self.decoder = decoder or WhisperDecoder(
            s.offline_model,
            s.offline_device,
            s.offline_compute_type,
            s.offline_cpu_threads,
            s.offline_beam_size,
            s.offline_encode_pad_s,
        )
        self.candidate: WhisperDecoder | None = None
        if s.offline_candidate_model and s.offline_candidate_fraction > 0:
            self.candidate = WhisperDecoder(
                s.offline_candidate_model,
                s.offline_device,
                s.offline_compute_type,
                s.offline_cpu_threads,
                s.offline_beam_size,
                s.offline_encode_pad_s,
            )
        self.nbest_jobs: deque = deque()
        self.nbest_dropped = 0
        self.live: dict[str, OfflineStream] = {}  # open streams (removed at close or discard), for drafts
        self.drafts = 0
        self.archive_fallbacks = 0
        self.store = open_archive(settings)
        log.info(
            "model loaded",
            extra=kv(
                model=self.decoder.model_name,
                version=self.decoder.model_version,
                candidate=self.candidate.model_name if self.candidate else None,
                candidate_fraction=s.offline_candidate_fraction,
            ),
        )

    def new_windows(self, start_ms: int, resume: dict | None = None) -> StreamWindows:
        s = self.settings
        bounds = int(s.offline_min_window_s * 1000), int(min(s.offline_max_window_s, MAX_WINDOW_S) * 1000)
        return StreamWindows.resumed(resume, *bounds) if resume else StreamWindows(start_ms, *bounds)

    def open(self, stream: StreamInfo) -> OfflineStream:
        routed = self.candidate is not None and routed_to_candidate(
            stream.stream_id, self.settings.offline_candidate_fraction
        )
        self.live[stream.stream_id] = st = OfflineStream(self, stream, routed)
        return st

    def resume(self, stream: StreamInfo, state: dict) -> OfflineStream:
        proc = self.open(StreamInfo(stream.stream_id, stream.tenant, state["declared"], start_ms=state["start_ms"]))
        proc.restore(state)
        return proc

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        """A stream this process has no state for: decode it from the archive, if it is there
        (never one ended by a notice: erased, or refused for want of room)."""
        try:
            if status in NOTICES:
                raise KeyError(stream.stream_id)
            meta = archived_meta(self.store, stream.stream_id)
        except KeyError:
            log.warning("stream ended with no audio seen and none archived", extra=kv(stream_id=stream.stream_id))
            return [self.record(stream, "STREAM_END", 0, 0, 0, "", [], [], "en", 0, 0, end_status=status)]
        proc = self.open(
            StreamInfo(
                stream.stream_id,
                meta.get("tenant", stream.tenant),
                meta.get("language"),
                hotwords=tuple(meta.get("hotwords") or ()),
            )
        )
        out = [o for pcm in archived_pcm(self.store, stream.stream_id) for o in proc.push(pcm)]
        self.archive_fallbacks += 1
        return out + proc.close(status, seq)

    def queue_nbest(self, info: StreamInfo, index: int, w: Window, prompt: str | None, language: str | None) -> None:
        if len(self.nbest_jobs) >= NBEST_QUEUE:
            self.nbest_jobs.popleft()
            self.nbest_dropped += 1
        self.nbest_jobs.append((info, index, w, prompt, language))

    def idle(self) -> list[Output]:
        """Deferred work, one decode per call: a draft of the stream with the most undrafted audio
        (while few streams are open: ``offline_draft_max_streams``), else one window's n-best
        list. Both wait for a poll that found no audio to read, so under load they are shed and the
        real windows, which every transcript needs, keep their pace."""
        if len(self.live) > self.settings.offline_draft_max_streams:
            return self._nbest()  # drafts would take the CPU the real windows and the diarizer need
        undrafted, stream = max(
            ((st.undrafted_ms(), st) for st in self.live.values()), default=(0, None), key=lambda x: x[0]
        )
        if undrafted and stream is not None:
            self.drafts += 1
            return stream.draft()
        return self._nbest()

    def _nbest(self) -> list[Output]:
        if not self.nbest_jobs:
            return []
        info, index, w, prompt, language = self.nbest_jobs.popleft()
        t0 = time.perf_counter()
        hyps = self.decoder.nbest(w.pcm, self.settings.offline_nbest, prompt=prompt, language=language)
        return [
            self.record(
                info,
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
            )
        ]

    def stats(self) -> dict[str, float]:
        return {
            "nbest_dropped_total": self.nbest_dropped,
            "archive_fallbacks_total": self.archive_fallbacks,
            "encoder_reuses_total": self.decoder.model.encoded_hits,
            "decode_loops_redone_total": self.decoder.loops,  # Whisper repetition loops, decoded again on 30 s
            "drafts_decoded_total": self.drafts,
        }

    def record(
        self,
        info: StreamInfo,
        kind: str,
        index: int,
        start_ms: int,
        end_ms: int,
        text: str,
        words: list,
        nbest: list,
        language: str | None,
        decode_ms: int,
        published_at: int,
        end_status: str | None = None,
        decoder: WhisperDecoder | None = None,
    ) -> Output:
        """An OfflineTranscript record (schemas/hark.OfflineTranscript.avsc)."""
        decoder = decoder or self.decoder
        return Output(
            self.settings.offline_topic,
            "OfflineTranscript",
            {
                "stream_id": info.stream_id,
                "tenant": info.tenant,
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
            },
        )


def main(argv: list[str] | None = None) -> None:
    main_for(lambda s: StreamRunner(s, OfflineProcessors(s)), OfflineProcessors.name, argv)
