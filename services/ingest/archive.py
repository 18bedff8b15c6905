"""The archive side of ingest: bytes into fixed-size objects."""

from __future__ import annotations

from hark.config import Settings
from hark.pcm import BYTES_PER_SAMPLE
from hark.storage import ObjectStore


def source_segment_bytes(settings: Settings, rate: int, channels: int) -> int:
    """Bytes per archived segment of a live connection's source audio: ``archive_segment_seconds``
    of it, but never more than ``ingest_buffer_bytes`` (what the connection holds in memory),
    and a whole number of frames."""
    frame = channels * BYTES_PER_SAMPLE
    wanted = int(settings.archive_segment_seconds * rate) * frame
    return max(frame, min(wanted, settings.ingest_buffer_bytes) // frame * frame)


class SegmentWriter:
    """Buffers bytes into fixed-size archive objects: memory is one segment, whatever the length."""

    def __init__(self, store: ObjectStore, prefix: str, segment_bytes: int, suffix: str):
        self.store, self.prefix, self.segment_bytes, self.suffix = store, prefix, segment_bytes, suffix
        self._buf = bytearray()
        self.count = 0

    def write(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= self.segment_bytes:
            self._put(bytes(self._buf[: self.segment_bytes]))
            del self._buf[: self.segment_bytes]

    def close(self) -> None:
        if self._buf:
            self._put(bytes(self._buf))
            self._buf.clear()

    def _put(self, data: bytes) -> None:
        self.store.put(f"{self.prefix}{self.count:06d}{self.suffix}", data)
        self.count += 1
