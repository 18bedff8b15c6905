"""What a changelog-backed table would write for the results merge (docs/decisions/0003).

A faust-streaming Table keeps one value per key and writes the whole value to its changelog topic
on every change. Keyed by stream, the value is the stream's merge state (``ResultsMerger``'s
``StreamTranscript``: every final and segment so far, with words, for the STREAM_COMPLETE
record). This feeds the merger one synthetic stream with the record shapes and rates of the real
passes (an online FINAL every 4 s with 10 words and a 5-best list, an offline SEGMENT every 20 s
with 50 words, diarizer turns every 6 s) and sums the size of the state after each record: the
bytes such a table would write, against the bytes of the input records themselves.

It also prints what the merger holds in memory for the stream (tracemalloc), per word kept, with
its parts in memory and with them on disk as the results service keeps them (``DiskParts``).

  python -m bench.merge_state --minutes 60
"""

from __future__ import annotations

import argparse
import copy
import pickle
import tempfile
import tracemalloc
from pathlib import Path

from services.results.merger import ResultsMerger
from services.results.parts import DiskParts


def words(n: int, start_ms: int, step_ms: int) -> list[dict]:
    return [
        {
            "word": f"word{i % 97}",
            "start_ms": start_ms + i * step_ms,
            "end_ms": start_ms + (i + 1) * step_ms - 40,
            "confidence": 0.8,
            "speaker": None,
        }
        for i in range(n)
    ]


def base(kind: str, **fields) -> dict:
    return {
        "stream_id": "s",
        "tenant": "default",
        "kind": kind,
        "audio_published_at_ms": 0,
        "emitted_at_ms": 0,
        "model_name": "m",
        "model_version": "1",
        "end_status": None,
        **fields,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0)
    a = ap.parse_args(argv)
    total_ms = int(a.minutes * 60_000)
    events = []
    for i, t in enumerate(range(0, total_ms, 4000)):
        w = words(10, t, 380)
        events.append(
            (
                t + 4000,
                "online",
                base(
                    "FINAL",
                    utterance_id=i,
                    text=" ".join(x["word"] for x in w),
                    start_ms=t,
                    end_ms=t + 3800,
                    words=w,
                    # five alternatives of about the utterance's length, each its own text
                    nbest=[
                        {"text": f"{' '.join(x['word'] for x in w[k:])} alt{k}", "score": -1.0 - k} for k in range(5)
                    ],
                    lattice_key=f"streams/s/lattices/{i:06d}.lat",
                    audio_seq=i,
                ),
            )
        )
    for i, t in enumerate(range(0, total_ms, 20000)):
        w = words(50, t, 390)
        events.append(
            (
                t + 24000,
                "offline",
                base(
                    "SEGMENT",
                    segment_index=i,
                    text=" ".join(x["word"] for x in w),
                    start_ms=t,
                    end_ms=t + 20000,
                    words=w,
                    nbest=[],
                    language="en",
                    decode_ms=1,
                    variant="primary",
                ),
            )
        )
    for t in range(0, total_ms, 6000):
        events.append(
            (
                t + 6000,
                "speakers",
                base(
                    "INCREMENTAL",
                    turns=[{"speaker": "SPEAKER_00", "start_ms": t, "end_ms": t + 5000}],
                    covered_until_ms=t + 6000,
                    num_speakers=1,
                    compute_ms=1,
                ),
            )
        )
    events.sort(key=lambda e: e[0])
    # with its parts in memory, the stream's state pickles whole: what a table value would hold
    merger = ResultsMerger(wait_for=("online", "offline", "diarizer"))
    handlers = {"online": merger.on_online, "offline": merger.on_offline, "speakers": merger.on_speakers}
    state_bytes = record_bytes = peak = 0
    for _, source, rec in events:
        handlers[source](copy.deepcopy(rec))
        size = len(pickle.dumps(merger.streams["s"], protocol=5))
        state_bytes += size
        peak = max(peak, size)
        record_bytes += len(pickle.dumps(rec, protocol=5))
    n_words = sum(p.words for p in merger.streams["s"].passes.values())
    with tempfile.TemporaryDirectory() as tmp:
        for where, m in (
            ("parts in memory", ResultsMerger(wait_for=("online", "offline", "diarizer"))),
            (
                "parts on disk (the service)",
                ResultsMerger(wait_for=("online", "offline", "diarizer"), parts=DiskParts(Path(tmp))),
            ),
        ):
            handlers = {"online": m.on_online, "offline": m.on_offline, "speakers": m.on_speakers}
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for _, source, rec in events:
                handlers[source](copy.deepcopy(rec))  # as read from Kafka: the merger's are its only references
            kept = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
            tracemalloc.stop()
            print(
                f"in memory, {where}: the merger keeps {kept / 1e6:.2f} MB for the open stream, "
                f"{kept / max(n_words, 1):.0f} bytes per word kept ({n_words} words of every pass, and its speaker turns)"
            )
    print(
        f"{a.minutes:g}-minute stream: {len(events)} input records, {record_bytes / 1e6:.1f} MB of input records; "
        f"a per-stream table value would write {state_bytes / 1e6:.1f} MB to its changelog "
        f"({state_bytes / max(record_bytes, 1):.0f}x), the last value {peak / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
