"""Overload at the door: N live streams at once against the embedded stack, with ingest's
admission limit and without it.

Each connection publishes a real 2.7 s utterance plus 1 s of silence in real time. Reports how
many ingest accepted and refused (by reason) and how fast a refusal came, and the final status of
every accepted stream: with the limit matched to the decoders' (32), a stream is either refused
at the door or completes; without it, the decoders refuse the excess and those streams end
DEGRADED.

    python -m bench.admission [--streams 50] [--limits 32,0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

from hark import stack
from hark.audio import read_pcm_file
from hark.config import Settings
from hark.keys import Keyring
from tests.helpers import collect

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"


async def one(url: str, sid: str, pcm: bytes) -> dict:
    t0 = time.perf_counter()
    async with connect(f"{url}?stream_id={sid}") as ws:
        first = json.loads(await ws.recv())
        answered_ms = (time.perf_counter() - t0) * 1000
        if first["type"] != "ready":
            return {"sid": sid, "answer": first.get("error"), "ms": answered_ms}
        for i in range(0, len(pcm), 6400):
            await ws.send(pcm[i : i + 6400])
            await asyncio.sleep(0.2)
        await ws.send(json.dumps({"type": "end"}))
        last = json.loads(await ws.recv())
        return {"sid": sid, "answer": "accepted" if last["type"] == "done" else last.get("error"), "ms": answered_ms}


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else 0.0


def run(limit: int, streams: int) -> dict:
    pcm = read_pcm_file(SPEECH / "goforward.wav").tobytes() + b"\x00\x00" * 16000
    with tempfile.TemporaryDirectory(prefix="hark-bench-admission-") as tmp:
        settings = Settings.load(data_dir=Path(tmp), ingest_max_streams=limit)
        print(f"limit {limit or 'none'}: starting the embedded stack ...", flush=True)
        state = stack.launch(settings, name="bench-admission")
        settings = stack.client_settings(settings, state)
        try:
            Keyring.for_settings(settings)
            sids = [f"adm-{limit}-{i}-{time.time_ns()}" for i in range(streams)]

            async def all_at_once():
                return await asyncio.gather(*(one(state["ingest_url"], sid, pcm) for sid in sids))

            answers = asyncio.run(all_at_once())
            accepted = {a["sid"] for a in answers if a["answer"] == "accepted"}

            def done(recs):
                got = {r["stream_id"] for t, r in recs if t == "Result" and r["kind"] == "STREAM_COMPLETE"}
                return accepted <= got

            recs = collect(settings, settings.results_topic, done, timeout=900)
            statuses = Counter(
                r["status"].split(" (")[0]
                for t, r in recs
                if t == "Result" and r["kind"] == "STREAM_COMPLETE" and r["stream_id"] in accepted
            )
        finally:
            stack.stop(stack.stack_dir(settings, "bench-admission"))
    refused = [a for a in answers if a["answer"] != "accepted"]
    return {
        "ingest_max_streams": limit,
        "streams": streams,
        "accepted": len(accepted),
        "refused": dict(Counter(a["answer"] for a in refused)),
        "refusal_ms_p50": pct([a["ms"] for a in refused], 50),
        "refusal_ms_p95": pct([a["ms"] for a in refused], 95),
        "ready_ms_p95": pct([a["ms"] for a in answers if a["answer"] == "accepted"], 95),
        "final_status_of_accepted": dict(statuses),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--limits", default="32,0", help="ingest_max_streams values to run (0: no limit)")
    a = p.parse_args(argv)
    for limit in (int(x) for x in a.limits.split(",")):
        r = run(limit, a.streams)
        print(json.dumps(r, indent=1))
        print(
            f"{a.streams} streams at once, ingest limit {limit or 'none'}: {r['accepted']} accepted "
            f"({r['final_status_of_accepted']}), refused {r['refused']} in p95 {r['refusal_ms_p95']} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
