"""The schema registry and the published tier, read the way another team reads them: with
confluent-kafka's stock SchemaRegistryClient and AvroDeserializer, no hark code on the read side.
"""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path
from urllib.parse import quote

import fastavro
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError

from hark import kafka, published, records, registry, serde
from hark.supervisor import REGISTRY_WRITER
from hark.wer import score

from .conftest import TOPICS_S, run_hark
from .helpers import complete_record

pytestmark = pytest.mark.e2e


def stock_consumer(settings, topic: str) -> Consumer:
    """A plain confluent-kafka consumer of every partition of ``topic`` from the start."""
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            **settings.kafka_extra,
            "group.id": f"stock-{time.time_ns()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    return c


def read_published(settings, topic: str, sid: str, until, timeout: float = 90.0) -> list:
    """(value or None, headers) of every record keyed ``sid``, decoded by the stock deserializer."""
    client = SchemaRegistryClient({"url": settings.schema_registry_url})
    deserialize = AvroDeserializer(client)
    c = stock_consumer(settings, topic)
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(out):
            for m in c.consume(100, 0.2):
                if m.error() or m.key() != sid.encode():
                    continue
                value = m.value()
                ctx = SerializationContext(topic, MessageField.VALUE)
                out.append((None if value is None else deserialize(value, ctx), dict(m.headers() or [])))
    finally:
        c.close()
    return out


def test_the_registry_holds_hark_schemas_and_refuses_an_incompatible_change(live_stack):
    settings, state = live_stack
    assert state["schema_registry_url"] == settings.schema_registry_url
    client = SchemaRegistryClient({"url": settings.schema_registry_url})
    subjects = set(client.get_subjects())
    assert {"hark.AudioChunk", "hark.Result", published.SUBJECT} <= subjects
    # every version of a changed schema is registered, oldest first: the history and the current one
    local = serde.LocalSchemaRegistry()
    assert len(client.get_versions("hark.Result")) == len(local.versions("Result")) >= 3
    # a field without a default cannot be read from the records already in the log: refused
    current = json.loads(client.get_latest_version("hark.Result").schema.schema_str)
    broken = {**current, "fields": [*current["fields"], {"name": "priority", "type": "int"}]}
    with pytest.raises(SchemaRegistryError) as refused:  # clients read; registering is hark's alone
        client.register_schema("hark.Result", Schema(json.dumps(broken), "AVRO"))
    assert refused.value.http_status_code == 401
    password = json.loads(Path(state["credentials"]).read_text())[REGISTRY_WRITER]
    writer_url = settings.schema_registry_url.replace("://", f"://{registry.WRITER}:{quote(password, safe='')}@")
    with pytest.raises(SchemaRegistryError) as refused:  # hark itself: refused as incompatible
        SchemaRegistryClient({"url": writer_url}).register_schema("hark.Result", Schema(json.dumps(broken), "AVRO"))
    assert refused.value.http_status_code == 409
    assert len(client.get_versions("hark.Result")) == len(local.versions("Result"))


def test_records_written_with_an_old_version_still_read(live_stack):
    """A record in the log from before a schema change: framed with the old version's registry
    id, resolved onto the current schema (the new fields take their defaults)."""
    settings, _ = live_stack
    client = SchemaRegistryClient({"url": settings.schema_registry_url})
    old = serde.LocalSchemaRegistry().versions("StreamStart")[0]
    old_id = client.lookup_schema("hark.StreamStart", Schema(serde.schema_json(old.parsed), "AVRO")).schema_id
    record = {f["name"]: f.get("default") for f in old.parsed["fields"]}
    record.update(stream_id="old-1", tenant="t", seq=0, source_format="wav", started_at_ms=0)
    record.update(sample_rate=16000, source_sample_rate=16000, source_channels=1)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old.parsed, record)
    name, rec = serde.decode(struct.pack(">bI", 0, old_id) + buf.getvalue())
    assert name == "StreamStart" and rec["stream_id"] == "old-1"
    assert rec["schema_version"] == 1 and rec["hotwords"] == []  # a field v2 added takes its default


def test_a_sealed_record_fails_cleanly_in_a_stock_deserializer(live_stack):
    settings, _ = live_stack
    client = SchemaRegistryClient({"url": settings.schema_registry_url})
    from hark.keys import Keyring

    keys = Keyring.for_settings(settings)
    sid = f"sealed-{time.time_ns()}"
    keys.create(sid)
    alive = records.StreamAlive(stream_id=sid, tenant="t", seq=1, silent_ms=0, published_at_ms=0)
    value = serde.encode("StreamAlive", alive, keys=keys, stream_id=sid)
    assert value[0] not in (0, 1)
    with pytest.raises(SerializationError, match="Invalid magic byte"):
        AvroDeserializer(client)(value, SerializationContext(settings.audio_topic, MessageField.VALUE))


def test_a_recording_reaches_the_published_tier_and_erasure_tombstones_it(live_stack, speech_dir, references):
    settings, _ = live_stack
    sid = f"published-{time.time_ns()}"
    kafka.ensure_tenant_topics(settings, "pubtenant", produce=False)  # what `hark clients create` makes
    time.sleep(TOPICS_S + 1)  # results sees it
    pub = run_hark(
        "publish", str(speech_dir / "austen_passage.flac"), "--stream-id", sid, "--tenant", "pubtenant",
        "--bootstrap", settings.bootstrap,
    )  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    internal = complete_record(settings, sid, timeout=120)
    topic = settings.published_topic("pubtenant")

    def complete(out):
        return any(v is not None and v["kind"] == "COMPLETE" for v, _ in out)

    records = read_published(settings, topic, sid, complete)
    finals = [(v, h) for v, h in records if v["kind"] == "FINAL"]
    done = [v for v, _ in records if v["kind"] == "COMPLETE"]
    assert len(done) == 1 and records[-1][0] is done[0], "COMPLETE is the stream's last record"
    assert finals and all(h.get(published.FINAL_HEADER) == b"1" for _, h in finals)
    assert {v["final_source"] for v, _ in finals} >= {"online"}
    t = done[0]
    assert t["text"] == internal["text"] and t["tenant"] == "pubtenant" and t["stream_id"] == sid
    assert score(references["austen_passage.flac"], t["text"]).wer < 0.15
    assert t["words"] and all(0 <= w["confidence"] <= 1 and w["start_ms"] <= w["end_ms"] for w in t["words"])
    assert t["status"] == internal["status"] and t["language"] == internal["language"]
    assert t["model_name"] and t["model_version"] and t["final_source"] == "offline"
    # the published records are plain: nothing of the stream's key is needed to read them
    md = kafka.admin(settings).list_topics(topic, timeout=10).topics[topic]
    assert len(md.partitions) == settings.partitions

    proc = run_hark("erase", sid, "--reason", "test", "--bootstrap", settings.bootstrap)
    assert proc.returncode == 0, proc.stderr
    assert topic in json.loads(proc.stdout)["tombstones"]
    after = read_published(settings, topic, sid, lambda out: any(v is None for v, _ in out))
    assert after[-1][0] is None, "the stream's last record on its tenant's topic is a tombstone"
