"""Per-stream data keys: what makes an erased stream unreadable everywhere it was copied.

Every stream gets its own data key (AES-256-GCM) when ingest accepts it. Every record of the
stream on every topic (serde.py) and every archived object of it (storage.py) is sealed with
that key, so Kafka's log, its replicas, dead letters and any backup hold only ciphertext.
Erasing a stream deletes its key and leaves a marker: from then on every copy is unreadable,
and the id cannot be used again.

The data keys live in a key store hark controls (``HARK_KEY_STORE_URI``: a folder, or an S3
bucket apart from the archive's, so that an archive backup carries no keys), each wrapped
(AES-GCM) with a master key that never leaves the processes: ``HARK_MASTER_KEY`` (base64 of 32
bytes), or else ``<data_dir>/master.key``, created 0600 at first use.

A process caches unwrapped keys (bounded, least recently used first out); erasure reaches a
cache through the stream's ERASED end on the audio topic, which every service reads (and
``forget`` then drops the key), and ingest re-checks the marker of each live stream.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .config import ConfigError, Settings
from .records import STREAM_ID_RE
from .storage import FilesystemStore, ObjectStore, S3Store

NONCE = 12
TAG = 16
OVERHEAD = NONCE + TAG  # bytes a sealed payload adds


_shared: dict[tuple[str, bytes], Keyring] = {}


class StreamErased(Exception):
    """The stream was erased: its key is gone, its records and objects are unreadable."""

    def __init__(self, stream_id: str):
        super().__init__(f"stream {stream_id} was erased")
        self.stream_id = stream_id


class StreamExists(Exception):
    """The stream id is taken: it has a key already."""

    def __init__(self, stream_id: str):
        super().__init__(f"stream {stream_id} exists already")
        self.stream_id = stream_id


class KeyMissing(Exception):
    """No key for the stream (never accepted by ingest, or the key store was lost)."""


class SealError(ValueError):
    """Ciphertext that does not open with the stream's key: altered, truncated or another stream's."""


def master_key(settings: Settings) -> bytes:
    raw = settings.master_key.strip()
    if raw:
        try:
            key = base64.b64decode(raw, validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("HARK_MASTER_KEY must be the base64 of 32 random bytes (`openssl rand -base64 32`)")
        return key
    path = Path(settings.data_dir) / "master.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".master.key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # atomic and never replaces: processes starting together agree on one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != 32:
        raise ConfigError(f"{path} is not a master key (32 bytes); it was altered")
    return key


def open_key_store(settings: Settings) -> ObjectStore:
    uri = urlparse(settings.key_store_uri or (Path(settings.data_dir) / "keys").resolve().as_uri())
    if uri.scheme == "file":
        store = FilesystemStore(Path(unquote(uri.path)))
        os.chmod(store.root, 0o700)
        return store
    if uri.scheme == "s3":
        return S3Store(uri.netloc, uri.path, settings)
    raise ConfigError(f"HARK_KEY_STORE_URI={settings.key_store_uri} is not file:// or s3://")


class Keyring:
    """Data keys of streams: created, looked up (cached), erased. Thread-safe enough for the
    services' use: the cache is an OrderedDict touched under the GIL, and the store's writes are
    atomic (rename or a single PUT)."""

    CACHE = 4096  # unwrapped keys kept (~100 bytes each)

    def __init__(self, store: ObjectStore, master: bytes, cache: int = CACHE):
        self.store, self._master, self.cache_size = store, AESGCM(master), cache
        self._cache: OrderedDict[str, tuple[AESGCM, bytes]] = OrderedDict()
        self._erased: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def for_settings(cls, settings: Settings) -> Keyring:
        """One keyring per key store and master key in a process: erasure's ``forget`` reaches
        every part of the process that cached the key."""
        master = master_key(settings)
        ident = (settings.key_store_uri or str(Path(settings.data_dir).resolve()), master)
        ring = _shared.get(ident)
        if ring is None:
            ring = _shared[ident] = cls(open_key_store(settings), master)
        return ring

    # -- the key store ----------------------------------------------------------------------------
    def create(self, stream_id: str) -> None:
        """Claim ``stream_id`` with a new key, exclusively: the key's create-if-absent in the key
        store is the one atomic step that decides who owns the id, across processes and ingest
        replicas. StreamExists when it has a key (another stream's, of any tenant), StreamErased
        when it was erased."""
        if not STREAM_ID_RE.fullmatch(stream_id):
            raise ValueError(f"invalid stream id {stream_id!r}")
        dek = AESGCM.generate_key(bit_length=256)
        nonce = secrets.token_bytes(NONCE)
        if not self.store.put_if_absent(
            f"{stream_id}.key", nonce + self._master.encrypt(nonce, dek, self._aad(stream_id))
        ):
            raise StreamExists(stream_id)
        if self.store.exists(f"{stream_id}.erased"):  # looked at after the claim: no erase slips between
            self.store.delete(f"{stream_id}.key")
            raise StreamErased(stream_id)
        self._remember(stream_id, dek)

    def erase(self, stream_id: str) -> bool:
        """Delete the stream's key (every sealed copy becomes unreadable) and mark the id used.
        Returns whether a key existed."""
        existed = self.store.exists(f"{stream_id}.key")
        self.store.put(f"{stream_id}.erased", json.dumps({"erased_at_ms": int(time.time() * 1000)}).encode())
        self.store.delete(f"{stream_id}.key")
        self.forget(stream_id)
        self._mark_erased(stream_id)
        return existed

    def erased(self, stream_id: str, fresh: bool = False) -> bool:
        """Whether the stream was erased; ``fresh`` asks the store instead of this process's memory."""
        if stream_id in self._erased and not fresh:
            return True
        if not STREAM_ID_RE.fullmatch(stream_id):  # never a stream: never erased, no file to look for
            return False
        if self.store.exists(f"{stream_id}.erased"):
            self.forget(stream_id)
            self._mark_erased(stream_id)
            return True
        return False

    def forget(self, stream_id: str) -> None:
        """Drop the stream's key from this process's memory (the stream ended or was erased)."""
        self._cache.pop(stream_id, None)

    def key(self, stream_id: str) -> AESGCM:
        return self._entry(stream_id)[0]

    def _entry(self, stream_id: str) -> tuple[AESGCM, bytes]:
        entry = self._cache.get(stream_id)
        if entry is not None:
            self._cache.move_to_end(stream_id)
            return entry
        if stream_id in self._erased:
            raise StreamErased(stream_id)
        if not STREAM_ID_RE.fullmatch(stream_id):  # a key names no such stream (a refused input's dead letter)
            raise KeyMissing(f"no stream {stream_id!r}")
        try:
            wrapped = self.store.get(f"{stream_id}.key")
        except KeyError:
            if self.erased(stream_id):
                raise StreamErased(stream_id) from None
            raise KeyMissing(f"no key for stream {stream_id}") from None
        try:
            dek = self._master.decrypt(wrapped[:NONCE], wrapped[NONCE:], self._aad(stream_id))
        except InvalidTag:
            raise SealError(f"the key of stream {stream_id} does not open with this master key") from None
        return self._remember(stream_id, dek)

    # -- sealing ----------------------------------------------------------------------------------
    def seal(self, stream_id: str, data: bytes, aad: bytes = b"") -> bytes:
        """nonce + AES-GCM(data); ``aad`` (authenticated, not secret) binds it to where it belongs."""
        nonce = secrets.token_bytes(NONCE)
        return nonce + self.key(stream_id).encrypt(nonce, data, stream_id.encode() + b"\0" + aad)

    def open(self, stream_id: str, sealed: bytes, aad: bytes = b"") -> bytes:
        cipher = self.key(stream_id)
        if len(sealed) < OVERHEAD:
            raise SealError(f"sealed payload of {len(sealed)} bytes is too short")
        try:
            return cipher.decrypt(sealed[:NONCE], sealed[NONCE:], stream_id.encode() + b"\0" + aad)
        except InvalidTag:
            raise SealError(f"a payload of stream {stream_id} does not open: altered, or not this stream's") from None

    def seal_file(self, stream_id: str, src: BinaryIO, dst: BinaryIO, aad: bytes = b"") -> int:
        """``seal`` for a file of any size, a block at a time (the same layout: nonce, ciphertext,
        tag). Returns the bytes written."""
        nonce = secrets.token_bytes(NONCE)
        enc = Cipher(algorithms.AES(self._entry(stream_id)[1]), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(stream_id.encode() + b"\0" + aad)
        dst.write(nonce)
        n = NONCE
        while block := src.read(1 << 20):
            n += dst.write(enc.update(block))
        n += dst.write(enc.finalize())
        return n + dst.write(enc.tag)

    # -- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _aad(stream_id: str) -> bytes:
        return b"hark-data-key\0" + stream_id.encode()

    def _remember(self, stream_id: str, dek: bytes) -> tuple[AESGCM, bytes]:
        entry = self._cache[stream_id] = (AESGCM(dek), dek)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    def _mark_erased(self, stream_id: str) -> None:
        self._erased[stream_id] = None
        while len(self._erased) > self.cache_size:
            self._erased.popitem(last=False)


class SealedStore(ObjectStore):
    """The archive with every object under ``streams/<id>/`` sealed with that stream's key (the
    object's name is authenticated with it, so objects cannot be swapped). Objects of a stream
    without a key (archived before keys existed) read as they are."""

    SPOOL = 8 << 20  # a larger upload is sealed through a temporary file, not memory

    def __init__(self, inner: ObjectStore, keys: Keyring):
        self.inner, self.keys, self.uri = inner, keys, inner.uri

    @staticmethod
    def _stream(key: str) -> str | None:
        parts = key.split("/")
        return parts[1] if len(parts) > 2 and parts[0] == "streams" else None

    def put(self, key: str, data: bytes | BinaryIO, length: int | None = None) -> None:
        sid = self._stream(key)
        if sid is None:
            self.inner.put(key, data, length)
        elif self.keys.erased(sid):  # a late write (a segment closing as the stream is erased): dropped
            return
        elif isinstance(data, (bytes, bytearray)):
            self.inner.put(key, self.keys.seal(sid, bytes(data), key.encode()))
        else:
            with tempfile.SpooledTemporaryFile(self.SPOOL) as tmp:
                n = self.keys.seal_file(sid, data, tmp, key.encode())  # type: ignore[arg-type]
                tmp.seek(0)
                self.inner.put(key, tmp, length=n)  # type: ignore[arg-type]

    def get(self, key: str) -> bytes:
        raw = self.inner.get(key)
        sid = self._stream(key)
        if sid is None:
            return raw
        try:
            return self.keys.open(sid, raw, key.encode())
        except KeyMissing:
            return raw

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def open_archive(settings: Settings, keys: Keyring | None = None) -> SealedStore:
    """The archive (storage.open_store), sealed with the streams' keys."""
    from .storage import open_store

    return SealedStore(open_store(settings), keys or Keyring.for_settings(settings))
