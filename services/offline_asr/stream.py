"""One stream's windows, decodes and drafts in offline_asr (service.py runs them on Kafka)."""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable

from hark.languages import AUTO, UNDETERMINED
from hark.runtime import Chunk, Output, StreamInfo, StreamProcessor, kv

from .context import OfflineContext
from .decoder import MAX_WINDOW_S, Decoded, WhisperDecoder, whisper_language
from .drafts import Drafter, Stretch
from .windows import Window

log = logging.getLogger("hark.offline_asr")

# Whisper's guess is taken as the stream's language at this probability or above: the lowest
# value (on a 0.05 grid) at which bench.languages' set claims no wrong language. Below it the
# stream is "und" and decoded in HARK_OFFLINE_LANGUAGE_FALLBACK. tests/test_offline.py checks
# it on clips that set does not contain.
DETECT_SURE = 0.85
DETECT_WINDOWS = 3  # windows with speech asked before the stream settles on "und"


def choose_language(decoder: WhisperDecoder, pcm, detections: int) -> tuple[str | None, float]:
    """One step of detection for a stream of language "auto", on its ``detections``-th window
    with speech: (Whisper's guess if its probability is >= DETECT_SURE, "und" once
    DETECT_WINDOWS windows were unsure, else None: ask the next window; the probability)."""
    lang, prob = decoder.detect(pcm)
    p = round(prob, 3)  # decided on as published: "und" is exactly p < DETECT_SURE
    if p >= DETECT_SURE:
        return lang, p
    return (UNDETERMINED if detections >= DETECT_WINDOWS else None), p


def decoded_in(language: str | None, fallback: str) -> str:
    """The language a window is decoded in: the stream's, or the fallback while it has none or
    it is "und"."""
    return fallback if language in (None, UNDETERMINED) else language


def routed_to_candidate(stream_id: str, fraction: float) -> bool:
    """The same answer for a stream id in every replica, restart and replay."""
    return fraction > 0 and zlib.crc32(stream_id.encode()) / 2**32 < fraction


