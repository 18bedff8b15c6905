"""Where to cut a stream into decode windows; no Kafka, no model here.

A window ends at a pause (the VAD gate's end of speech) once it holds at least
``min_window_ms`` of audio, so Whisper sees whole sentences with context and hour-long streams
are improved while they run; it never exceeds ``max_window_ms`` (Whisper's 30 s field), cut at
the latest pause inside or, failing one, hard. Windows without speech are skipped (Whisper
invents text for silence). Memory is the pending audio: at most one max window plus a chunk.

Resume point: a cut at a pause. There the VAD gate starts afresh (hark.vad) and nothing is
pending before the cut, so the cut's time and the bytes of the chunk it fell in are the whole
state (``boundary``): a cutter restored from it and fed that chunk again cuts every later window
exactly where an uninterrupted one does. A hard cut (30 s without a pause) is no resume point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hark.vad import SpeechGate

BYTES_PER_MS = 32  # 16 kHz, 16-bit mono


@dataclass
class Window:
    start_ms: int
    pcm: np.ndarray  # int16
    has_speech: bool = True

    @property
    def end_ms(self) -> int:
        return self.start_ms + len(self.pcm) // 16


class StreamWindows:
    def __init__(self, start_ms: int = 0, min_window_ms: int = 10000, max_window_ms: int = 30000):
        self.min_ms, self.max_ms = min_window_ms, max_window_ms
        self.gate = SpeechGate()
        self._frame_bytes = self.gate.frame_bytes
        self._residual = b""
        self._gate_origin_ms = start_ms  # the gate counts time from here
        self.start_ms = start_ms  # first pending sample
        self._pending = bytearray()
        self._pauses: list[int] = []  # candidate cut points (ms), ascending
        self._speech: list[list[int]] = []  # [start, end] speech regions; end -1 while open
        # Set by a push whose last cut fell at a pause inside that push: {"start_ms": the cut,
        # "skip_bytes": bytes of the pushed chunk before it}. None otherwise.
        self.boundary: dict | None = None
        self._skip = 0  # bytes of the next push already consumed before a restore

    @property
    def end_ms(self) -> int:
        return self.start_ms + len(self._pending) // BYTES_PER_MS

    @classmethod
    def resumed(cls, boundary: dict, min_window_ms: int = 10000, max_window_ms: int = 30000) -> StreamWindows:
        """A cutter continuing from another's ``boundary``: the next ``push`` must be the chunk it
        was taken in (its first ``skip_bytes`` are dropped)."""
        w = cls(boundary["start_ms"], min_window_ms, max_window_ms)
        w._skip = boundary["skip_bytes"]
        return w

    def push(self, pcm: bytes) -> list[Window]:
        if self._skip:
            pcm, self._skip = pcm[self._skip :], 0
        self._pending += pcm
        lead = len(self._residual)  # bytes of an earlier chunk that frame with this one's first
        data = self._residual + pcm
        fb, i = self._frame_bytes, 0
        here: dict[int, int] = {}  # pauses in this chunk: ms -> bytes of the chunk before them
        while len(data) - i >= fb:
            transition, _, first_ms = self.gate.push(data[i : i + fb])
            i += fb
            now = self._gate_origin_ms + self.gate.frames * self.gate.frame_ms
            if transition == "start":
                self._speech.append([self._gate_origin_ms + first_ms, -1])
            elif transition == "end":
                self._speech[-1][1] = now
                self._pauses.append(now)
                here[now] = i - lead
        self._residual = data[i:]
        windows, cut = self._ready(final=False)
        self.boundary = {"start_ms": cut, "skip_bytes": here[cut]} if cut is not None and cut in here else None
        return windows

    def flush(self) -> list[Window]:
        """End of stream: everything pending, in windows of at most max_window_ms."""
        if self._speech and self._speech[-1][1] == -1:
            self._speech[-1][1] = self.end_ms
        return self._ready(final=True)[0]

    def _ready(self, final: bool) -> tuple[list[Window], int | None]:
        """The windows complete now, and where the last of them was cut (None: no cut)."""
        out, cut = [], None
        while self.end_ms > self.start_ms:
            pending = self.end_ms - self.start_ms
            inside = [p for p in self._pauses if self.start_ms < p <= self.start_ms + self.max_ms]
            if inside and inside[-1] - self.start_ms >= self.min_ms:
                cut = inside[-1]
            elif pending >= self.max_ms:
                cut = inside[-1] if inside else self.start_ms + self.max_ms
            elif final:
                cut = self.end_ms
            else:
                break
            out.append(self._take(cut))
        return [w for w in out if w.has_speech], cut

    def audio(self, start_ms: int, end_ms: int) -> Window:
        """A copy of the pending audio in [start_ms, end_ms) (clipped to what is pending), for a
        provisional decode of a window still growing."""
        start_ms, end_ms = max(start_ms, self.start_ms), min(end_ms, self.end_ms)
        a, b = (start_ms - self.start_ms) * BYTES_PER_MS, (end_ms - self.start_ms) * BYTES_PER_MS
        w = Window(start_ms, np.frombuffer(bytes(self._pending[a:b]), dtype="<i2").copy())
        w.has_speech = any(s < end_ms and (e == -1 or e > start_ms) for s, e in self._speech)
        return w

    def pauses_after(self, ms: int) -> list[int]:
        """The pauses (ends of speech) pending after ``ms``, ascending."""
        return [p for p in self._pauses if p > ms]

    def _take(self, cut_ms: int) -> Window:
        w = self.audio(self.start_ms, cut_ms)
        del self._pending[: (cut_ms - self.start_ms) * BYTES_PER_MS]
        self.start_ms = cut_ms
        self._pauses = [p for p in self._pauses if p > cut_ms]
        self._speech = [r for r in self._speech if r[1] == -1 or r[1] > cut_ms]
        return w
