"""Does Tansu on s3:// storage lose acknowledged records across a restart, and does
``kafka.GuardedProducer`` get them back? (README "Guarantees".)

A producer writes numbered records (keyed over 8 keys, 4 partitions) while a group consumer
reads them; Tansu (SeaweedFS storage) is SIGKILLed and restarted on the same port at the given
times. Afterwards every acknowledged record is looked for in what the consumer got and in the
whole log read again from the start.

  python -m bench.broker_restart                 # plain confluent-kafka producer
  python -m bench.broker_restart --guard         # hark's GuardedProducer
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from hark import kafka
from hark.config import Settings
from hark.kafka import GuardedProducer
from hark.stack import free_port, tansu_command
from tests import seaweed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.broker_restart")
    ap.add_argument("--guard", action="store_true", help="produce with hark.kafka.GuardedProducer")
    ap.add_argument("--kills", default="5,10,15", help="seconds into the run to kill the broker")
    ap.add_argument("--seconds", type=float, default=22.0)
    ap.add_argument("--interval", type=float, default=0.003, help="seconds between records")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hark-restart-") as d:
        run(Path(d), a)


def run(d: Path, a) -> None:
    s3, s3port = seaweed.start(d / "s3", buckets=("tansu",))
    env = {**os.environ, **seaweed.tansu_env(s3port), "RUST_LOG": "warn"}
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    cmd = tansu_command(port, "s3://tansu/")
    broker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kafka.wait_for_broker(Settings(bootstrap=bootstrap))
        adm = AdminClient({"bootstrap.servers": bootstrap})
        for f in adm.create_topics([NewTopic("t", 4, 1)]).values():
            f.result()
        acked: dict[int, tuple[int, int | None]] = {}
        stop = threading.Event()

        def record_ack(err, m) -> None:
            if err is None:
                acked[int(m.value())] = (m.partition(), m.offset())

        class Recording(GuardedProducer):
            def _delivered(self, err, m, copy=False):
                record_ack(err, m)
                super()._delivered(err, m, copy)

        conf = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
        producer = Recording(conf) if a.guard else Producer({**conf, "on_delivery": record_ack})

        def produce() -> None:
            i = 0
            while not stop.is_set():
                producer.produce("t", key=str(i % 8).encode(), value=str(i).encode())
                producer.poll(0)
                i += 1
                time.sleep(a.interval)
            producer.flush(60)

        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "g", "auto.offset.reset": "earliest",
                             "enable.auto.commit": False, "session.timeout.ms": 6000,
                             "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 100})
        consumer.subscribe(["t"])
        got: set[int] = set()

        def drain(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                got.update(int(m.value()) for m in consumer.consume(200, 0.1) if not m.error())

        t = threading.Thread(target=produce)
        t.start()
        t0 = time.monotonic()
        kills = [float(x) for x in a.kills.split(",") if x]
        while time.monotonic() - t0 < a.seconds:
            drain(0.1)
            if kills and time.monotonic() - t0 > kills[0]:
                kills.pop(0)
                broker.kill()
                broker.wait()
                time.sleep(0.5)
                broker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop.set()
        t.join()
        drain(10)
        consumer.close()
        reader = Consumer({"bootstrap.servers": bootstrap, "group.id": "check", "auto.offset.reset": "earliest"})
        reader.assign([TopicPartition("t", p, 0) for p in range(4)])
        log: dict[int, int] = {}
        end = time.monotonic() + 8
        while time.monotonic() < end:
            for m in reader.consume(500, 0.3):
                if not m.error():
                    log[int(m.value())] = log.get(int(m.value()), 0) + 1
        reader.close()
        lost = sorted(set(acked) - set(log))
        print(f"producer: {'GuardedProducer' if a.guard else 'plain'}, broker kills: {a.kills}")
        print(f"acknowledged {len(acked)}, in the log {len(log)}, consumer got {len(got)}")
        print(f"acknowledged but in no partition: {len(lost)} {[(i, acked[i]) for i in lost[:10]]}")
        print(f"in the log but not consumed: {len(set(log) - got)}; written twice: {sum(n > 1 for n in log.values())}")
        if a.guard:
            print(f"records produced again by the guard: {producer.resent}")
    finally:
        broker.kill()
        seaweed.stop(s3)


if __name__ == "__main__":
    main()
