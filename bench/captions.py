"""`make bench` (part 2): the captions page's delay and search speed over 10 hours of transcripts.

  page    a real-time stream (the 28.7 s passage) followed by the captions page in headless
          Chromium: for every live caption event, the page's arrival time minus the Result's
          ``emitted_at_ms`` (set by the producer just before it produces the record, online_asr for
          partials and the results service for the rest, so this includes the hop onto the
          results topic)
  search  the real decoder output of the real-speech set (every Result record of one run:
          online finals with n-best, offline segments and n-best, final transcripts), copied
          under new stream ids until the index holds >= 10 hours of audio; then word, rare
          word, phrase, alternative-only and absent queries, each timed many times
Prints a report and writes bench/out/captions.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hark import kafka, serde, stack
from hark.config import Settings
from services.captions.index import TranscriptIndex
from services.ingest.core import Ingest

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "data" / "speech"
OUT = ROOT / "bench" / "out"


def pct(values, q) -> float:
    return round(float(np.percentile(np.array(values), q)), 2)


def page_delay(settings: Settings, state: dict, streams: int) -> dict:
    from playwright.sync_api import sync_playwright

    ingest = Ingest(settings)
    sids = [f"bench-page-{i}-{time.time_ns()}" for i in range(streams)]
    delays: list[int] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=["--no-sandbox", "--headless=new"]
        )
        pages = []
        for sid in sids:
            page = browser.new_page()
            page.goto(f"{state['captions_url']}streams/{sid}")
            pages.append(page)
        threads = [
            threading.Thread(
                target=ingest.publish_file,
                args=(SPEECH / "austen_passage.flac",),
                kwargs={"stream_id": sid, "realtime": True},
            )
            for sid in sids
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for page in pages:
            page.wait_for_selector("#status[data-complete='1']", timeout=120000)
            events = page.evaluate("window.harkEvents")
            delays += [e["received_ms"] - e["emitted_at_ms"] for e in events if not e["history"]]
        browser.close()
    return {
        "streams": streams,
        "events": len(delays),
        "p50_ms": pct(delays, 50),
        "p95_ms": pct(delays, 95),
        "max_ms": max(delays),
    }


def results_of_a_run(settings: Settings) -> list[dict]:
    """Every Result of the real-speech set decoded by the running stack."""
    ingest = Ingest(settings)
    files = sorted(SPEECH.glob("*.wav")) + [SPEECH / "austen_passage.flac"]
    sids = [ingest.publish_file(f).stream_id for f in files]
    pending, out = set(sids), []
    c = kafka.tail_consumer(settings, settings.results_topic, from_beginning=True)
    deadline = time.monotonic() + 300
    try:
        while pending and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error():
                    continue
                _t, r = serde.decode_message(m, ingest.keys)
                if r["stream_id"] in sids:
                    out.append(r)
                    if str(r["kind"]) == "STREAM_COMPLETE":
                        pending.discard(r["stream_id"])
        time.sleep(5)  # late offline n-best (ALTERNATIVES) records
        for m in c.consume(5000, 1.0):
            if not m.error():
                _t, r = serde.decode_message(m, ingest.keys)
                if r["stream_id"] in sids:
                    out.append(r)
    finally:
        c.close()
    if pending:
        raise TimeoutError(f"{len(pending)} streams did not complete")
    return out


def search_bench(records: list[dict], hours: float, tmp: Path, repeats: int) -> dict:
    audio_ms = sum(r["end_ms"] for r in records if str(r["kind"]) == "STREAM_COMPLETE")
    copies = int(np.ceil(hours * 3600_000 / audio_ms))
    idx = TranscriptIndex(tmp / "bench-index.sqlite")
    t0 = time.perf_counter()
    offset = 0
    for k in range(copies):
        batch: list[tuple[dict | str, str, int, int]] = [
            ({**r, "stream_id": f"{r['stream_id']}~{k}"}, "bench", 0, offset + i) for i, r in enumerate(records)
        ]
        offset += len(batch)
        idx.apply(batch)
    build_s = time.perf_counter() - t0
    rows = idx.db.execute("SELECT count(*), sum(source = '1best'), count(DISTINCT stream_id) FROM hyps").fetchone()
    best = idx.db.execute("SELECT norm FROM hyps WHERE source = '1best'").fetchall()
    alts = idx.db.execute("SELECT norm FROM hyps WHERE source = 'alternative' LIMIT 5000").fetchall()
    best_words = {w for r in best for w in r[0].split()}
    alt_only = sorted({w for r in alts for w in r[0].split()} - best_words, key=len, reverse=True)
    queries = {
        "frequent word": "the",
        "name": "dashwood",
        "phrase": "ill disposed young man",
        "alternative-only word": alt_only[0] if alt_only else "crudely",
        "absent word": "zyzzyva",
    }
    timings, hits = {}, {}
    for label, q in queries.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = idx.search(q, limit=20)
            times.append(1000 * (time.perf_counter() - t))
        timings[label] = {
            "query": q,
            "p50_ms": pct(times, 50),
            "p95_ms": pct(times, 95),
            "max_ms": round(max(times), 2),
        }
        hits[label] = len(result)
    all_times = [v["p95_ms"] for v in timings.values()]
    idx.close()
    size_mb = (tmp / "bench-index.sqlite").stat().st_size / 1e6
    return {
        "hours_indexed": round(copies * audio_ms / 3600_000, 2),
        "streams": rows[2],
        "rows": rows[0],
        "rows_1best": rows[1],
        "index_mb": round(size_mb, 1),
        "build_s": round(build_s, 1),
        "queries": timings,
        "hits": hits,
        "worst_p95_ms": max(all_times),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.captions")
    p.add_argument("--hours", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--page-streams", type=int, default=2)
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hark-bench-captions-") as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings.load(data_dir=tmp)
        print(f"starting the embedded stack in {tmp} ...", flush=True)
        state = stack.launch(settings, name="bench-captions")
        settings = stack.client_settings(settings, state)
        try:
            print(f"page: {a.page_streams} real-time streams followed in headless Chromium ...", flush=True)
            page = page_delay(settings, state, a.page_streams)
            print("search: decoding the real-speech set for its Result records ...", flush=True)
            records = results_of_a_run(settings)
        finally:
            stack.stop(stack.stack_dir(settings, "bench-captions"))
        print(f"search: indexing {len(records)} records x copies up to {a.hours} h ...", flush=True)
        search = search_bench(records, a.hours, tmp, a.repeats)
    report = {"page": page, "search": search, "machine": {"cpus": __import__("os").cpu_count()}}
    (OUT / "captions.json").write_text(json.dumps(report, indent=1))
    print(
        f"\ncaption delay, results topic -> page ({page['streams']} real-time streams, {page['events']} events): "
        f"p50 {page['p50_ms']} ms, p95 {page['p95_ms']} ms, max {page['max_ms']} ms   (target p95 <= 500 ms)"
    )
    s = search
    print(
        f"search index: {s['hours_indexed']} h of audio, {s['streams']} streams, {s['rows']} hypotheses "
        f"({s['rows_1best']} 1-best), {s['index_mb']} MB, built in {s['build_s']} s"
    )
    for label, t in s["queries"].items():
        print(
            f"  {label:<22} {t['query']!r:<26} p50 {t['p50_ms']:7.2f} ms  p95 {t['p95_ms']:7.2f} ms  "
            f"max {t['max_ms']:7.2f} ms  ({s['hits'][label]} hits)"
        )
    print(f"  worst p95 {s['worst_p95_ms']} ms   (target < 50 ms)")


if __name__ == "__main__":
    main()
