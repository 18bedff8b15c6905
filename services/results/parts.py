"""Where the merger keeps each open stream's transcript parts until its STREAM_COMPLETE.

An hour-long stream's final words are ~2 MB a pass; held in the process, the results service's
RSS grows with every open stream's length (51 -> 82 MB over `make soak`'s hour at 12 streams).
``DiskParts`` keeps them in an SQLite file instead, so the process holds only counts.

The file is a spill of memory, not a source of truth: the service rebuilds every open stream from
its input topics after a restart (its commits are held at each stream's first record). So it is
new in each process and unlinked as soon as it is open (nothing outlives the process, however it
ends), has no journal and is never synced. Each part is sealed with its stream's key (an erased
stream's parts do not open), and deleted rows are overwritten (``secure_delete``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

Seal = Callable[[str, bytes, bytes], bytes]  # (stream id, data, where it belongs) -> sealed


class Parts(Protocol):
    def add(self, stream_id: str, pass_name: str, index: int, part: dict) -> None: ...
    def has(self, stream_id: str, pass_name: str, index: int) -> bool: ...
    def ordered(self, stream_id: str, pass_name: str) -> list[dict]: ...
    def drop(self, stream_id: str) -> None: ...


class MemoryParts:
    """In the process: for tests and for a merger without a directory of its own."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str], dict[int, dict]] = {}

    def add(self, stream_id: str, pass_name: str, index: int, part: dict) -> None:
        self._parts.setdefault((stream_id, pass_name), {})[index] = part

    def has(self, stream_id: str, pass_name: str, index: int) -> bool:
        return index in self._parts.get((stream_id, pass_name), {})

    def ordered(self, stream_id: str, pass_name: str) -> list[dict]:
        parts = self._parts.get((stream_id, pass_name), {})
        return [parts[k] for k in sorted(parts)]

    def drop(self, stream_id: str) -> None:
        for key in [k for k in self._parts if k[0] == stream_id]:
            del self._parts[key]


class DiskParts:
    def __init__(self, directory: Path, seal: Seal | None = None, unseal: Seal | None = None):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="results-parts-", suffix=".sqlite", dir=directory)  # mode 0600
        os.close(fd)
        # one thread at a time (the service's loop), though not always the one that opened it
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "secure_delete=ON", "cache_size=-2048"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(
            "CREATE TABLE parts (stream TEXT, pass TEXT, idx INTEGER, body BLOB, PRIMARY KEY (stream, pass, idx))"
        )
        os.unlink(path)  # the open connection keeps the file; without a journal SQLite never reopens it
        self._seal, self._unseal = seal, unseal

    @staticmethod
    def _where(pass_name: str, index: int) -> bytes:
        return f"results-part\0{pass_name}\0{index}".encode()

    def add(self, stream_id: str, pass_name: str, index: int, part: dict) -> None:
        body = json.dumps(part, separators=(",", ":")).encode()
        if self._seal is not None:
            body = self._seal(stream_id, body, self._where(pass_name, index))
        self._db.execute("INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?)", (stream_id, pass_name, index, body))

    def has(self, stream_id: str, pass_name: str, index: int) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM parts WHERE stream = ? AND pass = ? AND idx = ?", (stream_id, pass_name, index)
        ).fetchone()
        return row is not None

    def ordered(self, stream_id: str, pass_name: str) -> list[dict]:
        rows = self._db.execute(
            "SELECT idx, body FROM parts WHERE stream = ? AND pass = ? ORDER BY idx", (stream_id, pass_name)
        )
        out = []
        for index, body in rows:
            if self._unseal is not None:
                body = self._unseal(stream_id, body, self._where(pass_name, index))
            out.append(json.loads(body))
        return out

    def drop(self, stream_id: str) -> None:
        self._db.execute("DELETE FROM parts WHERE stream = ?", (stream_id,))
