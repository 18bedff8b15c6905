"""`make load`: how many concurrent real-time streams one machine carries.

For each configuration (online only; online + offline + diarizer) the stack is started once and N
concurrent real-time streams run for ``--minutes`` each (real speech: the project's utterances
joined into one long recording; each stream starts at its own point of it and its chunks at its
own moment, as independent meetings would; ``--lockstep`` sends them all in step), with N stepping
up until a step fails. A step passes when the partial-caption latency p95 is <= 1 s and nothing is lost: every
stream completes, with status COMPLETE, a transcript, and no dead letters. It prints, per step,
the latency, the CPU (% of one core) and peak RSS of every service, and the largest N that passed.

  python -m bench.load                       # 10 minutes per step (the issue's definition)
  python -m bench.load --minutes 1 --online 8,12,16 --full 2,4,6
  HARK_CHUNK_MS=200 python -m bench.load --online 12 --full "" --online-replicas 4   # any HARK_* applies
  python -m bench.load --online 12 --full "" --minutes 60 --soak   # make soak
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hark import kafka

from .pipeline import OUT, SPEECH, latency_stats, long_stream_wav, phase, run_streams, start_stack, stop_stack

# One online_asr process decodes its streams one after another (~0.15 CPU-s per audio second each,
# pocketsphinx holds the GIL): a single replica saturates one core at ~6 streams, so the online-only
# configuration runs one replica per core.
CONFIGS = {"online": "online_asr={online_replicas},offline_asr=0,diarizer=0,captions=0", "full": ""}


def dead_letters(settings) -> int:
    c = kafka.tail_consumer(settings, settings.deadletter_topic, from_beginning=True)
    n, quiet = 0, 0
    try:
        while quiet < 5:
            msgs = [m for m in c.consume(500, 0.2) if not m.error()]
            n += len(msgs)
            quiet = 0 if msgs else quiet + 1
    finally:
        c.close()
    return n


class StreamAudio:
    """The audio of a step's streams. Independent (the default): stream i starts its own way into
    the recording (a golden-ratio rotation, so every i keeps its file whatever the step's N) and
    its chunk clock is offset by i/N of a chunk, as separate meetings would be. Lockstep: every
    stream the same audio from the same start, all chunks at once: every stream speaks, pauses and
    ends its utterances together, the worst case for a decoder replica's queue."""

    def __init__(self, tmp: Path, minutes: float, lockstep: bool):
        self.tmp, self.minutes, self.lockstep = tmp, minutes, lockstep
        self.files = sorted(SPEECH.glob("*.wav"))
        self._made: dict[int, Path] = {}

    def wav(self, i: int) -> Path:
        i = 0 if self.lockstep else i
        if i not in self._made:
            self._made[i] = self.tmp / f"stream-{i}.wav"
            self.seconds = long_stream_wav(self._made[i], self.minutes, self.files, rotation=(i * 0.618034) % 1.0)
        return self._made[i]

    def streams(self, n: int, chunk_ms: int) -> tuple[list[str], float]:
        return [str(self.wav(i)) for i in range(n)], 0.0 if self.lockstep else chunk_ms / n


def step(settings, procs, sampler, ingest, audio: StreamAudio, n: int) -> dict:
    out: dict = {"streams": n}
    before = dead_letters(settings)
    files, stagger_ms = audio.streams(n, settings.chunk_ms)
    t0 = time.monotonic()
    with phase(procs, sampler, out):
        rows = run_streams(settings, ingest, files, realtime=True, stagger_ms=stagger_ms)
    # a broker whose cost grows with its log shows here first
    out["broker_cpu_pct_by_minute"] = sampler.cpu_pct_by_minute("broker", t0)
    out["rss_mb_by_minute"] = {name: sampler.rss_mb_by_minute(name, t0) for name in procs}
    out.update(latency_stats(rows))
    out["complete"] = sum(r["status"] == "COMPLETE" and bool(r["final_text"]) for r in rows)
    out["dead_letters"] = dead_letters(settings) - before
    out["passed"] = out["partial_p95_ms"] <= 1000 and out["complete"] == n and out["dead_letters"] == 0
    return out


def flat(series: list[float], window: int, tolerance: float) -> tuple[bool, float, float]:
    """The mean of the last ``window`` values at most ``tolerance`` (a fraction) above the first's.
    A fall passes: what the soak looks for is a cost that grows with the log or the hours (Tansu's
    CPU went 11 -> 46% of a core in 10 minutes); the first minutes hold the JVM's warm-up, which
    only ever makes the first window dearer."""
    first, last = series[:window], series[-window:]
    a, b = sum(first) / max(len(first), 1), sum(last) / max(len(last), 1)
    return (len(series) >= 2 * window and a > 0 and b - a <= tolerance * a), round(a, 1), round(b, 1)


def soak_verdict(s: dict, window: int = 10) -> dict:
    """`make soak`: broker CPU of the last 10 minutes no more than 20% above the first 10, partial
    p95 <= 1 s in every minute, and every process's RSS of the last 10 minutes no more than 10%
    above the first 10. ``broker_cpu_within_20pct`` also says whether the CPU stayed within 20%
    either way, the issue's literal reading, which a warm-up in the first window fails."""
    cpu_ok, cpu_first, cpu_last = flat(s["broker_cpu_pct_by_minute"], window, 0.20)
    p95 = s.get("partial_p95_ms_by_minute") or []
    rss = {
        name: flat(series, window, 0.10)
        for name, series in s["rss_mb_by_minute"].items()
        if not name.startswith("client")
    }
    return {
        "broker_cpu_first_last_pct": [cpu_first, cpu_last],
        "broker_cpu_flat": cpu_ok,
        "broker_cpu_within_20pct": cpu_ok and cpu_last >= 0.8 * cpu_first,
        "partial_p95_worst_minute_ms": max(p95) if p95 else None,
        "rss_first_last_mb": {n: [a, b] for n, (_, a, b) in rss.items()},
        "rss_flat": all(ok for ok, _, _ in rss.values()),
        "passed": cpu_ok and bool(p95) and max(p95) <= 1000 and all(ok for ok, _, _ in rss.values()),
    }


def run_config(name: str, replicas: str, counts: list[int], audio: StreamAudio, tmp: Path, soak: bool = False) -> dict:
    settings, procs, sampler, ingest = start_stack(tmp / name, f"load-{name}", replicas)
    steps, best = [], 0
    try:
        run_streams(settings, ingest, [str(SPEECH / "goforward.wav")], realtime=False)  # warm the pools
        for n in counts:
            print(f"[{name}] {n} concurrent real-time streams ...", flush=True)
            s = step(settings, procs, sampler, ingest, audio, n)
            steps.append(s)
            print(
                f"[{name}] {n} streams: partial p95 {s['partial_p95_ms']} ms, complete {s['complete']}/{n}, "
                f"dead letters {s['dead_letters']} -> {'pass' if s['passed'] else 'FAIL'}",
                flush=True,
            )
            for svc, x in s["services"].items():
                print(
                    f"    {svc:<48} cpu {x['cpu_pct_of_one_core']:6.1f}% of a core   peak RSS {x['peak_rss_mb']:7.1f} MB"
                )
            print(f"    broker CPU by minute (% of a core): {s['broker_cpu_pct_by_minute']}")
            print(f"    partial p95 by minute of the streams (ms): {s.get('partial_p95_ms_by_minute')}")
            print(
                f"    latency parts, mean (ms): {s.get('latency_parts_mean_ms')}; "
                f"slowest 5%: {s.get('latency_parts_slowest_5pct_mean_ms')}"
            )
            if soak:
                s["soak"] = soak_verdict(s)
                print(f"    soak: {json.dumps(s['soak'])}")
                s["passed"] = s["passed"] and s["soak"]["passed"]
            if not s["passed"]:
                break
            best = n
    finally:
        stop_stack(settings, sampler, ingest, f"load-{name}")
    return {"config": name, "replicas": replicas or "all services", "largest_passing": best, "steps": steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.load")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of every stream of a step")
    ap.add_argument("--online", default="8,12,16,20", help="stream counts for the online-only stack")
    ap.add_argument("--full", default="2,4,6", help="stream counts with online + offline + diarizer")
    ap.add_argument("--online-replicas", type=int, default=2, help="online_asr replicas of the online-only stack")
    ap.add_argument(
        "--soak",
        action="store_true",
        help="also require flat broker CPU and RSS over the step (make soak: 12 streams, 60 minutes)",
    )
    ap.add_argument(
        "--lockstep",
        action="store_true",
        help="every stream the same audio, chunks published at the same moment (worst case)",
    )
    a = ap.parse_args(argv)
    report = {
        "minutes": a.minutes,
        "streams": "lockstep" if a.lockstep else "independent",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory(prefix="hark-load-") as d:
        tmp = Path(d)
        audio = StreamAudio(tmp, a.minutes, a.lockstep)
        audio.wav(0)
        print(
            f"each stream: {audio.seconds / 60:.1f} minutes of real speech, published in real time, "
            f"{report['streams']}",
            flush=True,
        )
        for name, counts in (("online", a.online), ("full", a.full)):
            if counts:
                replicas = CONFIGS[name].format(online_replicas=a.online_replicas)
                report[name] = run_config(name, replicas, [int(x) for x in counts.split(",")], audio, tmp, a.soak)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("soak.json" if a.soak else "load.json")).write_text(json.dumps(report, indent=1))
    for name in ("online", "full"):
        if name in report:
            print(
                f"largest N with partial p95 <= 1 s and zero loss, {report[name]['replicas']}: "
                f"{report[name]['largest_passing']}"
            )
    print(f"report: {OUT / ('soak.json' if a.soak else 'load.json')}")


if __name__ == "__main__":
    main()
