"""docs/clients.md, run as written, on the live stack with logins from `hark clients create`:
a tenant's producer (stock confluent-kafka, the registry's schemas) publishes a real recording,
its consumer (stock AvroDeserializer) reads the transcript, Kafka Connect's JDBC sink puts it in
PostgreSQL and `hark erase` deletes the row through the tombstone, and a Java consumer (Apache
Kafka's client, Apicurio's deserializer) reads it too; a Java producer (Apache Kafka's client,
Apicurio's serializer) publishes a recording that is transcribed. Another tenant's login gets
nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hark.wer import score

from . import connect_helpers as ch
from . import doc_snippets
from .conftest import ROOT, TOPICS_S, run_hark

pytestmark = pytest.mark.e2e

JAVA_DIR = ROOT / "clients" / "java" / "src" / "main" / "java" / "dev" / "hark" / "client"
JAVA_SOURCE = JAVA_DIR / "PublishedConsumer.java"
JAVA_PRODUCER = JAVA_DIR / "AudioProducer.java"


def create(state: dict, name: str, tenant: str, *grants: str) -> dict:
    out = run_hark("clients", "create", name, "--tenant", tenant, *grants, "--bootstrap", state["bootstrap"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def snippet(tmp_path: Path, first_line: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(doc_snippets.block(first_line))
    return path


class Lines:
    """A process's stdout lines, read on a thread (a consumer loops for ever: the test ends it)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, match, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((x for x in self.lines if match(x)), None)
            if found is not None:
                return found
            assert self.proc.poll() is None, f"the consumer exited: {self.lines[-5:]}"
            time.sleep(0.2)
        raise AssertionError(f"no such line in {timeout:.0f} s; got {self.lines[-5:]}")


def test_the_clients_page_runs_as_written(live_stack, speech_dir, references, tmp_path):
    settings, state = live_stack
    tenant, sid = f"doc{time.time_ns() % 10**8}", f"doc-{time.time_ns()}"
    login = create(state, f"app{time.time_ns() % 10**8}", tenant, "--consume", "--produce")
    assert login["produce_topic"] == settings.produce_topic(tenant)
    time.sleep(TOPICS_S + 1)  # the results service finds the tenant's new topic
    (tmp_path / "login.json").write_text(json.dumps(login))
    consume = snippet(tmp_path, "# consume.py", "consume.py")
    produce = snippet(tmp_path, "# produce.py", "produce.py")
    wav = speech_dir / "forever_input_2_16k.wav"

    consumer = subprocess.Popen(
        [sys.executable, str(consume), str(tmp_path / "login.json")], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    with ch.postgres_sink(
        tmp_path / "connect", settings.bootstrap, ch.Login.from_client(login), login["schema_registry_url"],
        login["consume_topic"],
    ) as (pg, worker):  # fmt: skip
        try:
            lines = Lines(consumer)
            out = subprocess.run(
                [sys.executable, str(produce), str(tmp_path / "login.json"), str(wav), sid],
                capture_output=True, text=True, timeout=120, cwd=tmp_path,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"{sid} published:")
            complete = lines.wait_for(lambda x: x.startswith(f"{sid} COMPLETE "), 120)
            text = complete.split(" ", 3)[3]
            assert score(references[wav.name], text).wer <= 0.5, text
            assert any(x.startswith(f"{sid} FINAL online ") for x in lines.lines)

            rows = ch.wait_rows(
                pg, f"SELECT kind, text FROM transcripts WHERE stream_id = '{sid}'", lambda r: bool(r), worker=worker
            )
            assert rows == [["COMPLETE", text]]
            java = ch.java_consume(
                settings.bootstrap, ch.Login.from_client(login), login["schema_registry_url"],
                login["consume_topic"], len(lines.lines),
            )  # fmt: skip
            assert {"stream_id": sid, "kind": "COMPLETE", "text": text} in [
                {k: r[k] for k in ("stream_id", "kind", "text")} for r in java
            ]

            erased = run_hark("erase", sid, "--reason", "test", "--bootstrap", settings.bootstrap)
            assert erased.returncode == 0, erased.stderr
            assert login["consume_topic"] in json.loads(erased.stdout)["tombstones"]
            lines.wait_for(lambda x: x == f"{sid} ERASED", 60)
            ch.wait_rows(pg, f"SELECT 1 FROM transcripts WHERE stream_id = '{sid}'", lambda r: r == [], worker=worker)
        finally:
            consumer.kill()


def test_the_java_producer_is_transcribed(live_stack, speech_dir, references, tmp_path):
    settings, state = live_stack
    tenant, sid = f"docj{time.time_ns() % 10**8}", f"docj-{time.time_ns()}"
    login = create(state, f"japp{time.time_ns() % 10**8}", tenant, "--consume", "--produce")
    time.sleep(TOPICS_S + 1)  # the results service finds the tenant's new topic
    (tmp_path / "login.json").write_text(json.dumps(login))
    consume = snippet(tmp_path, "# consume.py", "consume.py")
    wav = speech_dir / "forever_input_2_16k.wav"
    consumer = subprocess.Popen(
        [sys.executable, str(consume), str(tmp_path / "login.json")], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        lines = Lines(consumer)
        out = ch.java_produce(
            settings.bootstrap, ch.Login.from_client(login), login["schema_registry_url"],
            login["produce_topic"], wav, sid, directory=tmp_path,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.startswith(f"{sid} published:"), out.stdout
        complete = lines.wait_for(lambda x: x.startswith(f"{sid} COMPLETE "), 120)
        text = complete.split(" ", 3)[3]
        assert score(references[wav.name], text).wer <= 0.5, text
    finally:
        consumer.kill()


def test_another_tenants_login_cannot_publish_into_this_tenant(live_stack, speech_dir, tmp_path):
    _, state = live_stack
    victim = create(state, f"v{time.time_ns() % 10**8}", f"victim{time.time_ns() % 10**6}", "--produce")
    other = create(state, f"o{time.time_ns() % 10**8}", f"other{time.time_ns() % 10**6}", "--produce", "--consume")
    stolen = {**other, "produce_topic": victim["produce_topic"]}
    (tmp_path / "login.json").write_text(json.dumps(stolen))
    produce = snippet(tmp_path, "# produce.py", "produce.py")
    out = subprocess.run(
        [sys.executable, str(produce), str(tmp_path / "login.json"), str(speech_dir / "goforward.wav"), "x-1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0 and "TOPIC_AUTHORIZATION_FAILED" in out.stderr, out.stderr[-2000:]
    java = ch.java_produce(
        state["bootstrap"], ch.Login.from_client(other), other["schema_registry_url"], victim["produce_topic"],
        speech_dir / "goforward.wav", "x-2", directory=tmp_path,
    )  # fmt: skip
    assert java.returncode != 0 and "not published" in java.stderr and "uthoriz" in java.stderr, java.stderr[-2000:]


def test_the_java_shown_is_the_java_that_runs():
    excerpt = doc_snippets.block("        props.putIfAbsent(ConsumerConfig.KEY_DESERIALIZER")
    assert excerpt in JAVA_SOURCE.read_text()
    excerpt = doc_snippets.block("        props.putIfAbsent(ProducerConfig.KEY_SERIALIZER")
    assert excerpt in JAVA_PRODUCER.read_text()
