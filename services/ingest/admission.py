"""Admission: what one ingest replica accepts, refused at the door with a reason instead of
accepted and then dropped downstream.

Three limits, each 0 for none: open streams on this replica (``ingest_max_streams``), open
streams per tenant (``tenant_max_streams``) and audio seconds per tenant over the last hour
(``tenant_audio_seconds_per_hour``, counted as the audio is published, in one-minute buckets). A
stream over a limit at its start is refused (``capacity``, ``tenant_limit``, ``quota``); a stream
that crosses the hourly quota while it runs is ended there (``quota``). The limits hold per
replica: N ingest replicas admit N times as much (docs/guarantees.md).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque

from hark.audio import AudioError
from hark.config import Settings

BUCKET_S = 60
WINDOW_S = 3600
TENANTS_REMEMBERED = 10_000  # usage windows kept (each at most 60 buckets)


class Admission:
    def __init__(self, settings: Settings, clock=time.monotonic):
        self.max_streams = settings.ingest_max_streams
        self.tenant_max_streams = settings.tenant_max_streams
        self.seconds_per_hour = settings.tenant_audio_seconds_per_hour
        self.clock = clock
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._usage: OrderedDict[str, deque[list[float]]] = OrderedDict()  # tenant -> [bucket start, seconds]

    @property
    def open_streams(self) -> int:
        return sum(self._open.values())

    def check(self, tenant: str) -> None:
        """``admit``'s refusal without counting anything: cheap enough for the event loop, so a
        client over a limit is told at once instead of after the work queued ahead of it."""
        with self._lock:
            self._refuse_if_full(tenant)

    def admit(self, tenant: str) -> None:
        """Count a new stream of ``tenant``, or refuse it (AudioError) if a limit is reached."""
        with self._lock:
            self._refuse_if_full(tenant)
            self._open[tenant] += 1

    def _refuse_if_full(self, tenant: str) -> None:
        if self.max_streams and self.open_streams >= self.max_streams:
            raise AudioError(
                "capacity", f"ingest is at its limit of {self.max_streams} concurrent streams; retry later"
            )
        if self.tenant_max_streams and self._open[tenant] >= self.tenant_max_streams:
            raise AudioError(
                "tenant_limit",
                f"tenant {tenant!r} has {self._open[tenant]} streams open, its limit; end one or retry later",
            )
        self._check_quota(tenant)

    def release(self, tenant: str) -> None:
        with self._lock:
            self._open[tenant] -= 1
            if self._open[tenant] <= 0:
                del self._open[tenant]

    def use(self, tenant: str, seconds: float) -> None:
        """Count ``seconds`` of audio published for ``tenant``; AudioError once the hour's quota is spent."""
        if not self.seconds_per_hour:
            return
        with self._lock:
            now = self.clock()
            window = self._window(tenant, now)
            if window and now - window[-1][0] < BUCKET_S:
                window[-1][1] += seconds
            else:
                window.append([now, seconds])
            self._check_quota(tenant)

    def used(self, tenant: str) -> float:
        with self._lock:
            return sum(s for _, s in self._window(tenant, self.clock()))

    def _window(self, tenant: str, now: float) -> deque[list[float]]:
        window = self._usage.get(tenant)
        if window is None:
            window = self._usage[tenant] = deque()
            while len(self._usage) > TENANTS_REMEMBERED:
                self._usage.popitem(last=False)
        self._usage.move_to_end(tenant)
        while window and now - window[0][0] >= WINDOW_S:
            window.popleft()
        return window

    def _check_quota(self, tenant: str) -> None:
        if not self.seconds_per_hour:
            return
        used = sum(s for _, s in self._window(tenant, self.clock()))
        if used >= self.seconds_per_hour:
            raise AudioError(
                "quota",
                f"tenant {tenant!r} published {used:.0f} s of audio in the last hour, "
                f"its quota is {self.seconds_per_hour:.0f} s; retry later",
            )
