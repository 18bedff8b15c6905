"""The embedded Kafka broker's own costs: start time, memory, and what a transaction takes.

Starts a fresh single-node broker (hark.broker) in a temporary folder and prints:
- format and start times (JVM start to a metadata answer),
- its RSS idle and after the transaction test, and its CPU seconds to start and per test,
- all of it with the class archive ``make setup`` writes and without it (the JVM's defaults),
- the time of one transaction as the services run it (begin, produce, send offsets, commit), with
  librdkafka's default retry.backoff.ms (100) and with hark's (5): a transaction begun right after
  a commit is refused until the commit markers are written, then retried after the backoff.

  python -m bench.broker [--transactions 300]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition

from hark import broker, kafka
from hark.config import Settings


def transaction_ms(bootstrap: str, backoff_ms: int, n: int, tag: str) -> list[float]:
    settings = Settings(bootstrap=bootstrap, partitions=1)
    topic = f"bench-{tag}"
    from confluent_kafka.admin import NewTopic

    adm = kafka.admin(settings)  # kept: its futures fail once the client is collected
    adm.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    p = Producer({"bootstrap.servers": bootstrap})
    for _ in range(n + 1):
        p.produce(topic, b"x")
    p.flush()
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{tag}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([topic])
    while c.poll(1) is None:  # joined and reading
        pass
    tp = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"t-{tag}",
            "retry.backoff.ms": backoff_ms,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    tp.init_transactions(60)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        tp.begin_transaction()
        tp.produce(topic, b"y")
        tp.send_offsets_to_transaction(
            [TopicPartition(topic, 0, i + 1, metadata='{"processed":1}')], c.consumer_group_metadata(), 30
        )
        tp.commit_transaction(30)
        out.append((time.perf_counter() - t0) * 1000)
    c.close()
    return out


HARK_JVM_FLAGS = ("-XX:SharedArchiveFile=",)


def plain_jvm(cmd: list[str]) -> list[str]:
    """The command without hark's class archive: the JVM's defaults."""
    return [a for a in cmd if not a.startswith(HARK_JVM_FLAGS)]


def measure(a: argparse.Namespace, tmp: Path, plain: bool) -> None:
    label = "without the class archive" if plain else "with the class archive"
    node = broker.single_node(tmp / ("plain" if plain else "hark"), partitions=1)
    if plain:
        node.java = lambda main, *args: plain_jvm(broker.Node.java(node, main, *args))  # type: ignore[method-assign]
    t0 = time.monotonic()
    node.format()
    formatted = time.monotonic() - t0
    t0 = time.monotonic()
    proc = subprocess.Popen(node.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kafka.wait_for_broker(Settings(bootstrap=node.bootstrap), timeout=120)
        started = time.monotonic() - t0
        p = psutil.Process(proc.pid)
        cpu_ready = sum(p.cpu_times()[:2])
        time.sleep(5)
        idle_mb = p.memory_info().rss / 2**20
        print(
            f"Kafka {broker.KAFKA_VERSION}, {label}: format {formatted:.1f} s, start to first metadata answer "
            f"{started:.1f} s ({cpu_ready:.1f} CPU-s), RSS idle {idle_mb:.0f} MB (-Xmx{node.heap_mb}m)"
        )
        for backoff in (100, 5):
            cpu0 = sum(p.cpu_times()[:2])
            ms = transaction_ms(node.bootstrap, backoff, a.transactions, f"b{backoff}")
            print(
                f"  transaction (begin, produce, send offsets, commit), retry.backoff.ms={backoff}: "
                f"median {statistics.median(ms):.1f} ms, p95 {sorted(ms)[int(0.95 * len(ms)) - 1]:.1f} ms "
                f"over {len(ms)}; broker {sum(p.cpu_times()[:2]) - cpu0:.1f} CPU-s"
            )
        print(f"  RSS after the transactions {p.memory_info().rss / 2**20:.0f} MB")
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transactions", type=int, default=300)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for plain in (False, True):
            measure(a, Path(tmp), plain)


if __name__ == "__main__":
    main()
