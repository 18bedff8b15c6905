"""captions: the results topic served to people: a live captions page, search and exports.

One process: a follower thread reads every partition of the results topic (no consumer group:
each server instance needs every stream) from the offsets stored in its SQLite index, indexes
each batch in one transaction and fans each record out to the pages following that stream
(Server-Sent Events). The ASGI app (Starlette on uvicorn) serves:

  /                           streams, live and finished, and a search box
  /streams/{id}               the stream's captions: history first, then live updates
  /api/streams                streams as JSON
  /api/streams/{id}/events    SSE: caption events (history, then live)
  /api/search?q=&stream=      hits as JSON, best first (same as `hark search`)
  /api/streams/{id}/export?format=vtt|srt|json|rttm|ctm
  /api/streams/{id}/audio     the archived audio as WAV, with range requests (audio.py)
  POST /api/record            a new stream id and ingest's WebSocket URL for the page's Record
                              button, with a one-use ticket when tokens are on (record.py)

With a tokens file (``HARK_TOKENS_FILE``, else ``<data_dir>/tokens`` once it exists) every
request needs a token (``Authorization: Bearer``, ``?token=`` or the ``hark_token`` cookie that a
``?token=`` sets for the page's own requests) and sees only its tenant's streams: another
tenant's stream answers 404, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from hark.config import Settings
from hark.keys import open_archive
from hark.params import parse_count
from hark.records import now_ms
from hark.runtime import HealthServer, Metrics, kv, service_settings
from hark.tenants import Access, AccessDenied, request_token

from . import exports
from .audio import NoAudio, byte_range, open_audio
from .follower import Hub, ResultsFollower
from .guard import PAGE, Guard, allowed_hosts
from .index import TranscriptIndex
from .record import Recordings, ingest_url, record

log = logging.getLogger("hark.captions")

MAX_SEARCH_HITS = 200


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def create_app(settings: Settings, hub: Hub, follower: ResultsFollower | None) -> Guard:
    api = CaptionsApi(settings, hub, follower)
    guarded = api.guarded
    app = Starlette(
        routes=[
            Route("/", guarded(api.home)),
            Route("/streams/{stream_id}", guarded(api.stream_page)),
            Route("/api/streams", guarded(api.streams)),
            Route("/api/search", guarded(api.search)),
            Route("/api/streams/{stream_id}/events", guarded(api.events)),
            Route("/api/streams/{stream_id}/export", guarded(api.export)),
            Route("/api/streams/{stream_id}/audio", guarded(api.audio), methods=["GET", "HEAD"]),
            Route("/api/record", guarded(api.record), methods=["POST"]),
        ]
    )
    return Guard(app, allowed_hosts(settings), lambda host, scheme: ingest_url(settings, host, scheme))


class CaptionsApi:
    """The pages and the API's handlers; each takes the request and the caller's tenant (None:
    open access, everything visible), which ``guarded`` finds from its token."""

    def __init__(self, settings: Settings, hub: Hub, follower: ResultsFollower | None):
        self.settings, self.hub, self.follower = settings, hub, follower
        self.access = Access.load(settings)
        self.archive = open_archive(settings)
        self.recordings = Recordings()

    async def read_index(self, work: Callable[[TranscriptIndex], Any]) -> Any:
        """``work`` on a reader of the index, in a worker thread: SQLite blocks, the loop serves
        every page and live caption."""

        def run():
            idx = TranscriptIndex.reader(self.settings.index_file)
            try:
                return work(idx)
            finally:
                idx.close()

        return await asyncio.to_thread(run)

    def tenant_of(self, request: Request) -> str | None:
        """The caller's tenant (None: open access, everything visible); AccessDenied without a good token."""
        return self.access.tenant_of(
            request_token(
                request.headers.get("authorization"),
                request.query_params.get("token"),
                request.cookies.get("hark_token"),
            )
        )

    def guarded(self, handler):
        async def wrapper(request: Request) -> Response:
            try:
                tenant = self.tenant_of(request)
            except AccessDenied as e:
                return PlainTextResponse(f"{e.reason}\n", status_code=401, headers={"WWW-Authenticate": "Bearer"})
            response = await handler(request, tenant)
            token = request.query_params.get("token")
            if token and tenant is not None:  # the page's own fetches and EventSource carry it from here
                response.set_cookie("hark_token", token, httponly=True, samesite="strict")
            return response

        return wrapper

    async def home(self, request: Request, tenant: str | None) -> Response:
        return HTMLResponse(PAGE.replace("__STREAM__", ""))

    async def stream_page(self, request: Request, tenant: str | None) -> Response:
        sid = request.path_params["stream_id"]
        return HTMLResponse(PAGE.replace("__STREAM__", html.escape(sid, quote=True)))

    async def record(self, request: Request, tenant: str | None) -> Response:
        return await record(request, tenant, self.settings, self.recordings)

    async def streams(self, request: Request, tenant: str | None) -> Response:
        return JSONResponse(await self.read_index(lambda idx: idx.streams(tenant=tenant)))

    async def search(self, request: Request, tenant: str | None) -> Response:
        q = request.query_params.get("q", "")
        stream = request.query_params.get("stream") or None
        try:
            limit = parse_count(request.query_params.get("limit"), "limit", 20, 1, MAX_SEARCH_HITS)
        except ValueError as e:
            return PlainTextResponse(f"{e}\n", status_code=400)
        t0 = time.perf_counter()
        hits = await self.read_index(lambda idx: idx.search(q, stream, limit, tenant=tenant))
        return JSONResponse({"query": q, "hits": hits, "took_ms": round(1000 * (time.perf_counter() - t0), 2)})

    async def export(self, request: Request, tenant: str | None) -> Response:
        sid, fmt = request.path_params["stream_id"], request.query_params.get("format", "vtt")
        st = await self.read_index(lambda idx: idx.stream(sid))
        if not _visible(st, tenant) or st["complete"] is None:
            return PlainTextResponse(f"stream {sid!r} has no final transcript (yet)\n", status_code=404)
        try:
            body = exports.export(st["complete"], fmt)
        except ValueError as e:
            return PlainTextResponse(f"{e}\n", status_code=400)
        media = {"vtt": "text/vtt", "json": "application/json"}.get(fmt, "text/plain")
        headers = {}
        if request.query_params.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{exports.filename(sid, fmt)}"'
        return Response(body, media_type=f"{media}; charset=utf-8", headers=headers)

    async def audio(self, request: Request, tenant: str | None) -> Response:
        sid = request.path_params["stream_id"]
        try:
            audio = await asyncio.to_thread(open_audio, self.archive, sid, tenant)
        except NoAudio:
            return PlainTextResponse(f"no audio for stream {sid!r}\n", status_code=404)
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-store"}
        try:
            span = byte_range(request.headers.get("range"), audio.size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{audio.size}"})
        start, end = span or (0, audio.size)
        headers["Content-Length"] = str(end - start)
        if span:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{audio.size}"
        body = audio.read(start, end) if request.method == "GET" else None
        return StreamingResponse(body or iter(()), 206 if span else 200, headers, media_type="audio/wav")

    async def events(self, request: Request, tenant: str | None) -> Response:
        sid = request.path_params["stream_id"]
        if tenant is not None:  # a stream not indexed yet has no tenant to check: 404 until it is,
            st = await self.read_index(lambda idx: idx.stream(sid))  # unless its page is recording it
            if not _visible(st, tenant) and (st is not None or not self.recordings.handed_to(sid, tenant)):
                return PlainTextResponse(f"no stream {sid!r}\n", status_code=404)
        self.hub.loop = asyncio.get_running_loop()
        queue = self.hub.subscribe(sid)  # before reading history: nothing falls between the two
        return StreamingResponse(
            self._event_stream(sid, queue),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _event_stream(self, sid: str, queue: asyncio.Queue):
        """A stream's captions so far (marked history), then each new one as it comes."""
        try:
            history, st = await self.read_index(lambda idx: (idx.captions(sid), idx.stream(sid)))
            for event in history:
                yield _sse({**event, "history": True})
            partial = self.follower.partials.get(sid) if self.follower else None
            if partial:
                yield _sse({**partial, "history": True})
            if st and st["complete"]:
                c = st["complete"]
                yield _sse(
                    {
                        "kind": "STREAM_COMPLETE",
                        "status": c["status"],
                        "final_source": c["final_source"],
                        "history": True,
                        "emitted_at_ms": c["emitted_at_ms"],
                    }
                )
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if event is None:
                    break
                yield _sse({**event, "sent_at_ms": now_ms()})
                if event.get("kind") == "ERASED":  # nothing more will come; the page says so
                    break
        finally:
            self.hub.unsubscribe(sid, queue)


def _visible(st: dict | None, tenant: str | None) -> bool:
    return st is not None and (tenant is None or st["tenant"] == tenant)


def serve(settings: Settings) -> None:
    import uvicorn

    metrics, hub = Metrics("captions"), Hub()
    follower = ResultsFollower(settings, hub, metrics)
    follower.start()
    health = HealthServer(settings.health_host, settings.health_port, "captions", follower.healthy, metrics)
    config = uvicorn.Config(
        create_app(settings, hub, follower),
        host=settings.captions_host,
        port=settings.captions_port,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    log.info(
        "serving",
        extra=kv(
            host=settings.captions_host,
            port=settings.captions_port,
            index=str(settings.index_file),
            health_port=health.port,
        ),
    )
    try:
        server.run()
    finally:
        follower.stopping.set()
        follower.join(5)
        health.close()


def main(argv: list[str] | None = None) -> None:
    serve(service_settings("captions", argv, listen="captions"))
