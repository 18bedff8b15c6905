"""Turns one input into one stream on the audio topic, and archives it for replay.

A stream on the audio topic is StreamStart (seq 0), AudioChunk (seq 1..n, 200 ms of 16 kHz
mono s16le each by default) and StreamEnd (seq n+1), all keyed by the stream id so they stay
ordered on one partition. The archive keeps the original bytes and the normalised PCM in
30 s segments, so replay and the offline pass read bounded windows of any stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hark import serde
from hark.audio import BYTES_PER_SAMPLE, TARGET_RATE, AudioError, Chunker, SourceInfo
from hark.config import Settings
from hark.keys import Keyring, SealedStore, StreamErased, StreamExists
from hark.languages import check_hotwords, check_language
from hark.records import STREAM_ID_RE, AudioChunk, StreamAlive, StreamEnd, StreamStart, now_ms
from hark.runtime import kv
from hark.storage import archive_prefix

from .admission import Admission
from .archive import SegmentWriter
from .placement import Owners, PartitionPlacer

log = logging.getLogger("hark.ingest")


class PublishContext(Protocol):
    """What a StreamPublisher uses of the process that owns it (``core.Ingest``): its settings,
    producer, keyring, sealed archive, admission and partition placement."""

    settings: Settings
    producer: Any
    keys: Keyring
    store: SealedStore
    admission: Admission

    def placer(self) -> PartitionPlacer: ...

    def online_owners(self) -> Owners | None: ...


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
        ingest: PublishContext,
        stream_id: str,
        tenant: str,
        info: SourceInfo,
        *,
        source_name: str | None = None,
        language: str = "auto",
        metadata: dict | None = None,
        realtime: bool = False,
        on_chunk: ChunkCallback | None = None,
        live: bool = False,
        hotwords: str | list[str] | tuple[str, ...] | None = None,
        admitted: bool = False,
    ):
        s = ingest.settings
        self.ingest, self.settings = ingest, s
        self.stream_id, self.tenant, self.info = check_stream_id(stream_id), tenant, info
        try:
            self.language = check_language(language)
        except ValueError as e:
            raise AudioError("bad_language", str(e)) from None
        try:
            self.hotwords = check_hotwords(hotwords)
        except ValueError as e:
            raise AudioError("bad_hotwords", str(e)) from None
        self.source_name, self.metadata = source_name, dict(metadata or {})
        self.realtime, self.on_chunk, self.live = realtime, on_chunk, live
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
        # start() counts the stream in admission and finish() releases it, unless the caller
        # counted it already (an upload is counted from its first byte)
        self._admits = not admitted
        self._started = False
        self._erase_checked = self._opened = self._last_audio = time.monotonic()
        self.erased = False  # `hark erase` ended it: nothing more of it is written anywhere
        self._failures_before = ingest.producer.failures

    @property
    def finished(self) -> bool:
        return self._finished

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
            "hotwords": list(self.hotwords),
            "sample_rate": TARGET_RATE,
            "segment_seconds": self.settings.archive_segment_seconds,
            "audio_partition": -1 if self.partition is None else self.partition,  # where `hark erase` ends it
        }
        meta.update(extra)
        self.ingest.store.put(self.prefix + "meta.json", json.dumps(meta, indent=1).encode())

    def start(self) -> None:
        if self._admits:
            self.ingest.admission.admit(self.tenant)  # refused at the door (AudioError) over a limit
        try:  # the id's claim, before anything of the stream is written: all of it is sealed with this key
            self.ingest.keys.create(self.stream_id)
        except (StreamErased, StreamExists) as e:
            if self._admits:
                self.ingest.admission.release(self.tenant)
            if isinstance(e, StreamExists):
                raise AudioError(
                    "stream_exists", f"stream {self.stream_id!r} exists already; choose another id"
                ) from None
            raise AudioError(
                "stream_erased", f"stream id {self.stream_id!r} was erased and cannot be used again; choose another id"
            ) from None
        self._started = True
        try:
            self.partition = self._placer.acquire(self.ingest.online_owners())
            self._meta(status="OPEN", started_at_ms=now_ms())
            self._produce("StreamStart", self._start_record())
        except BaseException:  # nothing downstream opened it: give back what it holds
            self._finished = True
            self._placer.release(self.partition)
            if self._admits:
                self.ingest.admission.release(self.tenant)
            raise

    def _start_record(self) -> StreamStart:
        return StreamStart(
            stream_id=self.stream_id,
            tenant=self.tenant,
            seq=0,
            language=self.language,
            source_format=self.info.format,
            source_name=self.source_name,
            sample_rate=TARGET_RATE,
            source_sample_rate=self.info.sample_rate,
            source_channels=self.info.channels,
            archive_prefix=self.prefix,
            started_at_ms=now_ms(),
            metadata={k: str(v) for k, v in self.metadata.items()},
            hotwords=list(self.hotwords),
        )

    def push(self, pcm: bytes) -> None:
        self._check_open()
        if self.summary.samples + len(pcm) // BYTES_PER_SAMPLE > self.max_samples:
            raise AudioError("too_long", f"stream longer than the {self.settings.max_stream_seconds:.0f} s maximum")
        for chunk in self.chunker.push(pcm):
            self._send_chunk(chunk)

    ERASE_CHECK_S = 1.0  # how soon a live stream notices `hark erase` (one key-store lookup each)

    def keep_alive(self) -> None:
        """The live client sends nothing for now (a pause): tell the services the stream is open."""
        self._check_open(force=True)
        self._produce(
            "StreamAlive",
            StreamAlive(
                stream_id=self.stream_id,
                tenant=self.tenant,
                seq=self.seq + 1,
                silent_ms=int((time.monotonic() - self._last_audio) * 1000),
                published_at_ms=now_ms(),
            ),
        )

    def _check_open(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force:
            self._last_audio = now
        if self.live and now - self._opened > self.settings.max_stream_seconds:  # pauses count too
            raise AudioError(
                "too_long", f"live stream open longer than the {self.settings.max_stream_seconds:.0f} s maximum"
            )
        if now - self._erase_checked < self.ERASE_CHECK_S and not force:
            return
        self._erase_checked = now
        if self.ingest.keys.erased(self.stream_id, fresh=True):
            raise self._erased_now()

    def _erased_now(self) -> AudioError:
        self.erased = True
        return AudioError("stream_erased", f"stream {self.stream_id} was erased; no more of its audio is accepted")

    def _send_chunk(self, chunk: bytes) -> None:
        offset = self.summary.samples
        if self.realtime:
            if self._t0 is None:
                self._t0 = time.monotonic()
            delay = self._t0 + offset / TARGET_RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.ingest.admission.use(self.tenant, len(chunk) / BYTES_PER_SAMPLE / TARGET_RATE)  # quota: AudioError
        self.seq += 1
        published = now_ms()
        self._produce(
            "AudioChunk",
            AudioChunk(
                stream_id=self.stream_id,
                tenant=self.tenant,
                seq=self.seq,
                offset_samples=offset,
                sample_rate=TARGET_RATE,
                pcm=chunk,
                published_at_ms=published,
            ),
        )
        self.pcm_archive.write(chunk)
        n = len(chunk) // BYTES_PER_SAMPLE
        self.summary.chunks += 1
        self.summary.samples += n
        if self.on_chunk:
            self.on_chunk(self.seq, offset, n, published)

    def finish(self, status: str = "COMPLETE", reason: str | None = None) -> StreamSummary:
        if self._finished or not self._started:  # once, and only what start() opened
            return self.summary
        self._finished = True
        try:
            return self._finish(status, reason)
        finally:
            self._placer.release(self.partition)
            if self._started and self._admits:
                self.ingest.admission.release(self.tenant)

    def _finish(self, status: str, reason: str | None) -> StreamSummary:
        if self.erased or self.ingest.keys.erased(self.stream_id, fresh=True):
            self.erased = True  # its end was published by `hark erase`; its archive is gone and stays gone
            self.summary.status, self.summary.reason = "ERASED", "the stream was erased"
            self.ingest.store.delete_prefix(self.prefix)  # segments written since the erase
            return self.summary
        if status == "COMPLETE":
            for chunk in self.chunker.flush():
                self._send_chunk(chunk)
        self.pcm_archive.close()
        self.summary.status, self.summary.reason = status, reason
        self._produce(
            "StreamEnd",
            StreamEnd(
                stream_id=self.stream_id,
                tenant=self.tenant,
                seq=self.seq + 1,
                total_samples=self.summary.samples,
                status=status,
                reason=reason,
                ended_at_ms=now_ms(),
            ),
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

    def _seal(self, rtype: str, record: Mapping[str, Any]) -> bytes:
        try:
            return serde.encode(rtype, record, keys=self.ingest.keys, stream_id=self.stream_id)
        except StreamErased:
            raise self._erased_now() from None

    def _produce(self, rtype: str, record: Mapping[str, Any]) -> None:
        p = self.ingest.producer
        while True:
            try:
                p.produce(
                    self.settings.audio_topic,
                    key=self._key(),
                    value=self._seal(rtype, record),
                    partition=-1 if self.partition is None else self.partition,
                )  # -1: hash the key
                break
            except BufferError:  # local queue full: wait for deliveries instead of growing memory
                p.poll(0.05)
        p.poll(0)
