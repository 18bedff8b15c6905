"""What keeps the captions server's doors closed in a browser: the Host check against DNS
rebinding and the security headers (a hash-based Content-Security-Policy, no framing)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from hark.config import Settings

from .record import ws_origin

PAGE = (Path(__file__).parent / "page.html").read_text()


def _inline_hashes(tag: str) -> str:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)


_SCRIPTS, _STYLES = _inline_hashes("script"), _inline_hashes("style")


def csp(ingest: str | None = None) -> str:
    """The page's own inline script and style, by hash, and nothing else: no other script runs, no
    other site frames it, and it talks to this server only, and to ingest's WebSocket (``ingest``,
    an origin) where its Record button streams the microphone.

    'strict-dynamic' lets the hashed script load its audio worklet, whose source is a string in
    that same script (a Blob URL): every line that runs is covered by the hash. No page markup can
    add a script (parser-inserted scripts still need a hash), and no other origin's is loaded."""
    connect = "'self'" + (f" {ingest}" if ingest else "")
    return (
        f"default-src 'none'; script-src {_SCRIPTS} 'strict-dynamic'; "
        f"style-src {_STYLES}; connect-src {connect}; img-src 'self' data:; media-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """ASGI middleware: a request must name a host this server answers to (a page elsewhere that
    re-points its own name at 127.0.0.1, DNS rebinding, gets 400), and every response carries the
    security headers."""

    def __init__(self, app, hosts: set[str], ingest_url: Callable[[str, str], str | None] = lambda h, s: None):
        self.app, self.hosts, self.ingest_url = app, hosts, ingest_url

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name not in self.hosts:
            body = f"unknown host {host!r}: set HARK_CAPTIONS_ALLOWED_HOSTS\n".encode()
            headers = [(b"content-type", b"text/plain"), (b"content-security-policy", csp().encode())]
            await send({"type": "http.response.start", "status": 400, "headers": headers + SECURITY_HEADERS})
            await send({"type": "http.response.body", "body": body})
            return
        url = self.ingest_url(host, scope.get("scheme", "http"))
        policy = (b"content-security-policy", csp(ws_origin(url) if url else None).encode())

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), policy, *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def allowed_hosts(settings: Settings) -> set[str]:
    """Loopback names, the listening host when it is a name, and HARK_CAPTIONS_ALLOWED_HOSTS."""
    hosts = {"localhost", "127.0.0.1", "::1"}
    if settings.captions_host not in ("0.0.0.0", "::", ""):
        hosts.add(settings.captions_host.lower())
    return hosts | {h.strip().lower() for h in settings.captions_allowed_hosts.split(",") if h.strip()}
