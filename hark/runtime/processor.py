"""The contract between a stream of audio and whatever turns it into records.

A processor sees one stream: it is opened at the stream's start, fed its chunks in order, and
closed at its end; each call returns the records to publish. It knows nothing of Kafka, offsets,
transactions, metrics or other streams: the StreamRunner (streams.py) owns all of that, so a new
consumer of the audio topic (a translator, a redactor) writes a ``Processors`` subclass and a
declaration of its topics (docs/architecture.md shows one).

Resuming after a crash: the runner re-reads a stream from the last point its processor could be
rebuilt from. By default that is the stream's start (the runner replays every chunk with
``replay=True``; the records made then were committed before, so the runner drops them and a
processor may skip work that only serves output). A processor that can do better returns a
``snapshot()`` after a chunk: JSON-able state from which ``Processors.resume`` continues, the
chunk fed again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..pcm import duration_s

# End statuses that only say a pass did not (and must not) process the stream: `hark erase`
# ended it, or the pass had no room for it. ``end_unseen`` with one of them makes the pass's
# content-free end record and reads nothing (not the archive either).
ERASED = "ERASED"
REFUSED = "REFUSED"
NOTICES = (ERASED, REFUSED)


@dataclass(frozen=True)
class StreamInfo:
    """What is known of a stream when its processor opens."""

    stream_id: str
    tenant: str
    language: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    start_ms: int = 0  # where its first chunk begins: > 0 for a stream joined mid-way
    hotwords: tuple[str, ...] = ()  # terms the stream is likely to contain


@dataclass(frozen=True)
class Chunk:
    seq: int
    pcm: bytes  # 16 kHz 16-bit mono (hark.pcm), checked by the runner
    offset_samples: int
    published_at_ms: int  # when ingest published it: the start of every latency hark measures

    @property
    def seconds(self) -> float:
        return duration_s(self.pcm)


@dataclass(frozen=True)
class Output:
    """A record to publish: Avro type ``rtype`` on ``topic``, keyed by its stream id."""

    topic: str
    rtype: str
    record: Mapping[str, Any]  # one of hark.records' classes

    @property
    def key(self) -> str:
        return self.record["stream_id"]


class StreamProcessor:
    """One stream's processor. ``feed`` and ``close`` are its work; the rest have defaults."""

    def feed(self, chunk: Chunk, replay: bool = False) -> list[Output]:
        """A chunk of the stream, in order. ``replay``: the chunk's output was committed before
        (a resume rebuilding state): the runner drops what this returns, so work that only
        serves output may be skipped."""
        raise NotImplementedError

    def close(self, status: str, seq: int, replay: bool = False) -> list[Output]:
        """The stream ended (``status`` from its StreamEnd, or IDLE_TIMEOUT; ``seq`` its last
        chunk's number + 1): flush, publish the end, free what the stream held."""
        raise NotImplementedError

    def snapshot(self) -> dict | None:
        """After a feed: state to resume from by feeding that chunk again, or None (the last
        resume point still holds). Default: never, so a resume re-reads the stream from its start."""
        return None

    def discard(self) -> None:
        """Another process owns the stream now, or it was erased: free what it held, publish nothing."""


class Processors:
    """One service's processors: what they share (models, pools) and how one is made.

    ``open`` is required; every other hook has a default that does nothing. The runner passes
    the open streams (stream id -> processor) to the hooks that work across streams, so a
    service keeps no registry of its own."""

    name: str  # service name: logs, metrics, client ids
    group: str  # its consumer group on the audio topic

    def open(self, stream: StreamInfo) -> StreamProcessor:
        """A processor for a new stream; raises runtime.InputError to refuse it (the reason goes
        to the dead-letter topic)."""
        raise NotImplementedError

    def resume(self, stream: StreamInfo, state: dict) -> StreamProcessor:
        """A processor continuing from one's ``snapshot()`` (only called with a snapshot)."""
        raise NotImplementedError(f"{type(self).__name__} makes snapshots but cannot resume from them")

    def end_unseen(self, stream: StreamInfo, status: str, seq: int) -> list[Output]:
        """A stream ended whose audio this process never saw (it may be archived; with a status
        in NOTICES, it is not to be read). Default: publish nothing."""
        return []

    def every_pass(self, streams: Mapping[str, StreamProcessor]) -> list[Output]:
        """On every pass of the loop, busy or not: work beside the streams' records (e.g.
        collecting and starting background jobs); it must return at once."""
        return []

    def when_caught_up(self, streams: Mapping[str, StreamProcessor]) -> list[Output]:
        """When a poll found nothing waiting to be read: deferrable work (e.g. n-best lists)."""
        return []

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics (``*_total`` names are monotonic counts)."""
        return {}
