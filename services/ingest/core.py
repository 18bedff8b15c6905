"""The ingest core: a producer, the sealed archive, the keyring and dead letters, shared by every
stream this process publishes (files, replays, live WebSocket streams)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hark import kafka
from hark.audio import AudioError, DecodedAudio, SourceInfo
from hark.config import Settings
from hark.keys import Keyring, SealedStore
from hark.records import new_stream_id
from hark.runtime import DeadLetters, Metrics
from hark.storage import ObjectStore, archive_prefix, open_store

from .admission import Admission
from .placement import AssignmentView, Owners, PartitionPlacer
from .publisher import ChunkCallback, StreamPublisher, StreamSummary, check_stream_id

log = logging.getLogger("hark.ingest")


class Ingest:
    """The ingest core: validation, decoding, publishing, archiving, dead letters."""

    def __init__(
        self, settings: Settings, producer=None, store: ObjectStore | None = None, metrics: Metrics | None = None
    ):
        self.settings = settings
        self.producer = producer or kafka.producer(
            settings, **{"client.id": "hark-ingest", "linger.ms": settings.audio_linger_ms}
        )
        self.keys = Keyring.for_settings(settings)
        raw = store or open_store(settings)
        self.store = raw if isinstance(raw, SealedStore) else SealedStore(raw, self.keys)
        self.metrics = metrics or Metrics("ingest")
        self.deadletters = DeadLetters(self.producer, settings, "ingest", self.metrics, keys=self.keys)
        self.admission = Admission(settings)
        self._placer: PartitionPlacer | None = None
        self._assignment: AssignmentView | None = None
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

    @property
    def open_partition_slots(self) -> int:
        """Streams placed on a partition and not yet released (0 before the first stream)."""
        return self._placer.open_streams if self._placer else 0

    def online_owners(self) -> Owners | None:
        """Each online_asr replica's audio partitions now, for balanced placement (None: unknown)."""
        if self.settings.audio_placement == "hash":
            return None
        with self._placer_lock:
            if self._assignment is None:
                adm, topic = kafka.admin(self.settings), self.settings.audio_topic
                self._assignment = AssignmentView(lambda t: kafka.group_assignment(adm, kafka.ONLINE_GROUP, topic, t))
        return self._assignment.owners()

    def reject(
        self,
        err: AudioError,
        *,
        stream_id: str | None,
        tenant: str | None,
        payload: bytes | None = None,
        payload_size: int = 0,
    ) -> None:
        """Record a refused input on the dead-letter topic (the caller reports it to the producer),
        once: an error already recorded by a step below is not recorded again."""
        if getattr(err, "dead_lettered", False):
            return
        err.dead_lettered = True  # type: ignore[attr-defined]
        self.deadletters.send(
            err.kind, err.reason, stream_id=stream_id, tenant=tenant, payload=payload, payload_size=payload_size
        )
        self.producer.flush(10)

    def check_new_stream(self, stream_id: str) -> None:
        """Stream ids are global keys: refuse one that exists (another tenant's, or a re-publish)
        or was erased (its records may still sit in the log, unreadable)."""
        if self.store.exists(archive_prefix(stream_id) + "meta.json"):
            raise AudioError("stream_exists", f"stream {stream_id!r} exists already; choose another id")
        if self.keys.erased(stream_id, fresh=True):  # its key is made when the stream starts
            raise AudioError(
                "stream_erased", f"stream id {stream_id!r} was erased and cannot be used again; choose another id"
            )

    def publish_file(
        self,
        source: str | Path | BinaryIO,
        *,
        stream_id: str | None = None,
        tenant: str = "default",
        realtime: bool = False,
        language: str = "auto",
        metadata: dict | None = None,
        on_chunk: ChunkCallback | None = None,
        on_start: Callable[[StreamPublisher], None] | None = None,
        hotwords: str | list[str] | None = None,
        max_seconds: float | None = None,
        admitted: bool = False,
    ) -> StreamSummary:
        """Publish a whole encoded input. Raises AudioError (after dead-lettering it) if it is refused.
        ``max_seconds``: the most decoded audio it may hold (default: a stream's maximum);
        ``admitted``: the caller counted the stream in admission already (and releases it)."""
        name = Path(source).name if isinstance(source, (str, Path)) else getattr(source, "name", None)
        stream_id = stream_id or new_stream_id(Path(name).stem if name else "upload")
        size, decoded, blocks, first = self._open_input(source, stream_id, tenant, max_seconds)
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
            hotwords=hotwords,
            admitted=admitted,
        )
        try:
            pub.start()
        except AudioError as e:  # refused at the door (a limit, an erased id): nothing was written
            self.reject(e, stream_id=stream_id, tenant=tenant, payload_size=size or 0)
            raise
        if on_start:
            on_start(pub)
        try:
            self._archive_source(source, stream_id, decoded.info, size)
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

    def _open_input(self, source, stream_id: str, tenant: str, max_seconds: float | None):
        """Checks before anything is published: the id, the size, and that the audio decodes.
        (size, the decoder, its blocks, the first block); AudioError, dead-lettered, if refused."""
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
            decoded = DecodedAudio(source, min(max_seconds or math.inf, self.settings.max_stream_seconds))
            blocks = decoded.blocks()
            return size, decoded, blocks, next(blocks)  # fails before anything is published
        except AudioError as e:
            self.reject(e, stream_id=stream_id, tenant=tenant, payload_size=size or 0)
            raise
        except StopIteration:  # pragma: no cover - blocks() raises "empty" itself
            err = AudioError("empty", "input decodes to no audio samples")
            self.reject(err, stream_id=stream_id, tenant=tenant, payload_size=size or 0)
            raise err from None

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
