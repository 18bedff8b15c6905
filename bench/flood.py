"""A live flood beside a live stream: what one tenant's flooding costs another's captions.

Against the embedded stack, another tenant ("listener") publishes a real 28.7 s reading in real
time, first alone, then beside N flooding connections of one tenant that send 1 MiB messages as
fast as ingest reads them for the listener's whole stream, reconnecting whenever ingest refuses
them (too_fast). Reports, for each run: the listener's first-partial latency (from its first audio
to its first partial), its finals' lag after the stream ended (to STREAM_COMPLETE), how often the
flood was refused, and why, and online_asr's peak RSS.

    python -m bench.flood [--flooders 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from hark import stack
from hark.audio import read_pcm_file
from hark.config import Settings
from hark.keys import Keyring
from tests.helpers import collect

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"


async def listener(url: str, sid: str, pcm: bytes, marks: dict) -> None:
    async with connect(f"{url}?stream_id={sid}&tenant=listener") as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        marks["start"] = time.time()
        for i in range(0, len(pcm), 6400):  # 200 ms messages in real time
            await ws.send(pcm[i : i + 6400])
            await asyncio.sleep(0.2)
        await ws.send(json.dumps({"type": "end"}))
        marks["end"] = time.time()
        assert json.loads(await ws.recv())["type"] == "done"


async def flooder(url: str, stop: asyncio.Event, tally: Counter) -> None:
    message = b"\x01\x00" * (512 * 1024)  # 1 MiB: 32.8 s of audio
    while not stop.is_set():
        try:
            async with connect(f"{url}?tenant=flooder", max_size=None) as ws:
                first = json.loads(await ws.recv())
                if first["type"] != "ready":
                    tally[first["error"]] += 1
                    await asyncio.sleep(0.1)
                    continue
                tally["connections"] += 1
                while not stop.is_set():
                    await ws.send(message)
        except ConnectionClosed as e:
            tally[e.rcvd.reason if e.rcvd else "closed"] += 1


def _flood_process(url: str, n: int, control) -> None:
    tally: Counter[str] = Counter()

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(flooder(url, stop, tally)) for _ in range(n)]
        await asyncio.to_thread(control.get)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    control.put(dict(tally))


def run(state: dict, settings: Settings, flooders: int, pcm: bytes) -> dict:
    online = next(psutil.Process(s["pid"]) for s in state["services"] if s["name"].startswith("online_asr"))
    peak = [online.memory_info().rss]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            peak.append(online.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    sid = f"flood-{flooders}-{time.time_ns()}"
    marks: dict[str, float] = {}
    tally: Counter[str] = Counter()

    floods = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(
        target=_flood_process, args=(state["ingest_url"], flooders, floods), daemon=True
    )
    if flooders:  # a process of its own: the flood must not take the listener's event loop
        proc.start()
        time.sleep(2)
    asyncio.run(listener(state["ingest_url"], sid, pcm, marks))
    if flooders:
        floods.put("stop")
        proc.join(30)
        tally.update(floods.get(timeout=30))
    recs = collect(
        settings,
        settings.results_topic,
        lambda rs: any(t == "Result" and r["stream_id"] == sid and r["kind"] == "STREAM_COMPLETE" for t, r in rs),
        timeout=900,
    )
    sampling.set()
    mine = [(r["kind"], r["emitted_at_ms"]) for t, r in recs if t == "Result" and r["stream_id"] == sid]
    first_partial = min((ms for k, ms in mine if k == "PARTIAL"), default=0)
    complete = next(ms for k, ms in mine if k == "STREAM_COMPLETE")
    return {
        "flooders": flooders,
        "first_partial_s": round(first_partial / 1000 - marks["start"], 2) if first_partial else None,
        "complete_after_end_s": round(complete / 1000 - marks["end"], 2),
        "flood_refusals": dict(tally),
        "online_asr_peak_rss_mb": round(max(peak) / 2**20),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flooders", type=int, default=4)
    a = p.parse_args(argv)
    pcm = read_pcm_file(SPEECH / "austen_passage.flac").tobytes()
    with tempfile.TemporaryDirectory(prefix="hark-bench-flood-") as tmp:
        settings = Settings.load(data_dir=Path(tmp))
        print("starting the embedded stack ...", flush=True)
        state = stack.launch(settings, name="bench-flood")
        settings = stack.client_settings(settings, state)
        try:
            Keyring.for_settings(settings)
            for n in (0, a.flooders):
                r = run(state, settings, n, pcm)
                print(json.dumps(r), flush=True)
        finally:
            stack.stop(stack.stack_dir(settings, "bench-flood"))


if __name__ == "__main__":
    main()
