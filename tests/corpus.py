"""The bad-input corpus: inputs a transcription service meets in the wild, made from real speech.

Each case names what must happen to it: refused with that error kind (an error to its producer
and a dead-letter record with the reason), or accepted as the audio it really is. Files:
``bad_inputs(speech)``; raw records for each topic: ``bad_records(settings)``.
``python -m tests.corpus OUT_DIR`` writes the file cases out, with a manifest.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import av
import numpy as np

from hark import records, serde
from hark.records import now_ms

ACCEPTED = "accepted"


@dataclass
class Case:
    name: str
    data: bytes
    expect: str  # an AudioError kind, or ACCEPTED
    why: str


def encode(pcm: np.ndarray, rate: int, container: str, codec: str, channels: int = 1) -> bytes:
    """Encode mono PCM (int16, or float32 in [-1, 1]) into a real file of that container/codec."""
    buf = io.BytesIO()
    layout = "mono" if channels == 1 else "stereo"
    fmt = "flt" if pcm.dtype == np.float32 else "s16"
    with av.open(buf, "w", format=container) as out:
        stream = cast(av.AudioStream, out.add_stream(codec, rate=rate, layout=layout))
        interleaved = np.repeat(pcm, channels)[None, :]
        frame = av.AudioFrame.from_ndarray(interleaved, format=fmt, layout=layout)
        frame.sample_rate = rate
        to_codec = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        for f in to_codec.resample(frame) + to_codec.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_header(rate: int, channels: int = 1, bits: int = 16, fmt_tag: int = 1, data_len: int = 0) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_len)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_len)
    )


def bad_inputs(speech: np.ndarray) -> list[Case]:
    """``speech``: a few seconds of real 16 kHz int16 speech."""
    wav = encode(speech, 16000, "wav", "pcm_s16le")
    flac = encode(speech, 16000, "flac", "flac")
    mp3 = encode(speech, 16000, "mp3", "libmp3lame")
    ogg = encode(speech, 16000, "ogg", "libopus")
    floats = speech.astype(np.float32) / 32768
    nan = floats.copy()
    nan[len(nan) // 2 : len(nan) // 2 + 100] = np.nan
    inf = floats.copy()
    inf[1000] = np.inf
    rng = np.random.RandomState(7)
    corrupt_mp3 = bytearray(mp3)
    corrupt_mp3[len(mp3) // 3 : len(mp3) // 3 + 4000] = rng.bytes(4000)
    return [
        Case("empty.wav", b"", "empty", "0 bytes"),
        Case("text.wav", b"this is not audio at all\n" * 40, "undecodable", "not audio, audio name"),
        Case("random.mp3", rng.bytes(20000), "undecodable", "random bytes"),
        Case("header-only.wav", wav[:44], "undecodable", "a WAV header and no samples"),
        Case("cut-header.wav", wav[:20], "undecodable", "truncated inside the header"),
        Case(
            "truncated.flac",
            flac[: len(flac) // 2],
            "corrupt",
            "truncated mid-frame: what decoded is published, then the stream ends with status ERROR",
        ),
        Case("truncated.wav", wav[: len(wav) // 3], ACCEPTED, "data shorter than the header says"),
        Case("corrupt-middle.mp3", bytes(corrupt_mp3), "corrupt", "garbage inside an MP3"),
        Case("flac-named.wav", flac, ACCEPTED, "a FLAC file named .wav: the content decides"),
        Case(
            "mp3-in-riff.wav",
            wav_header(16000, data_len=len(mp3))[:12] + mp3,
            "undecodable",
            "a RIFF header lying about MP3 bytes",
        ),
        Case(
            "unknown-codec.wav",
            wav_header(16000, fmt_tag=0x7777, data_len=32000) + bytes(32000),
            "unsupported_codec",
            "a WAV format tag no decoder knows",
        ),
        Case(
            "rate-1hz.wav",
            wav_header(1, data_len=32000) + speech[:16000].tobytes(),
            "bad_sample_rate",
            "sample rate 1 Hz",
        ),
        Case(
            "rate-4ghz.wav",
            wav_header(4_000_000_000, data_len=32000) + speech[:16000].tobytes(),
            "undecodable",
            "sample rate 4 GHz (the container refuses it)",
        ),
        Case(
            "channels-0.wav",
            wav_header(16000, channels=0, data_len=32000) + bytes(32000),
            "bad_channels",
            "zero channels",
        ),
        Case("nan.wav", encode(nan, 16000, "wav", "pcm_f32le"), "non_finite", "float WAV with NaN samples"),
        Case("inf.wav", encode(inf, 16000, "wav", "pcm_f32le"), "non_finite", "float WAV with +inf"),
        Case(
            "silence.wav",
            encode(np.zeros(16000 * 3, dtype=np.int16), 16000, "wav", "pcm_s16le"),
            ACCEPTED,
            "3 s of digital silence: a stream with no words",
        ),
        Case("speech.ogg", ogg, ACCEPTED, "Ogg/Opus (control: must pass)"),
    ]


def too_long(speech: np.ndarray, max_seconds: float) -> Case:
    reps = int(max_seconds * 16000 / len(speech)) + 2
    return Case(
        "too-long.flac",
        encode(np.tile(speech, reps), 16000, "flac", "flac"),
        "too_long",
        f"longer than the {max_seconds:g} s maximum",
    )


def too_large(max_bytes: int) -> Case:
    return Case(
        "too-large.wav",
        wav_header(16000, data_len=max_bytes) + bytes(max_bytes),
        "too_large",
        f"more than the {max_bytes}-byte upload maximum",
    )


def bad_records(settings, sid: str) -> list[tuple[str, bytes, str]]:
    """(topic, value, expected dead-letter error_type): malformed and unknown-version records for
    every topic a service consumes."""
    chunk = records.AudioChunk(
        stream_id=sid,
        tenant="t",
        seq=1,
        offset_samples=0,
        sample_rate=16000,
        pcm=b"\x00\x00" * 1600,
        published_at_ms=now_ms(),
    )
    good = serde.encode("AudioChunk", chunk)
    unknown_version = good[:1] + struct.pack(">I", 999_999) + good[5:]  # a schema id nobody registered
    out = []
    for topic in (
        settings.audio_topic,
        settings.online_topic,
        settings.offline_topic,
        settings.speakers_topic,
        settings.results_topic,
    ):
        out += [
            (topic, b"\x00\x00\x00\x00\x07garbage", "malformed_record"),
            (topic, b"\x01not even the magic byte", "malformed_record"),
            (topic, unknown_version, "malformed_record"),
            (topic, good[:12], "malformed_record"),
        ]  # truncated Avro body
    out += [
        (settings.audio_topic, serde.encode("AudioChunk", {**chunk, "seq": 2, "pcm": b"\x01\x02\x03"}), "bad_pcm"),
        (settings.audio_topic, serde.encode("AudioChunk", {**chunk, "seq": 3, "sample_rate": 7}), "bad_sample_rate"),
        (
            settings.audio_topic,
            serde.encode("AudioChunk", {**chunk, "seq": 4, "pcm": bytes(400_000)}),
            "chunk_too_large",
        ),
    ]
    return out


def main(argv: list[str]) -> None:
    from hark.audio import read_pcm_file

    out = Path(argv[0] if argv else "bad-inputs")
    out.mkdir(parents=True, exist_ok=True)
    speech = read_pcm_file(Path(__file__).resolve().parent.parent / "data" / "speech" / "goforward.wav")
    cases = bad_inputs(speech) + [too_long(speech, 5.0), too_large(1 << 20)]
    for c in cases:
        (out / c.name).write_bytes(c.data)
    (out / "manifest.json").write_text(
        json.dumps([{"file": c.name, "expect": c.expect, "why": c.why} for c in cases], indent=1)
    )
    print(f"{len(cases)} cases in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
