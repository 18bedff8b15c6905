"""Which audio partition a new stream goes to."""

from __future__ import annotations

import random
import threading


class PartitionPlacer:
    """Which audio partition a new stream goes to. All of a stream's records go to that one
    partition (keyed by the stream id as before), so per-stream order holds either way.

    "balanced" (default): the partition with the fewest streams this ingest has open, ties taken
    in turn. That spreads streams evenly over the partitions, where hashing the stream id splits
    12 streams 8/4 or worse one time in three. It spreads them evenly over the replicas only when
    the group's assignment interleaves partitions, and cooperative-sticky does not promise that:
    a second online_asr replica joining the first was given 0-3 of 8, so 6 consecutive streams
    split 4/2 and the busy replica (one core, pocketsphinx holds the GIL) fell behind
    (docs/measurements.md, the soak). "hash": the producer's key hash.
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

    def acquire(self) -> int | None:
        """A partition for a new stream (None: let the producer hash the key)."""
        if self.mode == "hash":
            return None
        with self._lock:
            n, fewest = len(self._open), min(self._open)
            p = next(p % n for p in range(self._next, self._next + n) if self._open[p % n] == fewest)
            self._open[p] += 1
            self._next = p + 1
            return p

    def release(self, partition: int | None) -> None:
        if partition is not None:
            with self._lock:
                self._open[partition] -= 1
