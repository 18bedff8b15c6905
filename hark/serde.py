"""Avro records in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, body.

Several record types share a topic (the audio topic carries StreamStart, AudioChunk, StreamAlive
and StreamEnd so that one stream's records stay ordered on one partition), so the schema id in
each message says which type it is: Confluent's RecordNameStrategy.

Schema ids come from a registry. The embedded default derives each id from the schema's
Parsing Canonical Form (a stable fingerprint), so every process agrees without a server and a
changed schema gets a new id; a reader that meets an id it does not know rejects the record
(UnknownSchemaError, which the services dead-letter) instead of misreading it.

Sealed records (hark/keys.py): a record of a stream with a data key is written with magic byte
1 instead of 0, and the body after the header is sealed (AES-GCM) with the stream's key, the
header and stream id authenticated with it. The stream id is the record's Kafka key, so a reader
passes both; a record of an erased stream raises Erased (its key is gone), which readers skip.
Records with magic 0 (written before keys existed, or tests' hand-made input) still decode.

Evolution: when a schema changes, its previous version is kept, self-contained (nested types
inlined), in ``schemas/history/`` as ``hark.<Name>.v<N>.avsc``. Records written with it still decode: Avro schema resolution maps
them onto the current schema (new fields take their defaults), so a rolling upgrade and the
records already in the log keep working.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fastavro
from fastavro.schema import load_schema, parse_schema, to_parsing_canonical_form

from .keys import KeyMissing, SealError, StreamErased

if TYPE_CHECKING:
    from .keys import Keyring

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAGIC = 0
SEALED = 1
_HEADER = struct.Struct(">bI")

RECORD_TYPES = (
    "StreamStart",
    "AudioChunk",
    "StreamEnd",
    "StreamAlive",
    "OnlineTranscript",
    "OfflineTranscript",
    "SpeakerTurns",
    "Result",
    "DeadLetter",
)


class SerdeError(ValueError):
    """A message that is not a valid hark record."""


class UnknownSchemaError(SerdeError):
    pass


class Erased(SerdeError):
    """A sealed record of an erased stream: unreadable by design, skipped (never dead-lettered)."""

    def __init__(self, stream_id: str):
        super().__init__(f"stream {stream_id} was erased")
        self.stream_id = stream_id


@dataclass(frozen=True)
class RegisteredSchema:
    id: int
    name: str  # short record name, e.g. "AudioChunk"
    parsed: dict  # the writer schema
    version: int
    current: dict | None = None  # for an old version: the schema records are resolved to


def schema_id(parsed: dict) -> int:
    canonical = to_parsing_canonical_form(parsed)
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:4], "big") & 0x7FFFFFFF


class LocalSchemaRegistry:
    """Schemas from ``schemas/`` with fingerprint ids (see module doc)."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR):
        self._by_name: dict[str, RegisteredSchema] = {}
        self._by_id: dict[int, RegisteredSchema] = {}
        for name in RECORD_TYPES:
            parsed: dict = load_schema(  # type: ignore[assignment]  # a record schema parses to a dict
                str(schema_dir / f"hark.{name}.avsc"), _write_hint=False
            )
            reg = RegisteredSchema(schema_id(parsed), name, parsed, _version(parsed))
            self._add(reg)
            self._by_name[name] = reg
            for old in sorted((schema_dir / "history").glob(f"hark.{name}.v*.avsc")):
                # self-contained (nested types inlined as they were), parsed in a name space of its own
                old_parsed: dict = parse_schema(  # type: ignore[assignment]
                    json.loads(old.read_text()), named_schemas={}, _write_hint=False
                )
                self._add(RegisteredSchema(schema_id(old_parsed), name, old_parsed, _version(old_parsed), parsed))

    def _add(self, reg: RegisteredSchema) -> None:
        if reg.id in self._by_id:  # pragma: no cover - 31-bit collision or an unchanged copy in history/
            raise RuntimeError(f"schema id {reg.id} of {reg.name} v{reg.version} is already registered")
        self._by_id[reg.id] = reg

    def by_name(self, name: str) -> RegisteredSchema:
        return self._by_name[name]

    def by_id(self, sid: int) -> RegisteredSchema:
        try:
            return self._by_id[sid]
        except KeyError:
            raise UnknownSchemaError(f"unknown schema id {sid}") from None

    def names(self) -> list[str]:
        return list(self._by_name)

    def versions(self, name: str) -> list[RegisteredSchema]:
        return sorted((r for r in self._by_id.values() if r.name == name), key=lambda r: r.version)


def _version(parsed: dict) -> int:
    return next(f["default"] for f in parsed["fields"] if f["name"] == "schema_version")


_default_registry: LocalSchemaRegistry | None = None


def registry() -> LocalSchemaRegistry:
    global _default_registry
    if _default_registry is None:
        _default_registry = LocalSchemaRegistry()
    return _default_registry


def encode(
    name: str,
    record: dict,
    reg: LocalSchemaRegistry | None = None,
    *,
    keys: Keyring | None = None,
    stream_id: str | None = None,
) -> bytes:
    """The record in the wire format; sealed with ``stream_id``'s key when ``keys`` is given
    (StreamErased when the stream was erased, KeyMissing when it has no key)."""
    schema = (reg or registry()).by_name(name)
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schema.parsed, record)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SerdeError(f"cannot encode {name}: {e}") from e
    if keys is None or stream_id is None:
        return _HEADER.pack(MAGIC, schema.id) + buf.getvalue()
    header = _HEADER.pack(SEALED, schema.id)
    return header + keys.seal(stream_id, buf.getvalue(), header)


def decode(
    data: bytes | None,
    reg: LocalSchemaRegistry | None = None,
    *,
    keys: Keyring | None = None,
    stream_id: str | None = None,
) -> tuple[str, dict]:
    """Return (record type name, record). Raises SerdeError for anything malformed or unopenable
    (Erased for a record of an erased stream)."""
    if data is None or len(data) < _HEADER.size:
        raise SerdeError(f"message too short for the wire format ({0 if data is None else len(data)} bytes)")
    magic, sid = _HEADER.unpack_from(data)
    if magic not in (MAGIC, SEALED):
        raise SerdeError(f"bad magic byte {magic} (expected 0 or 1)")
    schema = (reg or registry()).by_id(sid)
    body = memoryview(data)[_HEADER.size :]
    if magic == SEALED:
        if keys is None or not stream_id:
            raise SerdeError(f"a sealed {schema.name} needs its stream's key, and none was given")
        try:
            body = memoryview(keys.open(stream_id, bytes(body), bytes(data[: _HEADER.size])))
        except StreamErased:
            raise Erased(stream_id) from None
        except (KeyMissing, SealError) as e:
            raise SerdeError(f"sealed {schema.name}: {e}") from None
    buf = io.BytesIO(body)
    try:
        record: dict = fastavro.schemaless_reader(buf, schema.parsed, schema.current)  # type: ignore[assignment]
    except Exception as e:  # fastavro raises a zoo of types on corrupt input
        raise SerdeError(f"corrupt {schema.name} body: {type(e).__name__}: {e}") from e
    if buf.tell() != len(body):
        raise SerdeError(f"{len(body) - buf.tell()} trailing bytes after {schema.name} body")
    return schema.name, record


def decode_message(msg, keys: Keyring | None = None) -> tuple[str, dict]:
    """``decode`` of a consumed message: its key is the stream id that opens a sealed value."""
    key = msg.key()
    return decode(msg.value(), keys=keys, stream_id=key.decode("utf-8", "replace") if key else None)
