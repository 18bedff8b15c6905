"""The archive side of ingest: bytes into fixed-size objects."""

from __future__ import annotations

from hark.storage import ObjectStore


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
