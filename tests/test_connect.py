"""hark's published tier read by software no one here wrote: Kafka Connect with Debezium's JDBC sink
and Apicurio's AvroConverter into PostgreSQL, and a Java consumer built from Apache Kafka's
client and Apicurio's deserializer. The records are written the way hark's publisher writes them
(Confluent framing, RecordNameStrategy, a ``hark.final`` header on FINAL records, tombstones on
erasure) by confluent-kafka's stock serializer, to a secured broker where the tenant's client may
read its own topic and join groups under its own prefix, and nothing else."""

from __future__ import annotations

import json
import secrets
import struct
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from confluent_kafka.schema_registry import SchemaRegistryClient, record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from hark import broker, registry, security
from tests import connect_helpers as ch

pytestmark = pytest.mark.e2e

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "published" / "hark.published.Transcript.avsc"
SUBJECT = "hark.published.Transcript"


@dataclass
class World:
    bootstrap: str
    admin_login: dict[str, str]
    registry: registry.Node  # readers: registry.url (anonymous); the publisher: writer_url
    directory: Path

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap, **self.admin_login})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A secured broker (SASL/SCRAM, ACLs enforced) and a registry that anyone reads and only its
    writer changes: hark's embedded broker and registry, as its stack runs them."""
    try:
        ch.check_installed()
        registry.check_installed()
    except (ch.Unavailable, registry.RegistryUnavailable) as e:
        pytest.fail(str(e))
    directory = tmp_path_factory.mktemp("connect")
    creds = security.Credentials.load(directory / "credentials.json", [security.ADMIN, security.CONTROLLER])
    node = broker.single_node(
        directory / "kafka",
        partitions=2,
        security={p: creds.passwords[p] for p in (security.ADMIN, security.CONTROLLER)},
    )
    node.format()
    procs = [
        subprocess.Popen(
            node.command(),
            stdout=open(directory / "broker.log", "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    ]
    try:
        reg = registry.Node(directory / "registry", password=secrets.token_urlsafe(16))
        procs.append(reg.spawn(directory / "registry.log"))
        took = reg.wait_ready(120, procs[-1], directory / "registry.log")
        print(f"\nconnect: registry answered in {took:.1f} s, RSS {ch.rss_mb(procs[-1].pid):.0f} MB")
        w = World(node.bootstrap, creds.client(security.ADMIN), reg, directory)
        deadline = time.monotonic() + 60
        while True:
            try:
                w.admin().list_topics(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise
                time.sleep(0.5)
        _register_decoys(reg)
        yield w
    finally:
        for proc in reversed(procs):
            ch._stop(proc)


def _register_decoys(reg: registry.Node) -> None:
    """The transcript schema, as the serializer registers it, under another subject first: the
    real subject's version then gets a new global id but the existing content id, so a record's
    4-byte id shows which of the two the registry's Confluent API frames with (the readers
    resolve content ids)."""
    sr = SchemaRegistryClient({"url": reg.writer_url})
    ser = AvroSerializer(
        sr, SCHEMA.read_text(), conf={"subject.name.strategy": lambda ctx, name: "test.Transcript.copy"}
    )
    ser(transcript("decoy", "COMPLETE", "x"), SerializationContext("test", MessageField.VALUE))


def make_tenant(w: World, name: str) -> tuple[str, ch.Login]:
    """A tenant's topic and its client's login, as ``hark clients create`` grants them: read the
    topic, join groups under the client's prefix, nothing else."""
    topic = f"hark.published.{name}"
    login = ch.Login(f"client.{name}", secrets.token_urlsafe(32), f"client.{name}.")
    adm = w.admin()
    for fut in adm.create_topics(
        [NewTopic(topic, 2, 1, config={"cleanup.policy": "compact,delete"})], request_timeout=30
    ).values():
        fut.result()
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, security.ITERATIONS)
    for fut in adm.alter_user_scram_credentials(
        [UserScramCredentialUpsertion(login.username, info, login.password.encode())], request_timeout=30
    ).values():
        fut.result()
    user = f"User:{login.username}"
    allow = AclPermissionType.ALLOW
    acls = [
        AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, user, "*", AclOperation.READ, allow),
        AclBinding(
            ResourceType.GROUP, login.group_prefix, ResourcePatternType.PREFIXED, user, "*", AclOperation.READ, allow
        ),
    ]
    for fut in adm.create_acls(acls, request_timeout=30).values():
        fut.result()
    return topic, login


class Publisher:
    """Writes what hark's publisher writes, with confluent-kafka's stock serializer."""

    def __init__(self, w: World, topic: str):
        self.topic = topic
        self.sr = SchemaRegistryClient({"url": w.registry.writer_url})
        self.ser = AvroSerializer(
            self.sr, SCHEMA.read_text(), conf={"subject.name.strategy": record_subject_name_strategy}
        )
        self.producer = Producer({"bootstrap.servers": w.bootstrap, **w.admin_login, "enable.idempotence": True})
        self.ids: set[int] = set()

    def send(self, stream_id: str, record: dict | None, partition: int | None = None) -> int:
        """Write one record (None: a tombstone) and wait for it; the partition it went to."""
        headers: list[tuple[str, str | bytes | None]] | None = None
        if record is not None and record["kind"] == "FINAL":
            headers = [("hark.final", b"1")]
        value = None
        if record is not None:
            value = self.ser(record, SerializationContext(self.topic, MessageField.VALUE))
            assert value is not None and value[0] == 0  # Confluent framing: magic 0, 4-byte id
            self.ids.add(struct.unpack(">I", value[1:5])[0])
        delivered: list[tuple[object, int]] = []

        def done(err, msg) -> None:
            delivered.append((err, msg.partition()))

        self.producer.produce(
            self.topic,
            key=stream_id.encode(),
            value=value,
            headers=headers,
            on_delivery=done,
            partition=-1 if partition is None else partition,  # -1: the key's partition
        )
        assert self.producer.flush(30) == 0 and delivered and delivered[0][0] is None, delivered
        return delivered[0][1]


def transcript(stream_id: str, kind: str, text: str, utterance_id: int = -1, tenant: str = "acme") -> dict:
    now = int(time.time() * 1000)
    words = [
        {"word": w, "start_ms": 300 * i, "end_ms": 300 * i + 250, "confidence": 0.9, "speaker": "S1"}
        for i, w in enumerate(text.split())
    ]
    return {
        "stream_id": stream_id,
        "tenant": tenant,
        "kind": kind,
        "utterance_id": utterance_id,
        "text": text,
        "start_ms": 0,
        "end_ms": 300 * len(words),
        "words": words,
        "turns": [{"speaker": "S1", "start_ms": 0, "end_ms": 300 * len(words)}] if kind == "COMPLETE" else [],
        "status": "complete" if kind == "COMPLETE" else None,
        "language": "en",
        "final_source": "offline",
        "model_name": "test",
        "model_version": "1",
        "audio_published_at_ms": now - 1000,
        "emitted_at_ms": now,
        "schema_version": 1,
    }


def test_the_registry_frames_records_with_the_content_id_that_the_readers_resolve(world):
    topic, _ = make_tenant(world, "ids")
    pub = Publisher(world, topic)
    pub.send("s-ids", transcript("s-ids", "COMPLETE", "one two"))
    url = f"{ch.registry_base(world.registry.url)}/apis/registry/v3/groups/default/artifacts/{SUBJECT}/versions/branch=latest"
    with urllib.request.urlopen(url, timeout=10) as r:
        meta = json.loads(r.read())
    # the readers resolve content ids (use-id=contentId, connect_helpers); the decoy made the two differ
    assert pub.ids == {meta["contentId"]} and meta["globalId"] != meta["contentId"], meta


def test_debezium_jdbc_sink_keeps_complete_transcripts_as_rows_and_a_tombstone_deletes_its_row(world):
    topic, login = make_tenant(world, "acme")
    pub = Publisher(world, topic)
    sink = ch.postgres_sink(world.directory / "worker-acme", world.bootstrap, login, world.registry.url, topic)
    with sink as (pg, worker):
        print(f"\nconnect: PostgreSQL answered {pg.start_s:.2f} s after initdb began (initdb {pg.initdb_s:.2f} s)")
        print(f"connect: the worker's sink task ran {worker.start_s:.1f} s after start, RSS {worker.rss_mb():.0f} MB")
        pub.send("s1", transcript("s1", "FINAL", "good morning", 0))
        pub.send("s1", transcript("s1", "FINAL", "everyone here", 1))
        pub.send("s3", transcript("s3", "FINAL", "still talking", 0))  # no COMPLETE yet: no row
        s1_partition = pub.send("s1", transcript("s1", "COMPLETE", "good morning everyone here"))
        pub.send("s2", transcript("s2", "COMPLETE", "a second stream"))
        sql = "SELECT stream_id, kind, text, status, utterance_id FROM transcripts ORDER BY stream_id"
        rows = ch.wait_rows(pg, sql, lambda r: len(r) >= 2, worker=worker)
        assert rows == [
            ["s1", "COMPLETE", "good morning everyone here", "complete", "-1"],
            ["s2", "COMPLETE", "a second stream", "complete", "-1"],
        ]
        columns = {
            r[0]
            for r in pg.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'transcripts'")
        }
        assert "words" not in columns and "turns" not in columns and {"tenant", "model_name"} <= columns
        keys = pg.query(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'transcripts'::regclass AND i.indisprimary"
        )
        assert keys == [["stream_id"]]

        # a later COMPLETE of the same stream (a redecode) replaces the row: upsert by key
        pub.send("s2", transcript("s2", "COMPLETE", "a second stream, redone"))
        ch.wait_rows(
            pg,
            "SELECT text FROM transcripts WHERE stream_id = 's2'",
            lambda r: r == [["a second stream, redone"]],
            worker=worker,
        )

        # the publisher's nudge (hark/published.py): an empty-keyed tombstone that only rolls a
        # quiet partition's segment; the sink deletes nothing and goes on. It goes ahead of s1's
        # tombstone on s1's partition, so s1's row going shows the sink got past it.
        pub.send("", None, partition=s1_partition)
        pub.send("s1", None)  # erasure
        # s1's row goes; s3 (FINALs only) never had one, or this would not hold
        ch.wait_rows(pg, "SELECT stream_id FROM transcripts ORDER BY stream_id", lambda r: r == [["s2"]], worker=worker)
        worker.check()
        print(f"connect: after the tombstone the worker's RSS is {worker.rss_mb():.0f} MB")
        assert worker.status()["tasks"][0]["state"] == "RUNNING"


def test_a_java_consumer_reads_finals_the_complete_transcript_and_the_tombstone(world):
    topic, login = make_tenant(world, "globex")
    pub = Publisher(world, topic)
    pub.send("g1", transcript("g1", "FINAL", "hello there", 0, tenant="globex"))
    pub.send("g1", transcript("g1", "COMPLETE", "hello there, general", tenant="globex"))
    pub.send("g1", None)
    t0 = time.monotonic()
    lines = ch.java_consume(world.bootstrap, login, world.registry.url, topic, max_records=3, timeout=60)
    print(f"\nconnect: the Java consumer read 3 records in {time.monotonic() - t0:.1f} s (JVM start included)")
    assert [(x["stream_id"], x["kind"], x["text"], x["final"]) for x in lines] == [
        ("g1", "FINAL", "hello there", True),
        ("g1", "COMPLETE", "hello there, general", False),
        ("g1", None, None, False),
    ]
    # its group commits under the client's prefix; a group outside it is refused
    with pytest.raises(AssertionError, match=r"(?i)not authorized|GroupAuthorization"):
        ch.java_consume(world.bootstrap, login, world.registry.url, topic, 1, timeout=20, group="elsewhere")
