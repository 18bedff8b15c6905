"""Named voices: how often an enrolled voice names the wrong speaker (false accept) or misses its
own (false reject), and the threshold chosen for ``HARK_VOICE_MATCH_THRESHOLD``.

    python -m bench.voices [--json bench/out/voices.json]

- **Chooses the threshold:** the committed flite conversations. Per conversation, slt, awb and
  rms are enrolled from their turns in the *other* conversations, and every speaker the full pass
  finds in it is tried against them. The threshold is the midpoint between the highest impostor
  and the lowest target score when they separate, else the score with the fewest errors, false
  accepts counted twice (naming the wrong person is worse than not naming).
- **Held out (reported at that threshold, never used to choose it):**
  - real speech: the LibriVox reader enrolled from three recordings and tried on two others
    (target); the cards, goforward and forever speakers and the two speakers of pyannote's real
    sample tried against every enrolled voice (impostors);
  - 14 espeak-ng en-us variants, each enrolled from six sentences and tested on four others, every
    voice against every test: a stress set, since the variants are one synthesizer with its pitch
    and formants shifted; also scored as the diarizer names, with all 14 enrolled at once.
Every score is the one the diarizer uses: the cosine similarity of a speaker's full-pass centroid
and the enrolled voiceprint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from hark import models
from hark.config import Settings
from hark.voices import VoiceError
from services.diarizer.matching import match
from services.diarizer.pipeline import Diarizer
from services.diarizer.scoring import read_rttm
from services.diarizer.voices import speakers_of, voiceprint
from tests.tts import say

ROOT = Path(__file__).resolve().parent.parent
# enrollment joins a recording's clusters this similar into one voiceprint: the configured value
ENROLL_T = Settings.load().voice_match_threshold
SPEECH, CONV = ROOT / "data" / "speech", ROOT / "data" / "conversations"
ESPEAK_VOICES = [f"en-us+{v}" for v in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f4", "f5")] + [
    "en-us+klatt",
    "en-us+klatt2",
    "en-us+croak",
]
ENROLL = [
    "The quarterly report is due on the first Monday of next month.",
    "Please remember to water the plants in the hallway before you leave.",
    "Our train was delayed by almost an hour because of the snow.",
    "She opened the window and listened to the birds in the garden.",
    "Nobody expected the small team to finish the project so early.",
    "A cup of strong coffee is the best way to start a long day.",
]
TEST = [
    "The library closes at eight o'clock on weekdays and at noon on Sundays.",
    "He carried the heavy boxes up the stairs without saying a word.",
    "We will need more chairs if everyone comes to the meeting.",
    "The museum has a new exhibition about ships and the sea.",
]


def pause(pcm: np.ndarray) -> np.ndarray:
    return np.concatenate([pcm, np.zeros(8000, np.int16)])


def sentences(voice: str, texts: list[str]) -> np.ndarray:
    return np.concatenate([pause(say(t, voice)) for t in texts])


def errors(target: list[float], impostor: list[float], t: float) -> tuple[float, float]:
    fa = sum(s >= t for s in impostor) / max(len(impostor), 1)
    fr = sum(s < t for s in target) / max(len(target), 1)
    return fa, fr


def choose(target: list[float], impostor: list[float]) -> float:
    if min(target) > max(impostor):
        return round((min(target) + max(impostor)) / 2, 3)
    grid = np.arange(0.30, 0.95, 0.005)
    cost = [2 * errors(target, impostor, t)[0] + errors(target, impostor, t)[1] for t in grid]
    return round(float(grid[int(np.argmin(cost))]), 3)


def read(path: Path) -> np.ndarray:
    pcm, sr = sf.read(path, dtype="int16")
    assert sr == 16000, path
    return pcm


def turns_of(pcm: np.ndarray, ref: list, who: str) -> np.ndarray:
    """A conversation's speech by ``who``, without the moments someone else speaks too."""
    parts = []
    for t in ref:
        if t.speaker != who:
            continue
        pieces = [(t.start_ms, t.end_ms)]
        for o in ref:
            if o.speaker == who:
                continue
            pieces = [q for s, e in pieces for q in ((s, min(e, o.start_ms)), (max(s, o.end_ms), e)) if q[1] - q[0] > 0]
        parts += [pause(pcm[s * 16 : e * 16]) for s, e in pieces if e - s >= 300]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def espeak_scores(diarizer) -> tuple[list[dict], dict[str, np.ndarray], dict[str, np.ndarray]]:
    prints, tests, refused = {}, {}, []
    for v in ESPEAK_VOICES:
        pcm = sentences(v, ENROLL)
        try:
            voiceprint(diarizer, [(v, pcm)], ENROLL_T)
        except VoiceError:  # what `hark speakers enroll` would say of this recording
            refused.append(v)
        prints[v] = voiceprint(diarizer, [(v, pcm)], ENROLL_T, one_voice=False)[0]
        tests[v] = sorted(speakers_of(diarizer, sentences(v, TEST))[0].values(), key=lambda s: -s[1])[0][0]
    print(f"espeak-ng enrollment refused as more than one voice: {len(refused)}/{len(ESPEAK_VOICES)} {refused}")
    rows = [
        {
            "set": "espeak",
            "stream": v,
            "speaker": v,
            "voice": u,
            "score": round(float(tests[v] @ p), 3),
            "target": u == v,
        }
        for v in ESPEAK_VOICES
        for u, p in prints.items()
    ]
    return rows, prints, tests


