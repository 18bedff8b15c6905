"""What every stream of one offline_asr process shares: settings, decoders, the n-best queue and
the OfflineTranscript record. The service owns one and hands it to each stream, so a stream
needs nothing of the service (stream.py imports this module, never service.py)."""

from __future__ import annotations

from collections import deque

from hark.config import Settings
from hark.records import Hypothesis, OfflineTranscript, Word, now_ms
from hark.runtime import Output, StreamInfo

from .decoder import MAX_WINDOW_S, WhisperDecoder
from .windows import StreamWindows, Window

NBEST_QUEUE = 8  # windows (<= 30 s of PCM, ~1 MB each) waiting for their n-best; the oldest is dropped beyond


class OfflineContext:
    def __init__(self, settings: Settings, decoder: WhisperDecoder, candidate: WhisperDecoder | None):
        self.settings, self.decoder, self.candidate = settings, decoder, candidate
        self.nbest_jobs: deque = deque()
        self.nbest_dropped = 0

    def new_windows(self, start_ms: int, resume: dict | None = None) -> StreamWindows:
        s = self.settings
        bounds = int(s.offline_min_window_s * 1000), int(min(s.offline_max_window_s, MAX_WINDOW_S) * 1000)
        return StreamWindows.resumed(resume, *bounds) if resume else StreamWindows(start_ms, *bounds)

    def queue_nbest(
        self,
        info: StreamInfo,
        index: int,
        w: Window,
        prompt: str | None,
        language: str | None,
        label: tuple[str, float | None],
    ) -> None:
        """``language``: the one to decode in; ``label``: the stream's language and detection
        probability as its records say them."""
        if len(self.nbest_jobs) >= NBEST_QUEUE:
            self.nbest_jobs.popleft()
            self.nbest_dropped += 1
        self.nbest_jobs.append((info, index, w, prompt, language, label))

    def record(
        self,
        info: StreamInfo,
        *,
        kind: str,
        segment_index: int,
        language: str,
        start_ms: int = 0,
        end_ms: int = 0,
        text: str = "",
        words: list[Word] | None = None,
        nbest: list[Hypothesis] | None = None,
        language_probability: float | None = None,
        decode_ms: int = 0,
        audio_published_at_ms: int = 0,
        end_status: str | None = None,
        decoder: WhisperDecoder | None = None,
        variant: str | None = None,
    ) -> Output:
        """An OfflineTranscript of ``decoder`` (default the primary model): its variant is
        "primary" or "candidate" by that decoder unless given ("provisional": a draft)."""
        decoder = decoder or self.decoder
        rec = OfflineTranscript(
            stream_id=info.stream_id,
            tenant=info.tenant,
            kind=kind,
            segment_index=segment_index,
            start_ms=start_ms,
            end_ms=end_ms,
            text=text,
            words=words or [],
            nbest=nbest or [],
            language=language,
            language_probability=language_probability,
            decode_ms=decode_ms,
            end_status=end_status,
            audio_published_at_ms=audio_published_at_ms,
            emitted_at_ms=now_ms(),
            model_name=decoder.model_name,
            model_version=decoder.model_version,
            variant=variant or ("primary" if decoder is self.decoder else "candidate"),
        )
        return Output(self.settings.offline_topic, "OfflineTranscript", rec)
