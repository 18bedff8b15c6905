"""`make bench`: what the pipeline costs and how it performs, measured in one run.

Phases (one embedded stack with every service, started here):
  direct    online decoding of the real-speech set in this process, no Kafka (baseline CPU and WER)
  pipeline  the same set through ingest -> Kafka -> online_asr + offline_asr -> results, as fast as
            possible: online and offline WER side by side, CPU per service
  rt1/rt4   1 and 4 concurrent streams at real-time pace (offline pass running too): partial latency
  short/long real-time streams under 15 s and over 40 s: final result after the stream's end
  batch     the short files published at once (also --batch-only): done in what share of their audio
  soak      one long stream (default 20 min of real speech, published fast): RSS over time
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
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

from hark import stack
from hark.audio import read_pcm_file
from hark.caption_timeline import DELAYS_MS
from hark.config import Settings
from hark.wer import WerScore, load_references, score
from hark_cli.display import Display
from hark_cli.session import file_runs, follow
from services.ingest.core import Ingest
from services.online_asr.recognizer import MAX_HMM_PER_FRAME, DecoderPool, StreamRecognizer

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "data" / "speech"
OUT = ROOT / "bench" / "out"
REFERENCES = load_references(SPEECH / "references.tsv")


class Sampler:
    """Samples RSS and CPU time of every stack process (and this one) twice a second; tracks RSS
    peaks per phase."""

    def __init__(self, procs: dict[str, psutil.Process]):
        self.procs = procs
        self.peak: dict[str, int] = {}
        self.series: dict[str, list[tuple[float, int]]] = {n: [] for n in procs}
        self.cpu: dict[str, list[tuple[float, float]]] = {n: [] for n in procs}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            now = time.monotonic()
            for name, p in self.procs.items():
                try:
                    rss, cpu = p.memory_info().rss, p.cpu_times()
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss)
                self.series[name].append((now, rss))
                self.cpu[name].append((now, cpu.user + cpu.system))
            time.sleep(0.5)

    def cpu_pct_by_minute(self, name: str, since: float) -> list[float]:
        """One process's CPU (% of one core) in each whole minute after `since` (time.monotonic())."""
        samples = [(t, c) for t, c in self.cpu[name] if t >= since]
        out: list[float] = []
        if not samples:
            return out
        t0, c0 = samples[0]
        for t, c in samples[1:]:
            if t - t0 >= 60:
                out.append(round(100 * (c - c0) / (t - t0), 1))
                t0, c0 = t, c
        return out

    def rss_mb_by_minute(self, name: str, since: float) -> list[float]:
        """One process's peak RSS (MB) in each whole minute after `since`."""
        out: list[float] = []
        start, peak = since, 0
        for t, rss in self.series[name]:
            if t < since:
                continue
            if t - start >= 60:
                out.append(round(peak / 2**20, 1))
                start, peak = t, 0
            peak = max(peak, rss)
        return out

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
        into["services"][n] = {
            "cpu_s": round(cpu, 2),
            "cpu_pct_of_one_core": round(100 * cpu / wall, 1),
            "peak_rss_mb": round(sampler.peak.get(n, 0) / 2**20, 1),
        }


def direct_decode(
    files: list[Path], refs: dict[str, str], max_hmm_per_frame: int = MAX_HMM_PER_FRAME, **search_options
) -> dict:
    pool = DecoderPool(1, max_hmm_per_frame, **search_options)
    pool.prewarm(1)
    total, audio_s, hyps = WerScore(0, 0), 0.0, {}
    audio = {f: read_pcm_file(f).tobytes() for f in files}  # file decoding is not part of the comparison
    cpu0 = time.process_time()
    for f in files:
        pcm = audio[f]
        audio_s += len(pcm) / 32000
        d = pool.acquire()
        r = StreamRecognizer(d)
        events = []
        for i in range(0, len(pcm), 3200):
            events += r.feed(pcm[i : i + 3200])
        events += r.finish()
        pool.release(d)
        hyps[f.name] = " ".join(e.text for e in events if e.kind == "FINAL")
        total += score(refs[f.name], hyps[f.name])
    cpu = time.process_time() - cpu0
    return {
        "wer": round(total.wer, 4),
        "ref_words": total.ref_words,
        "audio_s": round(audio_s, 2),
        "cpu_s": round(cpu, 3),
        "rtf": round(cpu / audio_s, 4),
        "hypotheses": hyps,
    }


