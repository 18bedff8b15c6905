"""Recording tickets: how a browser page opens ingest's WebSocket as its tenant.

A browser cannot put an Authorization header on a WebSocket, and a long-lived token in a URL
ends up in logs and histories. So the captions server, which the page reaches with its token
(the ``hark_token`` cookie or a Bearer header), issues a ticket:

    v1.<payload, base64url JSON>.<HMAC-SHA256, base64url>

The payload names the tenant, the one stream id the ticket opens, its expiry (``TTL_S``), a
nonce, and which token it was issued under (a hash of that token's hash: it reveals neither).
The MAC's key is that token's entry in the tokens file (the SHA-256 of the token), which both
servers already read: no new secret to distribute, and revoking the token voids its tickets at
once. Ingest takes a ticket once (``Redeemer`` keeps the nonces it has seen until they expire),
for that stream id only, before its expiry.

The cost, written in docs/guarantees.md: whoever can read the tokens file can mint tickets for
its tenants, so the file is a secret (as whoever can write it can add tokens); it stays 0600 on
the servers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time

from .tenants import Access, AccessDenied, token_hash

TTL_S = 60.0  # long enough to ask for the microphone and connect; short enough to be worthless later
MAX_PENDING = 100_000  # nonces remembered until they expire: tickets are only issued to token holders
_DOMAIN = b"hark-recording-ticket-v1\0"
_SHAPE = re.compile(r"v1\.[A-Za-z0-9_-]{1,1500}\.[A-Za-z0-9_-]{43}")
_KEY_ID = re.compile(r"[0-9a-f]{24}")


def key_id(stored_hash: str) -> str:
    return hashlib.sha256(("hark-ticket:" + stored_hash).encode()).hexdigest()[:24]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(stored_hash: str, payload: str) -> str:
    return _b64(hmac.new(bytes.fromhex(stored_hash), _DOMAIN + payload.encode(), hashlib.sha256).digest())


def issue(token: str, tenant: str, stream_id: str, ttl_s: float = TTL_S, now: float | None = None) -> str:
    """A ticket for ``stream_id`` as ``tenant``, under ``token`` (already checked by the caller)."""
    stored = token_hash(token)
    body = {
        "t": tenant,
        "s": stream_id,
        "e": round((now if now is not None else time.time()) + ttl_s, 3),
        "n": secrets.token_urlsafe(12),
        "k": key_id(stored),
    }
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"v1.{payload}.{_mac(stored, payload)}"


class Redeemer:
    """Ingest's side: checks a ticket against the tokens ``access`` holds now, once."""

    def __init__(self, access: Access):
        self.access = access
        self._seen: dict[str, float] = {}  # nonce -> expiry
        self._lock = threading.Lock()

    def redeem(self, ticket: str, stream_id: str, now: float | None = None) -> tuple[str, str]:
        """(tenant, the issuing token's stored hash); AccessDenied (unauthorized) for a ticket that
        is malformed, forged, expired, used already, for another stream, or whose token is gone."""
        now = now if now is not None else time.time()
        try:
            if not _SHAPE.fullmatch(ticket):  # ASCII only from here: compare_digest takes no other str
                raise ValueError
            _, payload, mac = ticket.split(".")
            body = json.loads(_unb64(payload))
            tenant, sid, expiry, nonce, kid = (body[k] for k in "tsenk")
            if not (isinstance(kid, str) and _KEY_ID.fullmatch(kid) and isinstance(nonce, str)):
                raise ValueError
        except (ValueError, TypeError, KeyError, RecursionError):
            raise AccessDenied("unauthorized", "malformed recording ticket") from None
        stored = self.access.hash_with_key_id(kid, key_id)
        if stored is None or not hmac.compare_digest(_mac(stored, payload).encode(), mac.encode()):
            raise AccessDenied("unauthorized", "recording ticket not valid (its token was revoked, or it is forged)")
        if self.access.tenant_of_hash(stored) != tenant:
            raise AccessDenied("unauthorized", "recording ticket not valid (its token's tenant changed)")
        if not isinstance(expiry, (int, float)) or now > expiry:
            raise AccessDenied("unauthorized", "recording ticket expired: ask the page for a new one")
        if sid != stream_id:
            raise AccessDenied("unauthorized", "this recording ticket opens another stream")
        with self._lock:
            while self._seen:  # issued with one TTL, tickets arrive in about the order they expire
                first = next(iter(self._seen))
                if self._seen[first] >= now:
                    break
                del self._seen[first]
            if nonce in self._seen:
                raise AccessDenied("unauthorized", "recording ticket used already: ask the page for a new one")
            if len(self._seen) >= MAX_PENDING:
                raise AccessDenied("capacity", "too many recording tickets in flight; retry in a minute")
            self._seen[str(nonce)] = float(expiry)
        return tenant, stored
