"""Does faust-streaming's exactly_once work against hark's Kafka broker? (docs/decisions/0003)

faust-streaming is no hark dependency: `make faust-probe` runs this in a virtual environment of its
own (.hark/faust-venv: faust-streaming 0.15.3, aiokafka 0.14.0, confluent-kafka 2.16.1), with
HARK_KAFKA_LIBS pointing at the Kafka jars `make setup` put in .venv/kafka/libs.

Starts a fresh embedded broker, writes 100 keyed records, runs a faust worker whose agent counts
records per key in a changelog-backed Table and sends each count to an output topic with
processing_guarantee="exactly_once", then reads the output and the changelog back with
read_committed and prints what it found.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from hark import broker, kafka
from hark.config import Settings

APP = textwrap.dedent("""
    import os, faust
    app = faust.App("probe", broker="kafka://" + os.environ["PROBE_BOOTSTRAP"], processing_guarantee="exactly_once",
                    store="memory://", topic_partitions=2, web_enabled=False)
    src = app.topic("probe-in", value_type=bytes, value_serializer="raw")
    out = app.topic("probe-out", value_type=bytes, value_serializer="raw")
    counts = app.Table("counts", default=int, partitions=2)

    @app.agent(src)
    async def count(stream):
        async for key, value in stream.items():
            counts[key] += 1
            await out.send(key=key, value=str(counts[key]).encode())
""")


def read_all(bootstrap: str, topic: str) -> tuple[int, list[tuple[int, int]]]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{time.time_ns()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    tps = [TopicPartition(topic, p, 0) for p in range(2)]
    c.assign(tps)
    n, quiet = 0, 0
    while quiet < 5:
        msgs = [m for m in c.consume(500, 0.5) if not m.error()]
        n += len(msgs)
        quiet = 0 if msgs else quiet + 1
    ends = [c.get_watermark_offsets(tp, timeout=10) for tp in tps]
    c.close()
    return n, ends


def main() -> None:
    import faust  # fails early, with the install hint above, where it is missing

    with tempfile.TemporaryDirectory() as tmp:
        node = broker.single_node(Path(tmp) / "kafka", partitions=2)
        node.format()
        proc = subprocess.Popen(node.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = None
        try:
            settings = Settings(bootstrap=node.bootstrap)
            kafka.wait_for_broker(settings, timeout=120)
            adm = kafka.admin(settings)  # kept: its futures fail once the client is collected
            for f in adm.create_topics([NewTopic(t, 2, 1) for t in ("probe-in", "probe-out")]).values():
                f.result()
            p = Producer({"bootstrap.servers": node.bootstrap})
            for i in range(100):
                p.produce("probe-in", key=f"k{i % 5}".encode(), value=b"x")
            p.flush()
            del p  # a client alive when the broker stops logs each retry to reach it
            (Path(tmp) / "probe_app.py").write_text(APP)
            worker = subprocess.Popen(
                [sys.executable, "-m", "faust", "-A", "probe_app", "worker", "-l", "warn"],
                cwd=tmp,
                env={**os.environ, "PROBE_BOOTSTRAP": node.bootstrap},
                stdout=subprocess.DEVNULL,
                stderr=open(Path(tmp) / "worker.log", "wb"),
            )
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and read_all(node.bootstrap, "probe-out")[0] < 100:
                time.sleep(2)
            import aiokafka

            n_out, ends_out = read_all(node.bootstrap, "probe-out")
            changelog = next(t for t in adm.list_topics(timeout=10).topics if t.endswith("changelog"))
            del adm
            n_log, ends_log = read_all(node.bootstrap, changelog)
            markers_out = sum(e[1] for e in ends_out) - n_out  # offsets taken by transaction markers
            markers_log = sum(e[1] for e in ends_log) - n_log
            print(
                f"faust-streaming {faust.__version__}, aiokafka {aiokafka.__version__}, Kafka {broker.KAFKA_VERSION}: "
                f"100 records in; read_committed: {n_out} output records ({markers_out} transaction markers), "
                f"{n_log} changelog records ({markers_log} transaction markers)"
            )
        except Exception:
            print((Path(tmp) / "worker.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
