"""`make bench`: what the pipeline costs and how it performs, measured in one run.

Phases (one embedded stack, started here):
  direct    decode the real-speech set in this process, no Kafka (baseline CPU and WER)
  pipeline  the same set through ingest -> Tansu -> online_asr -> results, as fast as possible
  rt1/rt4   1 and 4 concurrent streams published at real-time pace: partial latency, RTF
  long      one long stream (default 20 min of real speech, published fast): online_asr RSS over time
Prints a report and writes bench/out/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

from hark import stack
from hark.audio import read_pcm_file
from hark.config import Settings
from hark.session import Display, file_runs, follow
from hark.wer import WerScore, load_references, score
from services.ingest.publisher import Ingest
from services.online_asr.recognizer import DecoderPool, StreamRecognizer

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "data" / "speech"
OUT = ROOT / "bench" / "out"


class Sampler:
    """Samples RSS of every stack process (and this one) twice a second; tracks peaks per phase."""

    def __init__(self, procs: dict[str, psutil.Process]):
        self.procs = procs
        self.peak: dict[str, int] = {}
        self.series: dict[str, list[tuple[float, int]]] = {n: [] for n in procs}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            now = time.monotonic()
            for name, p in self.procs.items():
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss)
                self.series[name].append((now, rss))
            time.sleep(0.5)

    def reset_peaks(self):
        self.peak = {}

    def close(self):
        self._stop.set()
        self._t.join()


@contextmanager
def phase(procs, sampler, into: dict):
    cpu0 = {n: p.cpu_times() for n, p in procs.items()}
    sampler.reset_peaks()
    t0 = time.monotonic()
    yield
    wall = time.monotonic() - t0
    into["wall_s"] = round(wall, 2)
    into["services"] = {}
    for n, p in procs.items():
        c1 = p.cpu_times()
        cpu = (c1.user + c1.system) - (cpu0[n].user + cpu0[n].system)
        into["services"][n] = {"cpu_s": round(cpu, 2), "cpu_pct_of_one_core": round(100 * cpu / wall, 1),
                               "peak_rss_mb": round(sampler.peak.get(n, 0) / 2 ** 20, 1)}


def direct_decode(files: list[Path], refs: dict[str, str]) -> dict:
    pool = DecoderPool(1)
    pool.prewarm(1)
    total, audio_s, hyps = WerScore(0, 0), 0.0, {}
    cpu0 = time.process_time()
    for f in files:
        pcm = read_pcm_file(f).tobytes()
        audio_s += len(pcm) / 32000
        d = pool.acquire()
        r = StreamRecognizer(d)
        events = []
        for i in range(0, len(pcm), 3200):
            events += r.feed(pcm[i:i + 3200])
        events += r.finish()
        pool.release(d)
        hyps[f.name] = " ".join(e.text for e in events if e.kind == "FINAL")
        total += score(refs[f.name], hyps[f.name])
    cpu = time.process_time() - cpu0
    return {"wer": round(total.wer, 4), "ref_words": total.ref_words, "audio_s": round(audio_s, 2),
            "cpu_s": round(cpu, 3), "rtf": round(cpu / audio_s, 4), "hypotheses": hyps}


def run_streams(settings, ingest, files: list[str], realtime: bool) -> list[dict]:
    runs = file_runs(ingest, files, realtime, settings)
    follow(settings, runs, Display(quiet=True), min_timeout_s=120)
    return [r.summary() | {"_latencies": r.word_latency_ms} for r in runs]


def latency_stats(rows: list[dict]) -> dict:
    lat = np.array([x for r in rows for x in r["_latencies"]])
    fac = [r["latency"]["final_after_close_ms"] for r in rows if r["latency"]["final_after_close_ms"] is not None]
    return {"words": int(lat.size), "partial_p50_ms": round(float(np.percentile(lat, 50)), 1),
            "partial_p95_ms": round(float(np.percentile(lat, 95)), 1),
            "partial_max_ms": round(float(lat.max()), 1),
            "final_after_close_p50_ms": round(float(np.median(fac)), 1) if fac else None}


def long_stream_wav(path: Path, minutes: float, files: list[Path]) -> float:
    """Real speech tiled to `minutes`, 0.5 s pauses between utterances, written as 16 kHz WAV."""
    import soundfile as sf

    gap = np.zeros(8000, dtype=np.int16)
    pieces = []
    for f in files:
        pieces += [read_pcm_file(f), gap]
    block = np.concatenate(pieces)
    reps = int(np.ceil(minutes * 60 * 16000 / len(block)))
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16") as out:
        for _ in range(reps):
            out.write(block)
    return reps * len(block) / 16000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline")
    ap.add_argument("--long-minutes", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args(argv)

    refs = load_references(SPEECH / "references.tsv")
    utterances = [SPEECH / n for n in refs if n != "austen_passage.flac"]
    report: dict = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                                "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
                                "python": platform.python_version()},
                    "set": {"files": len(utterances), "source": "pocketsphinx 5.1.1 sdist test/data"}}
    tmp = Path(tempfile.mkdtemp(prefix="hark-bench-"))
    settings = Settings.load(data_dir=tmp)
    print(f"starting the embedded stack in {tmp} ...", flush=True)
    state = stack.launch(settings, name="bench")
    settings.bootstrap = state["bootstrap"]
    procs = {"broker": psutil.Process(state["broker"]["pid"])}
    procs.update({f"{s['name']}": psutil.Process(s["pid"]) for s in state["services"]})
    procs["client (hark run: publisher + results reader)"] = psutil.Process()
    sampler = Sampler(procs)
    try:
        ingest = Ingest(settings)
        print("direct decoding (no Kafka) ...", flush=True)
        report["direct"] = direct_decode(utterances, refs)

        print("pipeline, as fast as possible (one unmeasured pass first: a running service's decoder "
              "pool is warm) ...", flush=True)
        run_streams(settings, ingest, [str(f) for f in utterances], realtime=False)
        report["pipeline"] = {}
        with phase(procs, sampler, report["pipeline"]):
            rows = run_streams(settings, ingest, [str(f) for f in utterances], realtime=False)
        total = WerScore(0, 0)
        for r in rows:
            total += score(refs[Path(r["source"]).name], r["final_text"])
        report["pipeline"]["wer"] = round(total.wer, 4)
        report["pipeline"]["all_complete"] = all(r["status"] == "COMPLETE" for r in rows)
        asr_cpu = report["pipeline"]["services"]["online_asr"]["cpu_s"]
        report["overhead"] = {
            "online_asr_cpu_vs_direct": round(asr_cpu / report["direct"]["cpu_s"] - 1, 4),
            "all_services_cpu_vs_direct": round(sum(v["cpu_s"] for k, v in report["pipeline"]["services"].items()
                                                    if not k.startswith("client")) / report["direct"]["cpu_s"] - 1, 4),
        }

        passage = str(SPEECH / "austen_passage.flac")
        for n in (1, a.concurrency):
            key = f"realtime_{n}"
            print(f"{n} concurrent real-time stream(s) of {passage} ...", flush=True)
            report[key] = {}
            with phase(procs, sampler, report[key]):
                rows = run_streams(settings, ingest, [passage] * n, realtime=True)
            audio = sum(r["duration_s"] for r in rows)
            report[key].update(latency_stats(rows))
            report[key]["all_complete"] = all(r["status"] == "COMPLETE" for r in rows)
            report[key]["online_asr_rtf"] = round(report[key]["services"]["online_asr"]["cpu_s"] / audio, 4)
            report[key]["audio_s"] = round(audio, 1)

        if a.long_minutes > 0:
            wav = tmp / "long.wav"
            seconds = long_stream_wav(wav, a.long_minutes, utterances)
            print(f"one {seconds / 60:.1f}-minute stream, published fast ...", flush=True)
            report["long"] = {"audio_s": round(seconds, 1)}
            t0 = time.monotonic()
            with phase(procs, sampler, report["long"]):
                rows = run_streams(settings, ingest, [str(wav)], realtime=False)
            series = [(t - t0, rss) for t, rss in sampler.series["online_asr"] if t >= t0]
            rss = np.array([x for _, x in series], dtype=float)
            # after warm-up (first 10% of the run) vs. everything later
            cut = max(1, len(rss) // 10)
            early, late_peak = float(np.median(rss[:cut])), float(rss[cut:].max())
            report["long"].update({
                "status": rows[0]["status"], "words": len(rows[0]["words"]),
                "online_asr_rss_mb_after_warmup": round(early / 2 ** 20, 1),
                "online_asr_rss_mb_peak_later": round(late_peak / 2 ** 20, 1),
                "online_asr_rss_growth": round(late_peak / early - 1, 4),
                "online_asr_rss_mb_samples": [round(x / 2 ** 20, 1) for x in rss[:: max(1, len(rss) // 20)]],
            })
    finally:
        sampler.close()
        stack.stop(stack.stack_dir(settings, "bench"))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(report, indent=1))
    print_report(report)


def print_report(r: dict) -> None:
    m = r["machine"]
    print(f"\n== hark bench ({m['cpus']} cores, {m['memory_gb']} GB, Python {m['python']}) ==")
    print(f"real-speech set: {r['set']['files']} utterances, {r['direct']['ref_words']} words, "
          f"{r['direct']['audio_s']} s ({r['set']['source']})")
    print(f"online WER   direct {r['direct']['wer']:.1%}   through the pipeline {r['pipeline']['wer']:.1%}")
    print(f"direct decoding: {r['direct']['cpu_s']} s CPU, RTF {r['direct']['rtf']}")
    o = r["overhead"]
    print(f"pipeline CPU overhead vs direct: online_asr {o['online_asr_cpu_vs_direct']:+.1%}; "
          f"all services incl. broker {o['all_services_cpu_vs_direct']:+.1%}")
    for key in [k for k in r if k.startswith("realtime_")]:
        x = r[key]
        print(f"{key.split('_')[1]} real-time stream(s): partial latency p50 {x['partial_p50_ms']} ms, "
              f"p95 {x['partial_p95_ms']} ms (max {x['partial_max_ms']} ms, {x['words']} words); "
              f"final after close p50 {x['final_after_close_p50_ms']} ms; online_asr RTF {x['online_asr_rtf']}; "
              f"complete {x['all_complete']}")
    print("\nper service (phase: CPU % of one core, peak RSS MB):")
    phases = [k for k in ("pipeline", "realtime_1", f"realtime_{max(int(k.split('_')[1]) for k in r if k.startswith('realtime_'))}", "long") if k in r]
    names = list(r["pipeline"]["services"])
    print(f"{'':<48}" + "".join(f"{p:>20}" for p in phases))
    for n in names:
        cells = "".join(f"{r[p]['services'][n]['cpu_pct_of_one_core']:>11.1f}% {r[p]['services'][n]['peak_rss_mb']:>6.0f}MB"
                        for p in phases)
        print(f"{n:<48}{cells}")
    if "long" in r:
        lg = r["long"]
        print(f"\nlong stream {lg['audio_s'] / 60:.1f} min ({lg['status']}, {lg['words']} words): online_asr RSS "
              f"{lg['online_asr_rss_mb_after_warmup']} MB after warm-up, peak later {lg['online_asr_rss_mb_peak_later']} MB "
              f"({lg['online_asr_rss_growth']:+.1%})")
    print(f"\nfull results: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
