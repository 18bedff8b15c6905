"""Tenants and their tokens: who may publish, and whose streams a reader may see.

A tokens file holds one line per token: ``<sha256 of the token> <tenant>``. Only hashes are
stored, so the file holds no token; but each hash is the key that signs the captions page's
recording tickets (tickets.py), so whoever reads the file can open streams as its tenants for a
minute at a time: it is a secret, 0600. ``hark token create TENANT`` adds a line and prints the
token once. The file is ``HARK_TOKENS_FILE``, else ``<data_dir>/tokens`` (``tokens_path``), where
``hark token create`` puts it by default: creating a token is what turns tokens on. With a tokens
file, ingest requires a token and stamps every record of the stream with the token's tenant, and
the captions server shows a token only its tenant's streams. While ``<data_dir>/tokens`` does not
exist and no ``HARK_TOKENS_FILE`` is named (the embedded default for a single user), access is
open and the tenant is whatever the producer names ("default" unless told).

The file is read again when it changes (checked twice a second), so a token removed from
it stops working, and a file created in the data folder starts being enforced, without a
restart. Once enforced, a file that no longer parses or is gone denies every token until it is
fixed: a broken edit never opens access or keeps a revoked token alive.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from .config import Settings

log = logging.getLogger("hark.tenants")

Identity = tuple[int, int, int]  # a file's inode, size and mtime: a change to it shows in one of them

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AccessDenied(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def tokens_path(settings: Settings) -> Path:
    """The tokens file the servers enforce and ``hark token`` writes: ``HARK_TOKENS_FILE``, else
    ``<data_dir>/tokens``."""
    return Path(settings.tokens_file) if settings.tokens_file else Path(settings.data_dir) / "tokens"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.match(tenant or ""):
        raise AccessDenied("bad_tenant", f"invalid tenant {tenant!r} (letters, digits, . _ -, max 64)")
    return tenant


class Access:
    # how often the tokens file's identity (inode, size, mtime) is looked at: a stat() twice a
    # second, so a revoked token's open streams end within a second (services/ingest/live.py)
    RECHECK_S = 0.5

    def __init__(self, hashes: dict[str, str] | None, path: Path | None = None, seen: Identity | None = None):
        self._hashes = hashes  # sha256 hex -> tenant; None: open access
        self._path = path
        # the file's identity (None: absent) taken before ``hashes`` were read from it: a change
        # while it was read shows at the next check
        self._seen = seen
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._key_ids: tuple[dict, dict[str, str]] | None = None  # (the hashes, key id -> hash)

    @classmethod
    def load(cls, settings: Settings) -> Access:
        """Tokens from ``tokens_path(settings)``. A named file must exist; the data folder's may
        not yet, and access is open until it does (watched like a named one)."""
        path = tokens_path(settings)
        seen = _identity(path)
        try:
            return cls(_parse(path), path, seen)
        except FileNotFoundError:
            if settings.tokens_file:
                raise
            return cls(None, path)

    def _reload_if_changed(self) -> None:
        if self._path is None or time.monotonic() - self._checked < self.RECHECK_S:
            return
        with self._lock:
            self._checked = time.monotonic()
            seen = _identity(self._path)
            if seen == self._seen:
                return
            self._seen = seen
            try:
                self._hashes = _parse(self._path)
                log.info("tokens file reloaded: %d tokens", len(self._hashes))
            except (OSError, ValueError, AccessDenied) as e:
                self._hashes = {}
                log.error("tokens file unusable, every token is refused until it is fixed: %s", e)

    def tenant_of(self, token: str | None) -> str | None:
        """The token's tenant; None when access is open (every stream is visible)."""
        self._reload_if_changed()
        if self._hashes is None:
            return None
        if not token:
            raise AccessDenied("unauthorized", "a token is required (Authorization: Bearer TOKEN or ?token=)")
        digest = token_hash(token)
        for known, tenant in self._hashes.items():  # constant-time per entry
            if hmac.compare_digest(known, digest):
                return tenant
        raise AccessDenied("unauthorized", "unknown token")

    def hash_with_key_id(self, kid: str, key_id) -> str | None:
        """The stored token hash whose ``key_id(hash)`` is ``kid`` (tickets.py), or None. The ids
        are worked out once per version of the file: anyone may present a ticket."""
        self._reload_if_changed()
        hashes = self._hashes or {}
        if self._key_ids is None or self._key_ids[0] is not hashes:
            self._key_ids = (hashes, {key_id(h): h for h in hashes})
        return self._key_ids[1].get(str(kid))

    def tenant_of_hash(self, stored: str) -> str | None:
        """The tenant of a token by its stored hash; None once the token is gone."""
        self._reload_if_changed()
        return (self._hashes or {}).get(stored)

    def publishing_tenant(self, token: str | None, requested: str | None) -> str:
        """The tenant a producer publishes as: its token's, or with open access the one it names."""
        tenant = self.tenant_of(token)
        if tenant is None:
            return check_tenant(requested or "default")
        if requested and requested != tenant:
            raise AccessDenied("forbidden", f"this token publishes as tenant {tenant!r}, not {requested!r}")
        return tenant


def _identity(path: Path) -> Identity | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _parse(path: Path) -> dict[str, str]:
    hashes = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}:{n}: expected '<sha256 hex> <tenant>'")
        hashes[parts[0].lower()] = check_tenant(parts[1])
    return hashes


def request_token(authorization: str | None, *fallbacks: str | None) -> str | None:
    """The token of a request: ``Authorization: Bearer TOKEN``, else the first fallback given
    (a ``?token=`` parameter, a cookie)."""
    auth = authorization or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return next((f for f in fallbacks if f), None)


def create_token(tokens_file: str | Path, tenant: str) -> str:
    """Add a token for ``tenant`` to the file (created 0600) and return it; only its hash is kept."""
    check_tenant(tenant)
    token = "hark_" + secrets.token_urlsafe(32)
    path = Path(tokens_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{token_hash(token)} {tenant}\n")
    return token


def revoke_tokens(tokens_file: str | Path, who: str) -> int:
    """Remove a token (``who`` is the token itself) or every token of a tenant (``who`` is the
    tenant) from the file; returns how many lines went. Servers stop accepting them within a
    second (Access reloads the file)."""
    path = Path(tokens_file)
    digest = token_hash(who)
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and (parts[0].lower() == digest or parts[1] == who):
            removed += 1
        else:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # whole or not at all: a server never reads half a file
    return removed
