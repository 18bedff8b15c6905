"""Which audio partition a new stream goes to."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable

log = logging.getLogger("hark.ingest")

Owners = list[frozenset[int]]  # each online_asr member's audio partitions


class PartitionPlacer:
    """Which audio partition a new stream goes to. All of a stream's records go to that one
    partition (keyed by the stream id as before), so per-stream order holds either way.

    "balanced" (default): first the online_asr replica with the fewest of this ingest's open
    streams, by the group's current assignment (``owners``); then its partition with the fewest;
    ties taken in turn. online_asr is the pass that must keep up in real time, and a replica is
    one core (pocketsphinx holds the GIL), so a replica with 4 streams beside one with 2 falls
    behind while the other idles. Kafka's assignors do not say which partitions a member gets:
    cooperative-sticky gave a joining replica 0-3 of 8, not alternate partitions
    (docs/measurements.md, the soak), so no order of partitions alone is balanced for every
    assignment. Partitions no member holds (a rebalance under way) count as one more replica.
    Without an assignment (the group has no members yet, or it cannot be described) it spreads
    streams over partitions alone. "hash": the producer's key hash.
    """

    def __init__(self, mode: str, partitions: int, start: int | None = None):
        if mode not in ("balanced", "hash"):
            raise ValueError(f"audio placement must be balanced or hash, not {mode!r}")
        self.mode = mode
        self._open = [0] * partitions
        # Ties go round the partitions, so streams one after another spread over all of them. The
        # round starts at a random partition: placers know only their own streams, and ingest
        # replicas (or clients with one Ingest per stream) that all began at 0 would pile their
        # first streams onto partition 0.
        self._next = random.randrange(max(partitions, 1)) if start is None else start
        self._lock = threading.Lock()

    def acquire(self, owners: Owners | None = None) -> int | None:
        """A partition for a new stream (None: let the producer hash the key)."""
        if self.mode == "hash":
            return None
        with self._lock:
            n = len(self._open)
            members = [[p for p in m if p < n] for m in owners or []]
            # Partitions no member holds (mid-rebalance: cooperative-sticky revokes what a joining
            # member is to get, then assigns it) count as one more member: most likely the new one.
            held = {p for m in members for p in m}
            if held:
                members.append([p for p in range(n) if p not in held])
            member_load = [0] * n  # partition -> open streams of the member holding it
            for m in members:
                load = sum(self._open[p] for p in m)
                for p in m:
                    member_load[p] = load

            def key(p: int) -> tuple[int, int]:
                return member_load[p], self._open[p]

            best = min(key(p) for p in range(n))
            p = next(p % n for p in range(self._next, self._next + n) if key(p % n) == best)
            self._open[p] += 1
            self._next = p + 1
            return p

    @property
    def open_streams(self) -> int:
        """Streams placed and not released (0 once every stream has ended)."""
        return sum(self._open)

    def release(self, partition: int | None) -> None:
        if partition is not None:
            with self._lock:
                self._open[partition] -= 1


class AssignmentView:
    """The online group's assignment, asked of the broker at most once per ``ttl`` seconds (a stream
    start waits for it at most ``timeout``); None when it cannot be had, and placement then goes by
    partitions alone (a warning once, not per stream)."""

    def __init__(self, describe: Callable[[float], Owners], ttl: float = 2.0, timeout: float = 2.0):
        self._describe, self.ttl, self.timeout = describe, ttl, timeout
        self._owners: Owners | None = None
        self._at = -math.inf
        self._warned = False
        self._lock = threading.Lock()

    def owners(self) -> Owners | None:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._owners = [m for m in self._describe(self.timeout) if m] or None
                    self._warned = False
                except Exception as e:  # no Describe ACL on an operator's cluster, a broker away
                    if not self._warned:
                        log.warning("online group's assignment unavailable (%s): placing by partitions alone", e)
                    self._owners, self._warned = None, True
                self._at = time.monotonic()
            return self._owners
