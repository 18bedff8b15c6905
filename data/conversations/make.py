"""Synthetic multi-speaker conversations with exact reference turns, for the diarizer.

    python data/conversations/make.py      # needs Debian's flite and espeak-ng
    python data/conversations/make.py --held-out DIR   # 4 more, other voices and seed, not committed

Voices: flite slt, awb, rms, kal16 and espeak-ng en-us+f3. Each turn is a sentence spoken by
one voice, trimmed of its leading/trailing silence so the RTTM reference is exact; turns are
separated by 0.2-0.9 s gaps, some start before the previous one ends (overlap), and some
conversations get background noise. Output: NAME.flac (16 kHz mono) + NAME.rttm per conversation.
Seeded: the same files every run.
"""
from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from hark.audio import read_pcm_file  # noqa: E402

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
    "I would rather keep the thresholds in the configuration file.",
    "The customer asked whether speaker labels appear in the export.",
    "Yes, the captions page shows them as soon as they are known.",
    "Let me check the dashboard and come back to you in five minutes.",
    "We should write down why we chose this model over the other one.",
    "The weather was terrible on the way to the office this morning.",
    "Remember to archive the raw audio before replaying the stream.",
]

VOICES = {
    "slt": ["flite", "-voice", "slt"],
    "awb": ["flite", "-voice", "awb"],
    "rms": ["flite", "-voice", "rms"],
    "kal16": ["flite", "-voice", "kal16"],
    "f3": ["espeak-ng", "-v", "en-us+f3", "-s", "160"],
}

CONVERSATIONS = {  # name: (voices, turns, overlaps, noise SNR dB or None)
    "conv_2spk_clean": (["slt", "awb"], 14, 0, None),
    "conv_3spk_overlap": (["rms", "slt", "kal16"], 16, 3, 30),
    "conv_4spk_noisy": (["awb", "f3", "rms", "slt"], 20, 3, 20),
}


def speak(voice: str, text: str, tmp: Path) -> np.ndarray:
    wav = tmp / "t.wav"
    cmd = VOICES[voice]
    if cmd[0] == "flite":
        subprocess.run(cmd + ["-t", text, "-o", str(wav)], check=True)
    else:
        subprocess.run(cmd + ["-w", str(wav), text], check=True)
    pcm = read_pcm_file(wav).astype(np.float32)
    energy = np.convolve(np.abs(pcm), np.ones(160) / 160, mode="same")
    voiced = np.nonzero(energy > 0.02 * energy.max())[0]
    return pcm[voiced[0]:voiced[-1] + 1]


def make(name: str, voices: list[str], turns: int, overlaps: int, snr: float | None, rng: random.Random) -> None:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        order = [voices[i % len(voices)] for i in range(len(voices))]
        while len(order) < turns:
            order.append(rng.choice([v for v in voices if v != order[-1]]))
        overlap_at = set(rng.sample(range(1, turns), overlaps))
        pieces, refs, cursor = [], [], 0
        for i, voice in enumerate(order):
            clip = speak(voice, rng.choice(SENTENCES), tmp)
            if i in overlap_at:
                start = max(0, cursor - int(rng.uniform(0.4, 0.9) * 16000))
            else:
                start = cursor + int(rng.uniform(0.2, 0.9) * 16000)
            pieces.append((start, clip))
            refs.append((voices.index(voice), start, start + len(clip)))
            cursor = max(cursor, start + len(clip))
        audio = np.zeros(cursor + 8000, dtype=np.float32)
        for start, clip in pieces:
            audio[start:start + len(clip)] += clip
        if snr is not None:
            speech_power = np.mean(audio[audio != 0] ** 2)
            noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 1, len(audio))
            audio += noise * np.sqrt(speech_power / 10 ** (snr / 10))
        audio *= 0.9 * 32767 / np.abs(audio).max()
        sf.write(HERE / f"{name}.flac", audio.astype(np.int16), 16000, subtype="PCM_16")
        with open(HERE / f"{name}.rttm", "w") as f:
            for spk, s, e in sorted(refs, key=lambda r: r[1]):
                f.write(f"SPEAKER {name} 1 {s / 16000:.3f} {(e - s) / 16000:.3f} <NA> <NA> {voices[spk]} <NA> <NA>\n")
        print(f"{name}: {len(audio) / 16000:.1f} s, {len(voices)} speakers, {turns} turns, {overlaps} overlaps")


HELD_OUT = {  # never used to choose a threshold: a check that the defaults are not fitted to the above
    "h_2spk_noisy": (["kal16", "f3"], 14, 2, 20),
    "h_3spk": (["awb", "f3", "slt"], 18, 3, 30),
    "h_4spk_clean": (["rms", "kal16", "f3", "awb"], 20, 0, None),
    "h_5spk": (["slt", "awb", "rms", "kal16", "f3"], 24, 3, 25),
}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--held-out":  # make.py --held-out DIR
        HERE = Path(sys.argv[2])
        HERE.mkdir(parents=True, exist_ok=True)
        rng = random.Random(777)
        for name, spec in HELD_OUT.items():
            make(name, *spec, rng)
    else:
        rng = random.Random(20261121)
        for name, spec in CONVERSATIONS.items():
            make(name, *spec, rng)
