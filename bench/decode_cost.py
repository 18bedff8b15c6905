"""The online decoder's own CPU cost on this machine, without Kafka: the capacity ceiling.

Decodes every real-speech file of data/speech in-process, in 200 ms chunks, with the service's
settings (pocketsphinx, partials every 100 ms, 5-best, lattices), and prints CPU seconds per
audio second. A replica of online_asr is one process on one core, so it carries at most
1 / (this figure) real-time streams, less what Kafka and the other services take.

  python -m bench.decode_cost
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hark.audio import read_pcm_file
from hark.config import Settings
from services.online_asr.recognizer import DecoderPool, StreamRecognizer

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"


def main() -> None:
    s = Settings()
    pcm = np.concatenate([read_pcm_file(p) for p in sorted(SPEECH.glob("*.wav"))]).tobytes()
    pool = DecoderPool(1, s.online_max_hmm_per_frame)
    pool.prewarm(1)
    rec = StreamRecognizer(
        pool.acquire(),
        base_ms=0,
        partial_interval_ms=s.partial_interval_ms,
        nbest=s.nbest,
        keep_lattice=s.keep_lattices,
    )
    step = s.chunk_ms * 32  # bytes of 16 kHz s16le per chunk
    t0 = time.process_time()
    for i in range(0, len(pcm), step):
        rec.feed(pcm[i : i + step])
    rec.finish()
    cpu, audio = time.process_time() - t0, len(pcm) / 32000
    print(
        f"online decoder: {audio:.1f} s of real speech, {cpu:.2f} CPU-s: {cpu / audio:.3f} CPU-s per audio second, "
        f"at most {audio / cpu:.1f} real-time streams per core"
    )


if __name__ == "__main__":
    main()
