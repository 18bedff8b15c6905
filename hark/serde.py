"""Avro records in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, body.

Several record types share a topic (the audio topic carries StreamStart, AudioChunk, StreamAlive
and StreamEnd so that one stream's records stay ordered on one partition), so the schema id in
each message says which type it is: Confluent's RecordNameStrategy (the subject of a schema is
its full record name, e.g. ``hark.AudioChunk``).

Schema ids come from the schema registry (``HARK_SCHEMA_REGISTRY_URL``, Apicurio in the embedded
stack): ``register_schemas`` (the stack's owner, at start) registers every version of every
schema under its subject, oldest first, with BACKWARD compatibility, so an incompatible change
is refused at registration; ``configure`` (every process) looks the ids up. Without a registry
(unit tests, a process that never configured one) each id is a fingerprint of the schema's
Parsing Canonical Form, known to hark only. Readers accept both: a record written by a process
without the registry still decodes everywhere. A reader that meets an id it does not know asks
the registry which schema it is (once per id) and rejects the record if it is none of hark's
(UnknownSchemaError, which the services dead-letter) instead of misreading it.

Sealed records (hark/keys.py): a record of a stream with a data key is written with the marker
``SEALED`` (0x68) instead of 0, and the body after the header is sealed (AES-GCM) with the
stream's key, the header and stream id authenticated with it. The marker is neither 0 nor 1
(Confluent's: 1 announces a 16-byte schema GUID), so a stock deserializer fails cleanly on a
sealed record with "unknown magic byte". The stream id is the record's Kafka key, so a reader
passes both; a record of an erased stream raises Erased (its key is gone), which readers skip.
Records sealed under the old marker 1 still open; records with magic 0 (tests' hand-made input,
third-party producers) decode without a key.

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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastavro
from fastavro.schema import load_schema, parse_schema, to_parsing_canonical_form

from .keys import KeyMissing, SealError, StreamErased

if TYPE_CHECKING:
    from .config import Settings
    from .keys import Keyring

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAGIC = 0
SEALED = 0x68  # "h": not 0 or 1, Confluent's (module doc)
LEGACY_SEALED = 1  # sealed records written before the registry: opened, never written
_HEADER = struct.Struct(">BI")
_NEGATIVE_CACHE = 1024  # ids the registry did not know, remembered so garbage cannot flood it
ASKS_PER_S, ASK_BURST = 5.0, 20
SILENT_S = 10.0  # after a registry did not answer, fingerprints only for this long (no retry storm)

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


def subject(parsed: dict) -> str:
    """The schema's subject under RecordNameStrategy: its full name (fastavro qualifies it)."""
    return parsed["name"]


def schema_json(parsed: dict) -> str:
    """The schema as registered: self-contained (nested types inlined), docs and defaults kept."""
    return json.dumps(parsed)


def schema_id(parsed: dict) -> int:
    canonical = to_parsing_canonical_form(parsed)
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:4], "big") & 0x7FFFFFFF


