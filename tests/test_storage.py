"""The archive's object-store contract, on the filesystem and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

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


def test_put_if_absent_creates_once(store):
    store.delete_prefix("")
    assert store.put_if_absent("claims/a", b"first") is True
    assert store.put_if_absent("claims/a", b"second") is False
    assert store.get("claims/a") == b"first"
    assert store.list("") == ["claims/a"]  # no temp file or S3 probe object left behind
    with pytest.raises(ValueError):
        store.put_if_absent("../a", b"")


def test_put_if_absent_has_one_winner_under_a_race(store):
    store.delete_prefix("claims/")
    n = 16
    barrier = threading.Barrier(n)

    def claim(i: int) -> bool:
        barrier.wait()
        return store.put_if_absent("claims/race", f"payload-{i}".encode())

    with ThreadPoolExecutor(n) as pool:
        won = list(pool.map(claim, range(n)))
    assert won.count(True) == 1
    assert store.get("claims/race") == f"payload-{won.index(True)}".encode()


def test_put_if_absent_refuses_a_server_that_ignores_the_precondition(s3_server, monkeypatch):
    store = open_store(s3_server)
    monkeypatch.setattr(store.client, "_put_object", lambda *a, **k: None)  # every PUT answers 200
    with pytest.raises(RuntimeError, match="ignores If-None-Match"):
        store.put_if_absent("claims/x", b"")
