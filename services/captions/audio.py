"""A stream's archived audio as a WAV file for the page's player, with HTTP range requests.

The archive holds the stream's 16 kHz mono PCM in fixed-length sealed segments
(``streams/<id>/pcm/NNNNNN.s16le``, ``segment_seconds`` each, the last one shorter). A WAV
header is put in front of them, and a range of the file is read from the segments it covers, one
segment at a time: memory is one segment whatever the stream's length or the range asked for. A
live stream serves the segments closed so far. An erased stream's segments no longer open, so
its audio answers 404 like a stream that never existed.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hark.keys import KeyMissing, StreamErased
from hark.storage import ObjectStore, archive_prefix, archived_meta

SAMPLE_RATE, BYTES_PER_SAMPLE = 16000, 2
HEADER = 44
# ASCII digits only (``\d`` matches any script's), and few enough that int() never refuses them
RANGE_RE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})")


class NoAudio(Exception):
    """No archived audio for this stream (never archived, another tenant's, or erased)."""


def wav_header(data_bytes: int) -> bytes:
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * BYTES_PER_SAMPLE, BYTES_PER_SAMPLE, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


@dataclass
class ArchivedAudio:
    store: ObjectStore
    segments: list[str]
    segment_bytes: int
    pcm_bytes: int

    @property
    def size(self) -> int:
        return HEADER + self.pcm_bytes

    async def read(self, start: int, end: int, chunk: int = 1 << 16) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the WAV file."""
        if start < HEADER:
            yield wav_header(self.pcm_bytes)[start : min(end, HEADER)]
            start = HEADER
        pos, stop = start - HEADER, end - HEADER
        while pos < stop:
            seg, off = divmod(pos, self.segment_bytes)
            try:
                data = await asyncio.to_thread(self.store.get, self.segments[seg])
            except (KeyError, StreamErased, KeyMissing):  # erased while being played: stop here
                return
            piece = data[off : off + stop - pos]
            if not piece:
                return
            for i in range(0, len(piece), chunk):
                yield piece[i : i + chunk]
            pos += len(piece)


def open_audio(store: ObjectStore, stream_id: str, tenant: str | None) -> ArchivedAudio:
    """The stream's audio if ``tenant`` (None: open access) may hear it; NoAudio otherwise."""
    try:
        meta = archived_meta(store, stream_id)
    except (KeyError, StreamErased, KeyMissing, ValueError):
        raise NoAudio(stream_id) from None
    if tenant is not None and meta.get("tenant") != tenant:
        raise NoAudio(stream_id)
    segments = sorted(k for k in store.list(archive_prefix(stream_id) + "pcm/") if k.endswith(".s16le"))
    segment_bytes = int(meta.get("segment_seconds", 30) * SAMPLE_RATE) * BYTES_PER_SAMPLE
    if meta.get("total_samples") is not None and meta.get("status") != "OPEN":
        pcm = min(int(meta["total_samples"]) * BYTES_PER_SAMPLE, len(segments) * segment_bytes)
    else:  # live: the segments closed so far, each full
        pcm = len(segments) * segment_bytes
    return ArchivedAudio(store, segments, segment_bytes, pcm)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a ``Range: bytes=...`` header; None without one; ValueError if unsatisfiable."""
    if not header:
        return None
    m = RANGE_RE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(header)
    if not m.group(1):  # the last N bytes
        n = int(m.group(2))
        if n == 0:
            raise ValueError(header)
        return max(0, size - n), size
    start = int(m.group(1))
    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or end <= start:
        raise ValueError(header)
    return start, end