class LocalSchemaRegistry:
    """Schemas from ``schemas/`` with fingerprint ids (see module doc)."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR):
        self._by_name: dict[str, RegisteredSchema] = {}
        self._by_id: dict[int, RegisteredSchema] = {}
        self._write_ids: dict[str, int] = {}  # name -> the id written: the registry's once attached
        self._client = None  # a confluent_kafka SchemaRegistryClient once attached
        self._url = ""  # the registry it asks
        self._silent_until = 0.0  # a lazily attached registry that did not answer is left alone till then
        self._lock = threading.Lock()  # ingest decodes on two threads (WebSocket, produce topics)
        self._asks, self._asked_at = float(ASK_BURST), 0.0  # a token bucket: garbage ids cannot flood it
        self._unknown: dict[int, None] = {}  # ids the registry does not know as hark's (bounded)
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

        self._fingerprints = dict(self._by_id)

    def attach(self, client, url: str, eager: bool = True) -> None:
        """Write the registry's ids (registered by ``register_schemas``) from here on. ``eager``
        (a service at start): look up every version now, so a registry that lacks one fails the
        start, naming it; else (the CLI, tests) each current version when first written, and any
        id when first read (``by_id``). Another registry than the one attached (a process that
        talks to several stacks) starts from the fingerprints again."""
        if url != self._url:
            with self._lock:
                self._by_id, self._write_ids, self._unknown = dict(self._fingerprints), {}, {}
                self._client, self._url = client, url
        if eager:
            for name in self.names():
                for reg in self.versions(name):
                    self._lookup(reg)

    def _lookup(self, reg: RegisteredSchema) -> int:
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            found = self._client.lookup_schema(  # type: ignore[attr-defined]
                subject(reg.parsed), Schema(schema_json(reg.parsed), "AVRO")
            )
        except SchemaRegistryError as e:
            raise RuntimeError(
                f"the schema registry lacks {subject(reg.parsed)} v{reg.version} ({e}): "
                "the stack registers hark's schemas at start (serde.register_schemas)"
            ) from None
        self._by_id[found.schema_id] = reg
        if reg is self._by_name[reg.name]:
            self._write_ids[reg.name] = found.schema_id
        return found.schema_id

    def by_name(self, name: str) -> RegisteredSchema:
        return self._by_name[name]

    def write_id(self, name: str) -> int:
        """The registry's id of the current version once attached, else its fingerprint (also
        while a lazily attached registry does not answer: every hark reader takes both)."""
        sid = self._write_ids.get(name)
        if sid is None and self._answers():
            try:
                sid = self._lookup(self._by_name[name])
            except (OSError, httpx_errors()):
                self._silent_until = time.monotonic() + SILENT_S
        return sid if sid is not None else self._by_name[name].id

    def _may_ask(self) -> bool:
        """At most ASKS_PER_S questions a second about unknown ids (ASK_BURST at once): a producer
        sending random ids costs the registry that much, and its records are refused either way."""
        with self._lock:
            now = time.monotonic()
            self._asks = min(ASK_BURST, self._asks + (now - self._asked_at) * ASKS_PER_S)
            self._asked_at = now
            if self._asks < 1:
                return False
            self._asks -= 1
            return True

    def _answers(self) -> bool:
        return self._client is not None and time.monotonic() >= self._silent_until

    def by_id(self, sid: int) -> RegisteredSchema:
        reg = self._by_id.get(sid)
        if reg is None and self._answers() and sid not in self._unknown and self._may_ask():
            with self._lock:
                reg = self._ask(sid)
        if reg is None:
            raise UnknownSchemaError(f"unknown schema id {sid}")
        return reg

    def _ask(self, sid: int) -> RegisteredSchema | None:
        """A version registered after this process started (a newer hark's): which of ours is it?
        Remembered as unknown only when the registry answered: one that is down is asked again."""
        try:
            text = self._client.get_schema(sid).schema_str  # type: ignore[attr-defined]
            parsed = parse_schema(json.loads(text), named_schemas={}, _write_hint=False)
            reg = self._fingerprints.get(schema_id(parsed))  # type: ignore[arg-type]
        except (OSError, httpx_errors()):
            self._silent_until = time.monotonic() + SILENT_S
            return None
        except Exception:  # not found, not Avro: unknown, and said so by the caller
            reg = None
        if reg is None:
            if len(self._unknown) >= _NEGATIVE_CACHE:
                self._unknown.pop(next(iter(self._unknown)))
            self._unknown[sid] = None
        else:
            self._by_id[sid] = reg
        return reg

    def names(self) -> list[str]:
        return list(self._by_name)

    def versions(self, name: str) -> list[RegisteredSchema]:
        return sorted((r for r in self._fingerprints.values() if r.name == name), key=lambda r: r.version)


def httpx_errors() -> type[Exception]:
    """What confluent-kafka's registry client raises when the registry does not answer."""
    from confluent_kafka.schema_registry.common._httpx_compat import httpx  # httpx or its fork

    return httpx.TransportError


def _version(parsed: dict) -> int:
    return next(f["default"] for f in parsed["fields"] if f["name"] == "schema_version")


def published_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, dict]:
    """The published tier's schemas (``schemas/published/``), by subject: a contract for other
    teams' clients, apart from the internal records."""
    out = {}
    for path in sorted((schema_dir / "published").glob("*.avsc")):
        parsed: dict = parse_schema(json.loads(path.read_text()), named_schemas={}, _write_hint=False)  # type: ignore[assignment]
        out[subject(parsed)] = parsed
    return out


def registry_client(settings: Settings, **conf):
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": settings.schema_registry_url, **conf})


def register_schemas(settings: Settings, schema_dir: Path = SCHEMA_DIR) -> dict[str, int]:
    """Register every version of every hark schema (internal and published) under its subject,
    oldest first, after setting BACKWARD compatibility: a change that old records cannot be read
    with is refused here, at the stack's start, before any record is written with it. Idempotent:
    the registry answers an unchanged schema with its existing id. Returns subject -> current id."""
    from confluent_kafka.schema_registry import ConfigCompatibilityLevel, Schema, ServerConfig

    client = registry_client(settings)
    client.set_config(config=ServerConfig(compatibility=ConfigCompatibilityLevel.BACKWARD))
    local = LocalSchemaRegistry(schema_dir)
    chains = [[r.parsed for r in local.versions(name)] for name in local.names()]
    chains += [[parsed] for parsed in published_schemas(schema_dir).values()]
    out = {}
    for chain in chains:
        for parsed in chain:
            out[subject(parsed)] = client.register_schema(subject(parsed), Schema(schema_json(parsed), "AVRO"))
    return out


def configure(settings: Settings, eager: bool = True) -> None:
    """Write and read with the registry's ids from here on (every process of a stack with one;
    ``eager``: see ``LocalSchemaRegistry.attach``)."""
    if settings.schema_registry_url:
        # a lazy reader (the CLI) falls back at once to what it knows rather than wait on retries
        client = registry_client(settings) if eager else registry_client(settings, **{"max.retries": 0})
        registry().attach(client, settings.schema_registry_url, eager)


_default_registry: LocalSchemaRegistry | None = None


def registry() -> LocalSchemaRegistry:
    global _default_registry
    if _default_registry is None:
        _default_registry = LocalSchemaRegistry()
    return _default_registry


def encode(
    name: str,
    record: Mapping[str, Any],
    reg: LocalSchemaRegistry | None = None,
    *,
    keys: Keyring | None = None,
    stream_id: str | None = None,
) -> bytes:
    """The record in the wire format; sealed with ``stream_id``'s key when ``keys`` is given
    (StreamErased when the stream was erased, KeyMissing when it has no key)."""
    registry_ = reg or registry()
    schema, reg_id = registry_.by_name(name), registry_.write_id(name)
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schema.parsed, record)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SerdeError(f"cannot encode {name}: {e}") from e
    if keys is None or stream_id is None:
        return _HEADER.pack(MAGIC, reg_id) + buf.getvalue()
    header = _HEADER.pack(SEALED, reg_id)
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
    if magic not in (MAGIC, SEALED, LEGACY_SEALED):
        raise SerdeError(f"bad magic byte {magic} (expected {MAGIC}, or {SEALED} for a sealed record)")
    schema = (reg or registry()).by_id(sid)
    body = memoryview(data)[_HEADER.size :]
    if magic != MAGIC:
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
