"""Where the results merger keeps open streams' parts (services/results/parts.py): no broker."""

from __future__ import annotations

import os

import pytest

from hark import serde
from hark.keys import Keyring
from hark.records import Result
from hark.storage import FilesystemStore
from services.results.merger import ResultsMerger
from services.results.parts import DiskParts, MemoryParts
from services.results.service import Results

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


def _final(sid: str, i: int, text: str) -> dict:
    words = [{"word": w, "start_ms": i * 1000 + j, "end_ms": i * 1000 + j + 1, "confidence": 0.9, "speaker": None}
             for j, w in enumerate(text.split())]  # fmt: skip
    return {
        "stream_id": sid,
        "tenant": "t",
        "kind": "FINAL",
        "utterance_id": i,
        "start_ms": i * 1000,
        "end_ms": i * 1000 + 900,
        "text": text,
        "words": words,
        "nbest": [],
        "lattice": None,
        "end_status": None,
        "audio_seq": i,
        "audio_published_at_ms": 1,
        "emitted_at_ms": 2,
        "model_name": "m",
        "model_version": "1",
    }


def _end(sid: str, i: int) -> dict:
    return {**_final(sid, i, ""), "kind": "STREAM_END", "end_status": "COMPLETE"}


def _run(merger: ResultsMerger) -> dict[str, Result]:
    """Two interleaved streams, parts out of order and one repeated: their STREAM_COMPLETEs."""
    for i in (2, 0, 1, 1, 3):
        merger.on_online(_final("a", i, " ".join(WORDS[i : i + 3])))
        merger.on_online(_final("b", i, WORDS[-1 - i]))
    done = merger.on_online(_end("a", 4)) + merger.on_online(_end("b", 4))
    return {d["stream_id"]: d for d in done}


def _fd_path(db) -> str:
    """The open database file's /proc path: the file itself is unlinked."""
    (row,) = db.execute("PRAGMA database_list").fetchall()[:1]
    assert row[2] == "" or not os.path.exists(row[2])
    fds = [os.path.join("/proc/self/fd", f) for f in os.listdir("/proc/self/fd")]
    return next(p for p in fds if "results-parts-" in os.path.realpath(p))


def test_parts_on_disk_make_the_same_transcripts_as_in_memory_and_leave_no_file(tmp_path):
    a = _run(ResultsMerger(wait_for=("online",), parts=DiskParts(tmp_path / "spill")))
    b = _run(ResultsMerger(wait_for=("online",), parts=MemoryParts()))
    for sid in ("a", "b"):
        assert {k: v for k, v in a[sid].items() if k != "emitted_at_ms"} == {
            k: v for k, v in b[sid].items() if k != "emitted_at_ms"
        }
    assert a["a"]["text"] == "the quick brown quick brown fox brown fox jumps fox jumps over"
    assert os.listdir(tmp_path / "spill") == []
    assert oct((tmp_path / "spill").stat().st_mode & 0o777) == "0o700"


def test_parts_are_dropped_when_their_stream_completes_or_is_dropped(tmp_path):
    parts = DiskParts(tmp_path)
    m = ResultsMerger(wait_for=("online",), parts=parts)
    m.on_online(_final("a", 0, "one two"))
    m.on_online(_final("b", 0, "three four"))
    assert parts.has("a", "online", 0) and parts.has("b", "online", 0)
    m.on_online(_end("a", 1))
    m.drop("b")
    assert parts._db.execute("SELECT COUNT(*) FROM parts").fetchone() == (0,)


def test_sealed_parts_never_reach_the_disk_in_clear_and_an_erased_stream_s_do_not_open(tmp_path):
    keys = Keyring(FilesystemStore(tmp_path / "keys"), os.urandom(32))
    keys.create("s1")
    parts = DiskParts(tmp_path / "spill", lambda s, d, w: keys.seal(s, d, w), lambda s, b, w: keys.open(s, b, w))
    parts.add("s1", "online", 0, {"text": "a secret phrase", "words": []})
    assert parts.ordered("s1", "online") == [{"text": "a secret phrase", "words": []}]
    with open(_fd_path(parts._db), "rb") as f:
        assert b"secret" not in f.read()
    keys.erase("s1")
    with pytest.raises(Exception, match="s1"):
        parts.ordered("s1", "online")


def test_the_service_seals_parts_with_the_stream_key_and_keeps_unsealed_streams_readable(tmp_path):
    keys = Keyring(FilesystemStore(tmp_path / "keys"), os.urandom(32))
    keys.create("s1")
    svc = Results.__new__(Results)  # only its sealing: no Kafka
    svc.keys = keys
    sealed = svc._seal("s1", b"hello", b"w")
    assert sealed[:1] == b"S" and b"hello" not in sealed and svc._unseal("s1", sealed, b"w") == b"hello"
    plain = svc._seal("no-key-stream", b"hi", b"w")  # a hand-made input's stream has no key
    assert svc._unseal("no-key-stream", plain, b"w") == b"hi"
    keys.erase("s1")
    with pytest.raises(serde.Erased):
        svc._seal("s1", b"hello", b"w")
    with pytest.raises(serde.Erased):
        svc._unseal("s1", sealed, b"w")
