"""Does a window decode to the same text when it is decoded again? (What a restarted offline_asr
does with the windows it had not committed; the chaos tests compare the texts.)

The chaos tests' three recordings (real utterances joined with 0.75 s pauses) are cut into windows
as the service cuts them, decoded in order and then again in reverse order, `--repeats` times,
with the service's padding, once with beam search only (the service's decoding) and once with
faster-whisper's fallback to sampling. Prints how many re-decodes gave other text.

  python -m bench.redecode [--repeats 2]
"""

from __future__ import annotations

import argparse

import numpy as np

from hark.audio import read_pcm_file
from hark.config import Settings
from services.offline_asr.decoder import DETERMINISTIC, FALLBACK, WhisperDecoder
from services.offline_asr.windows import StreamWindows
from tests.test_chaos import RECORDINGS

from .decode_cost import SPEECH


def windows() -> list[np.ndarray]:
    pause = np.zeros(12000, dtype=np.int16)
    out = []
    for names in RECORDINGS.values():
        pcm = np.concatenate([p for n in names for p in (read_pcm_file(SPEECH / n), pause)]).tobytes()
        cutter = StreamWindows(0, 10000, 30000)
        out += [w.pcm for i in range(0, len(pcm), 6400) for w in cutter.push(pcm[i : i + 6400])]
        out += [w.pcm for w in cutter.flush()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    s, ws = Settings.load(), windows()
    for label, temperatures in (("beam search only", DETERMINISTIC), ("with the sampling fallback", FALLBACK)):
        dec = WhisperDecoder(
            s.offline_model, cpu_threads=2, encode_pad_s=s.offline_encode_pad_s, temperatures=temperatures
        )
        first = [dec.decode(w, 0).text for w in ws]
        differ = 0
        for _ in range(args.repeats):
            again = [dec.decode(w, 0).text for w in ws[::-1]][::-1]
            differ += sum(a != b for a, b in zip(first, again))
        print(
            f"{label}, {s.offline_encode_pad_s:g} s padding: {differ} of {args.repeats * len(ws)} re-decodes of "
            f"{len(ws)} windows gave other text",
            flush=True,
        )


if __name__ == "__main__":
    main()
