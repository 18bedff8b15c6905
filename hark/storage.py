"""Object storage for the audio archive and lattices.

``file:///path`` is the embedded default (write to a temp file, then rename: atomic and far
faster than a local S3 server for small objects). ``s3://bucket/prefix`` talks to MinIO or any
S3 through the ``minio`` client; endpoint and keys come from Settings.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from .config import Settings


class ObjectStore:
    """What the archive needs of a store: a local folder or an S3 bucket (below)."""

    uri: str

    def put(self, key: str, data: bytes | BinaryIO, length: int | None = None) -> None: ...
    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def delete(self, key: str) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` under ``key`` only if no object is there, atomically: True when this call
        created it, False when the key already existed (the stored bytes are then untouched). Of any
        number of racing callers, across processes and hosts sharing the store, exactly one wins."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class FilesystemStore(ObjectStore):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key, data, length=None):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    while block := data.read(1 << 20):
                        f.write(block)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_if_absent(self, key, data):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # link(2), unlike rename(2), never replaces an existing name, and the content is
            # complete before the name appears.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key):
        return self._path(key).is_file()

    def list(self, prefix):
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str, settings: Settings):
        from minio import Minio

        if not settings.s3_endpoint:
            raise ValueError("s3:// archive needs HARK_S3_ENDPOINT (host:port)")
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._conditional_checked = False
        if not self.client.bucket_exists(bucket):
            self.client.make_bucket(bucket)

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key, data, length=None):
        if isinstance(data, (bytes, bytearray, memoryview)):
            length, data = len(data), io.BytesIO(data)
        self.client.put_object(
            self.bucket,
            self._k(key),
            data,
            length=length if length is not None else -1,
            part_size=0 if length is not None else 16 * 1024 * 1024,
        )

    def _put_new(self, key: str, data: bytes) -> bool:
        from minio.error import S3Error

        # minio 7.2's put_object has no request-header parameter (metadata= becomes
        # X-Amz-Meta-If-None-Match), so this is the single-request PutObject beneath it.
        headers: dict[str, str | list[str] | tuple[str]] = {
            "If-None-Match": "*",
            "Content-Type": "application/octet-stream",
        }
        try:
            self.client._put_object(self.bucket, self._k(key), data, headers)
            return True
        except S3Error as e:
            if e.code == "PreconditionFailed" or e.response.status == 412:
                return False
            raise  # 409 ConditionalRequestConflict (a delete raced the create) included

    def put_if_absent(self, key, data):
        """A PutObject with ``If-None-Match: *`` (AWS S3, MinIO, SeaweedFS): the server refuses it
        with 412 when the key exists. A server that ignores the header would answer 200 to every
        writer, so the first call probes it once (creating a fresh key twice) and raises
        RuntimeError rather than let two callers both win. The probe cannot see a server that checks
        the precondition but not atomically under concurrent writes (SeaweedFS 4.16 did, seaweedfs#8800;
        4.48, which the tests run, does not)."""
        if not self._conditional_checked:
            probe = f".put-if-absent-probe/{uuid.uuid4().hex}"
            try:
                ignored = self._put_new(probe, b"") and self._put_new(probe, b"")
            finally:
                self.delete(probe)
            if ignored:
                raise RuntimeError(
                    f"the S3 server behind {self.uri} ignores If-None-Match on PutObject, so "
                    "put_if_absent cannot be atomic there; use AWS S3, MinIO or a current SeaweedFS"
                )
            self._conditional_checked = True
        return self._put_new(key, data)

    def get(self, key):
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, self._k(key))
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise KeyError(key) from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, key):
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._k(key))
            return True
        except S3Error:
            return False

    def list(self, prefix):
        full = "/".join(p for p in (self.prefix, prefix) if p)
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(o.object_name[strip:] for o in self.client.list_objects(self.bucket, prefix=full, recursive=True))

    def delete(self, key):
        self.client.remove_object(self.bucket, self._k(key))


def open_store(settings: Settings) -> ObjectStore:
    uri = urlparse(settings.archive)
    if uri.scheme == "file":
        return FilesystemStore(Path(unquote(uri.path)))
    if uri.scheme == "s3":
        return S3Store(uri.netloc, uri.path, settings)
    raise ValueError(f"unsupported archive URI {settings.archive!r} (use file:// or s3://)")


# ---- the archive layout (written by ingest, read by replay, offline_asr and `hark compare`) -------
# streams/<id>/meta.json, streams/<id>/source.<ext> (the bytes as received),
# streams/<id>/pcm/NNNNNN.s16le (16 kHz mono s16le in fixed-length segments),
# streams/<id>/lattices/NNNNNN.lat (online lattices)
def archive_prefix(stream_id: str) -> str:
    return f"streams/{stream_id}/"


def archived_meta(store: ObjectStore, stream_id: str) -> dict:
    """The stream's meta.json; KeyError when the stream is not archived."""
    return json.loads(store.get(archive_prefix(stream_id) + "meta.json"))


def archived_pcm(store: ObjectStore, stream_id: str):
    """The stream's PCM, one archive segment (<= 30 s by default) at a time: memory stays flat."""
    for key in store.list(archive_prefix(stream_id) + "pcm/"):
        if key.endswith(".s16le"):
            yield store.get(key)
