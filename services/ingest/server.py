"""The network endpoint for live clients: WebSocket at ``ws://HOST:PORT/v1/streams``.

Authentication: with a tokens file (``HARK_TOKENS_FILE``) every connection must carry a token,
``Authorization: Bearer TOKEN`` or ``?token=TOKEN``; the stream belongs to the token's tenant. A
missing or unknown token gets an ``error`` message (unauthorized) and close code 1008.

Query parameters: ``stream_id`` (optional), ``tenant``, ``language``, ``hotwords`` (a comma list
of terms the offline pass favours, at most 50), ``format``:
- ``pcm_s16le`` (default, live): binary messages of raw interleaved s16le PCM at
  ``sample_rate`` (default 16000) with ``channels`` (default 1), resampled and chunked as
  they arrive, so captions start while the client is still speaking;
- ``file``: binary messages carrying an encoded file (WAV, FLAC, MP3, Ogg/Opus...), spooled
  to disk (not memory) up to the upload limit and published when the client says end.
A text message ``{"type": "end"}`` ends the stream. The server answers with JSON text
messages: ``ready`` (with the stream id), ``done`` (chunks, seconds) or ``error`` (error,
reason). A message above ``max_ws_message_bytes`` closes the connection (1009): too-large
payloads are refused, never buffered. A client that disconnects without ``end`` gets its
stream closed as ABORTED, so downstream services release its state. A client may pause (send
nothing) for as long as it likes: ingest publishes a keep-alive (StreamAlive) every third of the
idle timeout, so the stream stays open and its utterances keep their numbering; a live stream
ends (too_long) once it has been open ``max_stream_seconds`` of wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import tempfile
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.typing import Origin

from hark.audio import TARGET_RATE, AudioError, PcmResampler, SourceInfo
from hark.config import Settings
from hark.languages import AUTO, check_hotwords, check_language
from hark.records import new_stream_id
from hark.runtime import HealthServer, Metrics, kv, service_settings
from hark.tenants import Access, AccessDenied, request_token

from .archive import SegmentWriter, source_segment_bytes
from .core import Ingest
from .publisher import StreamPublisher, StreamSummary, check_stream_id

log = logging.getLogger("hark.ingest")


class IngestServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics("ingest")
        self.ingest = Ingest(settings, metrics=self.metrics)
        self.access = Access.load(settings)
        self.open_streams = 0

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake is done when the handler runs
        url = urlparse(ws.request.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path.rstrip("/") != "/v1/streams":
            await _error(ws, AudioError("not_found", f"unknown path {url.path} (use /v1/streams)"))
            return
        stream_id = q.get("stream_id") or new_stream_id("live")
        token = request_token(ws.request.headers.get("Authorization"), q.get("token"))
        try:
            tenant = self.access.publishing_tenant(token, q.get("tenant"))
        except AccessDenied as e:  # refused before anything is read; not dead-lettered (nothing to keep)
            self.metrics.inc("refused_connections_total", reason=e.kind)
            log.warning("connection refused: %s", e.reason, extra=kv(stream_id=stream_id))
            await _error(ws, AudioError(e.kind, e.reason))
            return
        try:
            check_stream_id(stream_id)
            try:  # before any audio is read
                check_language(q.get("language", AUTO))
            except ValueError as e:
                raise AudioError("bad_language", str(e)) from None
            try:
                check_hotwords(q.get("hotwords"))
            except ValueError as e:
                raise AudioError("bad_hotwords", str(e)) from None
            self.ingest.admission.check(tenant)  # on the loop: a refusal waits for no worker thread
            await asyncio.to_thread(self.ingest.check_new_stream, stream_id)
            fmt = q.get("format", "pcm_s16le")
            if fmt == "pcm_s16le":
                await self._live_pcm(ws, q, stream_id, tenant)
            elif fmt == "file":
                await self._file_upload(ws, q, stream_id, tenant)
            else:
                raise AudioError("unsupported_format", f"unknown format {fmt!r} (pcm_s16le or file)")
        except AudioError as e:
            await asyncio.to_thread(self.ingest.reject, e, stream_id=stream_id, tenant=tenant)
            await _error(ws, e)
        except ConnectionClosed:
            pass

    async def _live_pcm(self, ws, q, stream_id, tenant) -> None:
        try:
            rate, channels = int(q.get("sample_rate", TARGET_RATE)), int(q.get("channels", 1))
        except ValueError:
            raise AudioError("bad_parameter", "sample_rate and channels must be integers") from None
        resampler = PcmResampler(rate, channels)
        info = SourceInfo(f"raw/pcm_s16le@{rate}x{channels}", rate, channels)
        pub = StreamPublisher(
            self.ingest,
            stream_id,
            tenant,
            info,
            source_name=q.get("source"),
            language=q.get("language", AUTO),
            live=True,
            hotwords=q.get("hotwords"),
        )
        raw = SegmentWriter(
            self.ingest.store,
            pub.prefix + "source/",
            source_segment_bytes(self.settings, rate, channels),
            ".pcm",
        )

        def take(message: bytes) -> None:  # archive writes and producer back-pressure block
            raw.write(message)
            pub.push(resampler.push(message))

        def finish() -> StreamSummary:
            raw.close()
            pub.push(resampler.flush())
            return pub.finish()

        # Everything that can block (archive PUTs, the producer's flush at the end) runs in a
        # worker thread, one call at a time per connection so the stream stays in order: a slow
        # store stalls its own client, never the loop that serves every other one.
        await asyncio.to_thread(pub.start)
        self.open_streams += 1
        self.metrics.set("open_streams", self.open_streams)
        try:
            await ws.send(json.dumps({"type": "ready", "stream_id": stream_id}))
            ended = False
            # a client that pauses (sends nothing) keeps its stream: ingest tells the services it
            # is alive well within their idle timeout
            keepalive_s = self.settings.idle_timeout_s / 3
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), keepalive_s)  # cancelling recv is safe
                except TimeoutError:
                    await asyncio.to_thread(pub.keep_alive)
                    continue
                except ConnectionClosedOK:
                    break
                if isinstance(message, str):
                    if _is_end(message):
                        ended = True
                        break
                    continue
                await asyncio.to_thread(take, message)
            if not ended:
                await asyncio.to_thread(raw.close)
                await asyncio.to_thread(pub.finish, "ABORTED", "client disconnected before end")
                return
            summary = await asyncio.to_thread(finish)
            await _done(ws, stream_id, summary)
        except AudioError as e:
            await asyncio.to_thread(raw.close)
            await asyncio.to_thread(pub.finish, "ERROR", e.reason)
            raise
        except ConnectionClosed as e:
            await asyncio.to_thread(raw.close)
            reason = f"connection closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
            await asyncio.to_thread(pub.finish, "ABORTED", reason)
        finally:
            self.open_streams -= 1
            self.metrics.set("open_streams", self.open_streams)

    async def _file_upload(self, ws, q, stream_id, tenant) -> None:
        limit = self.settings.max_upload_bytes
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as spool:
            size = 0
            await ws.send(json.dumps({"type": "ready", "stream_id": stream_id}))
            async for message in ws:
                if isinstance(message, str):
                    if _is_end(message):
                        break
                    continue
                size += len(message)
                if size > limit:
                    raise AudioError("too_large", f"upload exceeds the {limit}-byte maximum")
                spool.write(message)
            else:
                return  # closed without "end": nothing was published
            spool.seek(0)
            summary = await asyncio.to_thread(
                self.ingest.publish_file,
                spool,  # type: ignore[arg-type]  # a binary file object
                stream_id=stream_id,
                tenant=tenant,
                language=q.get("language", AUTO),
                hotwords=q.get("hotwords"),
            )
        await _done(ws, stream_id, summary)

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (RuntimeError, ValueError):  # not the main thread
                pass
        keep = self.settings.archive_retention_days, self.settings.voiceprint_retention_days
        sweeper = asyncio.create_task(self._retention()) if max(keep) > 0 else None
        # a web page in a local browser must not publish to a loopback endpoint it found: only
        # the origins allowed, and clients that send none (not a browser)
        allowed = [Origin(o.strip()) for o in self.settings.ingest_allowed_origins.split(",") if o.strip()]
        origins: list[Origin | None] = [None, *allowed]
        async with serve(
            self.handler, host, port, max_size=self.settings.max_ws_message_bytes, origins=origins
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("listening", extra=kv(url=f"ws://{host}:{self.port}/v1/streams"))
            if ready:
                ready.set()
            await stop.wait()
        if sweeper:
            sweeper.cancel()
        self.ingest.producer.flush(30)

    async def _retention(self, period_s: float = 3600.0) -> None:
        """Ingest owns the archive, so it enforces its retention (streams, and the enrolled voices
        kept beside them): a sweep every hour."""
        from hark.erasure import retention_sweep
        from hark.voices import VoiceStore

        voices = VoiceStore(self.settings)

        while True:
            try:
                erased = await asyncio.to_thread(
                    retention_sweep, self.settings, self.ingest.store, self.ingest.producer
                )
                self.metrics.inc("streams_expired_total", len(erased))
                await asyncio.to_thread(voices.sweep)
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(period_s)


async def _done(ws, stream_id: str, summary: StreamSummary) -> None:
    done = {"type": "done", "stream_id": stream_id, "chunks": summary.chunks, "seconds": round(summary.duration_s, 3)}
    await ws.send(json.dumps(done))


def _is_end(message: str) -> bool:
    try:
        return json.loads(message).get("type") == "end"
    except (ValueError, AttributeError):
        return False


async def _error(ws, err: AudioError) -> None:
    try:
        await ws.send(json.dumps({"type": "error", "error": err.kind, "reason": err.reason}))
        await ws.close(1008, err.kind[:100])
    except ConnectionClosed:
        pass


def main(argv: list[str] | None = None) -> None:
    s = service_settings("ingest", argv, listen="ingest")
    server = IngestServer(s)
    health = HealthServer(
        s.health_host, s.health_port, "ingest", lambda: (True, {"open_streams": server.open_streams}), server.metrics
    )
    try:
        asyncio.run(server.serve(s.ingest_host, s.ingest_port))
    finally:
        health.close()
