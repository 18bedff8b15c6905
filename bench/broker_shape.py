"""The online-only stack's traffic on a bare embedded broker, minus the decoding (README "Load").

Which partition counts and batching waits keep Tansu's CPU down late in a long load step? A
10-minute `make load` step takes 12 minutes; this replays the same shape of traffic at a given
age in about a minute: 12 streams of 100 ms audio chunks (3.2 KB, each stream on its own clock,
placed round-robin on the audio partitions as ingest places them), and every 2nd chunk a 500-byte
partial result on the results topic from the replica that owns the stream's audio partition
(``direct_partials=0``: as before online_asr wrote partials there itself, a 400-byte partial on the
online topic and the results service's copy of it on the results topic). The history (``--ages``,
minutes) is written first at ``--speed`` times real time with every wait scaled down alike, so it
holds the same number of batches a real run of that age would; then the traffic runs live for ``--live`` seconds read by
the stack's consumers (two audio readers splitting the partitions, one reader of the three
transcript topics, one of the results topic), and the broker's CPU over the last 10 s is reported.

  python -m bench.broker_shape           # the defaults and 2 partitions with long batching waits, 0 and 9 minutes old
  python -m bench.broker_shape --ages 9 --cases "audio-only:partial_every=0;c200:chunk=200"

It measures the broker only. Decoding is left out, and with it what batching costs there: the
batched case needs a third of the defaults' broker CPU here, yet lost in the real stack (README
"Load"); the likely reason is that chunks arriving together are decoded one after another.

Case keys: partitions, transcript_partitions (0: as partitions), audio_linger, output_linger (ms),
chunk (ms), partial_every (chunks; 0: no partials), streams, fetch_wait (ms), direct_partials (0: via
the online topic and the results service).
"""
from __future__ import annotations

import argparse
import heapq
import threading
import time
import zlib

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition

from .broker_fetch_cost import Broker

DEFAULT_CASES = "defaults:;batched:partitions=2,audio_linger=100,output_linger=50"
BASE = {"partitions": 8, "transcript_partitions": 0, "audio_linger": 50, "output_linger": 5, "chunk": 100,
        "partial_every": 2, "streams": 12, "fetch_wait": 50, "direct_partials": 1}
TRANSCRIPT_TOPICS = ("online", "offline", "speakers", "results")


def parse_cases(text: str) -> list[tuple[str, dict]]:
    cases = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, kvs = part.partition(":")
        case = dict(BASE)
        for kv in filter(None, kvs.split(",")):
            k, _, v = kv.partition("=")
            if k not in BASE:
                raise SystemExit(f"unknown case key {k!r} (known: {', '.join(BASE)})")
            case[k] = int(v)
        cases.append((name, case))
    return cases


