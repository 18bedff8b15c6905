"""The archive's object-store contract, on the filesystem and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import io

import pytest

from hark.config import Settings
from hark.storage import FilesystemStore, open_store

from . import seaweed


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    proc, port = seaweed.start(tmp_path_factory.mktemp("seaweed"))
    yield Settings.load(
        {},
        archive_uri="s3://hark-test/archive",
        s3_endpoint=f"127.0.0.1:{port}",
        s3_access_key=seaweed.ACCESS_KEY,
        s3_secret_key=seaweed.SECRET_KEY,
    )
    seaweed.stop(proc)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FilesystemStore(tmp_path / "archive")
    return open_store(request.getfixturevalue("s3_server"))


def test_store_contract(store):
    store.delete_prefix("streams/")
    store.put("streams/s/pcm/000000.s16le", b"abc")
    store.put("streams/s/meta.json", io.BytesIO(b"{}" * 70000), length=140000)  # streamed upload
    assert store.get("streams/s/pcm/000000.s16le") == b"abc"
    assert len(store.get("streams/s/meta.json")) == 140000
    assert store.list("streams/s/") == ["streams/s/meta.json", "streams/s/pcm/000000.s16le"]
    assert store.exists("streams/s/meta.json") and not store.exists("streams/x")
    with pytest.raises(KeyError):
        store.get("streams/none")
    for bad in ("../x", "/abs", "a//b", ""):
        with pytest.raises(ValueError):
            store.put(bad, b"")
    assert store.delete_prefix("streams/s/") == 2 and store.list("streams/") == []


def test_s3_credentials_are_checked(s3_server):
    from minio.error import S3Error

    wrong = Settings.load(
        {},
        archive_uri=s3_server.archive_uri,
        s3_endpoint=s3_server.s3_endpoint,
        s3_access_key="hark",
        s3_secret_key="wrong",
    )
    with pytest.raises(S3Error):
        open_store(wrong).put("streams/x/meta.json", b"{}")
