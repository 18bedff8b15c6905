"""Voice activity of every stream on the audio topic: speech where a 20 ms frame's energy is within
35 dB of the stream's loudest frame so far, ended by 300 ms of quiet. Each closed turn goes out
at once (an INCREMENTAL SpeakerTurns record), and all of them when the stream ends (FULL), onto
the service's own topic, in the runtime's transactions (once)."""

from __future__ import annotations

import numpy as np

from hark.declaration import topic
from hark.pcm import SAMPLES_PER_MS
from hark.records import SpeakerTurns, Turn, now_ms
from hark.runtime import Chunk, Output, Processors, StreamInfo, StreamProcessor, StreamRunner, main_for

from .spec import SPEC

FRAME_MS = 20
RANGE_DB = 35.0
HANGOVER_FRAMES = 15  # 300 ms of quiet ends a speech turn
MODEL_NAME, MODEL_VERSION = "energy-vad", "1"


class ActivityStream(StreamProcessor):
    def __init__(self, owner: ActivityProcessors, info: StreamInfo):
        self.owner, self.info = owner, info
        self.peak_db = -120.0
        self.frame_ms = info.start_ms
        self.tail = np.zeros(0, dtype=np.int16)
        self.turn_start: int | None = None
        self.quiet = 0
        self.turns: list[Turn] = []

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        pcm = np.concatenate([self.tail, np.frombuffer(chunk.pcm, dtype="<i2")])
        step = FRAME_MS * SAMPLES_PER_MS
        whole = len(pcm) - len(pcm) % step
        self.tail = pcm[whole:]
        closed = []
        for frame in pcm[:whole].reshape(-1, step).astype(np.float64):
            db = 10 * np.log10(np.mean(frame**2) + 1.0)
            self.peak_db = max(self.peak_db, db)
            if db > self.peak_db - RANGE_DB:
                self.turn_start = self.frame_ms if self.turn_start is None else self.turn_start
                self.quiet = 0
            elif self.turn_start is not None:
                self.quiet += 1
                if self.quiet >= HANGOVER_FRAMES:
                    closed.append(self._end_turn(self.frame_ms - (self.quiet - 1) * FRAME_MS))
            self.frame_ms += FRAME_MS
        return [self.owner.record(self.info, "INCREMENTAL", closed)] if closed else []

    def _end_turn(self, end_ms: int) -> Turn:
        assert self.turn_start is not None
        turn = Turn(speaker="SPEECH", start_ms=self.turn_start, end_ms=end_ms)
        self.turns.append(turn)
        self.turn_start, self.quiet = None, 0
        return turn

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        if self.turn_start is not None:
            self._end_turn(self.frame_ms - self.quiet * FRAME_MS)
        return [self.owner.record(self.info, "FULL", self.turns, status)]


class ActivityProcessors(Processors):
    """No snapshots: a stream moved to another replica, or resumed, is read again from its start."""

    name = SPEC.name
    group = SPEC.consumer_group

    def __init__(self, topic: str, group: str | None = None):
        self.topic = topic
        if group:  # a test runs its own group beside the stack's
            self.group = group

    def open(self, stream: StreamInfo) -> ActivityStream:
        return ActivityStream(self, stream)

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        return [self.record(stream, "FULL", [], status)]

    def record(self, info: StreamInfo, kind: str, turns: list[Turn], status: str | None = None) -> Output:
        rec = SpeakerTurns(
            stream_id=info.stream_id,
            tenant=info.tenant,
            kind=kind,
            turns=turns,
            covered_until_ms=max((t["end_ms"] for t in turns), default=0),
            num_speakers=1 if turns else 0,
            end_status=status,
            compute_ms=0,
            audio_published_at_ms=0,
            emitted_at_ms=now_ms(),
            model_name=MODEL_NAME,
            model_version=MODEL_VERSION,
        )
        return Output(self.topic, "SpeakerTurns", rec)


def main(argv: list[str] | None = None) -> None:
    main_for(lambda s: StreamRunner(s, ActivityProcessors(topic(s, "activity"))), SPEC.name, argv)
