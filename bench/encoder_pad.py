"""How much padding Whisper's encoder needs after a window: the offline pass's cost against WER.

    python -m bench.encoder_pad [--json bench/out/encoder_pad.json]

faster-whisper pads every window to Whisper's 30 s before the encoder; CTranslate2 also takes a
shorter input, and the encoder's cost grows with its length. Each candidate padding decodes the
same windows as the offline pass does (beam 5, word times, then the 5-best list) and is scored
on WER and CPU time. Windows are decoded without a prompt: only those are trimmed
(``WhisperDecoder.frames``).

- **Chooses the padding (dev set):** synthetic windows: six espeak-ng English voices
  (tests/tts.py) reading everyday sentences, 1 to 6 sentences a window (about 2-25 s) with
  0.5 s pauses. The rule, fixed before any run: the smallest padding whose dev WER is at
  most the 30 s padding's + 0.5 points.
- **Held out (reported, never used to choose):** the real recordings in data/speech: each
  utterance as one window, and the LibriVox passage cut into windows as the service cuts it
  (``HARK_OFFLINE_MIN_WINDOW_S``).
Also printed: how far each word's start moves against the 30 s padding (median and p95 ms), since
word times drive the transcript page and accurate-text latency.

``--temperatures both`` decodes each padding also with faster-whisper's fallback to sampling
(which the service gave up: it makes a re-decoded window's text differ). The reference row is
then 30 s with the fallback, the decoding before, and the rule is the same: the smallest padding,
beam search only, within 0.5 points of it on the dev set.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from hark.audio import read_pcm_file
from hark.config import Settings
from hark.wer import WerScore, load_references, score
from services.offline_asr.decoder import DETERMINISTIC, FALLBACK, WhisperDecoder
from services.offline_asr.windows import StreamWindows
from tests.tts import say

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "data" / "speech"
CANDIDATES = [30.0, 1.0, 2.0, 4.0, 8.0]  # 30: Whisper's full input, today's
ALLOWED_WER_POINTS = 0.5
CHUNK = 6400  # 200 ms, as ingest sends audio
SENTENCES = [
    "Let us review the plan for the next release before lunch.",
    "I think the ingest service needs another look at its error messages.",
    "The offline pass fixed most of the mistakes from the live captions.",
    "Can you share the numbers from yesterday's benchmark run?",
    "We measured the latency on two cores with four streams at once.",
    "That sounds good, but the memory grew during the long stream.",
    "Please send me the report when the tests are green again.",
    "The broker restarted twice, and nothing was lost either time.",
    "Who is presenting the search results at the meeting tomorrow?",
    "The customer asked whether speaker labels appear in the export.",
    "The quarterly report is due on the first Monday of next month.",
    "Please remember to water the plants in the hallway before you leave.",
    "Our train was delayed by almost an hour because of the snow.",
    "She opened the window and listened to the birds in the garden.",
    "Nobody expected the small team to finish the project so early.",
    "A cup of strong coffee is the best way to start a long day.",
    "The library closes at eight o'clock on weekdays and at noon on Sundays.",
    "He carried the heavy boxes up the stairs without saying a word.",
]
VOICES = ["en-us", "en-us+m3", "en-us+f2", "en-us+klatt", "en-us+f4", "en-us+m7"]  # espeak-ng


Case = tuple[str, list[np.ndarray]]  # a reference and the windows whose texts, joined, are scored


def dev_windows() -> list[Case]:
    """Windows, seeded: the same set every run."""
    rng, out = random.Random(7), []
    pause = np.zeros(8000, np.int16)
    for voice in VOICES:
        for n in (1, 2, 3, 4, 6):
            texts = rng.sample(SENTENCES, n)
            pcm = np.concatenate([p for t in texts for p in (say(t, voice), pause)])
            out.append((" ".join(texts), [pcm]))
    return out


def held_out_windows(min_window_s: float) -> list[Case]:
    refs = load_references(SPEECH / "references.tsv")
    out: list[Case] = [(refs[n], [read_pcm_file(SPEECH / n)]) for n in refs if n != "austen_passage.flac"]
    windows = cut(read_pcm_file(SPEECH / "austen_passage.flac"), min_window_s)
    # the passage's reference is scored against its windows' texts joined
    return out + [(refs["austen_passage.flac"], [w.pcm for w in windows])]


def cut(pcm: np.ndarray, min_window_s: float) -> list:
    """``pcm`` cut into windows as offline_asr cuts a stream: fed in 200 ms chunks as ingest sends
    them (pushed whole, the cutter would see every pause at once)."""
    cutter, raw = StreamWindows(0, int(min_window_s * 1000)), pcm.tobytes()
    windows = [w for i in range(0, len(raw), CHUNK) for w in cutter.push(raw[i : i + CHUNK])]
    return windows + cutter.flush()


def run(dec: WhisperDecoder, cases: list[Case]) -> tuple[WerScore, float, list[list[int]]]:
    total, cpu, starts = WerScore(0, 0), 0.0, []
    for ref, parts in cases:
        texts: list[str] = []
        for p in parts:
            t0 = time.process_time()
            d = dec.decode(p, 0)
            dec.nbest(p, 5)
            cpu += time.process_time() - t0
            texts.append(d.text)
            starts.append([w["start_ms"] for w in d.words])
        total += score(ref, " ".join(texts))
    return total, cpu, starts


def shift_ms(base: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """Median and p95 |start difference| of words, over windows where both found as many words."""
    diffs = [abs(a - b) for x, y in zip(base, other) if len(x) == len(y) for a, b in zip(x, y)]
    return (float(np.median(diffs)), float(np.percentile(diffs, 95))) if diffs else (float("nan"),) * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--pads", default=",".join(f"{p:g}" for p in CANDIDATES), help="paddings, 30 first")
    ap.add_argument(
        "--temperatures",
        choices=("beam", "fallback", "both"),
        default="beam",
        help="beam search only (the service's), faster-whisper's sampling fallback, or each padding both ways",
    )
    args = ap.parse_args()
    pads = [float(p) for p in args.pads.split(",")]
    choices: dict[str, list[tuple[float, ...]]] = {
        "beam": [DETERMINISTIC],
        "fallback": [FALLBACK],
        "both": [FALLBACK, DETERMINISTIC],
    }
    temps = choices[args.temperatures]
    s = Settings.load()
    dev, held = dev_windows(), held_out_windows(s.offline_min_window_s)
    sets: list[tuple[str, list[Case]]] = [("dev", dev), ("held_out", held)]
    audio_s = {name: sum(len(p) for c in cases for p in c[1]) / 16000 for name, cases in sets}
    print(
        f"dev: {len(dev)} windows, {audio_s['dev']:.0f} s; held out: {len(held)} windows, {audio_s['held_out']:.0f} s"
    )
    rows = []
    for pad, temperatures in [(p, t) for p in pads for t in temps]:
        dec = WhisperDecoder(
            s.offline_model, cpu_threads=2, beam_size=s.offline_beam_size, encode_pad_s=pad, temperatures=temperatures
        )
        dec.decode(dev[0][1][0], 0)  # warm
        row: dict = {"pad_s": pad, "fallback": temperatures == FALLBACK}
        for name, ws in (("dev", dev), ("held_out", held)):
            wer, cpu, starts = run(dec, ws)
            row[name] = {"wer": round(wer.wer, 4), "errors": wer.errors, "words": wer.ref_words,
                         "cpu_per_audio_s": round(cpu / audio_s[name], 3), "starts": starts}  # fmt: skip
        rows.append(row)
        label = f"{pad:.1f} s" + (" fallback" if row["fallback"] else "")
        print(f"pad {label:>11}: dev WER {row['dev']['wer']:.1%} ({row['dev']['errors']}/{row['dev']['words']}), "
              f"CPU {row['dev']['cpu_per_audio_s']:.3f}/audio s | held out WER {row['held_out']['wer']:.1%} "
              f"({row['held_out']['errors']}/{row['held_out']['words']}), CPU {row['held_out']['cpu_per_audio_s']:.3f}",
              flush=True)  # fmt: skip
    base = rows[0]
    ok = [r for r in rows[1:] if not r["fallback"] and r["dev"]["wer"] <= base["dev"]["wer"] + ALLOWED_WER_POINTS / 100]
    chosen = min(ok, key=lambda r: r["pad_s"]) if ok else base
    print(f"chosen on the dev set: {chosen['pad_s']} s")
    for r in rows[1:]:
        for name in ("dev", "held_out"):
            r[name]["start_shift_ms"] = shift_ms(base[name]["starts"], r[name]["starts"])
        print(f"pad {r['pad_s']:.1f} s: word starts vs 30 s, median / p95 ms: dev {r['dev']['start_shift_ms']}, "
              f"held out {r['held_out']['start_shift_ms']}")  # fmt: skip
    for r in rows:
        for name in ("dev", "held_out"):
            del r[name]["starts"]
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "chosen_pad_s": chosen["pad_s"]}, indent=2))


if __name__ == "__main__":
    main()
