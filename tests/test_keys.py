"""Per-stream data keys and sealed records/objects (hark/keys.py, serde.py): no broker needed."""

from __future__ import annotations

import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from hark import records, serde
from hark.config import ConfigError, Settings
from hark.keys import KeyMissing, Keyring, SealedStore, SealError, StreamErased, master_key
from hark.storage import FilesystemStore

END = records.StreamEnd(
    stream_id="s1",
    tenant="acme",
    seq=3,
    total_samples=48000,
    status="COMPLETE",
    reason=None,
    ended_at_ms=1,
)


MASTER = os.urandom(32)


@pytest.fixture
def keys(tmp_path) -> Keyring:
    ring = Keyring(FilesystemStore(tmp_path / "keys"), MASTER)
    ring.create("s1")
    ring.create("s2")
    return ring


def test_the_sealed_marker_is_none_of_confluents_and_the_old_one_still_opens(keys):
    """0 and 1 are Confluent's (1: a 16-byte schema GUID follows), so a stock deserializer must
    meet something else on a sealed record (tests/test_published.py shows one refuse it); records
    sealed under 1 before still open."""
    sealed = serde.encode("StreamEnd", END, keys=keys, stream_id="s1")
    assert sealed[0] not in (0, 1)
    body = serde.encode("StreamEnd", END)[5:]
    header = bytes([serde.LEGACY_SEALED]) + sealed[1:5]
    old = header + keys.seal("s1", body, header)
    assert serde.decode(old, keys=keys, stream_id="s1")[1] == serde.decode(sealed, keys=keys, stream_id="s1")[1]


def test_a_sealed_record_opens_with_its_stream_key_only(keys):
    sealed = serde.encode("StreamEnd", END, keys=keys, stream_id="s1")
    assert sealed[0] == serde.SEALED and b"acme" not in sealed
    assert serde.decode(sealed, keys=keys, stream_id="s1")[1]["tenant"] == "acme"
    with pytest.raises(serde.SerdeError, match="does not open"):  # another stream's key
        serde.decode(sealed, keys=keys, stream_id="s2")
    with pytest.raises(serde.SerdeError, match="needs its stream's key"):
        serde.decode(sealed)
    tampered = bytearray(sealed)
    tampered[-20] ^= 1
    with pytest.raises(serde.SerdeError, match="does not open"):
        serde.decode(bytes(tampered), keys=keys, stream_id="s1")
    # the header is authenticated too: the same body under another schema id does not open
    other = serde.registry().by_name("StreamStart").id.to_bytes(4, "big")
    with pytest.raises(serde.SerdeError, match="does not open"):
        serde.decode(sealed[:1] + other + sealed[5:], keys=keys, stream_id="s1")


def test_an_erased_stream_is_unreadable_and_its_id_refused(keys, tmp_path):
    sealed = serde.encode("StreamEnd", END, keys=keys, stream_id="s1")
    assert keys.erase("s1") is True
    with pytest.raises(serde.Erased):
        serde.decode(sealed, keys=keys, stream_id="s1")
    # another process, with the same master key and key store, cannot open it either
    fresh = Keyring(keys.store, MASTER)
    with pytest.raises(serde.Erased):
        serde.decode(sealed, keys=fresh, stream_id="s1")
    with pytest.raises(StreamErased):
        fresh.create("s1")
    with pytest.raises(StreamErased):
        serde.encode("StreamEnd", END, keys=fresh, stream_id="s1")
    assert serde.decode(serde.encode("StreamEnd", END, keys=fresh, stream_id="s2"), keys=fresh, stream_id="s2")
    with pytest.raises(KeyMissing):
        fresh.key("never-created")


def test_data_keys_are_stored_wrapped_and_need_the_master_key(keys, tmp_path):
    wrapped = keys.store.get("s1.key")
    assert keys.key("s1") is not None and len(wrapped) == 12 + 32 + 16
    stranger = Keyring(keys.store, os.urandom(32))  # the key store without the master key
    with pytest.raises(SealError):
        stranger.key("s1")


def test_sealed_archive_objects_small_and_streamed(keys, tmp_path):
    inner = FilesystemStore(tmp_path / "archive")
    store = SealedStore(inner, keys)
    store.put("streams/s1/meta.json", b'{"tenant": "acme"}')
    big = os.urandom(3 * (1 << 20) + 7)
    store.SPOOL = 1 << 20  # through a temporary file
    store.put("streams/s1/source.wav", io.BytesIO(big), length=len(big))
    assert b"acme" not in inner.get("streams/s1/meta.json")
    assert store.get("streams/s1/meta.json") == b'{"tenant": "acme"}'
    assert store.get("streams/s1/source.wav") == big and inner.get("streams/s1/source.wav") != big
    # an object moved to another name or stream does not open
    inner.put("streams/s1/other.json", inner.get("streams/s1/meta.json"))
    with pytest.raises(SealError):
        store.get("streams/s1/other.json")
    keys.erase("s1")
    with pytest.raises(StreamErased):
        store.get("streams/s1/meta.json")
    store.put("streams/s1/late.s16le", b"\x00" * 10)  # a write after the erase is dropped
    assert not inner.exists("streams/s1/late.s16le")


def test_the_master_key_is_created_once_0600_and_checked(tmp_path):
    s = Settings.load({}, data_dir=tmp_path)
    with ThreadPoolExecutor(8) as pool:  # processes starting together agree on one key
        got = set(pool.map(lambda _: master_key(s), range(16)))
    assert len(got) == 1 and len(next(iter(got))) == 32
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]
    with pytest.raises(ConfigError, match="HARK_MASTER_KEY"):
        master_key(Settings.load({"HARK_MASTER_KEY": "c2hvcnQ="}, data_dir=tmp_path))


def test_a_string_that_is_no_stream_id_has_no_key_and_is_never_erased(keys):
    """Found by fuzzing the endpoint: a refused input's dead letter named a stream id with a NUL
    in it, and looking up its key failed (1011) instead of the dead letter being written plain."""
    for bad in ("\x00", "a/b", "..", "x" * 200, ""):
        with pytest.raises(KeyMissing):
            keys.key(bad)
        assert keys.erased(bad) is False
        with pytest.raises(ValueError):
            keys.create(bad)
