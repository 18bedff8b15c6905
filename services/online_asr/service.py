"""online_asr: the streaming decoder as a processor on the audio topic; finals onto the online
topic (for the results service to merge), partial captions straight onto the results topic.

State per stream is one StreamRecognizer (a pooled decoder plus a sub-frame buffer): bounded
by ``max_streams`` and by the recognizer's utterance cap, released at the stream's end or idle
timeout (the runner's).

Resume point: the chunk of the stream's last end of speech, where the recognizer's state
(positions, next utterance id, cepstral mean: ~300 bytes) is its snapshot. A crash or rebalance
restores that state and re-decodes only the open utterance, with the same utterance ids and the
same text as an uninterrupted run (tests/test_recognizer.py checks this).
"""

from __future__ import annotations

from hark.config import Settings
from hark.keys import open_archive
from hark.languages import AUTO
from hark.records import Hypothesis, OnlineTranscript, Word, now_ms, result_record
from hark.runtime import Chunk, InputError, Output, Processors, StreamInfo, StreamProcessor, StreamRunner, main_for

from .recognizer import MODEL_NAME, MODEL_VERSION, CapacityError, DecoderPool, Event, StreamRecognizer
from .spec import SPEC


def transcript_record(
    *,
    stream_id: str,
    tenant: str,
    kind: str,
    utterance_id: int,
    audio_seq: int,
    text: str = "",
    start_ms: int = 0,
    end_ms: int = 0,
    audio_published_at_ms: int = 0,
    words: list[Word] | None = None,
    nbest: list[Hypothesis] | None = None,
    lattice_key: str | None = None,
    end_status: str | None = None,
) -> OnlineTranscript:
    """An OnlineTranscript record of this model; a STREAM_END gives only its ids, seq and status."""
    return OnlineTranscript(
        stream_id=stream_id,
        tenant=tenant,
        kind=kind,
        utterance_id=utterance_id,
        text=text,
        start_ms=start_ms,
        end_ms=end_ms,
        words=words or [],
        nbest=nbest or [],
        lattice_key=lattice_key,
        end_status=end_status,
        audio_seq=audio_seq,
        audio_published_at_ms=audio_published_at_ms,
        emitted_at_ms=now_ms(),
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
    )


class OnlineStream(StreamProcessor):
    """One stream's recognizer."""

    def __init__(self, owner: OnlineProcessors, info: StreamInfo, recognizer: StreamRecognizer):
        self.owner, self.info, self.recognizer = owner, info, recognizer
        self.published_at_ms = 0

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        self.published_at_ms = chunk.published_at_ms
        return self._outputs(self.recognizer.feed(chunk.pcm), chunk.seq, replay)

    def snapshot(self) -> dict | None:
        return self.recognizer.boundary  # set by a feed with an end of speech in it

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        out = self._outputs(self.recognizer.finish(), seq, replay)
        self.discard()
        r = self.recognizer
        end = transcript_record(
            stream_id=self.info.stream_id,
            tenant=self.info.tenant,
            kind="STREAM_END",
            utterance_id=r.utterance_id,
            start_ms=r.position_ms,
            end_ms=r.position_ms,
            audio_seq=seq,
            end_status=status,
        )
        return [*out, Output(self.owner.settings.online_topic, "OnlineTranscript", end)]

    def discard(self) -> None:
        self.owner.pool.release(self.recognizer.decoder)

    def _outputs(self, events: list[Event], seq: int, replay: bool) -> list[Output]:
        s, out = self.owner.settings, []
        for ev in events:
            lattice_key = None
            if ev.lattice and self.owner.store is not None:
                lattice_key = f"streams/{self.info.stream_id}/lattices/{ev.utterance_id:06d}.lat"
                if not replay:
                    self.owner.store.put(lattice_key, ev.lattice)
            rec = transcript_record(
                stream_id=self.info.stream_id,
                tenant=self.info.tenant,
                kind=ev.kind,
                utterance_id=ev.utterance_id,
                text=ev.text,
                start_ms=ev.start_ms,
                end_ms=ev.end_ms,
                audio_seq=seq,
                audio_published_at_ms=self.published_at_ms,
                words=[w.as_record() for w in ev.words],
                nbest=[Hypothesis(text=t, score=sc) for t, sc in ev.nbest],
                lattice_key=lattice_key,
            )
            if ev.kind == "PARTIAL":
                # a partial needs no merging: straight to the captions, a broker hop sooner
                out.append(Output(s.results_topic, "Result", result_record(rec, "PARTIAL", "online", ev.utterance_id)))
            else:
                out.append(Output(s.online_topic, "OnlineTranscript", rec))
        return out


class OtherLanguage(StreamProcessor):
    """A stream in a language the online model (English) does not know: no live text, which would
    be English-looking nonsense; captions come with the offline pass. Its end still tells results
    that this pass is done. A stream with no language given ("auto") is decoded as English."""

    def __init__(self, owner: OnlineProcessors, info: StreamInfo):
        self.owner, self.info = owner, info

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        return []

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        return self.owner.end_unseen(self.info, status, seq)


class OnlineProcessors(Processors):
    name = SPEC.name
    group = SPEC.consumer_group

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = DecoderPool(settings.max_streams, settings.online_max_hmm_per_frame)
        self.pool.prewarm(settings.prewarm_decoders)
        self.store = open_archive(settings) if settings.keep_lattices else None

    def open(self, stream: StreamInfo) -> OnlineStream | OtherLanguage:
        if (stream.language or AUTO).split("-")[0].lower() not in ("en", AUTO):
            return OtherLanguage(self, stream)
        return self._recognizing(stream)

    def _recognizing(self, stream: StreamInfo) -> OnlineStream:
        try:
            decoder = self.pool.acquire()
        except CapacityError as e:
            raise InputError("capacity", f"online_asr at capacity ({e}); scale out with more replicas") from None
        s = self.settings
        rec = StreamRecognizer(
            decoder,
            base_ms=stream.start_ms,
            partial_interval_ms=s.partial_interval_ms,
            nbest=s.nbest,
            keep_lattice=s.keep_lattices,
        )
        return OnlineStream(self, stream, rec)

    def resume(self, stream: StreamInfo, state: dict) -> OnlineStream:
        proc = self._recognizing(StreamInfo(stream.stream_id, stream.tenant))  # only these take snapshots
        proc.recognizer.restore(state)
        return proc

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        rec = transcript_record(
            stream_id=stream.stream_id,
            tenant=stream.tenant,
            kind="STREAM_END",
            utterance_id=0,
            audio_seq=seq,
            end_status=status,
        )
        return [Output(self.settings.online_topic, "OnlineTranscript", rec)]

    def stats(self) -> dict[str, float]:
        return {"decoders_pooled": self.pool.size}


def main(argv: list[str] | None = None) -> None:
    main_for(lambda s: StreamRunner(s, OnlineProcessors(s)), SPEC.name, argv)
