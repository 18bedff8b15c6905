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

With a tokens file (``HARK_TOKENS_FILE``) every request needs a token (``Authorization: Bearer``,
``?token=`` or the ``hark_token`` cookie that a ``?token=`` sets for the page's own requests) and
sees only its tenant's streams: another tenant's stream answers 404, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from hark import kafka, serde
from hark.config import Settings
from hark.keys import Keyring
from hark.records import now_ms
from hark.runtime import DeadLetters, HealthServer, Metrics, key_of, kv, service_settings
from hark.tenants import Access, AccessDenied, request_token

from . import exports
from .guard import PAGE, Guard, allowed_hosts
from .index import TranscriptIndex, majority_speaker

log = logging.getLogger("hark.captions")

MAX_LIVE_PARTIALS = 1000  # streams whose current partial is kept for pages that open mid-utterance
SUBSCRIBER_QUEUE = 1000  # events a slow page may lag behind before it is dropped


MAX_SEARCH_HITS = 200


def caption_event(r: dict) -> dict:
    """What a page needs of a Result record."""
    return {
        "kind": str(r["kind"]),
        "source": r["source"],
        "utterance_id": r["utterance_id"],
        "start_ms": r["start_ms"],
        "end_ms": r["end_ms"],
        "text": r["text"],
        "speaker": majority_speaker(r.get("words") or []),
        "status": r.get("status"),
        "final_source": r.get("final_source"),
        "emitted_at_ms": r["emitted_at_ms"],
        **({"turns": r["turns"]} if str(r["kind"]) == "SPEAKERS" else {}),
    }


class Hub:
    """Fans events out from the follower thread to the asyncio queues of connected pages."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Queue]] = {}
        self._lock = threading.Lock()

    def subscribe(self, sid: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subs.setdefault(sid, set()).add(q)
        return q

    def unsubscribe(self, sid: str, q: asyncio.Queue) -> None:
        with self._lock:
            subs = self._subs.get(sid)
            if subs:
                subs.discard(q)
                if not subs:
                    del self._subs[sid]

    def publish(self, sid: str, event: dict) -> None:
        with self._lock:
            queues = list(self._subs.get(sid, ()))
        if queues and self.loop is not None:
            self.loop.call_soon_threadsafe(self._deliver, queues, event)

    @staticmethod
    def _deliver(queues, event) -> None:
        for q in queues:
            if q.full():  # a page that stopped reading: end its stream rather than buffer without bound
                while not q.empty():  # (EventSource reconnects and gets the history again)
                    q.get_nowait()
                q.put_nowait(None)
                continue
            q.put_nowait(event)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subs.values())


class ResultsFollower(threading.Thread):
    def __init__(self, settings: Settings, hub: Hub, metrics: Metrics):
        super().__init__(name="results-follower", daemon=True)
        self.settings, self.hub, self.metrics = settings, hub, metrics
        self.partials: OrderedDict[str, dict] = OrderedDict()
        self.last_loop = time.monotonic()
        self.partitions = 0
        self.stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        index = TranscriptIndex(self.settings.index_file)
        topic = self.settings.results_topic
        producer = kafka.producer(self.settings, **{"client.id": "hark-captions"})
        keys = Keyring.for_settings(self.settings)
        deadletters = DeadLetters(producer, self.settings, "captions", self.metrics, keys=keys)
        try:
            consumer = kafka.tail_consumer(self.settings, topic, offsets=index.offsets(topic))
            self.partitions = len(consumer.assignment())
            while not self.stopping.is_set():
                self.last_loop = time.monotonic()
                batch = []
                for m in kafka.consume_ready(consumer, 500, 0.05):
                    if m.error():
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", m.error())
                        continue
                    if m.value() is None:  # a tombstone (`hark erase`): forget the stream, tell its pages
                        if m.key():
                            sid = m.key().decode("utf-8", "replace")
                            batch.append((sid, m.topic(), m.partition(), m.offset()))
                            self.partials.pop(sid, None)
                            keys.forget(sid)
                            self.hub.publish(sid, {"kind": "ERASED", "stream_id": sid})
                            self.metrics.inc("streams_erased_total")
                        continue
                    try:
                        rtype, rec = serde.decode_message(m, keys)
                    except serde.Erased:  # its key is gone: nothing readable to index
                        self.metrics.inc("records_of_erased_streams_total")
                        continue
                    except serde.SerdeError as e:  # kept with its reason; every other record goes on
                        deadletters.send("malformed_record", str(e), msg=m, stream_id=key_of(m))
                        continue
                    if rtype != "Result":
                        continue
                    self._live(rec)
                    batch.append((rec, m.topic(), m.partition(), m.offset()))
                if batch:
                    index.apply(batch)
                    self.metrics.inc("records_indexed_total", len(batch))
                producer.poll(0)
            consumer.close()
            producer.flush(10)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("follower stopped")
        finally:
            index.close()

    def _live(self, rec: dict) -> None:
        sid, kind = rec["stream_id"], str(rec["kind"])
        event = caption_event(rec)
        if kind == "PARTIAL":
            self.partials[sid] = event
            self.partials.move_to_end(sid)
            while len(self.partials) > MAX_LIVE_PARTIALS:
                self.partials.popitem(last=False)
        elif kind in ("FINAL", "STREAM_COMPLETE") and (kind == "STREAM_COMPLETE" or rec["source"] == "online"):
            self.partials.pop(sid, None)
        if kind != "ALTERNATIVES":
            self.hub.publish(sid, event)
            self.metrics.inc("events_published_total")

    def healthy(self) -> tuple[bool, dict]:
        stalled = time.monotonic() - self.last_loop
        ok = self.is_alive() and self.error is None and stalled < 15
        return ok, {
            "loop_stalled_s": round(stalled, 2),
            "partitions": self.partitions,
            "subscribers": self.hub.subscribers,
            **({"error": self.error} if self.error else {}),
        }


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def create_app(settings: Settings, hub: Hub, follower: ResultsFollower | None) -> Guard:
    access = Access.load(settings)

    async def read_index(work: Callable[[TranscriptIndex], Any]) -> Any:
        """``work`` on a reader of the index, in a worker thread: SQLite blocks, the loop serves
        every page and live caption."""

        def run():
            idx = TranscriptIndex(settings.index_file)
            try:
                return work(idx)
            finally:
                idx.close()

        return await asyncio.to_thread(run)

    def tenant_of(request: Request) -> str | None:
        """The caller's tenant (None: open access, everything visible); AccessDenied without a good token."""
        return access.tenant_of(
            request_token(
                request.headers.get("authorization"),
                request.query_params.get("token"),
                request.cookies.get("hark_token"),
            )
        )

    def visible(st: dict | None, tenant: str | None) -> bool:
        return st is not None and (tenant is None or st["tenant"] == tenant)

    def guarded(handler):
        async def wrapper(request: Request) -> Response:
            try:
                tenant = tenant_of(request)
            except AccessDenied as e:
                return PlainTextResponse(f"{e.reason}\n", status_code=401, headers={"WWW-Authenticate": "Bearer"})
            response = await handler(request, tenant)
            token = request.query_params.get("token")
            if token and tenant is not None:  # the page's own fetches and EventSource carry it from here
                response.set_cookie("hark_token", token, httponly=True, samesite="strict")
            return response

        return wrapper

    async def home(request: Request, tenant: str | None) -> Response:
        return HTMLResponse(PAGE.replace("__STREAM__", ""))

    async def stream_page(request: Request, tenant: str | None) -> Response:
        sid = request.path_params["stream_id"]
        return HTMLResponse(PAGE.replace("__STREAM__", html.escape(sid, quote=True)))

    async def api_streams(request: Request, tenant: str | None) -> Response:
        return JSONResponse(await read_index(lambda idx: idx.streams(tenant=tenant)))

    async def api_search(request: Request, tenant: str | None) -> Response:
        q = request.query_params.get("q", "")
        stream, raw = request.query_params.get("stream") or None, request.query_params.get("limit", "20")
        limit = int(raw) if raw.isdigit() else 0
        if not 1 <= limit <= MAX_SEARCH_HITS:
            return PlainTextResponse(f"limit must be a whole number 1..{MAX_SEARCH_HITS}\n", status_code=400)
        t0 = time.perf_counter()
        hits = await read_index(lambda idx: idx.search(q, stream, limit, tenant=tenant))
        return JSONResponse({"query": q, "hits": hits, "took_ms": round(1000 * (time.perf_counter() - t0), 2)})

    async def api_export(request: Request, tenant: str | None) -> Response:
        sid, fmt = request.path_params["stream_id"], request.query_params.get("format", "vtt")
        st = await read_index(lambda idx: idx.stream(sid))
        if st is None or not visible(st, tenant) or st["complete"] is None:
            return PlainTextResponse(f"stream {sid!r} has no final transcript (yet)\n", status_code=404)
        try:
            body = exports.export(st["complete"], fmt)
        except ValueError as e:
            return PlainTextResponse(f"{e}\n", status_code=400)
        media = {"vtt": "text/vtt", "json": "application/json"}.get(fmt, "text/plain")
        return Response(body, media_type=f"{media}; charset=utf-8")

    async def api_events(request: Request, tenant: str | None) -> Response:
        sid = request.path_params["stream_id"]
        if tenant is not None:  # a stream not indexed yet has no tenant to check: 404 until it is
            st = await read_index(lambda idx: idx.stream(sid))
            if not visible(st, tenant):
                return PlainTextResponse(f"no stream {sid!r}\n", status_code=404)
        hub.loop = asyncio.get_running_loop()
        queue = hub.subscribe(sid)  # before reading history: nothing falls between the two

        async def events():
            try:
                history, st = await read_index(lambda idx: (idx.captions(sid), idx.stream(sid)))
                for event in history:
                    yield _sse({**event, "history": True})
                partial = follower.partials.get(sid) if follower else None
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
                hub.unsubscribe(sid, queue)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    app = Starlette(
        routes=[
            Route("/", guarded(home)),
            Route("/streams/{stream_id}", guarded(stream_page)),
            Route("/api/streams", guarded(api_streams)),
            Route("/api/search", guarded(api_search)),
            Route("/api/streams/{stream_id}/events", guarded(api_events)),
            Route("/api/streams/{stream_id}/export", guarded(api_export)),
        ]
    )
    return Guard(app, allowed_hosts(settings))


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