def other_scores(diarizer) -> list[dict]:
    convs = {p.stem: (read(p), read_rttm(p.with_suffix(".rttm"))) for p in sorted(CONV.glob("*.flac"))}
    rows: list[dict] = []

    def trial(score: float, is_target: bool, **what) -> None:
        rows.append({**what, "score": round(score, 3), "target": is_target})

    for name, (pcm, ref) in convs.items():
        voices = {t.speaker for t in ref}
        prints = {}
        for who in ("slt", "awb", "rms"):
            material = [
                (o, turns_of(p, r, who)) for o, (p, r) in convs.items() if o != name and who in {t.speaker for t in r}
            ]
            if material:
                prints[who] = voiceprint(
                    diarizer,
                    [(f"{who} elsewhere", np.concatenate([m for _, m in material]))],
                    ENROLL_T,
                    one_voice=False,
                )[0]
        final, turns = speakers_of(diarizer, pcm)
        for label, (vec, _ms) in final.items():
            overlap: dict[str, int] = {}
            for t in turns:
                if t.speaker != label:
                    continue
                for r in ref:
                    overlap[r.speaker] = overlap.get(r.speaker, 0) + max(
                        0, min(t.end_ms, r.end_ms) - max(t.start_ms, r.start_ms)
                    )
            truth = max(overlap, key=lambda who: overlap[who]) if overlap else None
            for who, p in prints.items():
                trial(float(vec @ p), truth == who, set="flite", stream=name, speaker=truth, voice=who)
        assert voices  # every conversation has its reference
    # real speech
    reader = voiceprint(
        diarizer,
        [(n, read(SPEECH / f"sense_and_sensibility_01_austen_64kb-{n}.wav")) for n in ("0870", "0880", "0890")],
        ENROLL_T,
        one_voice=False,
    )[0]
    enrolled = {"librivox": reader}
    tests = {
        "librivox": np.concatenate(
            [pause(read(SPEECH / f"sense_and_sensibility_01_austen_64kb-{n}.wav")) for n in ("0920", "0930")]
        ),
        "cards": np.concatenate([pause(read(SPEECH / f"cards_00{i}.wav")) for i in range(1, 6)]),
        "goforward": read(SPEECH / "goforward.wav"),
        "forever": read(SPEECH / "forever_input_2_16k.wav"),
    }
    sample = models.package_dir("pyannote.audio") / "sample"
    spk = read_rttm(sample / "sample.rttm")
    spcm = read(sample / "sample.wav")
    for who in sorted({t.speaker for t in spk}):
        alone = turns_of(spcm, spk, who)
        if len(alone) >= 32000:  # at least 2 s where only this speaker talks
            tests[f"pyannote-sample:{who}"] = alone
    for who in ("slt", "awb", "rms"):  # the flite voices from every conversation, as impostors for real speech
        enrolled[who] = voiceprint(
            diarizer,
            [(who, np.concatenate([turns_of(p, r, who) for p, r in convs.values() if who in {t.speaker for t in r}]))],
            ENROLL_T,
            one_voice=False,
        )[0]
    for test, pcm in tests.items():
        found = sorted(speakers_of(diarizer, pcm)[0].values(), key=lambda s: -s[1])
        if not found:
            continue
        for who, p in enrolled.items():
            trial(float(found[0][0] @ p), test == who, set="real", stream=test, speaker=test, voice=who)
    return rows


def report(rows: list[dict], name: str, t: float) -> None:
    st = [r["score"] for r in rows if r["set"] == name and r["target"]]
    si = [r["score"] for r in rows if r["set"] == name and not r["target"]]
    fa, fr = errors(st, si, t)
    print(
        f"  {name:6s} {len(st):3d} target, {len(si):3d} impostor trials at {t:.3f}: "
        f"false accept {fa:.1%} ({sum(s >= t for s in si)}/{len(si)}), "
        f"false reject {fr:.1%} ({sum(s < t for s in st)}/{len(st)}); "
        f"target min {min(st):.3f}, impostor max {max(si):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write every score here")
    a = ap.parse_args()
    torch.set_num_threads(2)
    diarizer = Diarizer()
    rows = other_scores(diarizer)
    flite = [r for r in rows if r["set"] == "flite"]
    t = choose([r["score"] for r in flite if r["target"]], [r["score"] for r in flite if not r["target"]])
    print(f"threshold chosen on the flite conversations: {t:.3f}")
    espeak, prints, tests = espeak_scores(diarizer)
    rows += espeak
    for name in ("flite", "real", "espeak"):
        report(rows, name, t)
    named = match(np.stack(list(tests.values())), list(prints.items()), t)
    right = sum(named.get(i) == v for i, v in enumerate(tests))
    wrong = sum(i in named and named[i] != v for i, v in enumerate(tests))
    print(
        f"  espeak with all {len(prints)} voices enrolled (as the diarizer names): "
        f"{right} named right, {wrong} named wrong, {len(tests) - right - wrong} unnamed"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"threshold": t, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
