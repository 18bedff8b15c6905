"""A new consumer of the audio topic is a Processors and nothing else.

The one here is a voice-activity detector (speech where a 20 ms frame's energy is within 35 dB of
the stream's loudest frame so far), written against the processor contract only. The
StreamRunner runs it on the session stack's real broker, in its own consumer group, beside the
real services: it gets the stream, its records land on its own topic in transactions, once.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from confluent_kafka.admin import NewTopic

from hark import kafka
from hark.pcm import SAMPLES_PER_MS
from hark.records import now_ms
from hark.runtime import Chunk, Output, StreamInfo, StreamRunner
from services.diarizer.scoring import read_rttm
from services.ingest.core import Ingest

from .conftest import ROOT
from .helpers import collect

FRAME_MS = 20
RANGE_DB = 35.0
HANGOVER_FRAMES = 15  # 300 ms of quiet ends a speech turn


class ActivityStream:
    def __init__(self, owner: ActivityProcessors, info: StreamInfo):
        self.owner, self.info = owner, info
        self.peak_db = -120.0
        self.frame_ms = info.start_ms
        self.tail = np.zeros(0, dtype=np.int16)
        self.turn_start: int | None = None
        self.quiet = 0
        self.turns: list[dict] = []

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

    def _end_turn(self, end_ms: int) -> dict:
        turn = {"speaker": "SPEECH", "start_ms": self.turn_start, "end_ms": end_ms}
        self.turns.append(turn)
        self.turn_start, self.quiet = None, 0
        return turn

    def snapshot(self) -> dict | None:
        return None

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        if self.turn_start is not None:
            self._end_turn(self.frame_ms - self.quiet * FRAME_MS)
        return [self.owner.record(self.info, "FULL", self.turns, status)]

    def discard(self) -> None:
        pass


class ActivityProcessors:
    name = "activity"

    def __init__(self, topic: str, group: str):
        self.topic, self.group = topic, group

    def open(self, stream: StreamInfo) -> ActivityStream:
        return ActivityStream(self, stream)

    def resume(self, stream: StreamInfo, state: dict) -> ActivityStream:
        raise AssertionError("no snapshots")

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        return [self.record(stream, "FULL", [], status)]

    def step(self) -> list[Output]:
        return []

    def idle(self) -> list[Output]:
        return []

    def stats(self) -> dict[str, float]:
        return {}

    def record(self, info: StreamInfo, kind: str, turns: list[dict], status: str | None = None) -> Output:
        return Output(
            self.topic,
            "SpeakerTurns",
            {
                "stream_id": info.stream_id,
                "tenant": info.tenant,
                "kind": kind,
                "turns": turns,
                "covered_until_ms": max((t["end_ms"] for t in turns), default=0),
                "num_speakers": 1 if turns else 0,
                "end_status": status,
                "compute_ms": 0,
                "audio_published_at_ms": 0,
                "emitted_at_ms": now_ms(),
                "model_name": "energy-vad",
                "model_version": "test",
            },
        )


def speech_ms(turns) -> int:
    return sum(t["end_ms"] - t["start_ms"] for t in turns)


def overlap_ms(a, b) -> int:
    return sum(max(0, min(x["end_ms"], y["end_ms"]) - max(x["start_ms"], y["start_ms"])) for x in a for y in b)


def test_a_processor_is_all_a_new_audio_consumer_needs(live_stack):
    settings, _ = live_stack
    tag = time.time_ns()
    topic, sid = f"test.activity.{tag}", f"activity-{tag}"
    admin = kafka.admin(settings)  # kept referenced: a collected client cancels its requests
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    runner = StreamRunner(settings, ActivityProcessors(topic, f"test-activity-{tag}"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        conversation = ROOT / "data" / "conversations" / "conv_2spk_clean.flac"
        Ingest(settings).publish_file(conversation, stream_id=sid)
        recs = collect(
            settings, topic, lambda rs: any(r["stream_id"] == sid and r["kind"] == "FULL" for _, r in rs), timeout=120
        )
    finally:
        runner.stop()
        thread.join(60)
    assert not thread.is_alive()
    mine = [r for _, r in recs if r["stream_id"] == sid]
    full = [r for r in mine if r["kind"] == "FULL"]
    incremental = [t for r in mine if r["kind"] == "INCREMENTAL" for t in r["turns"]]
    assert len(full) == 1 and full[0]["end_status"] == "COMPLETE"  # once, though other streams ran beside it
    turns = full[0]["turns"]
    assert incremental == turns[: len(incremental)] and len(incremental) >= len(turns) - 1
    reference = [t.__dict__ for t in read_rttm(conversation.with_suffix(".rttm"))]
    # most of the reference's speech is found, and most of what is found is speech
    assert overlap_ms(turns, reference) >= 0.8 * speech_ms(reference), (turns, reference)
    assert overlap_ms(turns, reference) >= 0.7 * speech_ms(turns), (turns, reference)
