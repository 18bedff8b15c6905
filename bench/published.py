"""The published tier: its latency against the internal results topic, its cost, and how long an
erased stream's plain copies stay on disk.

Against the embedded stack (registry included), a real 28.7 s reading (austen_passage.flac) is
published in real time under tenant "bench". Two readers follow it as it is transcribed: hark's
own on the internal results topic (sealed) and a stock confluent-kafka consumer with the stock
AvroDeserializer on the tenant's published topic. For every FINAL, the latency is its arrival
minus the moment ingest published the audio it covers (``audio_published_at_ms``).
Cost: the published bytes per audio second (key + value, against the results topic's), and the
CPU this process spends turning the stream's Results into published records (hark/published.py)
per audio second.

``--erasure``: then erase the stream and read the tenant topic's segment files with Kafka's own
DumpLogSegments (what kafka-dump-log.sh runs) every 10 s until none holds the stream's text: the
time an erased stream's plain records stay on disk at HARK_PUBLISHED_COMPACTION_LAG_S (default
600 s, so this takes about 11 minutes).

    python -m bench.published [--erasure]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from hark import kafka, published, serde, stack
from hark.config import Settings
from hark.keys import Keyring
from services.ingest.core import Ingest
from tests.helpers import segments_holding

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"
AUDIO_S = 28.7
TENANT = "bench"


def follow(settings: Settings, topic: str, sid: str, decode, out: list, stop: threading.Event) -> None:
    """(arrival time, value size, record or None) of every record keyed ``sid``."""
    c = Consumer(
        {"bootstrap.servers": settings.bootstrap, **settings.kafka_extra, "group.id": f"bench-{time.time_ns()}"}
    )
    while topic not in c.list_topics(timeout=10).topics:
        time.sleep(0.2)  # the tenant's topic is made with its first record
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    try:
        while not stop.is_set():
            for m in c.consume(100, 0.1):
                if not m.error() and m.key() == sid.encode():
                    value = m.value()
                    out.append((time.time(), len(value or b"") + len(sid), decode(m) if value else None))
    finally:
        c.close()


def latencies(rows: list) -> dict[tuple, float]:
    return {
        (r["final_source"] or r.get("source"), r["utterance_id"]): t - r["audio_published_at_ms"] / 1000
        for t, _, r in rows
        if r is not None and r["kind"] == "FINAL" and r.get("source", r["final_source"]) == "online"
    }


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
    return f"median {statistics.median(values):.2f} s, p95 {q[18]:.2f} s ({len(values)} finals)"


def transcribe(settings: Settings, sid: str) -> tuple[list, list]:
    keys = Keyring.for_settings(settings)
    stock = AvroDeserializer(SchemaRegistryClient({"url": settings.schema_registry_url}))
    internal: list = []
    public: list = []
    stop = threading.Event()
    readers = [
        threading.Thread(
            target=follow,
            args=(settings, settings.results_topic, sid, lambda m: serde.decode_message(m, keys)[1], internal, stop),
        ),
        threading.Thread(
            target=follow,
            args=(
                settings,
                settings.published_topic(TENANT),
                sid,
                lambda m: stock(m.value(), SerializationContext(m.topic(), MessageField.VALUE)),
                public,
                stop,
            ),
        ),
    ]
    for r in readers:
        r.start()
    kafka.ensure_tenant_topics(settings, TENANT, produce=False)  # what `hark clients create` makes
    time.sleep(settings.published_topics_s + 1)  # results sees it
    ingest = Ingest(settings)
    ingest.publish_file(SPEECH / "austen_passage.flac", stream_id=sid, tenant=TENANT, realtime=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(r and r["kind"] == "COMPLETE" for _, _, r in public):
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for r in readers:
        r.join()
    ingest.producer.close()
    return internal, public


def report_latency_and_cost(settings: Settings, internal: list, public: list) -> None:
    a, b = latencies(internal), latencies(public)
    print(f"online FINAL latency, internal results topic: {summary(list(a.values()))}")
    print(f"online FINAL latency, published topic:        {summary(list(b.values()))}")
    both = [b[k] - a[k] for k in a.keys() & b.keys()]
    print(f"published minus internal, per final: median {statistics.median(both) * 1000:.0f} ms")
    pub_bytes, int_bytes = sum(n for _, n, _ in public), sum(n for _, n, _ in internal)
    print(f"bytes per audio second: published {pub_bytes / AUDIO_S:.0f} ({len(public)} records), "
          f"results topic {int_bytes / AUDIO_S:.0f} ({len(internal)} records)")  # fmt: skip
    publisher = published.Publisher(settings)
    results = [r for _, _, r in internal if r is not None]
    t0 = time.process_time()
    for _ in range(20):
        for r in results:
            publisher.message(r)
    cpu = (time.process_time() - t0) / 20
    print(f"published tier CPU (Result -> Avro): {cpu * 1000 / AUDIO_S:.3f} ms per audio second")


def erasure(settings: Settings, sid: str, log_root: Path) -> None:
    topic = settings.published_topic(TENANT)
    needle = "Dashwood"
    print(f"before erasure: {segments_holding(log_root, topic, needle)} records on disk hold {needle!r}")
    erase = [sys.executable, "-m", "hark_cli", "erase", sid, "--bootstrap", settings.bootstrap]
    env = {**os.environ, "HARK_DATA_DIR": str(settings.data_dir)}  # the bench stack's keys and archive
    subprocess.run(erase, check=True, capture_output=True, env=env)
    t0 = time.monotonic()
    lag = settings.published_compaction_lag_s
    while time.monotonic() - t0 < lag * 2 + 300:
        n = segments_holding(log_root, topic, needle)
        if n == 0:
            print(f"erased stream's records gone from {topic}'s segment files {time.monotonic() - t0:.0f} s "
                  f"after `hark erase` (HARK_PUBLISHED_COMPACTION_LAG_S={lag:g})")  # fmt: skip
            return
        time.sleep(10)
    print(f"still on disk {time.monotonic() - t0:.0f} s after `hark erase`")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--erasure", action="store_true", help="also time an erased stream's records on disk")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(data_dir=Path(tmp))
        state = stack.launch(settings, name="bench-published")
        settings = stack.client_settings(settings, state)
        serde.configure(settings)
        try:
            sid = f"bench-published-{time.time_ns()}"
            internal, public = transcribe(settings, sid)
            report_latency_and_cost(settings, internal, public)
            if a.erasure:
                erasure(settings, sid, stack.stack_dir(settings, "bench-published") / "kafka")
        finally:
            stack.stop(stack.stack_dir(settings, "bench-published"))


if __name__ == "__main__":
    main()
