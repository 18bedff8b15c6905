"""What does a live consumer cost the embedded broker as its topic grows? (README "Load".)

Tansu (memory:// storage) keeps every batch it was ever sent as its own object and has no
retention. This grows one topic to a given number of stored batches, then for 10 s sends 120
records/s of 3.2 KB (12 keys, like 12 real-time audio streams of 100 ms chunks) and measures
the broker's CPU three ways: with a consumer reading them live, with no consumer, and with the
stored batches in another topic instead.

  python -m bench.broker_fetch_cost                       # 0, 40k and 80k stored batches
  python -m bench.broker_fetch_cost --stored 0,20000 --rate 60 --partitions 1
  python -m bench.broker_fetch_cost --stored "" --lingers "" --chunks 100,200,400
  python -m bench.broker_fetch_cost --storage s3 --stored 0,5000 --lingers "" --chunks ""

``--storage s3`` runs the first part on Tansu's s3:// storage in SeaweedFS (the engine the broker
restart test uses) and reports SeaweedFS's CPU beside the broker's.

Then it shows what ingest's audio batching (``HARK_AUDIO_LINGER_MS``) buys: 24 streams' worth of
100 ms chunks at staggered times for 50 s into an empty topic, read live, producer linger 5 ms
and 50 ms; the broker's CPU over the last 10 s and the batches sent.

Last, the chunk test: 12 keyed streams that have each already sent ``--stored-seconds`` of audio
go on live for 10 s, in 100 ms and in 200 ms records (``HARK_CHUNK_MS``). A stream's partition is
listed once per fetch that finds new data in it, and holds one object per chunk sent, so the cost
of a stream grows with the square of its chunk rate.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from hark import kafka
from hark.config import Settings
from hark.stack import free_port, tansu_command
from tests import seaweed


def cpu_pct(c0, c1, seconds: float) -> float:
    """% of one core between two psutil cpu_times readings."""
    return 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.broker_fetch_cost")
    ap.add_argument("--stored", default="0,40000,80000", help="batches stored before each measurement")
    ap.add_argument("--rate", type=int, default=120, help="live records per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--lingers", default="5,50", help="producer linger.ms values for the batching test ('' skips it)")
    ap.add_argument("--chunks", default="100,200", help="audio chunk lengths (ms) for the chunk test ('' skips it)")
    ap.add_argument("--stored-seconds", type=float, default=300.0, help="audio each stream has sent before the chunk test")
    ap.add_argument("--storage", choices=("memory", "s3"), default="memory",
                    help="the broker's storage for the stored-batches part (s3: SeaweedFS, its CPU shown too)")
    a = ap.parse_args(argv)
    if a.stored:
        print(f"{'stored batches':>14} {'where':>12} {'consumer':>9} {'broker CPU':>11} {'delivered':>10}"
              + (f" {'SeaweedFS CPU':>14}" if a.storage == "s3" else ""))
    for stored in (int(x) for x in a.stored.split(",") if x):
        cases = [("same topic", True), ("same topic", False)] + ([("other topic", True)] if stored else [])
        for where, consume in cases:
            with Broker(a.partitions, storage=a.storage) as b:
                b.fill("live" if where == "same topic" else "other", stored)
                pct, delivered, storage_pct = b.measure(a.rate, a.seconds, consume)
            print(f"{stored:>14} {where:>12} {'yes' if consume else 'no':>9} {pct:>10.1f}% "
                  f"{delivered if consume else '-':>10}" + (f" {storage_pct:>13.1f}%" if a.storage == "s3" else ""),
                  flush=True)
    if a.lingers:
        print(f"\n{'linger.ms':>9} {'records':>8} {'batches':>8} {'broker CPU, last 10 s':>22}")
    for linger in (int(x) for x in a.lingers.split(",") if x):
        with Broker(a.partitions) as b:
            records, batches, pct = b.batching(linger)
        print(f"{linger:>9} {records:>8} {batches:>8} {pct:>21.1f}%", flush=True)
    if a.chunks:
        print(f"\n12 streams, {a.stored_seconds:.0f} s of audio each already stored, then {a.seconds:.0f} s live")
        print(f"{'chunk ms':>8} {'stored records':>15} {'broker CPU':>11}")
    for chunk_ms in (int(x) for x in a.chunks.split(",") if x):
        with Broker(a.partitions) as b:
            stored, pct = b.chunks(chunk_ms, a.stored_seconds, a.seconds)
        print(f"{chunk_ms:>8} {stored:>15} {pct:>10.1f}%", flush=True)


class Broker:
    """A bare Tansu with its topics created: "live" and "other" with ``partitions`` each, or
    ``topics`` (name -> partitions); on memory:// storage, or on s3:// in a SeaweedFS of its own."""

    def __init__(self, partitions: int, topics: dict[str, int] | None = None, storage: str = "memory"):
        self.partitions, self.storage = partitions, storage
        self.topics = topics or {"live": partitions, "other": partitions}
        self.s3: subprocess.Popen | None = None

    def __enter__(self):
        port = free_port()
        self.bootstrap = f"127.0.0.1:{port}"
        env = {**os.environ, "RUST_LOG": "warn"}
        if self.storage == "s3":
            self.s3_dir = tempfile.TemporaryDirectory(prefix="hark-fetch-cost-")
            self.s3, s3port = seaweed.start(Path(self.s3_dir.name), buckets=("tansu",))
            env.update(seaweed.tansu_env(s3port))
        self.proc = subprocess.Popen(tansu_command(port, "s3://tansu/" if self.s3 else "memory://tansu/"), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kafka.wait_for_broker(Settings(bootstrap=self.bootstrap))
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for f in admin.create_topics([NewTopic(t, n, 1) for t, n in self.topics.items()]).values():
            f.result()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.s3 is not None:
            seaweed.stop(self.s3)
            self.s3_dir.cleanup()

    def storage_cpu_seconds(self) -> float:
        """CPU seconds of the storage server so far (0 for memory://)."""
        if self.s3 is None:
            return 0.0
        procs = [psutil.Process(self.s3.pid)]
        procs += procs[0].children(recursive=True)
        return sum(t.user + t.system for t in (p.cpu_times() for p in procs))

    def fill(self, topic: str, batches: int) -> None:
        """`batches` one-record batches: one per partition per flush."""
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 0})
        for i in range(batches):
            p.produce(topic, partition=i % self.partitions, value=b"x" * 3200)
            if i % self.partitions == self.partitions - 1:
                p.flush()
        p.flush()

    def measure(self, rate: int, seconds: float, consume: bool) -> tuple[float, int, float]:
        """Broker CPU (% of one core), live records delivered, storage server CPU (%)."""
        with self.reading(from_end=True) if consume else contextlib.nullcontext([0]) as delivered:
            if consume:
                time.sleep(2)
            p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
            broker = psutil.Process(self.proc.pid)
            c0, s0, t0 = broker.cpu_times(), self.storage_cpu_seconds(), time.monotonic()
            n = int(rate * seconds)
            for i in range(n):
                p.produce("live", key=str(i % 12).encode(), value=b"live" + b"x" * 3196)
                p.poll(0)
                time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
            p.flush()
            c1, s1, t1 = broker.cpu_times(), self.storage_cpu_seconds(), time.monotonic()
            if consume:
                time.sleep(1)
        return cpu_pct(c0, c1, t1 - t0), delivered[0], 100 * (s1 - s0) / (t1 - t0)

    @contextlib.contextmanager
    def reading(self, from_end: bool):
        """A consumer reading topic "live" on its own thread, as a live service does. Yields a
        one-item list: how many records marked b"live" it has read (Tansu's end offset can point
        into the last stored batch, so the stored ones may show up too)."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "live", "fetch.wait.max.ms": 50,
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition("live", i, consumer.get_watermark_offsets(TopicPartition("live", i))[1]
                                        if from_end else 0) for i in range(self.partitions)])
        stop, seen = threading.Event(), [0]

        def read() -> None:
            while not stop.is_set():
                seen[0] += sum(1 for m in consumer.consume(500, 0.05)
                               if not m.error() and m.value().startswith(b"live"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            yield seen
        finally:
            stop.set()
            reader.join()
            consumer.close()

    def batching(self, linger: int, streams: int = 24, seconds: float = 50.0) -> tuple[int, int, float]:
        """Chunks of `streams` real-time streams (10/s each, staggered) read live; the broker's CPU at the end."""
        batches = [0]

        def count(stats: str) -> None:
            topic = json.loads(stats).get("topics", {}).get("live")
            if topic:
                batches[0] += topic["batchcnt"]["cnt"]  # batches sent since the last report

        with self.reading(from_end=False):
            p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": linger, "enable.idempotence": True,
                          "statistics.interval.ms": 1000, "stats_cb": count})
            broker = psutil.Process(self.proc.pid)
            t0, n, c0 = time.monotonic(), int(seconds * 10 * streams), None
            for i in range(n):
                time.sleep(max(0.0, t0 + i * 0.1 / streams - time.monotonic()))
                p.produce("live", key=str(i % streams).encode(), value=b"x" * 3200)
                p.poll(0)
                if c0 is None and i >= n - 100 * streams:  # the last 10 s
                    c0, t1 = broker.cpu_times(), time.monotonic()
            c1, t2 = broker.cpu_times(), time.monotonic()
            p.flush()
            time.sleep(1.5)  # one more statistics report
            p.poll(0)
        return n, batches[0], cpu_pct(c0, c1, t2 - t1)

    def chunks(self, chunk_ms: int, stored_seconds: float, seconds: float, streams: int = 12) -> tuple[int, float]:
        """Real-time audio of `streams` keyed streams in `chunk_ms` records (the same bytes per second
        whatever the length), after each stream has already sent `stored_seconds` of it."""
        size = 32 * chunk_ms  # 16 kHz 16-bit PCM
        keys = [f"stream-{i}".encode() for i in range(streams)]
        fill = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 0})
        rounds = int(stored_seconds * 1000 / chunk_ms)
        for _ in range(rounds):  # one batch per partition per round, as streams sharing a partition share batches
            for k in keys:
                fill.produce("live", key=k, value=b"x" * size)
            fill.flush()
        with self.reading(from_end=True):
            time.sleep(2)
            p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": Settings().audio_linger_ms})
            broker = psutil.Process(self.proc.pid)
            c0, t0 = broker.cpu_times(), time.monotonic()
            n = int(seconds * 1000 / chunk_ms) * streams
            for i in range(n):  # the streams' chunks at staggered times, as real clients send them
                time.sleep(max(0.0, t0 + i * chunk_ms / 1000 / streams - time.monotonic()))
                p.produce("live", key=keys[i % streams], value=b"x" * size)
                p.poll(0)
            c1, t1 = broker.cpu_times(), time.monotonic()
            p.flush()
        return rounds * streams, cpu_pct(c0, c1, t1 - t0)


if __name__ == "__main__":
    main()
