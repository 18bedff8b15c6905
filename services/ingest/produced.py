"""One stream that a tenant's own Kafka producer publishes (kafka_source.py reads its records):
the WebSocket live path's checks and publishing, fed by records instead of messages.

The producer's StreamStart says the rate of the mono s16le PCM that its AudioChunks carry; ingest
resamples it to 16 kHz, re-chunks it, seals it with the stream's own key and archives both the
source PCM and the normalised PCM, as live.py does for a WebSocket stream. The producer's own
sequence numbers, offsets and timestamps are not trusted: ingest numbers what it publishes.
"""

from __future__ import annotations

import logging
import time

from hark.audio import AudioError, PcmResampler, SourceInfo
from hark.runtime import kv
from hark.storage import archived_meta

from .archive import SegmentWriter, source_segment_bytes
from .core import Ingest
from .publisher import StreamPublisher, StreamSummary

log = logging.getLogger("hark.ingest")

# Where a stream's StreamStart was read (topic:partition:offset), kept in its metadata: a
# StreamStart read again after a crash finds its own stream there, not another producer's.
ORIGIN = "kafka_origin"
# A producer's metadata goes into every StreamStart and the archive: kept small.
MAX_METADATA_ENTRIES = 32
MAX_METADATA_CHARS = 4096
MAX_SOURCE_NAME = 256


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES or sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_CHARS:
        raise AudioError(
            "bad_metadata", f"metadata holds at most {MAX_METADATA_ENTRIES} entries of {MAX_METADATA_CHARS} characters"
        )
    return {k: v for k, v in metadata.items() if k != ORIGIN}


class ProducedStream:
    """A stream opened by a producer's StreamStart read at ``origin`` (topic, partition, offset)."""

    def __init__(self, ingest: Ingest, tenant: str, origin: tuple[str, int, int], start: dict):
        self.ingest, self.tenant = ingest, tenant
        self.topic, self.partition, offset = origin
        self.origin = f"{self.topic}:{self.partition}:{offset}"
        self.stream_id: str = start["stream_id"]
        self.rate: int = start["sample_rate"]
        self.resampler = PcmResampler(self.rate, 1)  # AudioError (bad_sample_rate) for a rate it cannot take
        self.pub = StreamPublisher(
            ingest,
            self.stream_id,
            tenant,  # the topic's tenant: the record's own tenant field is not trusted
            SourceInfo(f"raw/pcm_s16le@{self.rate}x1", self.rate, 1),
            source_name=(start["source_name"] or "")[:MAX_SOURCE_NAME] or None,
            language=start["language"],
            metadata={**check_metadata(start["metadata"]), ORIGIN: self.origin},
            live=True,  # open at most max_stream_seconds of wall-clock time, pauses included
            hotwords=start["hotwords"],
        )
        self.raw = SegmentWriter(
            ingest.store, self.pub.prefix + "source/", source_segment_bytes(ingest.settings, self.rate, 1), ".pcm"
        )
        self.last_seen = time.monotonic()

    def start(self) -> None:
        """Admission and the stream id's claim, as for a WebSocket stream; AudioError if refused."""
        self.ingest.check_new_stream(self.stream_id)
        self.pub.start()

    def redelivered(self) -> str | None:
        """After a ``stream_exists`` refusal: the archived status of this same StreamStart's stream
        when it was taken before (read again after a crash), else None (someone else's id)."""
        try:
            meta = archived_meta(self.ingest.store, self.stream_id)
        except (KeyError, ValueError):
            return None
        if (meta.get("metadata") or {}).get(ORIGIN) != self.origin or meta.get("tenant") != self.tenant:
            return None
        return str(meta.get("status", "OPEN"))

    def push(self, chunk: dict) -> None:
        """One AudioChunk: the format the start announced, then published and archived."""
        self.last_seen = time.monotonic()
        if chunk["sample_rate"] != self.rate:
            raise AudioError(
                "bad_sample_rate", f"chunk sample rate {chunk['sample_rate']} differs from the start's {self.rate}"
            )
        pcm: bytes = chunk["pcm"]
        if len(pcm) % 2:
            raise AudioError("bad_pcm", f"a chunk of {len(pcm)} bytes is not whole 16-bit samples")
        self.raw.write(pcm)
        self.pub.push(self.resampler.push(pcm))

    def keep_alive(self) -> None:
        """The producer's StreamAlive: a pause, not a vanished producer."""
        self.last_seen = time.monotonic()
        self.pub.keep_alive()

    def complete(self) -> StreamSummary:
        self.raw.close()
        self.pub.push(self.resampler.flush())
        return self.pub.finish()

    def close(self, status: str, reason: str) -> None:
        """Ends the stream (ERROR or ABORTED) unless it ended already; never raises."""
        if self.pub.finished:
            return
        try:
            try:
                self.raw.close()
            finally:
                self.pub.finish(status, reason)
        except Exception:
            log.exception("could not end the stream", extra=kv(stream_id=self.stream_id))
