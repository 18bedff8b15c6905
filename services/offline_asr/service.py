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
from collections.abc import Mapping

from hark.config import Settings
from hark.keys import open_archive
from hark.languages import UNDETERMINED
from hark.records import Hypothesis
from hark.runtime import NOTICES, Output, Processors, StreamInfo, StreamProcessor, StreamRunner, kv, main_for
from hark.storage import archived_meta, archived_pcm

from .context import OfflineContext
from .decoder import WhisperDecoder
from .drafts import Stretch
from .lane import Lane
from .spec import SPEC
from .stream import OfflineStream, routed_to_candidate

log = logging.getLogger("hark.offline_asr")


class OfflineProcessors(Processors):
    name = SPEC.name
    group = SPEC.consumer_group

    def __init__(
        self, settings: Settings, decoder: WhisperDecoder | None = None, draft_decoder: WhisperDecoder | None = None
    ):
        self.settings = s = settings
        if s.offline_nice:
            os.nice(s.offline_nice)
        candidate = None
        if s.offline_candidate_model and s.offline_candidate_fraction > 0:
            candidate = self._whisper(s.offline_candidate_model)
        self.context = OfflineContext(s, decoder or self._whisper(s.offline_model), candidate)
        # drafts decode on a model of their own (Whisper base: ~270 MB more peak RSS), never the windows'
        self.lane: Lane[WhisperDecoder] | None = None
        if s.offline_provisional_s > 0:
            model = s.offline_draft_model or s.offline_model
            self.lane = Lane(lambda: draft_decoder or decoder or self._whisper(model), s.offline_draft_nice)
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

    @property
    def decoder(self) -> WhisperDecoder:  # the streams' (OfflineContext): one place to change it
        return self.context.decoder

    @property
    def candidate(self) -> WhisperDecoder | None:
        return self.context.candidate

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

    def open(self, stream: StreamInfo) -> OfflineStream:
        routed = self.candidate is not None and routed_to_candidate(
            stream.stream_id, self.settings.offline_candidate_fraction
        )
        return OfflineStream(self.context, stream, routed)

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
            return [
                self.context.record(
                    stream, kind="STREAM_END", segment_index=0, language=UNDETERMINED, end_status=status
                )
            ]
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

    def every_pass(self, streams: Mapping[str, StreamProcessor]) -> list[Output]:
        """Drafts, on every pass of the loop: the lane's finished job is published and the next
        started, for the streams with the most undrafted audio (while few streams are open:
        ``offline_draft_max_streams``). A draft whose window was decoded meanwhile, or whose
        stream ended, is dropped: the window's own text is there."""
        if self.lane is None:
            return []
        live = {sid: st for sid, st in streams.items() if isinstance(st, OfflineStream)}
        out = self._drafted(self.lane, live)
        if not self.lane.busy and len(streams) <= self.settings.offline_draft_max_streams:
            self._start_drafts(self.lane, live)
        return out

    def _drafted(self, lane: Lane, live: dict[str, OfflineStream]) -> list[Output]:
        finished = lane.done()
        if finished is None:
            return []
        taken: list[tuple[OfflineStream, int, Stretch]] = finished[0]
        out: list[Output] = []
        for (st, index, stretch), d in zip(taken, finished[1]):
            if live.get(st.info.stream_id) is not st or st.segments != index:
                self.drafts_dropped += 1
                continue
            out += st.drafted(stretch, d, lane.decoder)
        return out

    def _start_drafts(self, lane: Lane, live: dict[str, OfflineStream]) -> None:
        pending = sorted(((st.undrafted_ms(), st) for st in live.values()), key=lambda x: -x[0])
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

    def when_caught_up(self, streams: Mapping[str, StreamProcessor]) -> list[Output]:
        """One window's n-best list when a poll found no audio to read, and the drafts' lane is
        not decoding: n-best lists are shed under load, and the real windows keep their pace."""
        if self.lane is not None and self.lane.busy:
            return []
        return self._nbest()

    def _nbest(self) -> list[Output]:
        jobs = self.context.nbest_jobs
        if not jobs:
            return []
        info, index, w, prompt, language, (said, language_p) = jobs.popleft()
        t0 = time.perf_counter()
        hyps = self.decoder.nbest(w.pcm, self.settings.offline_nbest, prompt=prompt, language=language)
        return [
            self.context.record(
                info,
                kind="NBEST",
                segment_index=index,
                start_ms=w.start_ms,
                end_ms=w.end_ms,
                text=hyps[0][0] if hyps else "",
                nbest=[Hypothesis(text=t, score=sc) for t, sc in hyps],
                language=said,
                language_probability=language_p,
                decode_ms=int((time.perf_counter() - t0) * 1000),
            )
        ]

    def stats(self) -> dict[str, float]:
        return {
            "nbest_dropped_total": self.context.nbest_dropped,
            "archive_fallbacks_total": self.archive_fallbacks,
            "encoder_reuses_total": self.decoder.model.encoded_hits,
            "decode_loops_redone_total": self.decoder.loops,  # Whisper repetition loops, decoded again on 30 s
            "drafts_decoded_total": self.drafts,
            "draft_batches_total": self.draft_batches,
            "drafts_dropped_total": self.drafts_dropped,
            "draft_failures_total": self.lane.failures if self.lane else 0,
        }


def main(argv: list[str] | None = None) -> None:
    main_for(lambda s: StreamRunner(s, OfflineProcessors(s)), SPEC.name, argv)
