"""A voice in a large, noisy room, made from clean recordings: a synthetic impulse response
(exponentially decaying noise after a direct path, with the given RT60) and a crowd's babble
(ten espeak-ng talkers in five languages, each in a hall of its own), mixed at a given SNR.
Deterministic for a seed."""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

from .tts import say

RATE = 16000
CROWD = [
    ("en-us", "the meeting starts at ten and ends before lunch"),
    ("en", "we are going to visit my grandparents tomorrow"),
    ("en-us", "I cannot find my car keys anywhere"),
    ("en", "the train is late again today"),
    ("en-us", "please take your seats now"),
    ("es", "la reunion empieza a las diez"),
    ("de", "morgen fahren wir nach berlin"),
    ("fr", "il fait beau aujourd'hui"),
    ("it", "non trovo le chiavi"),
    ("nl", "het regent al de hele week"),
]


def impulse_response(rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-energy room response: the direct path, then 2 ms later a tail falling 60 dB in rt60_s."""
    n = int(rt60_s * 1.2 * RATE)
    h = rng.normal(0, 1, n) * np.exp(-6.9 * np.arange(n) / RATE / rt60_s)
    h[: int(0.002 * RATE)] = 0
    h[0] = 0.5 * np.abs(h).max()
    return h / np.sqrt((h**2).sum())


def babble(samples: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(samples)
    for voice, sentence in CROWD:
        x = say(sentence, voice).astype(float)
        x = np.tile(x, samples // len(x) + 2)
        start = rng.integers(0, len(x) - samples)
        x = fftconvolve(x[start : start + samples], impulse_response(1.5, rng))[:samples]
        out += x / (np.sqrt((x**2).mean()) + 1e-9)
    return out


def in_a_hall(pcm: np.ndarray, seed: int, rt60_s: float = 1.2, snr_db: float = 10.0) -> np.ndarray:
    """``pcm`` (16 kHz mono int16) spoken in a reverberant hall over a crowd, peak at -6 dBFS."""
    rng = np.random.default_rng(seed)
    speech = fftconvolve(pcm.astype(float), impulse_response(rt60_s, rng))[: len(pcm) + RATE // 2]
    crowd = babble(len(speech), rng)
    mix = speech + crowd * np.sqrt((speech**2).mean() / (crowd**2).mean() / 10 ** (snr_db / 10))
    return (mix / np.abs(mix).max() * 0.5 * 32767).astype(np.int16)