class OfflineStream(StreamProcessor):
    """One stream's windows and decoding."""

    def __init__(self, owner: OfflineContext, info: StreamInfo, candidate: bool):
        self.owner, self.info, self.candidate = owner, info, candidate
        # "auto": detected on the first window with speech (hark/languages.py), then kept; "und"
        # when no window's guess was sure enough
        self.language: str | None = None if info.language == AUTO else whisper_language(info.language)
        self.language_p: float | None = None  # the detection's probability (None: declared)
        self.detections = 0
        self.windows = owner.new_windows(info.start_ms)
        self.prompt = ""
        self.segments = 0
        self.published_at_ms = 0
        self.drafts = Drafter(
            int(owner.settings.offline_provisional_s * 1000),
            info.start_ms,
            agree=owner.settings.offline_draft_agree,
            context_ms=int(owner.settings.offline_draft_context_s * 1000),
        )

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        self.published_at_ms = chunk.published_at_ms
        return self.push(chunk.pcm, replay)

    def push(self, pcm: bytes, replay: bool = False) -> list[Output]:
        return [o for w in self.windows.push(pcm) for o in self._decode(w, replay)]

    def undrafted_ms(self) -> int:
        return self.drafts.undrafted_ms(self.windows)

    def snapshot(self) -> dict | None:
        cut = self.windows.boundary  # set by a feed whose last cut fell at a pause in its chunk
        if cut is None or self.info.hotwords or self.owner.settings.offline_prompt_chars:
            return None
        return cut | {
            "segments": self.segments,
            # "und" stays out of "language": a replica from before it knew "und" would hand it to Whisper
            "language": None if self.language == UNDETERMINED else self.language,
            "undetermined": self.language == UNDETERMINED,
            "language_p": self.language_p,
            "detections": self.detections,
            "declared": self.info.language,
        }

    def restore(self, state: dict) -> None:
        self.windows = self.owner.new_windows(state["start_ms"], resume=state)
        self.segments, self.language, self.detections = state["segments"], state["language"], state["detections"]
        self.language = UNDETERMINED if state.get("undetermined") else self.language
        self.language_p = state.get("language_p")

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        out = [o for w in self.windows.flush() for o in self._decode(w, replay)]
        end = self.windows.end_ms
        decoders = [self.owner.decoder] + ([self.owner.candidate] if self.candidate and self.owner.candidate else [])
        for decoder in decoders:
            out.append(
                self.owner.record(
                    self.info,
                    kind="STREAM_END",
                    segment_index=self.segments,
                    start_ms=end,
                    end_ms=end,
                    language=self.language or UNDETERMINED,
                    language_probability=self.language_p,
                    audio_published_at_ms=self.published_at_ms,
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
                out.append(self._segment(index, w.start_ms, w.end_ms, c, o.candidate))
        if not d.text:
            return out
        out.append(self._segment(index, w.start_ms, w.end_ms, d, o.decoder))
        if s.offline_nbest > 1:
            o.queue_nbest(info, index, w, prompt, language, (self.language or UNDETERMINED, self.language_p))
        if s.offline_prompt_chars:
            self.prompt = (self.prompt + " " + d.text)[-s.offline_prompt_chars :]
        return out

    def _language(self, w: Window) -> str:
        """The language to decode ``w`` in. For "auto": Whisper's guess on this window once it is
        sure (probability >= DETECT_SURE), kept for the rest of the stream. While it is not, the
        window is decoded in the fallback language and the next one asked again; after
        DETECT_WINDOWS unsure windows the stream is "und", decoded in the fallback language: an
        unsure guess is never presented as the stream's language."""
        if self.language is None:
            self.detections += 1
            self.language, self.language_p = choose_language(self.owner.decoder, w.pcm, self.detections)
            log.info(
                "language detection",
                extra=kv(
                    stream_id=self.info.stream_id, language=self.language, p=self.language_p, windows=self.detections
                ),
            )
        return self.decode_language()

    def decode_language(self) -> str:
        """The settled language, or the fallback while there is none (or it is "und")."""
        return decoded_in(self.language, self.owner.settings.offline_language_fallback)

    def _segment(
        self, index: int, start_ms: int, end_ms: int, d, decoder: WhisperDecoder, variant: str | None = None
    ) -> Output:
        return self.owner.record(
            self.info,
            kind="SEGMENT",
            segment_index=index,
            start_ms=start_ms,
            end_ms=end_ms,
            text=d.text,
            words=d.words,
            language=self.language or UNDETERMINED,  # the stream's, not the decode's: an unsure one is "und"
            language_probability=self.language_p,
            decode_ms=int(d.decode_s * 1000),
            audio_published_at_ms=self.published_at_ms,
            decoder=decoder,
            variant=variant,
        )

    def batch_key(self) -> str | None:
        """Drafts with the same key share one batched decode: the language, when the stream has
        settled it and gives Whisper no prompt (its hotwords, its previous text); None: alone."""
        return None if self.language is None or self.info.hotwords or self._prompt() else self.decode_language()

    def draft_job(self, stretch: Stretch) -> Callable[[WhisperDecoder], list[Decoded | None]]:
        """The decode of a stretch drafted alone, as a job for the drafts' lane (lane.py): the
        prompt, language and hotwords are taken now, so the job reads nothing the loop changes.
        A stream whose language is not settled yet gets Whisper's guess on the stretch, kept for
        the draft alone (the stream's comes from its real windows); None: no confident guess."""
        w, prompt, hotwords = stretch.window, self._prompt(), self.info.hotwords
        language = None if self.language is None else self.decode_language()

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

    def drafted(self, stretch: Stretch, d: Decoded | None, decoder: WhisperDecoder | None = None) -> list[Output]:
        """The provisional SEGMENT for a decoded stretch, with the words its draft keeps, and the
        tentative one with the words after them (drafts.py)."""
        if d is None:
            return []
        end = stretch.window.end_ms
        kept, tentative = self.drafts.keep(stretch, d.words)
        out = []
        if kept:
            whole = stretch.at_pause and stretch.from_ms == stretch.window.start_ms  # every word decoded kept
            text = d.text if whole else " ".join(x["word"] for x in kept)
            out.append(self._draft(stretch.from_ms, stretch.window.end_ms, text, kept, d, "provisional", decoder))
        if tentative:  # up to the cut: Whisper's reading of all the audio it heard
            start = kept[-1]["end_ms"] if kept else stretch.from_ms
            text = " ".join(x["word"] for x in tentative)
            out.append(self._draft(start, end, text, tentative, d, "tentative", decoder))
        return out

    def _draft(
        self,
        start_ms: int,
        end_ms: int,
        text: str,
        words: list[dict],
        d: Decoded,
        variant: str,
        decoder: WhisperDecoder | None,
    ) -> Output:
        """A draft's record, of the model that drafted it (the drafts' lane's)."""
        d = dataclasses.replace(d, text=text, words=words)
        return self._segment(self.segments, start_ms, end_ms, d, decoder or self.owner.decoder, variant=variant)

    def _prompt(self) -> str | None:
        chars = self.owner.settings.offline_prompt_chars
        return self.prompt[-chars:] if chars else None
