"""A background lane for offline_asr's drafts: one job at a time on its own thread and decoder,
at a lower CPU priority than the real windows. No Kafka here.

Drafts run beside the service's loop, not in its idle moments: a loop whose poll is never empty
(several streams in real time) never idles, and drafts there held the windows' decodes back while
they ran. On a thread of its own at nice 19 a draft takes only the CPU the windows (nice
``offline_nice``), the online pass and the diarizer leave, and the loop is never blocked by one.
Linux niceness is per thread and inherited by the threads a thread creates, so the draft decoder
is built on the lane's own niced thread: CTranslate2's worker and its OpenMP threads start there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger("hark.offline_asr")

D = TypeVar("D")


class Lane(Generic[D]):
    """Runs ``work(decoder)`` jobs one at a time, tagged, on one thread at niceness ``nice``
    (absolute, never below the process's). The decoder is made on that thread, so the threads
    it starts, such as a model's compute pool, keep the priority. The caller submits when not
    ``busy`` and collects with ``done()`` from its own loop, so everything but the decode stays
    on the caller's thread."""

    def __init__(self, make: Callable[[], D], nice: int = 0):
        self.failures = 0
        # os.nice is per thread on Linux: the process keeps its own
        self._pool = ThreadPoolExecutor(1, "draft-lane", initializer=lambda: os.nice(max(0, nice - os.nice(0))))
        self.decoder: D = self._pool.submit(make).result()
        self._job: tuple[Any, Future] | None = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def submit(self, tag: Any, work: Callable[[D], Any]) -> None:
        if self._job is not None:
            raise RuntimeError("the lane runs one job at a time")
        self._job = (tag, self._pool.submit(work, self.decoder))

    def done(self) -> tuple[Any, Any] | None:
        """The finished job's (tag, result), once; None while it runs, when there is none, or
        when it failed (logged and counted: a draft is never worth stopping the service for)."""
        if self._job is None or not self._job[1].done():
            return None
        (tag, future), self._job = self._job, None
        error = future.exception()
        if error is not None:
            self.failures += 1
            log.warning("draft failed: %s: %s", type(error).__name__, error)
            return None
        return tag, future.result()

    def wait(self, timeout: float | None = None) -> None:
        """Until the running job (if any) finishes (tests use it to let a draft end)."""
        if self._job is not None:
            self._job[1].exception(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
