"""One stream's windows, decodes and drafts in offline_asr (service.py runs them on Kafka)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from hark.languages import AUTO, UNDETERMINED
from hark.runtime import Chunk, Output, StreamInfo, kv

from .decoder import MAX_WINDOW_S, Decoded, WhisperDecoder, whisper_language
from .drafts import Drafter, Stretch
from .windows import Window

if TYPE_CHECKING:
    from .service import OfflineProcessors

log = logging.getLogger("hark.offline_asr")

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

    def batch_key(self) -> str | None:
        """Drafts with the same key share one batched decode: the language, when the stream has
        settled it and gives Whisper no prompt (its hotwords, its previous text); None: alone."""
        return None if self.language is None or self.info.hotwords or self._prompt() else self.language

    def draft_job(self, stretch: Stretch) -> Callable[[WhisperDecoder], list[Decoded | None]]:
        """The decode of a stretch drafted alone, as a job for the drafts' lane (lane.py): the
        prompt, language and hotwords are taken now, so the job reads nothing the loop changes.
        A stream whose language is not settled yet gets Whisper's guess on the stretch, kept for
        the draft alone (the stream's comes from its real windows); None: no confident guess."""
        w, language, prompt, hotwords = stretch.window, self.language, self._prompt(), self.info.hotwords

        def job(decoder: WhisperDecoder) -> list[Decoded | None]:
            lang = language
            if lang is None:
                lang, sure = decoder.detect(w.pcm)
                if sure < DETECT_SURE:
                    return [None]
            return [decoder.decode(w.pcm, w.start_ms, prompt=prompt, language=lang, hotwords=hotwords)]

        return job

    def stretch(self) -> Stretch | None:
        """The next stretch to draft (None: none with speech)."""
        return self.drafts.stretch(self.windows, int(MAX_WINDOW_S * 1000))

    def drafted(self, stretch: Stretch, d: Decoded | None) -> list[Output]:
        """The provisional SEGMENT for a decoded stretch, with the words its draft keeps."""
        if d is None:
            return []
        kept = self.drafts.keep(stretch, d.words)
        if not kept:
            return []
        if not stretch.at_pause:
            d.text, d.words = " ".join(x["word"] for x in kept), kept
        rec = self._segment(self.segments, stretch.window, d, self.owner.decoder)
        rec.record["variant"] = "provisional"
        return [rec]

    def _prompt(self) -> str | None:
        chars = self.owner.settings.offline_prompt_chars
        return self.prompt[-chars:] if chars else None
