"""Speech for tests that no recording here has: other languages, rare terms. espeak-ng (the
espeakng-loader wheel: the library and its voice data, no download at run time) through ctypes,
resampled to 16 kHz mono int16."""

from __future__ import annotations

import ctypes
import functools
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

_lock = threading.Lock()
_lib = None
_rate = 0
_buf: list[np.ndarray] = []
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@_CALLBACK
def _collect(wav, n, _events):
    if wav and n > 0:
        _buf.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0


def _init():
    global _lib, _rate
    if _lib is None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        _rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # synchronous
        if _rate <= 0:
            raise RuntimeError("espeak-ng did not initialise")
        lib.espeak_SetSynthCallback(_collect)
        _lib = lib
    return _lib


def _synth(text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
    """espeak-ng's samples at its own rate, in this process."""
    with _lock:
        lib = _init()
        _buf.clear()
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"no espeak-ng voice {voice!r}")
        lib.espeak_SetParameter(1, rate_wpm, 0)  # espeakRATE
        data = text.encode()
        lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0x1000 | 1, None, None)  # espeakCHARS_UTF8, SSML off
        lib.espeak_Synchronize()
        return (np.concatenate(_buf) if _buf else np.zeros(0, np.int16)), _rate


@functools.lru_cache(maxsize=64)
def _spoken(text: str, voice: str, rate_wpm: int) -> bytes:
    """The utterance synthesised by a fresh process: espeak-ng keeps state from one utterance to
    the next (the same sentence came out 61954, 61951 and 61803 samples long in one process, and
    Whisper's language probability for it moved from 0.59 to 0.93), so a clip is the same only
    when it is the first a process speaks."""
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [sys.executable, "-m", "tests.tts", voice, str(rate_wpm)],
        input=text.encode(),
        capture_output=True,
        cwd=root,
        timeout=120,
    )
    if child.returncode:
        raise ValueError(child.stderr.decode(errors="replace").strip().splitlines()[-1])
    return child.stdout


def say(text: str, voice: str = "en-us", rate_wpm: int = 160) -> np.ndarray:
    """``text`` spoken by espeak-ng's ``voice`` (es, de, fr, en-us...), 16 kHz mono int16; the
    same samples on every call."""
    raw = _spoken(text, voice, rate_wpm)
    rate = int.from_bytes(raw[:4], "little")
    x = np.frombuffer(raw[4:], np.int16).astype(np.float32)
    at = np.arange(0, len(x), rate / 16000)
    return np.interp(at, np.arange(len(x)), x).round().astype(np.int16)


def wav_bytes(pcm: np.ndarray, pause_s: float = 0.5) -> bytes:
    """``pcm`` and ``pause_s`` of silence after it, as a WAV file."""
    from .helpers import wav_bytes as wav

    return wav(np.concatenate([pcm, np.zeros(int(16000 * pause_s), np.int16)]))


if __name__ == "__main__":  # the child of _spoken: text on stdin, rate and samples on stdout
    pcm, native = _synth(sys.stdin.read(), sys.argv[1], int(sys.argv[2]))
    sys.stdout.buffer.write(native.to_bytes(4, "little") + pcm.tobytes())