def run_streams(settings, ingest, files: list[str], realtime: bool, stagger_ms: float = 0.0) -> list[dict]:
    """Publish ``files`` as concurrent streams; stream i starts ``i * stagger_ms`` after the first."""
    runs = file_runs(ingest, files, realtime, settings)
    for i, r in enumerate(runs):
        r.start_delay_s = i * stagger_ms / 1000
    follow(settings, runs, Display(quiet=True), stall_timeout_s=120)
    return [
        r.summary()
        | {
            "_latencies": r.word_latency_ms,
            "_latency_parts": r.word_latency_parts,
            "_accurate": r.accurate_latency_ms(),
            "_settled": r.accurate_latency_ms(settled=True),
            "_first_text": r.first_text(),
            "_caption": r.caption_scores(),
            "_caption_human": r.caption_scores(ref) if (ref := REFERENCES.get(Path(r.source).name)) else None,
        }
        for r in runs
    ]


def latency_stats(rows: list[dict]) -> dict:
    lat = np.array([x for r in rows for x in r["_latencies"]])
    fac = [r["latency"]["final_after_close_ms"] for r in rows if r["latency"]["final_after_close_ms"] is not None]

    def after_close_p50(part: str) -> float | None:
        xs = [r["latency"][part] for r in rows if r["latency"].get(part) is not None]
        return round(float(np.median(xs)), 1) if xs else None

    accurate = np.array([x for r in rows for x in r.get("_accurate", [])])
    settled = np.array([x for r in rows for x in r.get("_settled", [])])
    return {
        # time to accurate text: audio published -> Whisper's first text covering each final word
        # (provisional or its window's); settled: its window's
        "accurate_p50_ms": round(float(np.percentile(accurate, 50)), 1) if accurate.size else None,
        "accurate_p95_ms": round(float(np.percentile(accurate, 95)), 1) if accurate.size else None,
        "settled_p50_ms": round(float(np.percentile(settled, 50)), 1) if settled.size else None,
        "settled_p95_ms": round(float(np.percentile(settled, 95)), 1) if settled.size else None,
        "words": int(lat.size),
        "partial_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "partial_p95_ms": round(float(np.percentile(lat, 95)), 1),
        "partial_max_ms": round(float(lat.max()), 1),
        "final_after_close_p50_ms": round(float(np.median(fac)), 1) if fac else None,
        "offline_after_close_p50_ms": after_close_p50("offline_after_close_ms"),
        "speakers_after_close_p50_ms": after_close_p50("speakers_after_close_ms"),
        **caption_stats(rows),
        **latency_breakdown(rows),
    }


def caption_stats(rows: list[dict]) -> dict:
    """What a viewer reads 1, 2 and 4 s after each word: caption WER over all streams, against the
    final transcript and against the human reference (hark/caption_timeline.py)."""
    out: dict = {}
    for key, name in (("_caption", "caption_wer"), ("_caption_human", "caption_wer_human")):
        scored = [r[key] for r in rows if r.get(key)]
        for d in DELAYS_MS:
            total = sum((x[d] for x in scored), WerScore(0, 0))
            out[f"{name}_{d // 1000}s"] = round(total.wer, 4) if total.ref_words else None
    return out


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def caption_line(x: dict) -> str:
    return "caption WER at +1/+2/+4 s: " + " / ".join(
        f"{pct(x.get(f'caption_wer_{d}s'))} vs final, {pct(x.get(f'caption_wer_human_{d}s'))} vs human"
        for d in (1, 2, 4)
    )