class Traffic:
    def __init__(self, case: dict, broker: Broker):
        self.case, self.bootstrap, self.broker_pid = case, broker.bootstrap, broker.proc.pid

    @staticmethod
    def topics(case: dict) -> dict[str, int]:
        tparts = case["transcript_partitions"] or case["partitions"]
        return {"audio": case["partitions"], **{t: tparts for t in TRANSCRIPT_TOPICS}}

    def _producer(self, linger_ms: float) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, "linger.ms": linger_ms,
                         "queue.buffering.max.messages": 1_000_000})

    def _reader(self, tps: list[tuple[str, int]], stop: threading.Event, hops: list[float]) -> threading.Thread:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"shape-{time.time_ns()}",
                      "fetch.wait.max.ms": self.case["fetch_wait"], "enable.auto.commit": False})
        c.assign([TopicPartition(t, p, c.get_watermark_offsets(TopicPartition(t, p))[1]) for t, p in tps])

        def read() -> None:
            while not stop.is_set():
                for m in c.consume(500, 0.05):
                    if not m.error() and m.topic() == "audio":
                        hops.append(time.time() - float(m.value()[:20]))
            c.close()
        t = threading.Thread(target=read, daemon=True)
        t.start()
        return t

    def run(self, seconds: float, speed: float, live: bool) -> dict:
        """The traffic for ``seconds`` of wall time at ``speed`` x real time (waits scaled alike)."""
        c = self.case
        parts, tparts = self.topics(c)["audio"], self.topics(c)["results"]
        ingest = self._producer(c["audio_linger"] / speed)
        replicas = [self._producer(c["output_linger"] / speed) for _ in range(2)]
        results = self._producer(c["output_linger"] / speed)
        chunk_s = c["chunk"] / 1000
        audio = b"x" * (32 * c["chunk"])
        events = [(i * chunk_s / c["streams"], 0, i, 0) for i in range(c["streams"])]  # (t, kind, stream, chunk)
        transcript_part = [zlib.crc32(f"stream-{i}".encode()) % tparts for i in range(c["streams"])]  # keyed: one per stream
        heapq.heapify(events)
        stop, hops, readers = threading.Event(), [], []
        if live:
            audio_parts = [("audio", p) for p in range(parts)]
            readers = [self._reader(audio_parts[r::2], stop, hops) for r in range(2)]
            readers.append(self._reader([(t, p) for t in TRANSCRIPT_TOPICS[:3] for p in range(tparts)], stop, hops))
            readers.append(self._reader([("results", p) for p in range(tparts)], stop, hops))
            time.sleep(3)
        broker = psutil.Process(self.broker_pid)
        t0, mark = time.time(), None
        while True:
            t, kind, i, k = heapq.heappop(events)
            if t / speed > seconds:
                break
            time.sleep(max(0.0, t0 + t / speed - time.time()))
            if mark is None and t / speed > seconds - 10:
                mark = (broker.cpu_times(), time.time())
            sid = f"stream-{i}"
            if kind == 0:
                ingest.produce("audio", key=sid, partition=i % parts, value=f"{time.time():20.6f}".encode() + audio)
                ingest.poll(0)
                heapq.heappush(events, (t + chunk_s, 0, i, k + 1))
                if c["partial_every"] and k % c["partial_every"] == 0:
                    heapq.heappush(events, (t + 0.03, 1, i, k))
            elif kind == 1:
                p = replicas[(i % parts) % 2]
                if c["direct_partials"]:
                    p.produce("results", key=sid, partition=transcript_part[i], value=b"r" * 500)
                else:
                    p.produce("online", key=sid, partition=transcript_part[i], value=b"p" * 400)
                    heapq.heappush(events, (t + 0.06, 2, i, k))
                p.poll(0)
            else:
                results.produce("results", key=sid, partition=transcript_part[i], value=b"r" * 500)
                results.poll(0)
        for p in (ingest, results, *replicas):
            p.flush()
        out = {}
        if live:
            (c0, m0), c1 = mark, broker.cpu_times()
            out["broker_cpu_pct"] = round(100 * ((c1.user + c1.system) - (c0.user + c0.system)) / (time.time() - m0), 1)
            stop.set()
            for r in readers:
                r.join()
            hops.sort()
            out["audio_hop_p50_ms"] = round(1000 * hops[len(hops) // 2]) if hops else None
            out["audio_hop_p95_ms"] = round(1000 * hops[int(0.95 * (len(hops) - 1))]) if hops else None
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.broker_shape")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="'name:key=value,...;name:...' (keys: %s)" % ", ".join(BASE))
    ap.add_argument("--ages", default="0,9", help="minutes of history before the live part")
    ap.add_argument("--speed", type=float, default=20.0, help="how much faster than real time the history is written")
    ap.add_argument("--live", type=float, default=12.0, help="seconds of live traffic (CPU: the last 10)")
    a = ap.parse_args(argv)
    print(f"{'case':<10} {'settings':<100} {'age':>4} {'broker CPU':>11} {'audio hop p50 / p95':>20}")
    for name, case in parse_cases(a.cases):
        for age in (float(x) for x in a.ages.split(",") if x):
            with Broker(case["partitions"], Traffic.topics(case)) as broker:
                traffic = Traffic(case, broker)
                traffic.run(age * 60 / a.speed, a.speed, live=False)
                r = traffic.run(a.live, 1.0, live=True)
            settings = ",".join(f"{k}={v}" for k, v in case.items())
            print(f"{name:<10} {settings:<100} {age:>4.0f} {r['broker_cpu_pct']:>10.1f}% "
                  f"{r['audio_hop_p50_ms']:>9} / {r['audio_hop_p95_ms']} ms", flush=True)


if __name__ == "__main__":
    main()
