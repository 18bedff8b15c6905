"""What keeps the captions server's doors closed in a browser: the Host check against DNS
rebinding and the security headers (a hash-based Content-Security-Policy, no framing)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from hark.config import Settings

PAGE = (Path(__file__).parent / "page.html").read_text()


def _inline_hashes(tag: str) -> str:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)


# The page's own inline script and style, by hash, and nothing else: no other script runs, no
# other site frames it, and it talks to this server only.
CSP = (
    f"default-src 'none'; script-src {_inline_hashes('script')}; style-src {_inline_hashes('style')}; "
    "connect-src 'self'; img-src 'self' data:; media-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """ASGI middleware: a request must name a host this server answers to (a page elsewhere that
    re-points its own name at 127.0.0.1, DNS rebinding, gets 400), and every response carries the
    security headers."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name not in self.hosts:
            body = f"unknown host {host!r}: set HARK_CAPTIONS_ALLOWED_HOSTS\n".encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"text/plain"), *SECURITY_HEADERS]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def allowed_hosts(settings: Settings) -> set[str]:
    """Loopback names, the listening host when it is a name, and HARK_CAPTIONS_ALLOWED_HOSTS."""
    hosts = {"localhost", "127.0.0.1", "::1"}
    if settings.captions_host not in ("0.0.0.0", "::", ""):
        hosts.add(settings.captions_host.lower())
    return hosts | {h.strip().lower() for h in settings.captions_allowed_hosts.split(",") if h.strip()}
