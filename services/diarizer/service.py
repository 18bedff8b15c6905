"""diarizer: speaker diarization as a processor on the audio topic; turns onto ``hark.speakers``.

Per stream, a StreamDiarizer (``stream.py``) runs pyannote + CAM++ on blocks of
``diarizer_block_s`` as the audio arrives and publishes INCREMENTAL turns whose labels never
change; at the stream's end (or idle timeout) it publishes one FULL record: every turn relabelled
with the whole stream known, honouring ``num_speakers`` / ``min_speakers`` / ``max_speakers``
from the StreamStart metadata. Memory per stream: the context and one block of PCM plus one
centroid per speaker per block.

No snapshot: the full pass needs every block of the stream, so a restarted diarizer re-reads an
open stream from its start (at ~0.1 s per audio second) instead of keeping state outside Kafka.
The turns it already published are recomputed identically and dropped by the runner.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from hark import records
from hark.config import Settings
from hark.params import MAX_SPEAKERS
from hark.records import SpeakerTurns, now_ms
from hark.runtime import Chunk, InputError, Output, Processors, StreamInfo, StreamProcessor, StreamRunner, kv, main_for
from hark.voices import TenantVoices, VoiceStore

from .pipeline import MODEL_NAME, Diarizer, Turn
from .spec import SPEC
from .stream import StreamDiarizer

log = logging.getLogger("hark.diarizer")

HINTS = ("num_speakers", "min_speakers", "max_speakers")


def speaker_hints(metadata: dict | None) -> dict[str, int]:
    out = {}
    for k in HINTS:
        v = (metadata or {}).get(k)
        if v in (None, ""):
            continue
        try:
            out[k] = int(v)
        except ValueError:
            raise InputError("bad_metadata", f"stream metadata {k}={v!r} is not an integer") from None
        if not 1 <= out[k] <= MAX_SPEAKERS:
            raise InputError("bad_metadata", f"stream metadata {k}={v} is outside 1..{MAX_SPEAKERS}")
    return out


class DiarizedStream(StreamProcessor):
    """One stream's diarizer."""

    def __init__(self, owner: DiarizerProcessors, info: StreamInfo, diarizer: StreamDiarizer):
        self.owner, self.info, self.diarizer = owner, info, diarizer
        self.published_at_ms = 0

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        self.published_at_ms = chunk.published_at_ms
        block = self._diarize(lambda: self.diarizer.push(np.frombuffer(chunk.pcm, dtype="<i2")))
        return [] if block is None else [self._record("INCREMENTAL", *block)]

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        d, out = self.diarizer, []
        t0 = time.perf_counter()
        tail = self._diarize(d.flush)  # a stream shorter than a block is diarized only here
        if tail is not None and tail[0]:
            out.append(self._record("INCREMENTAL", *tail))
        full = d.full_turns()
        speakers = len({t.speaker for t in full})
        out.append(
            self.owner.record(
                self.info,
                kind="FULL",
                turns=full,
                covered_until_ms=d.emitted_ms,
                num_speakers=speakers,
                compute_ms=int((time.perf_counter() - t0) * 1000),
                audio_published_at_ms=self.published_at_ms,
                end_status=status,
            )
        )
        log.info(
            "stream diarized",
            extra=kv(
                stream_id=self.info.stream_id,
                speakers=speakers,
                turns=len(full),
                rtf=round(d.compute_s / max(d.audio_ms / 1000, 1e-3), 3),
            ),
        )
        return out

    def _diarize(self, step: Callable[[], list[Turn]]) -> tuple[list[Turn], float] | None:
        """Run ``step`` (push or flush); if it diarized a block, its turns and compute seconds."""
        before, covered = self.diarizer.compute_s, self.diarizer.emitted_ms
        turns = step()
        if self.diarizer.emitted_ms <= covered:
            return None
        return turns, self.diarizer.compute_s - before

    def _record(self, kind: str, turns: list[Turn], secs: float) -> Output:
        d = self.diarizer
        return self.owner.record(
            self.info,
            kind=kind,
            turns=turns,
            covered_until_ms=d.emitted_ms,
            num_speakers=d.speakers,
            compute_ms=int(secs * 1000),
            audio_published_at_ms=self.published_at_ms,
        )


class DiarizerProcessors(Processors):
    name = SPEC.name
    group = SPEC.consumer_group

    def __init__(self, settings: Settings, diarizer: Diarizer | None = None):
        self.settings = settings
        if settings.diarizer_nice:
            os.nice(settings.diarizer_nice)
        torch.set_num_threads(max(1, settings.diarizer_threads))
        self.diarizer = diarizer or Diarizer()
        self.voices = TenantVoices(VoiceStore(settings))
        log.info("model loaded", extra=kv(model=MODEL_NAME, version=self.diarizer.model_version))

    def open(self, stream: StreamInfo) -> DiarizedStream:
        s = self.settings
        d = StreamDiarizer(
            self.diarizer,
            block_s=s.diarizer_block_s,
            context_s=s.diarizer_context_s,
            link_threshold=s.diarizer_link_threshold,
            cluster_threshold=s.diarizer_cluster_threshold,
            merge_threshold=s.diarizer_merge_threshold,
            min_speaker_s=s.diarizer_min_speaker_s,
            voices=self._voices(stream.tenant),
            name_threshold=s.voice_match_threshold,
            live_name_min_s=s.voice_live_min_s,
            **speaker_hints(stream.metadata),
        )
        if stream.start_ms:  # joined mid-way: the full pass cannot cover what came before
            d.start_at(stream.start_ms)
        return DiarizedStream(self, stream, d)

    def _voices(self, tenant: str) -> list[tuple[str, np.ndarray]]:
        """The tenant's enrolled voices made by this model; a store that cannot be read names nobody
        (the stream is still diarized) and says so."""
        try:
            return [(v.name, v.vector) for v in self.voices(tenant) if v.model == MODEL_NAME]
        except Exception as e:  # naming is an extra: never lose a stream for it
            log.warning("enrolled voices unreadable", extra=kv(tenant=tenant, error=str(e)))
            return []

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        log.warning("stream ended with no audio seen", extra=kv(stream_id=stream.stream_id))
        return [self.record(stream, kind="FULL", end_status=status)]

    def record(
        self,
        info: StreamInfo,
        *,
        kind: str,
        turns: Sequence[Turn] = (),
        covered_until_ms: int = 0,
        num_speakers: int = 0,
        compute_ms: int = 0,
        audio_published_at_ms: int = 0,
        end_status: str | None = None,
    ) -> Output:
        rec = SpeakerTurns(
            stream_id=info.stream_id,
            tenant=info.tenant,
            kind=kind,
            turns=[records.Turn(speaker=t.speaker, start_ms=t.start_ms, end_ms=t.end_ms) for t in turns],
            covered_until_ms=covered_until_ms,
            num_speakers=num_speakers,
            end_status=end_status,
            compute_ms=compute_ms,
            audio_published_at_ms=audio_published_at_ms,
            emitted_at_ms=now_ms(),
            model_name=MODEL_NAME,
            model_version=self.diarizer.model_version,
        )
        return Output(self.settings.speakers_topic, "SpeakerTurns", rec)


def main(argv: list[str] | None = None) -> None:
    main_for(lambda s: StreamRunner(s, DiarizerProcessors(s)), SPEC.name, argv)
