"""Where to cut a stream into decode windows; no Kafka, no model here.

A window ends at a pause (the VAD gate's end of speech) once it holds at least
``min_window_ms`` of audio, so Whisper sees whole sentences with context and hour-long streams
are improved while they run; it never exceeds ``max_window_ms`` (Whisper's 30 s field), cut at
the latest pause inside or, failing one, hard. Windows without speech are skipped (Whisper
invents text for silence). Memory is the pending audio: at most one max window plus a chunk.
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

    @property
    def end_ms(self) -> int:
        return self.start_ms + len(self._pending) // BYTES_PER_MS

    def push(self, pcm: bytes) -> list[Window]:
        self._pending += pcm
        data = self._residual + pcm
        fb, i = self._frame_bytes, 0
        while len(data) - i >= fb:
            transition, _, first_ms = self.gate.push(data[i : i + fb])
            i += fb
            now = self._gate_origin_ms + self.gate.frames * self.gate.frame_ms
            if transition == "start":
                self._speech.append([self._gate_origin_ms + first_ms, -1])
            elif transition == "end":
                self._speech[-1][1] = now
                self._pauses.append(now)
        self._residual = data[i:]
        return self._ready(final=False)

    def flush(self) -> list[Window]:
        """End of stream: everything pending, in windows of at most max_window_ms."""
        if self._speech and self._speech[-1][1] == -1:
            self._speech[-1][1] = self.end_ms
        return self._ready(final=True)

    def _ready(self, final: bool) -> list[Window]:
        out = []
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
        return [w for w in out if w.has_speech]

    def _take(self, cut_ms: int) -> Window:
        n = (cut_ms - self.start_ms) * BYTES_PER_MS
        w = Window(self.start_ms, np.frombuffer(bytes(self._pending[:n]), dtype="<i2").copy())
        w.has_speech = any(s < cut_ms and (e == -1 or e > w.start_ms) for s, e in self._speech)
        del self._pending[:n]
        self.start_ms = cut_ms
        self._pauses = [p for p in self._pauses if p > cut_ms]
        self._speech = [r for r in self._speech if r[1] == -1 or r[1] > cut_ms]
        return w
