"""Decoding of every accepted format from real speech, resampling, chunking, bad input."""

import io

import av
import numpy as np
import pytest

from hark.audio import TARGET_RATE, AudioError, Chunker, DecodedAudio, PcmResampler, read_pcm_file

from .corpus import encode

SOURCE = "sense_and_sensibility_01_austen_64kb-0880.wav"


def resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    r = PcmResampler(TARGET_RATE, 1)
    assert r._resampler is None  # 16 kHz mono passes through untouched
    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
    frame.sample_rate = TARGET_RATE
    out = b"".join(
        f.to_ndarray().tobytes() for f in av.AudioResampler(format="s16", layout="mono", rate=rate).resample(frame)
    )
    return np.frombuffer(out, dtype="<i2")


@pytest.fixture(scope="module")
def speech(speech_dir):
    return read_pcm_file(speech_dir / SOURCE)


@pytest.mark.parametrize(
    "container, codec, rate, channels",
    [
        ("wav", "pcm_s16le", 16000, 1),
        ("wav", "pcm_s16le", 44100, 2),
        ("flac", "flac", 48000, 1),
        ("mp3", "libmp3lame", 44100, 2),
        ("ogg", "libopus", 48000, 1),
    ],
)
def test_formats_decode_to_16k_mono_of_the_right_length(speech, container, codec, rate, channels):
    src = speech if rate == TARGET_RATE else resample(speech, rate)
    data = encode(src, rate, container, codec, channels)
    decoded = DecodedAudio(io.BytesIO(data), max_seconds=60)
    assert decoded.info.sample_rate == rate and decoded.info.channels == channels
    assert decoded.info.format.startswith(container)
    out = np.frombuffer(b"".join(decoded.blocks()), dtype="<i2")
    # Codec padding/priming differs (MP3 adds ~50 ms); the speech must survive with its length.
    assert abs(len(out) - len(speech)) < 0.1 * TARGET_RATE
    assert np.abs(out.astype(float)).mean() > 0.3 * np.abs(speech.astype(float)).mean()


def test_lossless_round_trip_is_exact(speech):
    data = encode(speech, TARGET_RATE, "flac", "flac")
    out = np.frombuffer(b"".join(DecodedAudio(io.BytesIO(data), 60).blocks()), dtype="<i2")
    assert np.array_equal(out, speech)


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "undecodable"),
        (b"this is not audio at all" * 40, "undecodable"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "undecodable"),
    ],
)
def test_unreadable_input_is_refused_with_a_reason(data, kind):
    with pytest.raises(AudioError) as e:
        DecodedAudio(io.BytesIO(data), 60)
    assert e.value.kind == kind and e.value.reason


def test_truncated_file_decodes_what_is_there_or_fails_clearly(speech):
    data = encode(speech, TARGET_RATE, "flac", "flac")
    cut = data[: len(data) // 2]
    try:
        out = b"".join(DecodedAudio(io.BytesIO(cut), 60).blocks())
        assert 0 < len(out) // 2 < len(speech)
    except AudioError as e:
        assert e.kind in ("corrupt", "undecodable")


def test_stream_longer_than_the_maximum_is_refused(speech):
    data = encode(speech, TARGET_RATE, "wav", "pcm_s16le")
    with pytest.raises(AudioError) as e:
        b"".join(DecodedAudio(io.BytesIO(data), max_seconds=1.0).blocks())
    assert e.value.kind == "too_long"


def test_chunker_cuts_fixed_chunks_and_keeps_the_remainder():
    c = Chunker(100)
    chunks = list(c.push(b"\x00" * 5000)) + list(c.push(b"\x01" * 2000)) + list(c.flush())
    assert [len(x) for x in chunks] == [3200, 3200, 600]
    assert b"".join(chunks) == b"\x00" * 5000 + b"\x01" * 2000


def test_live_pcm_resampler_handles_odd_splits_and_stereo():
    rate, secs = 44100, 1.0
    t = np.arange(int(rate * secs)) / rate
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype("<i2")
    stereo = np.repeat(tone, 2).tobytes()
    r = PcmResampler(rate, 2)
    out = b"".join(r.push(stereo[i : i + 777]) for i in range(0, len(stereo), 777)) + r.flush()
    samples = np.frombuffer(out, dtype="<i2")
    assert abs(len(samples) - TARGET_RATE * secs) < 50
    spectrum = np.abs(np.fft.rfft(samples.astype(float)))
    assert abs(np.argmax(spectrum) * TARGET_RATE / len(samples) - 440) < 5


@pytest.mark.parametrize("rate, channels", [(0, 1), (10**7, 1), (16000, 0), (16000, 1000)])
def test_absurd_live_formats_are_refused(rate, channels):
    with pytest.raises(AudioError):
        PcmResampler(rate, channels)


def test_every_channel_count_the_endpoint_accepts_decodes_to_the_channels_average():
    from hark.audio import MAX_CHANNELS

    rate = 22050
    t = np.arange(rate // 2) / rate
    tone = (np.sin(2 * np.pi * 300 * t) * 8000).astype("<i2")
    for channels in range(1, MAX_CHANNELS + 1):
        # channel c carries the tone scaled by c / channels: their average is the tone x (channels + 1) / 2 / channels
        frames = np.stack(
            [(tone.astype(np.int32) * c // channels).astype("<i2") for c in range(1, channels + 1)], axis=1
        )
        r = PcmResampler(rate, channels)
        raw = frames.tobytes()
        out = np.frombuffer(b"".join(r.push(raw[i : i + 1001]) for i in range(0, len(raw), 1001)) + r.flush(), "<i2")
        assert abs(len(out) - TARGET_RATE // 2) < 50, channels
        expect = 8000 * (channels + 1) / 2 / channels
        assert abs(np.abs(out[100:-100]).max() - expect) < 0.05 * expect + 2, channels


def test_a_stream_declares_only_a_language_the_models_decode():
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    from hark.languages import WHISPER, check_language

    assert set(WHISPER) == set(_LANGUAGE_CODES)
    assert check_language("en-US") == "en-US" and check_language("yue") == "yue" and check_language("pt-BR")
    for bad in ("xx", "english", "", "en_US", "en-US\n", "EN"):
        with pytest.raises(ValueError):
            check_language(bad)