def latency_breakdown(rows: list[dict]) -> dict:
    """Where the partial latency goes (hark_cli/session.py word_latency_parts), for all words and for
    the slowest 5%, and its p95 per minute of the streams (does it grow as the log grows?)."""
    parts = np.array([p for r in rows for p in r.get("_latency_parts", [])], dtype=float).reshape(-1, 4)
    if not len(parts):
        return {}
    total = parts[:, 1:].sum(axis=1)
    slow = total >= np.percentile(total, 95)
    names = ("waiting_for_audio", "audio_to_results", "results_to_client")
    minute = (parts[:, 0] // 60000).astype(int)
    return {
        "latency_parts_mean_ms": {n: round(float(parts[:, i + 1].mean()), 1) for i, n in enumerate(names)},
        "latency_parts_slowest_5pct_mean_ms": {
            n: round(float(parts[slow, i + 1].mean()), 1) for i, n in enumerate(names)
        },
        "partial_p95_ms_by_minute": [
            round(float(np.percentile(total[minute == m], 95)), 1)
            for m in range(minute.max() + 1)
            if (minute == m).any()
        ],
    }


def long_stream_wav(path: Path, minutes: float, files: list[Path], rotation: float = 0.0) -> float:
    """Real speech tiled to `minutes` (at least once), 0.5 s pauses between files, as 16 kHz WAV;
    ``rotation`` (a fraction of one pass over the files) is where in that pass the stream starts."""
    import soundfile as sf

    gap = np.zeros(8000, dtype=np.int16)
    pieces = []
    for f in files:
        pieces += [read_pcm_file(f), gap]
    block = np.concatenate(pieces)
    block = np.roll(block, -int(rotation * len(block)))
    reps = max(1, int(np.ceil(minutes * 60 * 16000 / len(block))))
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16") as out:
        for _ in range(reps):
            out.write(block)
    return reps * len(block) / 16000


def start_stack(tmp: Path, name: str, replicas: str, **overrides):
    settings = Settings.load(data_dir=tmp, **overrides)
    print(f"starting the embedded stack {name} ({replicas or 'all services'}) in {tmp} ...", flush=True)
    state = stack.launch(settings, name=name, replicas=replicas)
    settings = stack.client_settings(settings, state)
    procs = {"broker": psutil.Process(state["broker"]["pid"])}
    # replicas get their own rows (one name per replica would keep only the last one's CPU)
    per_name = Counter(s["name"] for s in state["services"])
    procs.update(
        {
            (s["name"] if per_name[s["name"]] == 1 else f"{s['name']}#{s['replica']}"): psutil.Process(s["pid"])
            for s in state["services"]
        }
    )
    procs["client (hark run: publisher + results reader)"] = psutil.Process()
    return settings, procs, Sampler(procs), Ingest(settings)


def stop_stack(settings, sampler, ingest, name: str) -> None:
    sampler.close()
    ingest.producer.close()
    stack.stop(stack.stack_dir(settings, name))


def wer_of(rows, refs, field: str) -> WerScore:
    total = WerScore(0, 0)
    for r in rows:
        total += score(refs[Path(r["source"]).name], r[field])
    return total


def soak(settings, procs, sampler, ingest, tmp: Path, utterances, minutes: float) -> dict:
    """One long stream published fast; RSS of both decoders sampled through it."""
    wav = tmp / "soak.wav"
    seconds = long_stream_wav(wav, minutes, utterances)
    print(f"one {seconds / 60:.1f}-minute stream, published fast ...", flush=True)
    out: dict = {"audio_s": round(seconds, 1)}
    t0 = time.monotonic()
    with phase(procs, sampler, out):
        rows = run_streams(settings, ingest, [str(wav)], realtime=False)
    out.update({"status": rows[0]["status"], "final_source": rows[0]["final_source"], "words": len(rows[0]["words"])})
    for name in ("online_asr", "offline_asr", "diarizer"):
        rss = np.array([x for t, x in sampler.series[name] if t >= t0], dtype=float) / 2**20
        # Quarters of the stream: the median shows growth with stream length (a leak), the peak the
        # transient working memory of decoding a window. Growth compares the last quarter with the first.
        q = np.array_split(rss, 4)
        out[name] = {
            "median_mb_by_quarter": [round(float(np.median(x)), 1) for x in q],
            "peak_mb_by_quarter": [round(float(x.max()), 1) for x in q],
            "median_growth": round(float(np.median(q[3]) / np.median(q[0]) - 1), 4),
            "peak_growth": round(float(q[3].max() / q[0].max() - 1), 4),
            "rss_mb_series_2hz": [round(float(x), 1) for x in rss],
        }
    return out


def realtime(settings, procs, sampler, ingest, counts, passage: Path = SPEECH / "austen_passage.flac") -> dict:
    """Partial latency and CPU with n concurrent real-time streams of the passage (or another
    file: a choice is tuned on one file and reported on another), every service running."""
    out: dict = {}
    for i, n in enumerate(counts):
        key = f"realtime_{n}" if f"realtime_{n}" not in out else f"realtime_{n}_{i}"
        print(f"{n} concurrent real-time stream(s) of {passage.name}, offline pass running too ...", flush=True)
        out[key] = {}
        with phase(procs, sampler, out[key]):
            rows = run_streams(settings, ingest, [str(passage)] * n, realtime=True)
        audio = sum(r["duration_s"] for r in rows)
        out[key].update(latency_stats(rows))
        out[key]["all_complete"] = all(r["status"] == "COMPLETE" for r in rows)
        out[key]["online_asr_rtf"] = round(out[key]["services"]["online_asr"]["cpu_s"] / audio, 4)
        out[key]["diarizer_rtf"] = round(out[key]["services"]["diarizer"]["cpu_s"] / audio, 4)
        out[key]["audio_s"] = round(audio, 1)
        known = passage.name in REFERENCES
        out[key]["offline_wer"] = round(wer_of(rows, REFERENCES, "final_text").wer, 4) if known else None
        # before windows settle
        out[key]["first_text_wer"] = round(wer_of(rows, REFERENCES, "_first_text").wer, 4) if known else None
    return out


def realtime_only(a, tmp: Path) -> None:
    settings, procs, sampler, ingest = start_stack(tmp, "bench", "")
    try:
        run_streams(settings, ingest, [str(SPEECH / "goforward.wav")], realtime=False)  # warm the pools
        result = realtime(settings, procs, sampler, ingest, [a.concurrency] * a.repeats, Path(a.file))
    finally:
        stop_stack(settings, sampler, ingest, "bench")
    for key, x in result.items():
        print(
            f"{key}: partial latency p50 {x['partial_p50_ms']} ms, p95 {x['partial_p95_ms']} ms "
            f"(max {x['partial_max_ms']} ms); accurate text p50 {x['accurate_p50_ms']} ms, "
            f"p95 {x['accurate_p95_ms']} ms (settled p50 {x['settled_p50_ms']} ms, p95 {x['settled_p95_ms']} ms; "
            f"WER of the first text {pct(x['first_text_wer'])}); finals {x['final_after_close_p50_ms']} ms after close (p50; the last "
            f"offline text {x['offline_after_close_p50_ms']} ms, speakers {x['speakers_after_close_p50_ms']} ms); "
            f"offline WER {pct(x['offline_wer'])}; CPU % of one core: "
            + ", ".join(f"{n} {v['cpu_pct_of_one_core']:.0f}" for n, v in x["services"].items())
        )
        print(f"  {caption_line(x)}")


def batch(settings, procs, sampler, ingest, files: list[str]) -> tuple[dict, list[dict]]:
    """The files published at once, as fast as they read (``hark run --fast``), after one unmeasured
    pass (a running service's pools are warm): the phase's CPU and wall time, and the streams."""
    run_streams(settings, ingest, files, realtime=False)
    out: dict = {}
    with phase(procs, sampler, out):
        rows = run_streams(settings, ingest, files, realtime=False)
    return out, rows


def batch_figures(rows: list[dict], wall_s: float) -> dict:
    """How long until every stream was COMPLETE, against their audio (issue 23: at most half of it)."""
    audio_s = sum(r["duration_s"] for r in rows)
    return {
        "files": len(rows),
        "audio_s": round(audio_s, 2),
        "complete": sum(r["status"] == "COMPLETE" for r in rows),
        "wall_s": wall_s,
        "wall_vs_audio": round(wall_s / audio_s, 3),
    }


def batch_line(x: dict) -> str:
    return (
        f"batch of {x['files']} short files published at once: all {x['complete']} COMPLETE in {x['wall_s']} s "
        f"for {x['audio_s']} s of audio ({x['wall_vs_audio']:.0%} of it; target <= 50%)"
    )


def batch_only(tmp: Path, files: list[str]) -> None:
    settings, procs, sampler, ingest = start_stack(tmp, "bench", "")
    try:
        x, rows = batch(settings, procs, sampler, ingest, files)
        x |= batch_figures(rows, x["wall_s"])
    finally:
        stop_stack(settings, sampler, ingest, "bench")
    print(batch_line(x) + "; CPU % of one core: " + ", ".join(
        f"{n} {v['cpu_pct_of_one_core']:.0f}" for n, v in x["services"].items()
    ))  # fmt: skip


def soak_only(a, tmp: Path, utterances) -> None:
    settings, procs, sampler, ingest = start_stack(tmp, "bench", "")
    try:
        result = soak(settings, procs, sampler, ingest, tmp, utterances, a.long_minutes)
    finally:
        stop_stack(settings, sampler, ingest, "bench")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                k: ({kk: vv for kk, vv in v.items() if kk != "rss_mb_series_2hz"} if isinstance(v, dict) else v)
                for k, v in result.items()
            }
        )
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline")
    ap.add_argument("--long-minutes", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--soak-only", action="store_true", help="only the long-stream memory phase")
    ap.add_argument(
        "--realtime-only", action="store_true", help="only --concurrency real-time streams, --repeats times"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--file", default=str(SPEECH / "austen_passage.flac"), help="the real-time streams' audio (--realtime-only)"
    )
    ap.add_argument("--batch-only", action="store_true", help="only the short files published at once")
    a = ap.parse_args(argv)

    refs = REFERENCES
    utterances = [SPEECH / n for n in refs if n != "austen_passage.flac"]
    files = [str(f) for f in utterances]
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
        },
        "set": {"files": len(utterances), "source": "pocketsphinx 5.1.1 sdist test/data"},
    }
    tmp = Path(tempfile.mkdtemp(prefix="hark-bench-"))

    # 1. The online pipeline vs the same decoding without Kafka, on an online-only stack (with the
    #    offline pass beside it, both would compete for the same 2 cores and skew the comparison).
    if a.soak_only:
        return soak_only(a, tmp, utterances)
    if a.realtime_only:
        return realtime_only(a, tmp)
    if a.batch_only:
        return batch_only(tmp, files)
    # One decoder per file built at start: building one costs ~0.3 s CPU, a one-time cost that
    # depends on how many streams happen to overlap, not a per-record overhead of the pipeline.
    settings, procs, sampler, ingest = start_stack(
        tmp, "bench-online", "offline_asr=0,diarizer=0,captions=0", prewarm_decoders=len(files)
    )
    try:
        print("direct decoding (no Kafka) ...", flush=True)
        report["direct"] = direct_decode(utterances, refs)
        print(
            "online-only pipeline, as fast as possible (after one unmeasured pass: a running "
            "service's decoder pool is warm) ...",
            flush=True,
        )
        run_streams(settings, ingest, files, realtime=False)
        report["online_pipeline"] = {}
        with phase(procs, sampler, report["online_pipeline"]):
            rows = run_streams(settings, ingest, files, realtime=False)
        report["online_pipeline"]["wer"] = round(wer_of(rows, refs, "final_text").wer, 4)
        cpu = report["online_pipeline"]["services"]["online_asr"]["cpu_s"]
        report["overhead"] = {"online_asr_cpu_vs_direct": round(cpu / report["direct"]["cpu_s"] - 1, 4)}
    finally:
        stop_stack(settings, sampler, ingest, "bench-online")

    # 2. Everything else on the full stack.
    settings, procs, sampler, ingest = start_stack(tmp, "bench", "")
    try:
        print("full pipeline (online + offline), as fast as possible ...", flush=True)
        report["pipeline"], rows = batch(settings, procs, sampler, ingest, files)
        report["batch"] = batch_figures(rows, report["pipeline"]["wall_s"])
        online, offline = wer_of(rows, refs, "online_text"), wer_of(rows, refs, "final_text")
        report["pipeline"].update(
            {
                "online_wer": round(online.wer, 4),
                "offline_wer": round(offline.wer, 4),
                "offline_errors": offline.errors,
                "ref_words": offline.ref_words,
                "offline_vs_online": round(offline.wer / online.wer, 3) if online.wer else None,
                "all_complete": all(r["status"] == "COMPLETE" and r["final_source"] == "offline" for r in rows),
                "offline_cpu_per_audio_s": round(
                    report["pipeline"]["services"]["offline_asr"]["cpu_s"] / report["direct"]["audio_s"], 4
                ),
            }
        )
        passage = SPEECH / "austen_passage.flac"
        rows = run_streams(settings, ingest, [str(passage)], realtime=False)
        report["passage"] = {
            "online_wer": round(wer_of(rows, refs, "online_text").wer, 4),
            "offline_wer": round(wer_of(rows, refs, "final_text").wer, 4),
            "ref_words": wer_of(rows, refs, "final_text").ref_words,
        }

        report.update(realtime(settings, procs, sampler, ingest, (1, a.concurrency)))

        long_wav = tmp / "long.wav"  # > 40 s: the whole set joined, real utterances with pauses
        long_stream_wav(long_wav, 0, [passage, *utterances])
        for key, chosen in (
            (
                "short",
                [
                    SPEECH / "sense_and_sensibility_01_austen_64kb-0870.wav",
                    SPEECH / "sense_and_sensibility_01_austen_64kb-0920.wav",
                    SPEECH / "cards_005.wav",
                ],
            ),
            ("long", [long_wav]),
        ):
            print(f"final after close, {key} stream(s) at real-time pace ...", flush=True)
            rows = []
            for f in chosen:  # one at a time: the latency of one stream, not of a queue
                rows += run_streams(settings, ingest, [str(f)], realtime=True)
            report[key] = [
                {
                    "file": Path(r["source"]).name,
                    "duration_s": r["duration_s"],
                    "final_after_close_ms": r["latency"]["final_after_close_ms"],
                    "target_ms": round(2000 + 150 * r["duration_s"]),
                    "final_source": r["final_source"],
                }
                for r in rows
            ]

        if a.long_minutes > 0:
            report["soak"] = soak(settings, procs, sampler, ingest, tmp, utterances, a.long_minutes)
    finally:
        stop_stack(settings, sampler, ingest, "bench")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(report, indent=1))
    print_report(report)


