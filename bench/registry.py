"""The embedded schema registry's own costs: start time and memory.

Starts a registry as the stack does (hark.registry.Node: Apicurio on an H2 file, a writer with a
password, anonymous reads) in a temporary folder and prints:
- the time from the JVM's start until ``/apis/ccompat/v7/subjects`` answers, on a new database
  and again on the same database after a restart,
- its RSS when it first answers, and after registering hark's schemas (serde.register_schemas,
  which it also times).

  python -m bench.registry
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from hark import registry, serde
from hark.config import Settings


def rss_mb(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def start(node: registry.Node, log: Path) -> tuple[subprocess.Popen, float]:
    proc = node.spawn(log)
    return proc, node.wait_ready(timeout=180, proc=proc, log=log)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def main() -> None:
    print(f"Apicurio Registry {registry.VERSION} on {registry.find_java()}, -Xmx{registry.Node(Path('.')).heap_mb}m")
    with tempfile.TemporaryDirectory() as tmp:
        node = registry.Node(Path(tmp) / "registry", password=secrets.token_urlsafe(24))
        log = Path(tmp) / "registry.log"
        proc, first = start(node, log)
        try:
            idle = rss_mb(proc)
            print(f"new database: answers {first:.1f} s after start, RSS {idle:.0f} MB")
            settings = dataclasses.replace(Settings(), schema_registry_url=node.writer_url)
            t0 = time.monotonic()
            subjects = serde.register_schemas(settings)
            took = time.monotonic() - t0
            print(f"register_schemas: {len(subjects)} subjects in {took:.2f} s, RSS {rss_mb(proc):.0f} MB after")
        finally:
            stop(proc)
        proc, again = start(node, log)
        try:
            print(f"restart on the same database: answers {again:.1f} s after start, RSS {rss_mb(proc):.0f} MB")
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
