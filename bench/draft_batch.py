"""Drafts of several streams decoded in one Whisper call, against one by one: CPU and WER.

    python -m bench.draft_batch [--json bench/out/draft_batch.json]

offline_asr drafts the windows still growing of every open stream (drafts.py); on 2 cores, one
decode per draft left no room for them above 2 streams. ``WhisperDecoder.decode_batch`` decodes
up to ``offline_draft_batch`` of them in one CTranslate2 call. Each batch size here decodes the
same windows, in groups of that size, and is scored on CPU seconds per audio second, wall time,
and WER (the batch pads each window's encoder input to the longest one's, so a text may change).

Each window of the sets below is cut at pauses, each stretch at least ``STRETCH_S`` long (3 s: a
sentence or two, the drafts' length when this was measured), and a case's stretches, joined, are
scored.
Beam widths: the service's 5, and 1 (greedy: far less search per token).
- **Dev set (chooses):** bench.encoder_pad's synthetic windows (six espeak-ng voices). The rule,
  fixed before any run: of the settings whose dev WER is within 0.5 points of one by one with
  beam 5, the one with the least CPU per audio second.
- **Held out (reported only):** the real recordings of data/speech and the LibriVox passage.

``--shape`` measures instead why windows are not batched: each real utterance of data/speech,
at one fixed encoder length, decoded beside silence and in batches of 3, 4 and 6; it counts the
utterances whose text, word times or word confidences differ from the first decode.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.encoder_pad import ALLOWED_WER_POINTS, SPEECH, Case, cut, dev_windows, held_out_windows
from hark.audio import read_pcm_file
from hark.config import Settings
from hark.wer import WerScore, score
from services.offline_asr.decoder import WhisperDecoder

STRETCH_S = 3.0

SIZES = (1, 2, 4)
BEAMS = (5, 1)


def run(dec: WhisperDecoder, cases: list[Case], size: int, beam: int) -> dict:
    flat = [(i, p) for i, (_, parts) in enumerate(cases) for p in parts]
    texts: list[list[str]] = [[] for _ in cases]
    cpu = wall = 0.0
    for at in range(0, len(flat), size):
        group = flat[at : at + size]
        dec.model.encoded.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        out = dec.decode_batch([p for _, p in group], [0] * len(group), beam_size=beam)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        for (i, _), d in zip(group, out):
            texts[i].append(d.text)
    total = WerScore(0, 0)
    for (ref, _), t in zip(cases, texts):
        total += score(ref, " ".join(t))
    audio = sum(len(p) for _, p in flat) / 16000
    return {
        "batch": size,
        "beam": beam,
        "wer": total.wer,
        "cpu_per_audio_s": cpu / audio,
        "wall_per_audio_s": wall / audio,
    }


def shape(dec: WhisperDecoder) -> None:
    """How a batch's shape changes what CTranslate2 gives one utterance, its input length fixed."""
    pcms = [read_pcm_file(p) for p in sorted(SPEECH.glob("*.wav"))]
    dec.frames = lambda samples, prompted: 1000  # type: ignore[method-assign]  # 10 s for every utterance

    def seen(d) -> tuple:
        return d.text, [(w["start_ms"], w["end_ms"], w["confidence"]) for w in d.words]

    alone = [seen(dec.decode_batch([p, np.zeros(16000, np.int16)], [0, 0])[0]) for p in pcms]
    for size in (3, 4, 6):
        got = [
            seen(d)
            for at in range(0, len(pcms), size)
            for d in dec.decode_batch(pcms[at : at + size], [0] * len(pcms[at : at + size]))
        ]
        texts = sum(a[0] != b[0] for a, b in zip(alone, got))
        other = sum(a != b for a, b in zip(alone, got))
        print(
            f"batches of {size}: {other} of {len(pcms)} utterances differ from beside silence ({texts} in their text)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--shape", action="store_true", help="only: does a batch's shape change an utterance's output")
    args = ap.parse_args()
    s = Settings()
    dec = WhisperDecoder(s.offline_model, cpu_threads=s.offline_cpu_threads, beam_size=s.offline_beam_size,
                         encode_pad_s=s.offline_encode_pad_s)  # fmt: skip
    if args.shape:
        return shape(dec)

    def stretches(cases: list[Case]) -> list[Case]:
        return [(ref, [w.pcm for p in parts for w in cut(p, STRETCH_S)]) for ref, parts in cases]

    sets = {"dev": stretches(dev_windows()), "held_out": stretches(held_out_windows(s.offline_min_window_s))}
    dec.decode(sets["dev"][0][1][0], 0)  # warm
    rows = []
    for size, beam in [(size, beam) for beam in BEAMS for size in SIZES]:
        for name, cases in sets.items():
            r = run(dec, cases, size, beam) | {"set": name}
            rows.append(r)
            print(
                f"batch {size} beam {beam} {name:8s}: WER {100 * r['wer']:.1f}%, {r['cpu_per_audio_s']:.3f} CPU-s and "
                f"{r['wall_per_audio_s']:.3f} s wall per audio second",
                flush=True,
            )
    dev = {(r["batch"], r["beam"]): r for r in rows if r["set"] == "dev"}
    ok = [k for k, r in dev.items() if r["wer"] <= dev[1, BEAMS[0]]["wer"] + ALLOWED_WER_POINTS / 100]
    chosen = min(ok, key=lambda k: dev[k]["cpu_per_audio_s"])
    print(
        f"chosen by the dev rule (within {ALLOWED_WER_POINTS} points of one by one, beam {BEAMS[0]}; least CPU): "
        f"batch {chosen[0]}, beam {chosen[1]}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": rows, "chosen": chosen, "stretches": {k: sum(len(p) for _, p in v) for k, v in sets.items()}},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
