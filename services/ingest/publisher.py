"""Turns one input into one stream on the audio topic, and archives it for replay.

A stream on the audio topic is StreamStart (seq 0), AudioChunk (seq 1..n, 200 ms of 16 kHz
mono s16le each by default) and StreamEnd (seq n+1), all keyed by the stream id so they stay
ordered on one partition. The archive keeps the original bytes and the normalised PCM in
30 s segments, so replay and the offline pass read bounded windows of any stream.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hark import kafka, serde
from hark.audio import BYTES_PER_SAMPLE, TARGET_RATE, AudioError, Chunker, DecodedAudio, SourceInfo
from hark.config import Settings
from hark.languages import check_language
from hark.records import new_stream_id, now_ms
from hark.runtime import DeadLetters, Metrics, kv
from hark.storage import ObjectStore, archive_prefix, open_store

from .archive import SegmentWriter
from .placement import PartitionPlacer

log = logging.getLogger("hark.ingest")

STREAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ChunkCallback = Callable[[int, int, int, int], None]  # seq, offset_samples, n_samples, published_at_ms


def check_stream_id(stream_id: str) -> str:
    if not STREAM_ID_RE.fullmatch(stream_id):  # match() would pass a trailing newline
        raise AudioError("bad_stream_id", f"invalid stream id {stream_id!r} (letters, digits, . _ -, max 128)")
    return stream_id


@dataclass
class StreamSummary:
    stream_id: str
    tenant: str
    source_format: str
    chunks: int = 0
    samples: int = 0
    status: str = "COMPLETE"
    reason: str | None = None

    @property
    def duration_s(self) -> float:
        return self.samples / TARGET_RATE


class StreamPublisher:
    """Publishes one stream's records and archives its PCM. Use: start(), push()*, finish()."""

    def __init__(
        self,
        ingest: Ingest,
        stream_id: str,
        tenant: str,
        info: SourceInfo,
        *,
        source_name: str | None = None,
        language: str = "en-US",
        metadata: dict | None = None,
        realtime: bool = False,
        on_chunk: ChunkCallback | None = None,
    ):
        s = ingest.settings
        self.ingest, self.settings = ingest, s
        self.stream_id, self.tenant, self.info = check_stream_id(stream_id), tenant, info
        try:
            self.language = check_language(language)
        except ValueError as e:
            raise AudioError("bad_language", str(e)) from None
        self.source_name, self.metadata = source_name, dict(metadata or {})
        self.realtime, self.on_chunk = realtime, on_chunk
        self.prefix = archive_prefix(stream_id)
        self.chunker = Chunker(s.chunk_ms)
        seg_bytes = int(s.archive_segment_seconds * TARGET_RATE) * BYTES_PER_SAMPLE
        self.pcm_archive = SegmentWriter(ingest.store, self.prefix + "pcm/", seg_bytes, ".s16le")
        self.max_samples = int(s.max_stream_seconds * TARGET_RATE)
        self.summary = StreamSummary(stream_id, tenant, info.format)
        self.seq = 0
        self._placer = ingest.placer()  # kept, so finish() releases where start() acquired
        self.partition: int | None = None  # chosen at start(); None: the key's hash
        self._t0: float | None = None
        self._finished = False
        self._failures_before = ingest.producer.failures

    def _key(self) -> bytes:
        return self.stream_id.encode()

    def _meta(self, **extra) -> None:
        meta = {
            "stream_id": self.stream_id,
            "tenant": self.tenant,
            "source_format": self.info.format,
            "source_sample_rate": self.info.sample_rate,
            "source_channels": self.info.channels,
            "source_name": self.source_name,
            "language": self.language,
            "metadata": self.metadata,
            "sample_rate": TARGET_RATE,
            "segment_seconds": self.settings.archive_segment_seconds,
        }
        meta.update(extra)
        self.ingest.store.put(self.prefix + "meta.json", json.dumps(meta, indent=1).encode())

    def start(self) -> None:
        self.partition = self._placer.acquire()
        self._meta(status="OPEN", started_at_ms=now_ms())
        self._produce(
            "StreamStart",
            {
                "stream_id": self.stream_id,
                "tenant": self.tenant,
                "seq": 0,
                "language": self.language,
                "source_format": self.info.format,
                "source_name": self.source_name,
                "sample_rate": TARGET_RATE,
                "source_sample_rate": self.info.sample_rate,
                "source_channels": self.info.channels,
                "archive_prefix": self.prefix,
                "started_at_ms": now_ms(),
                "metadata": {k: str(v) for k, v in self.metadata.items()},
            },
        )

    def push(self, pcm: bytes) -> None:
        if self.summary.samples + len(pcm) // BYTES_PER_SAMPLE > self.max_samples:
            raise AudioError("too_long", f"stream longer than the {self.settings.max_stream_seconds:.0f} s maximum")
        for chunk in self.chunker.push(pcm):
            self._send_chunk(chunk)

    def _send_chunk(self, chunk: bytes) -> None:
        offset = self.summary.samples
        if self.realtime:
            if self._t0 is None:
                self._t0 = time.monotonic()
            delay = self._t0 + offset / TARGET_RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.seq += 1
        published = now_ms()
        self._produce(
            "AudioChunk",
            {
                "stream_id": self.stream_id,
                "tenant": self.tenant,
                "seq": self.seq,
                "offset_samples": offset,
                "sample_rate": TARGET_RATE,
                "pcm": chunk,
                "published_at_ms": published,
            },
        )
        self.pcm_archive.write(chunk)
        n = len(chunk) // BYTES_PER_SAMPLE
        self.summary.chunks += 1
        self.summary.samples += n
        if self.on_chunk:
            self.on_chunk(self.seq, offset, n, published)

    def finish(self, status: str = "COMPLETE", reason: str | None = None) -> StreamSummary:
        if self._finished:
            return self.summary
        self._finished = True
        try:
            return self._finish(status, reason)
        finally:
            self._placer.release(self.partition)

    def _finish(self, status: str, reason: str | None) -> StreamSummary:
        if status == "COMPLETE":
            for chunk in self.chunker.flush():
                self._send_chunk(chunk)
        self.pcm_archive.close()
        self.summary.status, self.summary.reason = status, reason
        self._produce(
            "StreamEnd",
            {
                "stream_id": self.stream_id,
                "tenant": self.tenant,
                "seq": self.seq + 1,
                "total_samples": self.summary.samples,
                "status": status,
                "reason": reason,
                "ended_at_ms": now_ms(),
            },
        )
        unacknowledged = self.ingest.producer.flush(30)
        if unacknowledged or self.ingest.producer.failures > self._failures_before:
            # the log may lack part of the stream: the producer must know, and not see COMPLETE
            self._meta(status="ERROR", reason="not acknowledged by the broker", total_samples=self.summary.samples)
            raise AudioError(
                "not_acknowledged",
                f"the broker did not acknowledge all of stream {self.stream_id}'s "
                "records; publish it again under a new stream id",
            )
        self._meta(
            status=status,
            reason=reason,
            total_samples=self.summary.samples,
            chunks=self.summary.chunks,
            pcm_segments=self.pcm_archive.count,
            ended_at_ms=now_ms(),
        )
        log.info(
            "stream published",
            extra=kv(stream_id=self.stream_id, status=status, seconds=round(self.summary.duration_s, 2)),
        )
        return self.summary

    def _produce(self, rtype: str, record: dict) -> None:
        p = self.ingest.producer
        while True:
            try:
                p.produce(
                    self.settings.audio_topic,
                    key=self._key(),
                    value=serde.encode(rtype, record),
                    partition=-1 if self.partition is None else self.partition,
                )  # -1: hash the key
                break
            except BufferError:  # local queue full: wait for deliveries instead of growing memory
                p.poll(0.05)
        p.poll(0)


