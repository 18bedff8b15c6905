"""What per-stream encryption (hark/keys.py) costs: CPU per audio second, sealed against plain.

Measures, on this machine, the Avro encode/decode of the records one stream second produces with
and without sealing, the archive's segment sealing, and a cold key lookup; then adds them up the
way the pipeline does them: ingest seals each audio chunk once and the three decoders each open
it; the archive seals each PCM segment (and the source bytes) once; each transcript record is
sealed by its pass and opened by results; each Result is sealed by results and opened by captions.

    python -m bench.sealing [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hark import serde
from hark.keys import Keyring, SealedStore
from hark.pcm import BYTES_PER_SECOND
from hark.records import AudioChunk, Result, Word, result_record
from hark.storage import FilesystemStore

CHUNK_MS = 200


def per_call(fn, seconds: float, repeats: int = 7) -> float:
    """Seconds of CPU per call of ``fn``: the lowest mean of ``repeats`` runs of ``seconds`` /
    ``repeats`` each (the other processes on 2 cores only ever add to a run)."""
    best = float("inf")
    for _ in range(repeats):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / repeats:
            for _ in range(20):
                fn()
            n += 20
        best = min(best, (time.process_time() - c0) / n)
    return best


def records() -> dict[str, AudioChunk | Result]:
    pcm = os.urandom(BYTES_PER_SECOND * CHUNK_MS // 1000)
    words: list[Word] = [
        Word(word=w, start_ms=i * 300, end_ms=i * 300 + 250, confidence=0.9, speaker="SPEAKER_00")
        for i, w in enumerate(
            ["it", "is", "a", "truth", "universally", "acknowledged", "that", "a", "single", "man", "in", "possession"]
        )
    ]
    return {
        "AudioChunk": AudioChunk(
            stream_id="bench-stream",
            tenant="acme",
            seq=7,
            offset_samples=16000,
            sample_rate=16000,
            pcm=pcm,
            published_at_ms=1,
        ),
        "Result": result_record(
            {
                "stream_id": "bench-stream",
                "tenant": "acme",
                "text": " ".join(str(w["word"]) for w in words),
                "start_ms": 0,
                "end_ms": 3600,
                "words": words,
                "nbest": [],
                "audio_published_at_ms": 1,
                "model_name": "faster-whisper",
                "model_version": "base.en",
            },
            "FINAL",
            "offline",
            3,
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="time spent on each measurement")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        master = os.urandom(32)
        keys = Keyring(FilesystemStore(Path(d) / "keys"), master)
        keys.create("bench-stream")
        out: dict[str, float] = {}
        for name, rec in records().items():
            plain = serde.encode(name, rec)
            body, header = plain[5:], bytes([serde.SEALED]) + plain[1:5]
            sealed = keys.seal("bench-stream", body, header)
            out[f"{name}_bytes"] = len(body)
            out[f"{name}_avro_encode_us"] = per_call(lambda n=name, r=rec: serde.encode(n, r), a.seconds) * 1e6
            out[f"{name}_seal_us"] = per_call(lambda b=body, h=header: keys.seal("bench-stream", b, h), a.seconds) * 1e6
            out[f"{name}_open_us"] = (
                per_call(lambda b=sealed, h=header: keys.open("bench-stream", b, h), a.seconds) * 1e6
            )
        store = SealedStore(FilesystemStore(Path(d) / "archive"), keys)
        segment = os.urandom(BYTES_PER_SECOND * 30)
        raw = FilesystemStore(Path(d) / "raw")
        out["segment_30s_put_plain_ms"] = per_call(lambda: raw.put("streams/x/pcm/0.s16le", segment), 1) * 1e3
        out["segment_30s_put_sealed_ms"] = per_call(lambda: store.put("streams/bench-stream/pcm/0", segment), 1) * 1e3
        fresh = Keyring(keys.store, master)

        def cold_lookup() -> None:
            fresh.forget("bench-stream")
            fresh.key("bench-stream")

        out["key_lookup_cold_us"] = per_call(cold_lookup, 1) * 1e6

    chunks = 1000 / CHUNK_MS
    audio_extra = chunks * (out["AudioChunk_seal_us"] + 3 * out["AudioChunk_open_us"])
    # PCM segments and the source bytes (about as large again for WAV; far less for compressed input)
    archive_extra = 2 * (out["segment_30s_put_sealed_ms"] - out["segment_30s_put_plain_ms"]) * 1e3 / 30
    # ~2 text records per audio second (finals, partials, speakers) are sealed by a pass and opened
    # by results, and as many Results are sealed by results and opened by captions
    text_extra = 2 * 2 * (out["Result_seal_us"] + out["Result_open_us"])
    total_us = audio_extra + archive_extra + text_extra
    report = {
        **{k: round(v, 2) for k, v in out.items()},
        "per_audio_second_us": {
            "audio_records": round(audio_extra, 1),
            "archive": round(archive_extra, 1),
            "transcripts_and_results": round(text_extra, 1),
            "total": round(total_us, 1),
        },
        "share_of_one_core_per_realtime_stream_pct": round(total_us / 1e6 * 100, 4),
    }
    print(json.dumps(report, indent=1))
    print(
        f"sealing costs {total_us:.0f} us of CPU per audio second across the pipeline "
        f"({total_us / 1e4:.3f}% of one core per real-time stream)"
    )


if __name__ == "__main__":
    main()
