"""`make bench` (part 3): the diarizer on the project's conversations and the real 2-speaker sample.

For each recording, the stream is fed in 100 ms chunks as the service feeds it (torch on one
thread, as the service runs): DER (pyannote.metrics, 0.25 s collar, overlapped speech scored) of
the incremental turns and of the full pass, with and without the speaker-count hint; speakers
found; RTF; and the incremental label latency: how far behind the audio a turn's label is
published (position of each 100 ms of speech to the end of its block, plus that block's compute
time). Peak RSS of this process. Writes bench/out/diarization.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from hark import models
from services.diarizer.pipeline import Diarizer
from services.diarizer.scoring import der, read_rttm
from services.diarizer.stream import StreamDiarizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def recordings(folder: Path | None = None) -> list[tuple[str, Path, Path]]:
    conv = folder or ROOT / "data" / "conversations"
    out = [(p.stem, p, p.with_suffix(".rttm")) for p in sorted(conv.glob("*.flac"))]
    if folder:
        return out
    sample = models.package_dir("pyannote.audio") / "sample"
    return out + [("pyannote sample (real)", sample / "sample.wav", sample / "sample.rttm")]


def run(d: Diarizer, audio: Path | np.ndarray, one_voice_blocks: bool = True, **hints) -> dict:
    pcm = sf.read(audio, dtype="int16")[0] if isinstance(audio, Path) else audio
    sd = StreamDiarizer(d, **hints)
    sd.one_voice_blocks = one_voice_blocks
    inc, lat = [], []
    t0 = time.perf_counter()
    for i in range(0, len(pcm), 1600):
        before_ms, before_s = sd.emitted_ms, sd.compute_s
        turns = sd.push(pcm[i : i + 1600])
        if sd.emitted_ms > before_ms:
            compute_ms = 1000 * (sd.compute_s - before_s)
            for t in turns:  # every 100 ms of labelled speech: its distance to the block end, plus compute
                lat += [sd.emitted_ms - x + compute_ms for x in range(t.start_ms, t.end_ms, 100)]
        inc += turns
    inc += sd.flush()
    full = sd.full_turns()
    wall = time.perf_counter() - t0
    return {"inc": inc, "full": full, "rtf": wall / (len(pcm) / 16000), "latency_ms": lat, "audio_s": len(pcm) / 16000}


READER = [
    ["sense_and_sensibility_01_austen_64kb-0870.wav", "sense_and_sensibility_01_austen_64kb-0880.wav"],
    ["sense_and_sensibility_01_austen_64kb-0890.wav", "sense_and_sensibility_01_austen_64kb-0920.wav"],
]
ROOMS = [(1.2, 8), (1.0, 15), (0.8, 20)]  # RT60 s, SNR dB of the crowd


def halls(d: Diarizer) -> None:
    """One voice and the conversations in a reverberant hall over a crowd (tests/rooms.py), with
    the one-voice rule (a block whose window the segmentation hears one voice in is one speaker)
    and without: speakers found, and DER where there is a reference. The voice clips and rooms
    here are the ones the rule was made on; tests/test_diarizer.py checks it on others."""
    from hark.audio import read_pcm_file
    from tests.rooms import in_a_hall

    gap = np.zeros(4000, np.int16)
    for rule in (False, True):
        counts = []
        for names in READER:
            pcm = np.concatenate([np.concatenate([read_pcm_file(ROOT / "data" / "speech" / n), gap]) for n in names])
            for seed in (0, 1):
                for rt60, snr in ROOMS:
                    r = run(d, in_a_hall(pcm, seed, rt60, snr), one_voice_blocks=rule)
                    counts.append((len({t.speaker for t in r["inc"]}), len({t.speaker for t in r["full"]})))
        one = sum(full == 1 for _, full in counts)
        print(f"one-voice rule {'on ' if rule else 'off'}: one reader in a hall, (live, full) speakers {counts}: "
              f"full pass one speaker in {one}/{len(counts)}", flush=True)  # fmt: skip
        for name, audio, rttm in recordings():
            ref = read_rttm(rttm)
            r = run(d, in_a_hall(sf.read(audio, dtype="int16")[0], 0, 1.0, 15), one_voice_blocks=rule)
            inc, full = der(ref, r["inc"]), der(ref, r["full"])
            print(f"  {name:<24} in a hall: live DER {inc['der']:6.1%} ({inc['hyp_speakers']} spk), full "
                  f"{full['der']:6.1%} ({full['hyp_speakers']} spk), reference {len({t.speaker for t in ref})}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        help="score the conversations in this folder instead "
        "(e.g. the held-out set of data/conversations/make.py --held-out DIR)",
    )
    parser.add_argument("--hall", action="store_true", help="one voice and the conversations in a noisy hall")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = Diarizer()
    if args.hall:
        return halls(d)
    report = []
    for name, audio, rttm in recordings(args.dir):
        ref = read_rttm(rttm)
        n = len({t.speaker for t in ref})
        plain, hinted = run(d, audio), run(d, audio, num_speakers=n)
        row = {
            "recording": name,
            "audio_s": round(plain["audio_s"], 1),
            "ref_speakers": n,
            "incremental": der(ref, plain["inc"]),
            "full": der(ref, plain["full"]),
            "full_with_hint": der(ref, hinted["full"]),
            "rtf": round(plain["rtf"], 3),
            "label_latency_p50_ms": round(float(np.percentile(plain["latency_ms"], 50))),
            "label_latency_p95_ms": round(float(np.percentile(plain["latency_ms"], 95))),
        }
        report.append(row)
        print(
            f"{name:<24} {row['audio_s']:5.1f} s {n} spk | incremental DER {row['incremental']['der']:6.1%} "
            f"({row['incremental']['hyp_speakers']} spk) | full {row['full']['der']:6.1%} "
            f"({row['full']['hyp_speakers']} spk) | full+hint {row['full_with_hint']['der']:6.1%} | "
            f"RTF {row['rtf']:.3f} | label latency p50 {row['label_latency_p50_ms']} ms, "
            f"p95 {row['label_latency_p95_ms']} ms",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    correct = sum(r["full"]["hyp_speakers"] == r["ref_speakers"] for r in report)
    print(
        f"speaker count correct (full pass, no hint): {correct}/{len(report)}; peak RSS {peak:.0f} MB (1 torch thread)"
    )
    if args.dir:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "diarization.json").write_text(json.dumps({"recordings": report, "peak_rss_mb": round(peak)}, indent=1))


if __name__ == "__main__":
    main()