class Ingest:
    """The ingest core: validation, decoding, publishing, archiving, dead letters."""

    def __init__(
        self, settings: Settings, producer=None, store: ObjectStore | None = None, metrics: Metrics | None = None
    ):
        self.settings = settings
        self.producer = producer or kafka.producer(
            settings, **{"client.id": "hark-ingest", "linger.ms": settings.audio_linger_ms}
        )
        self.store = store or open_store(settings)
        self.metrics = metrics or Metrics("ingest")
        self.deadletters = DeadLetters(self.producer, settings, "ingest", self.metrics)
        self._placer: PartitionPlacer | None = None
        self._placer_lock = threading.Lock()

    def placer(self) -> PartitionPlacer:
        """Built at the first stream: the audio topic's partition count is the broker's, not config's."""
        with self._placer_lock:
            if self._placer is None:
                mode, topic, partitions = self.settings.audio_placement, self.settings.audio_topic, 0
                if mode != "hash":
                    try:
                        partitions = len(self.producer.list_topics(topic, timeout=10).topics[topic].partitions)
                        if not partitions:
                            raise LookupError("no partitions")
                    except Exception as e:  # no metadata yet: hash this stream, ask again for the next
                        log.warning("no partition count for %s (%s): placing by hash", topic, e)
                        return PartitionPlacer("hash", 0)
                self._placer = PartitionPlacer(mode, partitions)
            return self._placer

    def reject(
        self,
        err: AudioError,
        *,
        stream_id: str | None,
        tenant: str | None,
        payload: bytes | None = None,
        payload_size: int = 0,
    ) -> None:
        """Record a refused input on the dead-letter topic (the caller reports it to the producer)."""
        self.deadletters.send(
            err.kind, err.reason, stream_id=stream_id, tenant=tenant, payload=payload, payload_size=payload_size
        )
        self.producer.flush(10)

    def check_new_stream(self, stream_id: str) -> None:
        """Stream ids are global keys: refuse one that exists (another tenant's, or a re-publish)."""
        if self.store.exists(archive_prefix(stream_id) + "meta.json"):
            raise AudioError("stream_exists", f"stream {stream_id!r} exists already; choose another id")

    def publish_file(
        self,
        source: str | Path | BinaryIO,
        *,
        stream_id: str | None = None,
        tenant: str = "default",
        realtime: bool = False,
        language: str = "en-US",
        metadata: dict | None = None,
        on_chunk: ChunkCallback | None = None,
        on_start: Callable[[StreamPublisher], None] | None = None,
    ) -> StreamSummary:
        """Publish a whole encoded input. Raises AudioError (after dead-lettering it) if it is refused."""
        name = Path(source).name if isinstance(source, (str, Path)) else getattr(source, "name", None)
        stream_id = stream_id or new_stream_id(Path(name).stem if name else "upload")
        size = None
        try:
            check_stream_id(stream_id)
            self.check_new_stream(stream_id)
            size = _size_of(source)
            if size == 0:
                raise AudioError("empty", "input is empty (0 bytes)")
            if size > self.settings.max_upload_bytes:
                raise AudioError(
                    "too_large", f"input is {size} bytes, above the {self.settings.max_upload_bytes}-byte maximum"
                )
            decoded = DecodedAudio(source, self.settings.max_stream_seconds)
            blocks = decoded.blocks()
            first = next(blocks)  # fail before anything is published if the audio does not decode
        except AudioError as e:
            self.reject(e, stream_id=stream_id, tenant=tenant, payload_size=size or 0)
            raise
        except StopIteration:  # pragma: no cover - blocks() raises "empty" itself
            err = AudioError("empty", "input decodes to no audio samples")
            self.reject(err, stream_id=stream_id, tenant=tenant, payload_size=size or 0)
            raise err from None
        self._archive_source(source, stream_id, decoded.info, size)
        pub = StreamPublisher(
            self,
            stream_id,
            tenant,
            decoded.info,
            source_name=name,
            language=language,
            metadata=metadata,
            realtime=realtime,
            on_chunk=on_chunk,
        )
        pub.start()
        if on_start:
            on_start(pub)
        try:
            pub.push(first)
            for block in blocks:
                pub.push(block)
        except AudioError as e:
            pub.finish("ERROR", e.reason)
            self.reject(e, stream_id=stream_id, tenant=tenant, payload_size=size or 0)
            raise
        except BaseException as e:
            pub.finish("ABORTED", f"publisher stopped: {type(e).__name__}")
            raise
        self.metrics.inc("streams_published_total")
        return pub.finish()

    def _archive_source(self, source, stream_id: str, info: SourceInfo, size: int | None) -> None:
        ext = info.format.split("/")[0].split(",")[0] or "bin"
        key = f"{archive_prefix(stream_id)}source.{ext}"
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                self.store.put(key, f, length=size)
        else:  # the decoder is part-way through this file: put its position back afterwards
            position = source.tell()
            source.seek(0)
            self.store.put(key, source, length=size)
            source.seek(position)


def _size_of(source) -> int:
    if isinstance(source, (str, Path)):
        try:
            return Path(source).stat().st_size
        except FileNotFoundError:
            raise AudioError("not_found", f"no such file: {source}") from None
        except OSError as e:
            raise AudioError("unreadable", f"cannot read {source}: {e.strerror}") from None
    pos = source.tell()
    end = source.seek(0, 2)
    source.seek(pos)
    return end - pos
