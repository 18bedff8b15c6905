"""Replay: an archived stream published again as a new stream, through the whole pipeline."""

from __future__ import annotations

from hark.audio import TARGET_RATE, AudioError, SourceInfo
from hark.keys import StreamErased
from hark.records import new_stream_id
from hark.storage import archived_meta, archived_pcm

from .core import Ingest
from .publisher import ChunkCallback, StreamPublisher, StreamSummary


def replay(
    ingest: Ingest,
    stream_id: str,
    *,
    new_id: str | None = None,
    realtime: bool = False,
    on_chunk: ChunkCallback | None = None,
) -> StreamSummary:
    """Re-publish an archived stream's normalised PCM as a new stream (``hark replay``)."""
    try:
        meta = archived_meta(ingest.store, stream_id)
    except (KeyError, StreamErased):
        raise AudioError("not_archived", f"no archived stream {stream_id!r} in {ingest.store.uri}") from None
    segments = archived_pcm(ingest.store, stream_id)
    first = next(segments, None)
    if first is None:
        raise AudioError("not_archived", f"archived stream {stream_id!r} has no audio")
    info = SourceInfo(
        meta.get("source_format", "unknown"),
        meta.get("source_sample_rate", TARGET_RATE),
        meta.get("source_channels", 1),
    )
    new_id = new_id or new_stream_id(f"{stream_id}-replay")
    ingest.check_new_stream(new_id)
    pub = StreamPublisher(
        ingest,
        new_id,
        meta.get("tenant", "default"),
        info,
        source_name=meta.get("source_name"),
        language=meta.get("language", "en-US"),
        metadata={**meta.get("metadata", {}), "replay_of": stream_id},
        realtime=realtime,
        on_chunk=on_chunk,
        hotwords=meta.get("hotwords"),
    )
    pub.start()
    pub.push(first)
    for pcm in segments:
        pub.push(pcm)
    return pub.finish()
