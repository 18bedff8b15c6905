"""The decoders' own CPU cost on this machine, without Kafka: the capacity ceiling.

Decodes every real-speech file of data/speech in-process, in 200 ms chunks, with the service's
settings (pocketsphinx, partials every 100 ms, 5-best, lattices), and prints CPU seconds per
audio second. A replica of online_asr is one process on one core, so it carries at most
1 / (this figure) real-time streams, less what Kafka and the other services take.

The offline pass: every real-speech file as one window, decoded as the service decodes it
(Whisper, beam 5, word times), then its n-best, once as the service runs them (the n-best reuses
the decode's encoder output) and once with the encoding done again.

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


def offline(s: Settings, windows: list[np.ndarray]) -> None:
    from services.offline_asr.decoder import WhisperDecoder

    dec = WhisperDecoder(s.offline_model, cpu_threads=s.offline_cpu_threads, beam_size=s.offline_beam_size)
    audio = sum(len(w) for w in windows) / 16000
    dec.decode(windows[0], 0)  # warm
    for reuse in (True, False):
        t0 = time.process_time()
        for w in windows:
            dec.model.encoded.clear()
            dec.decode(w, 0)
            if not reuse:
                dec.model.encoded.clear()
            dec.nbest(w, s.offline_nbest)
        cpu = time.process_time() - t0
        print(
            f"offline decode + {s.offline_nbest}-best, encoding {'shared' if reuse else 'done twice'}: "
            f"{audio:.1f} s in {len(windows)} windows, {cpu:.2f} CPU-s: {cpu / audio:.3f} CPU-s per audio second"
        )


def main() -> None:
    s = Settings()
    files = [read_pcm_file(p) for p in sorted(SPEECH.glob("*.wav"))]
    pcm = np.concatenate(files).tobytes()
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
    offline(s, files)


if __name__ == "__main__":
    main()
