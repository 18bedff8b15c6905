"""The schema registry (hark/registry.py): which Java it takes, ids across a restart, who may write,
and the registry of the live stack."""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from hark import registry, serde, stack
from hark.supervisor import REGISTRY_WRITER

TEST_SCHEMA = Schema(
    json.dumps({"type": "record", "name": "Probe", "namespace": "hark.test", "fields": [{"name": "x", "type": "int"}]}),
    "AVRO",
)


def fake_java(folder: Path, version: str) -> Path:
    """A script that answers ``-version`` as a JDK of ``version`` does (on stderr)."""
    java = folder / f"java-{version}"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2025-04-15' >&2\n")
    java.chmod(0o755)
    return java


def test_find_java_refuses_an_old_java_in_one_line(tmp_path, monkeypatch):
    old = fake_java(tmp_path, "17.0.15")
    monkeypatch.setenv("HARK_REGISTRY_JAVA", str(old))
    with pytest.raises(registry.RegistryUnavailable) as e:
        registry.find_java()
    message = str(e.value)
    assert "\n" not in message
    assert f"{old} (17)" in message and "Java 21+" in message and "HARK_REGISTRY_JAVA" in message


def test_find_java_takes_a_new_enough_one_and_reads_old_version_strings(tmp_path, monkeypatch):
    new = fake_java(tmp_path, "21.0.2")
    monkeypatch.setenv("HARK_REGISTRY_JAVA", str(new))
    assert registry.find_java() == str(new)
    assert registry.java_major(str(fake_java(tmp_path, "1.8.0_402"))) == 8
    assert registry.java_major(str(tmp_path / "absent")) is None


def refused(call) -> int:
    with pytest.raises(SchemaRegistryError) as e:
        call()
    return e.value.http_status_code


def started(node: registry.Node, log: Path) -> subprocess.Popen:
    proc = node.spawn(log)
    try:
        node.wait_ready(180, proc, log)
    except Exception:
        proc.kill()
        raise
    return proc


@pytest.mark.e2e
def test_ids_survive_a_restart_and_only_the_writer_writes(tmp_path):
    node = registry.Node(tmp_path / "registry", password=secrets.token_urlsafe(24))
    log = tmp_path / "registry.log"
    proc = started(node, log)
    try:
        assert stat.S_IMODE((node.directory / "registry.properties").stat().st_mode) == 0o600  # holds the password
        writer, anonymous = SchemaRegistryClient({"url": node.writer_url}), SchemaRegistryClient({"url": node.url})
        sid = writer.register_schema("hark.test.Probe", TEST_SCHEMA)
        assert refused(lambda: anonymous.register_schema("hark.test.Other", TEST_SCHEMA)) == 401
        assert refused(lambda: anonymous.set_compatibility("hark.test.Probe", "NONE")) == 401
        assert refused(lambda: anonymous.delete_subject("hark.test.Probe")) == 401
        wrong = SchemaRegistryClient({"url": node.url, "basic.auth.user.info": f"{registry.WRITER}:wrong"})
        assert refused(lambda: wrong.register_schema("hark.test.Other", TEST_SCHEMA)) == 401
        assert anonymous.lookup_schema("hark.test.Probe", TEST_SCHEMA).schema_id == sid  # reads are open
        proc.terminate()
        proc.wait(60)
        proc = started(node, log)
        fresh = SchemaRegistryClient({"url": node.url})
        assert json.loads(fresh.get_schema(sid).schema_str) == json.loads(TEST_SCHEMA.schema_str)
        assert fresh.lookup_schema("hark.test.Probe", TEST_SCHEMA).schema_id == sid
        assert fresh.get_subjects() == ["hark.test.Probe"]
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.e2e
def test_the_stack_serves_hark_schemas_read_only_to_others(live_stack):
    settings, state = live_stack
    url = state["schema_registry_url"]
    assert url and settings.schema_registry_url == url and registry.answers(url)
    client = SchemaRegistryClient({"url": url})
    ours = {serde.subject(serde.registry().by_name(n).parsed) for n in serde.registry().names()}
    assert ours <= set(client.get_subjects())
    assert refused(lambda: client.register_schema("hark.test.Probe", TEST_SCHEMA)) == 401
    shown = stack.status(stack.stack_dir(settings, "pytest"))
    assert shown is not None and shown["registry"]["health"] == "ok" and shown["schema_registry_url"] == url
    writer_password = json.loads(Path(state["credentials"]).read_text())[REGISTRY_WRITER].encode()
    for svc in shown["services"]:  # every service reads this registry, and holds no writer's credential
        env = Path(f"/proc/{svc['pid']}/environ").read_bytes().split(b"\0")
        assert f"HARK_SCHEMA_REGISTRY_URL={url}".encode() in env, svc["name"]
        assert not any(writer_password in entry for entry in env), svc["name"]
