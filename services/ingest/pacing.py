"""Pacing: a live stream publishes audio no faster than real time times a factor.

A token bucket over audio seconds. It fills at ``factor`` seconds of audio per wall-clock second
up to ``burst`` seconds; each message spends the audio it carries (at least ``MIN_MESSAGE_S``, so
a flood of tiny or empty messages is paced too). ``spend`` says how long the debt takes to repay,
and the connection (live.py) stops reading for that long: the client's TCP window fills and it
is slowed down. A client sending in real time never waits, and one that fell behind (a network
stall) catches up at ``factor`` x real time.

Live audio cannot come from the future: a stream whose audio runs more than ``burst`` seconds
ahead of the wall clock since it opened (``lead``) is not a live client but a flood or a
recording, and the connection refuses it (too_fast) instead of holding it back: held back, a
flooder parks megabytes in the socket's buffers that ingest would go on reading, at the pace,
long after the client has gone. No I/O here; the clock is injected for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# A message counts as at least this much audio: an AudioWorklet's 128-frame quantum at 44.1 kHz
# is 2.9 ms, so a browser sending every quantum still runs at 1.7x real time, under the factor.
MIN_MESSAGE_S = 0.005


class Pacer:
    def __init__(self, factor: float, burst_s: float, clock: Callable[[], float] = time.monotonic):
        if factor < 1:
            raise ValueError(f"a pace factor below 1 ({factor}) could never keep up with real time")
        self.factor, self.burst, self.clock = factor, burst_s, clock
        self._tokens, self._at = burst_s, clock()
        self._opened = self._at
        self.published_s = 0.0  # audio accepted so far (for tests and metrics)

    def spend(self, seconds: float) -> float:
        """Count a message of ``seconds`` of audio; returns how long to wait before the next read."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.factor)
        self._at = now
        self._tokens -= max(seconds, MIN_MESSAGE_S)
        self.published_s += seconds
        return max(0.0, -self._tokens / self.factor)

    def lead(self) -> float:
        """Seconds of audio accepted beyond the wall-clock time since the stream opened."""
        return self.published_s - (self.clock() - self._opened)
