"""Audio in, 16 kHz mono s16le PCM out, in bounded blocks.

Every input goes through PyAV (libavformat/libavcodec + libswresample): WAV, FLAC, MP3,
Ogg/Opus and whatever else FFmpeg reads. The resampler is streaming, so a file of any length
or an endless live stream is converted with constant memory, and live raw PCM uses the same
resampler as files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from .pcm import BYTES_PER_SAMPLE
from .pcm import SAMPLE_RATE as TARGET_RATE

MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1000, 768000
MAX_CHANNELS = 64


class AudioError(ValueError):
    """Input that cannot become a stream. ``kind`` is a short machine-readable class."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class SourceInfo:
    format: str  # "container/codec", e.g. "ogg/opus"
    sample_rate: int
    channels: int


def _check_source(rate: int | None, channels: int | None) -> None:
    if not rate or not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioError(
            "bad_sample_rate", f"unsupported sample rate {rate} Hz (accepted {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE})"
        )
    if not channels or not 1 <= channels <= MAX_CHANNELS:
        raise AudioError("bad_channels", f"unsupported channel count {channels}")


def _frame_pcm(frame: av.AudioFrame) -> bytes:
    return frame.to_ndarray().tobytes()


class DecodedAudio:
    """An opened input: ``info`` is known at once, ``blocks()`` yields 16 kHz mono PCM."""

    def __init__(self, source: str | Path | BinaryIO, max_seconds: float):
        self.max_samples = int(max_seconds * TARGET_RATE)
        try:
            self._container = av.open(str(source) if isinstance(source, Path) else source, mode="r")
        except FileNotFoundError:
            raise AudioError("not_found", f"no such file: {source}") from None
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
            raise AudioError("undecodable", f"not a readable audio file ({_av_reason(e)})") from None
        audio = self._container.streams.audio
        if not audio:
            self._container.close()
            raise AudioError("no_audio_stream", "input has no audio stream")
        self._stream = audio[0]
        ctx = self._stream.codec_context
        if ctx is None:  # the container names a codec this build cannot decode
            self._container.close()
            raise AudioError("unsupported_codec", f"no decoder for the audio codec (in {self._container.format.name})")
        try:
            _check_source(ctx.sample_rate, ctx.channels)
        except AudioError:
            self._container.close()
            raise
        self.info = SourceInfo(f"{self._container.format.name}/{ctx.name}", ctx.sample_rate, ctx.channels)
        self.samples = 0

    def blocks(self) -> Iterator[bytes]:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=TARGET_RATE)
        try:
            for frame in self._container.decode(self._stream):
                if frame.format.name.startswith(("flt", "dbl")) and not np.isfinite(frame.to_ndarray()).all():
                    # the resampler would turn NaN/inf into full-scale clicks (or undefined values)
                    raise AudioError(
                        "non_finite",
                        f"float audio has NaN or infinite samples after {self.samples / TARGET_RATE:.2f} s",
                    )
                for out in resampler.resample(frame):
                    yield self._count(_frame_pcm(out))
            for out in resampler.resample(None):
                yield self._count(_frame_pcm(out))
        except av.error.FFmpegError as e:
            raise AudioError(
                "corrupt", f"audio data is corrupt after {self.samples / TARGET_RATE:.2f} s ({_av_reason(e)})"
            ) from None
        finally:
            self._container.close()
        if self.samples == 0:
            raise AudioError("empty", "input decodes to no audio samples")

    def _count(self, pcm: bytes) -> bytes:
        self.samples += len(pcm) // BYTES_PER_SAMPLE
        if self.samples > self.max_samples:
            raise AudioError("too_long", f"stream longer than the {self.max_samples / TARGET_RATE:.0f} s maximum")
        return pcm


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class PcmResampler:
    """Live raw PCM (s16le, interleaved, any rate/channels) to 16 kHz mono, incrementally.

    Channels are averaged here, not by the resampler: libav knows layouts for some channel
    counts only, and every count the endpoint accepts (1..MAX_CHANNELS) must work."""

    def __init__(self, sample_rate: int, channels: int = 1):
        _check_source(sample_rate, channels)
        self.rate, self.channels = sample_rate, channels
        self._frame_bytes = BYTES_PER_SAMPLE * channels
        self._residual = b""
        self._resampler = (
            None if sample_rate == TARGET_RATE else av.AudioResampler(format="s16", layout="mono", rate=TARGET_RATE)
        )

    def push(self, data: bytes) -> bytes:
        data = self._residual + data
        whole = len(data) - len(data) % self._frame_bytes
        data, self._residual = data[:whole], data[whole:]
        if not data:
            return b""
        arr = np.frombuffer(data, dtype="<i2")
        if self.channels > 1:
            arr = arr.reshape(-1, self.channels).mean(axis=1).round().astype("<i2")
        if self._resampler is None:
            return arr.tobytes()
        frame = av.AudioFrame.from_ndarray(arr.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        return b"".join(_frame_pcm(o) for o in self._resampler.resample(frame))

    def flush(self) -> bytes:
        if self._resampler is None:
            return b""
        return b"".join(_frame_pcm(o) for o in self._resampler.resample(None))


class Chunker:
    """Cuts a PCM byte stream into fixed-duration chunks; the last one may be shorter."""

    def __init__(self, chunk_ms: int):
        self.size = TARGET_RATE * chunk_ms // 1000 * BYTES_PER_SAMPLE
        self._buf = bytearray()

    def push(self, pcm: bytes) -> Iterator[bytes]:
        self._buf += pcm
        while len(self._buf) >= self.size:
            chunk = bytes(self._buf[: self.size])
            del self._buf[: self.size]
            yield chunk

    def flush(self) -> Iterator[bytes]:
        if self._buf:
            chunk = bytes(self._buf)
            self._buf.clear()
            yield chunk


def read_pcm_file(path: str | Path) -> np.ndarray:
    """Decode any file to 16 kHz mono int16 (tests, benchmarks, direct decoding)."""
    d = DecodedAudio(path, max_seconds=24 * 3600)
    return np.frombuffer(b"".join(d.blocks()), dtype="<i2")
