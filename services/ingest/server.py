"""The network endpoint for live clients: WebSocket at ``ws://HOST:PORT/v1/streams``.

Authentication: with a tokens file (``HARK_TOKENS_FILE``, or ``<data dir>/tokens`` once `hark token
create` made one) every connection must carry a token, ``Authorization: Bearer TOKEN`` or
``?token=TOKEN``; the stream belongs to the token's tenant. A missing or unknown token gets an
``error`` message (unauthorized) and close code 1008; a token revoked while its stream is open
ends the stream (ERROR, unauthorized) with what arrived before.

Query parameters: ``stream_id`` (optional), ``tenant``, ``language``, ``hotwords`` (a comma list
of terms the offline pass favours, at most 50), ``format``:
- ``pcm_s16le`` (default, live): binary messages of raw interleaved s16le PCM at
  ``sample_rate`` (default 16000) with ``channels`` (default 1), resampled and chunked as
  they arrive, so captions start while the client is still speaking. Paced: at most
  ``live_pace_factor`` x real time after a burst of ``live_burst_seconds`` (pacing.py);
- ``file``: binary messages carrying an encoded file (WAV, FLAC, MP3, Ogg/Opus...), spooled
  to disk (not memory) up to the upload limit and published when the client says end, on
  threads of their own; at most ``max_upload_seconds`` of decoded audio.
The only text message is ``{"type": "end"}``, which ends the stream; any other is refused
(bad_message). The server answers with JSON text messages: ``ready`` (with the stream id),
``done`` (chunks, seconds) or ``error`` (error, reason). A message above ``max_ws_message_bytes``
closes the connection (1009): too-large payloads are refused, never buffered. A client that
disconnects without ``end`` gets its stream closed as ABORTED, so downstream services release its
state. A client may pause (send nothing) for as long as it likes: ingest publishes a keep-alive
(StreamAlive) every third of the idle timeout, so the stream stays open and its utterances keep
their numbering; a live stream ends (too_long) once it has been open ``max_stream_seconds`` of
wall-clock time. Connections are capped per replica (``ingest_max_connections``) and per tenant
(``tenant_max_connections``); streams, uploads included, count in admission (admission.py).
Beside it, with the server, runs the reader of what tenants' own Kafka producers publish, through
the same doors (kafka_source.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConcurrencyError, ConnectionClosed, ConnectionClosedOK
from websockets.typing import Origin

from hark.audio import AudioError
from hark.config import Settings
from hark.languages import AUTO, check_hotwords, check_language
from hark.params import speakers_metadata
from hark.records import new_stream_id
from hark.runtime import HealthServer, Metrics, kv, service_settings
from hark.tenants import Access, AccessDenied, request_token
from hark.tickets import Redeemer

from .core import Ingest
from .kafka_source import KafkaSource
from .live import TICK_S, LiveStream, control
from .publisher import StreamSummary, check_stream_id

log = logging.getLogger("hark.ingest")

UPLOAD_MEMORY_BYTES = 256 << 10  # an upload's spool in memory; beyond it, a temporary file
# Messages a connection's reader queues before it stops reading the socket: with pacing holding a
# reader back, this (times max_ws_message_bytes) is all a connection can make ingest hold.
MAX_QUEUE = 4


class IngestServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics("ingest")
        self.ingest = Ingest(settings, metrics=self.metrics)
        self.access = Access.load(settings)
        self.tickets = Redeemer(self.access)
        self.connections = 0
        self._tenant_connections: Counter[str] = Counter()
        # Uploads decode and publish on threads of their own at a lower priority: however many
        # arrive, the threads that serve live streams (asyncio's default pool) never queue behind them.
        self.uploads = ThreadPoolExecutor(
            settings.ingest_upload_workers, "upload", initializer=_renice, initargs=(settings.ingest_upload_nice,)
        )

    def health(self) -> dict:
        return {
            "open_streams": self.ingest.admission.open_streams,
            "open_partition_slots": self.ingest.open_partition_slots,
            "connections": self.connections,
        }

    async def handler(self, ws: ServerConnection) -> None:
        if self.connections >= self.settings.ingest_max_connections:  # before any work, even the token's
            self.metrics.inc("refused_connections_total", reason="capacity")
            limit = self.settings.ingest_max_connections
            await _error(ws, AudioError("capacity", f"ingest has {limit} connections open, its limit; retry later"))
            return
        self.connections += 1
        try:
            await self._connection(ws)
        finally:
            self.connections -= 1

    async def _connection(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake is done when the handler runs
        url = urlparse(ws.request.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path.rstrip("/") != "/v1/streams":
            await _error(ws, AudioError("not_found", f"unknown path {url.path} (use /v1/streams)"))
            return
        stream_id = q.get("stream_id") or new_stream_id("live")
        token = request_token(ws.request.headers.get("Authorization"), q.get("token"))
        try:
            if q.get("ticket"):  # a browser page's, from the captions server (hark/tickets.py)
                tenant, stored = self.tickets.redeem(q["ticket"], stream_id)
                if q.get("tenant") and q["tenant"] != tenant:
                    raise AccessDenied("forbidden", f"this ticket publishes as tenant {tenant!r}, not {q['tenant']!r}")
                authorizer = self._ticket_authorizer(stored, tenant)
            else:
                tenant = self.access.publishing_tenant(token, q.get("tenant"))
                authorizer = self._authorizer(token, tenant)
            cap = self.settings.tenant_max_connections
            if cap and self._tenant_connections[tenant] >= cap:
                raise AccessDenied("tenant_limit", f"tenant {tenant!r} has {cap} connections open, its limit")
        except AccessDenied as e:  # refused before anything is read; not dead-lettered (nothing to keep)
            self.metrics.inc("refused_connections_total", reason=e.kind)
            log.warning("connection refused: %s", e.reason, extra=kv(stream_id=stream_id))
            await _error(ws, AudioError(e.kind, e.reason))
            return
        self._tenant_connections[tenant] += 1
        try:
            await self._stream(ws, q, stream_id, tenant, authorizer)
        finally:
            self._tenant_connections[tenant] -= 1
            if self._tenant_connections[tenant] <= 0:
                del self._tenant_connections[tenant]

    def _authorizer(self, token: str | None, tenant: str):
        """A check that raises AudioError (unauthorized) once ``token`` no longer admits ``tenant``:
        revoking a token ends its open streams too."""

        def check() -> None:
            try:
                now = self.access.tenant_of(token)
            except AccessDenied as e:
                raise AudioError("unauthorized", f"the stream's token no longer admits it ({e.reason})") from None
            if now is not None and now != tenant:
                raise AudioError("unauthorized", "the stream's token no longer admits it (tenant changed)")

        return check

    def _ticket_authorizer(self, stored: str, tenant: str):
        """As ``_authorizer``, for a stream opened with a ticket: the token it was issued under."""

        def check() -> None:
            if self.access.tenant_of_hash(stored) != tenant:
                raise AudioError("unauthorized", "the token this recording was opened under was revoked")

        return check

    async def _stream(self, ws: ServerConnection, q: dict, stream_id: str, tenant: str, authorized) -> None:
        """One stream's door checks and its publishing; whatever goes wrong, the client hears why."""
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
            try:
                metadata = speakers_metadata(q.get("speakers"))
            except ValueError as e:
                raise AudioError("bad_parameter", str(e)) from None
            self.ingest.admission.check(tenant)  # on the loop: a refusal waits for no worker thread
            await asyncio.to_thread(self.ingest.check_new_stream, stream_id)
            fmt = q.get("format", "pcm_s16le")
            if fmt == "pcm_s16le":
                summary = await LiveStream(self.ingest, ws, q, stream_id, tenant, authorized, metadata).run()
            elif fmt == "file":
                summary = await self._file_upload(ws, q, stream_id, tenant, authorized, metadata)
            else:
                raise AudioError("unsupported_format", f"unknown format {fmt!r} (pcm_s16le or file)")
            if summary is not None:
                await _done(ws, stream_id, summary)
        except AudioError as e:
            await self._refuse(ws, e, stream_id, tenant)
        except ConnectionClosed:
            pass
        except Exception as e:  # a defect of ingest's: the stream was ended (LiveStream), say so
            log.exception("stream failed", extra=kv(stream_id=stream_id))
            self.metrics.inc("internal_errors_total")
            err = AudioError("internal", f"ingest failed on this stream ({type(e).__name__}); retry under a new id")
            await self._refuse(ws, err, stream_id, tenant, code=1011)

    async def _refuse(self, ws, err: AudioError, stream_id: str, tenant: str, code: int = 1008) -> None:
        try:
            await asyncio.to_thread(self.ingest.reject, err, stream_id=stream_id, tenant=tenant)
        except Exception:  # the client is still told
            log.exception("could not dead-letter a refusal", extra=kv(stream_id=stream_id))
        await _error(ws, err, code)

    async def _file_upload(self, ws, q, stream_id, tenant, authorized, metadata) -> StreamSummary | None:
        """An encoded file, spooled to disk as it arrives, then decoded and published on the uploads'
        own threads. It counts in admission from its first byte, like a live stream."""
        self.ingest.admission.admit(tenant)
        spool = tempfile.SpooledTemporaryFile(max_size=UPLOAD_MEMORY_BYTES)
        ended = False
        try:
            await ws.send(json.dumps({"type": "ready", "stream_id": stream_id}))
            ended = await self._receive_upload(ws, spool, authorized)
        finally:
            if not ended:  # refused, or closed without "end": nothing was published
                spool.close()
                self.ingest.admission.release(tenant)
        if not ended:
            return None
        spool.seek(0)

        def publish() -> StreamSummary:  # owns the spool and the admission slot from here on
            try:
                return self.ingest.publish_file(
                    spool,  # type: ignore[arg-type]  # a binary file object
                    stream_id=stream_id,
                    tenant=tenant,
                    language=q.get("language", AUTO),
                    hotwords=q.get("hotwords"),
                    metadata=metadata,
                    max_seconds=self.settings.max_upload_seconds,
                    admitted=True,
                )
            finally:
                spool.close()
                self.ingest.admission.release(tenant)

        # shielded: a client that leaves, or a server that stops, does not cancel a publish that
        # has not begun yet (the slot would never be released)
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self.uploads, publish))

    async def _receive_upload(self, ws, spool, authorized) -> bool:
        """Spools the upload's messages until ``end`` (True) or a clean close without it (False)."""
        limit, idle = self.settings.max_upload_bytes, self.settings.upload_idle_timeout_s
        size, last = 0, time.monotonic()
        while True:
            authorized()
            try:
                message = await asyncio.wait_for(ws.recv(), TICK_S)
            except TimeoutError:
                if time.monotonic() - last > idle:
                    raise AudioError("idle", f"the upload sent nothing for {idle:.0f} s") from None
                continue
            except ConnectionClosedOK:
                return False
            last = time.monotonic()
            if isinstance(message, str):
                return control(message) == "end"
            size += len(message)
            if size > limit:
                raise AudioError("too_large", f"upload exceeds the {limit}-byte maximum")
            spool.write(message)

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
        origins: list[Origin | None] = [None, *map(Origin, allowed_origins(self.settings))]
        # what tenants' own Kafka producers publish, through the same doors (kafka_source.py)
        self.kafka_source = KafkaSource(self.ingest, self.metrics)
        self.kafka_source.start()
        try:
            async with serve(
                self.handler,
                host,
                port,
                max_size=self.settings.max_ws_message_bytes,
                max_queue=MAX_QUEUE,
                origins=origins,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info("listening", extra=kv(url=f"ws://{host}:{self.port}/v1/streams"))
                if ready:
                    ready.set()
                await stop.wait()
        finally:  # a signal, or the task cancelled (an embedding caller, the tests)
            if sweeper:
                sweeper.cancel()
            self.uploads.shutdown(wait=False)  # an upload being published finishes first
            self.kafka_source.stop()  # its open streams end, its positions commit
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


def allowed_origins(settings: Settings) -> list[str]:
    """The browser origins that may open streams: the captions page's own (its port on the
    loopback names and on its allowed host names), where its Record button runs, and those named
    in ``ingest_allowed_origins`` (a proxy's https origin). Any other page that finds a loopback
    ingest is refused (403)."""
    named = [o.strip() for o in settings.ingest_allowed_origins.split(",") if o.strip()]
    if not settings.captions_port:
        return named
    names = ["localhost", "127.0.0.1", "[::1]"]
    names += [h.strip().lower() for h in settings.captions_allowed_hosts.split(",") if h.strip()]
    own = [f"{scheme}://{n}:{settings.captions_port}" for n in names for scheme in ("http", "https")]
    return [*own, *named]


def _renice(nice: int) -> None:
    os.nice(max(0, nice - os.nice(0)))  # per thread on Linux: the process keeps its own


async def _error(ws, err: AudioError, code: int = 1008) -> None:
    """Tell the client why, and close. What the client sent meanwhile is read and dropped until
    its close frame: a connection whose reading was paused (a paced or flooding client) would
    otherwise never complete the closing handshake, and its socket, closed with data unread,
    would be reset, which loses the error message at the client before it reads it."""
    try:
        await ws.send(json.dumps({"type": "error", "error": err.kind, "reason": err.reason}))
        drain = asyncio.create_task(_discard(ws))
        try:
            await ws.close(code, err.kind[:100])
        finally:
            drain.cancel()
    except ConnectionClosed:
        pass


async def _discard(ws) -> None:
    try:
        while True:
            await ws.recv()
    except (ConnectionClosed, ConcurrencyError):
        pass


def main(argv: list[str] | None = None) -> None:
    s = service_settings("ingest", argv, listen="ingest")
    server = IngestServer(s)
    health = HealthServer(s.health_host, s.health_port, "ingest", lambda: (True, server.health()), server.metrics)
    try:
        asyncio.run(server.serve(s.ingest_host, s.ingest_port))
    finally:
        health.close()