def print_report(r: dict) -> None:
    m, p = r["machine"], r["pipeline"]
    print(f"\n== hark bench ({m['cpus']} cores, {m['memory_gb']} GB, Python {m['python']}) ==")
    print(
        f"real-speech set: {r['set']['files']} utterances, {r['direct']['ref_words']} words, "
        f"{r['direct']['audio_s']} s ({r['set']['source']})"
    )
    print(
        f"WER through the pipeline: online {p['online_wer']:.1%}, offline {p['offline_wer']:.1%} "
        f"({p['offline_errors']}/{p['ref_words']} words; offline/online {p['offline_vs_online']})"
    )
    pa = r["passage"]
    print(
        f"WER on the 28.7 s passage as one stream ({pa['ref_words']} words): online {pa['online_wer']:.1%}, "
        f"offline {pa['offline_wer']:.1%}"
    )
    print(f"offline_asr CPU per audio second {p['offline_cpu_per_audio_s']} (incl. n-best)")
    print(batch_line(r["batch"]))
    print(
        f"online-only stack: WER {r['online_pipeline']['wer']:.1%}; direct decoding WER {r['direct']['wer']:.1%}, "
        f"RTF {r['direct']['rtf']}; online_asr CPU vs direct {r['overhead']['online_asr_cpu_vs_direct']:+.1%}"
    )
    for key in [k for k in r if k.startswith("realtime_")]:
        x = r[key]
        print(
            f"{key.split('_')[1]} real-time stream(s): partial latency p50 {x['partial_p50_ms']} ms, "
            f"p95 {x['partial_p95_ms']} ms (max {x['partial_max_ms']} ms, {x['words']} words); "
            f"accurate text p50 {x.get('accurate_p50_ms')} ms, p95 {x.get('accurate_p95_ms')} ms (settled "
            f"{x.get('settled_p50_ms')} / {x.get('settled_p95_ms')} ms, first text WER {x.get('first_text_wer')}); "
            f"online_asr RTF {x['online_asr_rtf']}; diarizer CPU per audio second {x['diarizer_rtf']}; "
            f"complete {x['all_complete']}"
        )
        print(f"  {caption_line(x)}")
    for key in ("short", "long"):
        for x in r.get(key, []):
            print(
                f"final after close ({key}): {x['file']} {x['duration_s']:.1f} s -> {x['final_after_close_ms']} ms "
                f"(target {x['target_ms']} ms, from {x['final_source']})"
            )
    print("\nper service (phase: CPU % of one core, peak RSS MB):")
    phases = [k for k in r if k in ("online_pipeline", "pipeline", "soak") or k.startswith("realtime_")]
    print(f"{'':<48}" + "".join(f"{ph:>20}" for ph in phases))
    for n in r["pipeline"]["services"]:
        cells = [r[ph]["services"].get(n) for ph in phases]
        print(
            f"{n:<48}"
            + "".join(
                f"{c['cpu_pct_of_one_core']:>11.1f}% {c['peak_rss_mb']:>6.0f}MB" if c else f"{'-':>20}" for c in cells
            )
        )
    if "soak" in r:
        sk = r["soak"]
        print(
            f"\n{sk['audio_s'] / 60:.1f}-minute stream ({sk['status']}, final from {sk['final_source']}, "
            f"{sk['words']} words):"
        )
        for n in ("online_asr", "offline_asr", "diarizer"):
            x = sk[n]
            print(
                f"  {n} RSS by quarter of the stream: median {x['median_mb_by_quarter']} MB "
                f"({x['median_growth']:+.1%}), peak {x['peak_mb_by_quarter']} MB ({x['peak_growth']:+.1%})"
            )
    print(f"\nfull results: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
