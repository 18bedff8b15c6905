"""The page's Record button, server side: ``POST /api/record`` hands the page what it needs to
stream its microphone into ingest's WebSocket as the caller's tenant.

The page sends its options (language, hotwords, number of speakers) as JSON; they are checked
here with ingest's own checks, so a mistake shows before the microphone is on. The answer names a
fresh stream id and the WebSocket URL to open, with a one-use ticket in it when tokens are on
(hark/tickets.py): the page never holds the token itself (it is an HttpOnly cookie), and what
the URL carries is worthless a minute later or once used.

The page follows its new stream's captions before anything of it is indexed, so the server
remembers which tenant each id it handed out belongs to (``Recordings``), for the events stream.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hark.config import Settings
from hark.languages import AUTO, check_hotwords, check_language
from hark.params import speakers_metadata
from hark.records import new_stream_id
from hark.tenants import request_token
from hark.tickets import TTL_S, issue

MAX_BODY = 16 << 10  # options only: a language, a few hotwords, a count
# how long a handed-out id stays followable before its stream has anything indexed
PENDING_S = 3600.0
MAX_PENDING = 1000  # per tenant
RATE, RATE_WINDOW_S = 30, 60.0  # recordings a tenant may start per minute, on one captions server


def ingest_url(settings: Settings, host: str, scheme: str) -> str | None:
    """Ingest's WebSocket as the page's browser reaches it: ``captions_ingest_url``, else the
    page's own host name at ingest's port (wss:// for a page that came over https); None when
    neither is known."""
    if settings.captions_ingest_url:
        return settings.captions_ingest_url
    if not settings.ingest_port:
        return None
    name = host[: host.index("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
    return f"{'wss' if scheme == 'https' else 'ws'}://{name}:{settings.ingest_port}/v1/streams"


def ws_origin(url: str) -> str:
    """The scheme, host and port of a WebSocket URL, for the page's connect-src."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


class Recordings:
    """Stream ids handed out to pages, with their tenant, until their stream is indexed; and how
    fast each tenant may ask for them. Bounded per tenant: one tenant asking without end evicts
    only its own ids and is then refused, never another's."""

    def __init__(self) -> None:
        self._ids: dict[str | None, OrderedDict[str, float]] = {}
        self._asks: dict[str | None, list[float]] = {}

    def allow(self, tenant: str | None, now: float | None = None) -> bool:
        """Whether ``tenant`` may start another recording now: RATE recordings per RATE_WINDOW_S."""
        now = time.monotonic() if now is None else now
        asks = [t for t in self._asks.get(tenant, []) if t > now - RATE_WINDOW_S]
        if len(asks) >= RATE:
            self._asks[tenant] = asks
            return False
        self._asks[tenant] = [*asks, now]
        return True

    def add(self, stream_id: str, tenant: str | None) -> None:
        ids = self._ids.setdefault(tenant, OrderedDict())
        ids[stream_id] = time.monotonic() + PENDING_S
        while len(ids) > MAX_PENDING:
            ids.popitem(last=False)

    def handed_to(self, stream_id: str, tenant: str | None) -> bool:
        """Whether this server handed ``stream_id`` to ``tenant``'s page within PENDING_S."""
        ids = self._ids.get(tenant)
        expiry = ids.get(stream_id) if ids is not None else None
        return expiry is not None and expiry >= time.monotonic()


async def record(request: Request, tenant: str | None, settings: Settings, recordings: Recordings) -> Response:
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    # host and port only: behind a TLS proxy the scheme here is http while the page's is https
    # (the Guard checked the host already)
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return _refuse(403, "cross_origin", "a recording starts from this server's own page")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _refuse(415, "bad_request", "send the options as application/json")
    try:
        body = await _capped_body(request)
    except ValueError as e:
        return _refuse(413, "too_large", str(e))
    if not recordings.allow(tenant):
        return _refuse(429, "rate_limited", f"at most {RATE} recordings a minute; wait a moment")
    try:
        opts = json.loads(body or b"{}")
        if not isinstance(opts, dict):
            raise ValueError("the options are a JSON object")
        language = str(opts.get("language") or AUTO)
        check_language(language)
        hotwords = str(opts.get("hotwords") or "").strip()
        check_hotwords(hotwords or None)
        speakers = str(opts["speakers"]) if opts.get("speakers") not in (None, "", 0, "0") else None
        speakers_metadata(speakers)
    except (ValueError, RecursionError) as e:
        return _refuse(400, "bad_option", str(e))
    url = ingest_url(settings, host, request.url.scheme)
    if url is None:
        return _refuse(503, "no_ingest", "this server does not know ingest's address: set HARK_CAPTIONS_INGEST_URL")
    stream_id = new_stream_id("rec")
    params = {"stream_id": stream_id, "format": "pcm_s16le", "language": language, "source": "browser"}
    if hotwords:
        params["hotwords"] = hotwords
    if speakers:
        params["speakers"] = speakers
    if tenant is not None:  # tokens are on: the tenant comes from the ticket, never from the page
        token = request_token(
            request.headers.get("authorization"), request.query_params.get("token"), request.cookies.get("hark_token")
        )
        params["ticket"] = issue(token or "", tenant, stream_id)
    recordings.add(stream_id, tenant)
    return JSONResponse(
        {
            "stream_id": stream_id,
            "url": f"{url}{'&' if '?' in url else '?'}{urlencode(params)}",
            "expires_in_s": TTL_S,
            "tenant": tenant,
        },
        headers={"Cache-Control": "no-store"},
    )


async def _capped_body(request: Request) -> bytes:
    """The request's body, refused (ValueError) past MAX_BODY before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
        raise ValueError(f"the options are at most {MAX_BODY} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise ValueError(f"the options are at most {MAX_BODY} bytes")
    return bytes(body)


def _refuse(status: int, kind: str, reason: str) -> Response:
    return JSONResponse({"error": kind, "reason": reason}, status_code=status)
