"""offline_asr: Whisper over pause-cut windows, as a processor on the audio topic.

Triggers: a window is decoded as soon as the stream has moved past a pause with at least
``offline_min_window_s`` of audio pending (so long streams are improved while they run), and
the rest at StreamEnd (the previous offline text can be the prompt: ``offline_prompt_chars``,
off by default, docs/decisions/stack-choices.md). n-best lists are
computed when the service is otherwise idle and the lane free (they cost another decode and nobody
waits on them).

Drafts: while a window grows, its undrafted audio is decoded once ``offline_provisional_s`` of it
is pending, up to its latest pause or, inside speech, up to the words ending 0.5 s before the cut
(drafts.py), on a background lane with a model of its own at nice ``offline_draft_nice`` (lane.py),
so the loop never waits for one: SEGMENTs with ``variant="provisional"`` that captions
show until the window's own text replaces them (docs/architecture.md#drafts-whisper-text-before-a-window-ends).
They depend on timing, so they are not snapshotted or replayed, and nothing else depends on them.

Audio source: the stream's chunks as they arrive on the audio topic, buffered per stream up to
one window. The archive cannot serve this, because ingest writes its PCM in 30 s segments and
the open one only at stream end; it is the fallback for a stream whose audio this service
never saw (StreamEnd without state), read in bounded windows.

Resume point: the last window cut at a pause (windows.py), where the state is the cut's time,
the next window's index and the stream's language and its detection (~150 bytes); a restart re-reads the stream from
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
from collections import deque

from hark.config import Settings
from hark.keys import open_archive
from hark.languages import UNDETERMINED
from hark.records import now_ms
from hark.runtime import NOTICES, Output, StreamInfo, StreamRunner, kv, main_for
from hark.storage import archived_meta, archived_pcm

from .decoder import MAX_WINDOW_S, WhisperDecoder
from .drafts import Stretch
from .lane import Lane
from .stream import OfflineStream, routed_to_candidate
from .windows import StreamWindows, Window

log = logging.getLogger("hark.offline_asr")

NBEST_QUEUE = 8  # windows (<= 30 s of PCM, ~1 MB each) waiting for their n-best; the oldest is dropped beyond


class OfflineProcessors:
    name = "offline_asr"
    group = "hark-offline-asr"

    def __init__(
        self, settings: Settings, decoder: WhisperDecoder | None = None, draft_decoder: WhisperDecoder | None = None
    ):
        self.settings = s = settings
        if s.offline_nice:
            os.nice(s.offline_nice)
        self.decoder = decoder or self._whisper(s.offline_model)
        self.candidate: WhisperDecoder | None = None
        if s.offline_candidate_model and s.offline_candidate_fraction > 0:
            self.candidate = self._whisper(s.offline_candidate_model)
        # drafts decode on a model of their own (Whisper base: ~270 MB more peak RSS), never the windows'
        self.lane: Lane[WhisperDecoder] | None = None
        if s.offline_provisional_s > 0:
            self.lane = Lane(lambda: draft_decoder or decoder or self._whisper(s.offline_model), s.offline_draft_nice)
        self.nbest_jobs: deque = deque()
        self.nbest_dropped = 0
        self.live: dict[str, OfflineStream] = {}  # open streams (removed at close or discard), for drafts
        self.drafts = 0
        self.draft_batches = 0  # decode_batch calls for drafts (each of 1 to offline_draft_batch streams)
        self.archive_fallbacks = 0
        self.drafts_dropped = 0  # finished after their window was decoded or their stream ended
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

    def _whisper(self, model: str) -> WhisperDecoder:
        s = self.settings
        return WhisperDecoder(
            model,
            s.offline_device,
            s.offline_compute_type,
            s.offline_cpu_threads,
            s.offline_beam_size,
            s.offline_encode_pad_s,
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
            return [self.record(stream, "STREAM_END", 0, 0, 0, "", [], [], UNDETERMINED, 0, 0, end_status=status)]
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

    def step(self) -> list[Output]:
        """Drafts, on every pass of the loop: the lane's finished job is published and the next
        started, for the streams with the most undrafted audio (while few streams are open:
        ``offline_draft_max_streams``). A draft whose window was decoded meanwhile, or whose
        stream ended, is dropped: the window's own text is there."""
        if self.lane is None:
            return []
        out = self._drafted(self.lane)
        if not self.lane.busy and len(self.live) <= self.settings.offline_draft_max_streams:
            self._start_drafts(self.lane)
        return out

    def _drafted(self, lane: Lane) -> list[Output]:
        finished = lane.done()
        if finished is None:
            return []
        taken: list[tuple[OfflineStream, int, Stretch]] = finished[0]
        out: list[Output] = []
        for (st, index, stretch), d in zip(taken, finished[1]):
            if self.live.get(st.info.stream_id) is not st or st.segments != index:
                self.drafts_dropped += 1
                continue
            out += st.drafted(stretch, d)
        return out

    def _start_drafts(self, lane: Lane) -> None:
        pending = sorted(((st.undrafted_ms(), st) for st in self.live.values()), key=lambda x: -x[0])
        due = [st for undrafted, st in pending if undrafted]
        if not due:
            return
        key = due[0].batch_key()
        group = [due[0]] if key is None else [st for st in due if st.batch_key() == key]
        taken = [(st, st.segments, x) for st in group[: self.settings.offline_draft_batch] if (x := st.stretch())]
        if not taken:
            return
        self.drafts += len(taken)
        if key is None or self.settings.offline_draft_batch == 1:
            st, _, x = taken[0]
            lane.submit(taken, st.draft_job(x))
            return
        self.draft_batches += 1
        pcms, starts = [x.window.pcm for _, _, x in taken], [x.window.start_ms for _, _, x in taken]
        lane.submit(taken, lambda decoder: decoder.decode_batch(pcms, starts, language=key))

    def idle(self) -> list[Output]:
        """One window's n-best list when a poll found no audio to read, and the drafts' lane is
        not decoding: n-best lists are shed under load, and the real windows keep their pace."""
        if self.lane is not None and self.lane.busy:
            return []
        return self._nbest()

    def _nbest(self) -> list[Output]:
        if not self.nbest_jobs:
            return []
        info, index, w, prompt, language, (said, language_p) = self.nbest_jobs.popleft()
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
                said,
                int((time.perf_counter() - t0) * 1000),
                0,
                language_p=language_p,
            )
        ]

    def stats(self) -> dict[str, float]:
        return {
            "nbest_dropped_total": self.nbest_dropped,
            "archive_fallbacks_total": self.archive_fallbacks,
            "encoder_reuses_total": self.decoder.model.encoded_hits,
            "decode_loops_redone_total": self.decoder.loops,  # Whisper repetition loops, decoded again on 30 s
            "drafts_decoded_total": self.drafts,
            "draft_batches_total": self.draft_batches,
            "drafts_dropped_total": self.drafts_dropped,
            "draft_failures_total": self.lane.failures if self.lane else 0,
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
        language_p: float | None = None,
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
                "language_probability": language_p,
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
