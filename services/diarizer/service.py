"""diarizer: a consumer group of its own on the audio topic; speaker turns onto ``hark.speakers``.

Per stream, a StreamDiarizer (``stream.py``) runs pyannote + CAM++ on blocks of
``diarizer_block_s`` as the audio arrives and publishes INCREMENTAL turns whose labels never
change; at the stream's end (or idle timeout) it publishes one FULL record: every turn relabelled
with the whole stream known, honouring ``num_speakers`` / ``min_speakers`` / ``max_speakers``
from the StreamStart metadata. Memory per stream: the context and one block of PCM plus one
centroid per speaker per block.

Commits are held at each open stream's first record: the full pass needs every block of the
stream, so a restarted diarizer re-reads an open stream from its start (at ~0.1 s per audio
second) instead of keeping state outside Kafka. The turns it already published are recomputed
identically and not published again (runtime ``replaying``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from confluent_kafka import Message

from hark.config import Settings
from hark.runtime import AudioStreamService, InputError, check_chunk, kv, main_for, now_ms

from .pipeline import MODEL_NAME, Diarizer, Turn
from .stream import StreamDiarizer

log = logging.getLogger("hark.diarizer")

HINTS = ("num_speakers", "min_speakers", "max_speakers")


@dataclass
class DiarizedStream:
    diarizer: StreamDiarizer
    tenant: str
    partition: int
    next_seq: int
    last_seen: float
    published_at_ms: int = 0


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
        if not 1 <= out[k] <= 32:
            raise InputError("bad_metadata", f"stream metadata {k}={v} is outside 1..32")
    return out


class DiarizerService(AudioStreamService):
    name = "diarizer"
    group = "hark-diarizer"

    def __init__(self, settings: Settings, diarizer: Diarizer | None = None):
        super().__init__(settings)
        if settings.diarizer_nice:
            os.nice(settings.diarizer_nice)
        torch.set_num_threads(max(1, settings.diarizer_threads))
        self.diarizer = diarizer or Diarizer()
        self.streams: dict[str, DiarizedStream] = {}
        log.info("model loaded", extra=kv(model=MODEL_NAME, version=self.diarizer.model_version))

    def _new(self, hints: dict[str, int]) -> StreamDiarizer:
        s = self.settings
        return StreamDiarizer(
            self.diarizer,
            block_s=s.diarizer_block_s,
            context_s=s.diarizer_context_s,
            link_threshold=s.diarizer_link_threshold,
            cluster_threshold=s.diarizer_cluster_threshold,
            merge_threshold=s.diarizer_merge_threshold,
            min_speaker_s=s.diarizer_min_speaker_s,
            **hints,
        )

    # -- records --------------------------------------------------------------------------------
    def on_start(self, sid: str, rec: dict, msg: Message) -> None:
        if sid in self.streams:
            return
        if len(self.streams) >= self.settings.max_streams:
            raise InputError("capacity", f"diarizer at capacity ({self.settings.max_streams} streams); add a replica")
        self.streams[sid] = DiarizedStream(
            self._new(speaker_hints(rec.get("metadata"))), rec["tenant"], msg.partition(), 1, time.monotonic()
        )
        self.hold(sid, msg)
        self.metrics.set("open_streams", len(self.streams))

    def on_chunk(self, sid: str, rec: dict, msg: Message) -> None:
        pcm = check_chunk(rec)
        st = self.streams.get(sid)
        if st is None:
            # Its start was committed past (a restart after the hold moved) or never seen: the full
            # pass cannot cover what came before, so diarize from here and say so in the log.
            log.warning("stream joined mid-way", extra=kv(stream_id=sid, seq=rec["seq"]))
            self.on_start(sid, {"tenant": rec["tenant"], "metadata": {}}, msg)
            st = self.streams[sid]
            st.next_seq = rec["seq"]
            st.diarizer.start_at(rec["offset_samples"] // 16)
        st.next_seq = rec["seq"] + 1
        st.last_seen = time.monotonic()
        st.published_at_ms = rec["published_at_ms"]
        block = self._diarize(st, lambda: st.diarizer.push(np.frombuffer(pcm, dtype="<i2")))
        if block is not None:
            self._publish(sid, st, "INCREMENTAL", *block)

    def _diarize(self, st: DiarizedStream, step) -> tuple[list[Turn], float] | None:
        """Run ``step`` (push or flush); if it diarized a block, count its decode time and return
        its turns and compute seconds."""
        before, covered = st.diarizer.compute_s, st.diarizer.emitted_ms
        turns = step()
        if st.diarizer.emitted_ms <= covered:
            return None
        self.observe_decode(st.diarizer.compute_s - before, (st.diarizer.emitted_ms - covered) / 1000)
        return turns, st.diarizer.compute_s - before

    def on_end(self, sid: str, rec: dict, msg: Message) -> None:
        self._close(sid, rec["tenant"], str(rec["status"]))

    def _close(self, sid: str, tenant: str, status: str) -> None:
        st = self.streams.pop(sid, None)
        self.release(sid)
        self.metrics.set("open_streams", len(self.streams))
        if st is None:
            log.warning("stream ended with no audio seen", extra=kv(stream_id=sid))
            self._emit(sid, tenant, "FULL", [], 0, 0, 0, 0, status)
            return
        t0 = time.perf_counter()
        tail = self._diarize(st, st.diarizer.flush)  # a stream shorter than a block is diarized only here
        if tail is not None and tail[0]:
            self._publish(sid, st, "INCREMENTAL", tail[0], time.perf_counter() - t0)
        full = st.diarizer.full_turns()
        self._emit(
            sid,
            st.tenant,
            "FULL",
            full,
            st.diarizer.emitted_ms,
            len({t.speaker for t in full}),
            int((time.perf_counter() - t0) * 1000),
            st.published_at_ms,
            status,
        )
        log.info(
            "stream diarized",
            extra=kv(
                stream_id=sid,
                speakers=len({t.speaker for t in full}),
                turns=len(full),
                rtf=round(st.diarizer.compute_s / max(st.diarizer.audio_ms / 1000, 1e-3), 3),
            ),
        )

    def _publish(self, sid: str, st: DiarizedStream, kind: str, turns: list[Turn], secs: float) -> None:
        self._emit(
            sid,
            st.tenant,
            kind,
            turns,
            st.diarizer.emitted_ms,
            st.diarizer.speakers,
            int(secs * 1000),
            st.published_at_ms,
        )

    def _emit(self, sid, tenant, kind, turns, covered, speakers, compute_ms, published_at, status=None) -> None:
        self.produce(
            self.settings.speakers_topic,
            sid,
            "SpeakerTurns",
            {
                "stream_id": sid,
                "tenant": tenant,
                "kind": kind,
                "turns": [{"speaker": t.speaker, "start_ms": t.start_ms, "end_ms": t.end_ms} for t in turns],
                "covered_until_ms": covered,
                "num_speakers": speakers,
                "end_status": status,
                "compute_ms": compute_ms,
                "audio_published_at_ms": published_at,
                "emitted_at_ms": now_ms(),
                "model_name": MODEL_NAME,
                "model_version": self.diarizer.model_version,
            },
        )


def main(argv: list[str] | None = None) -> None:
    main_for(DiarizerService, argv)
