"""Diarization: the real pyannote + CAM++ models on synthetic conversations and the real 2-speaker sample."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hark import models
from hark.audio import read_pcm_file
from services.diarizer.pipeline import Diarizer, Turn
from services.diarizer.scoring import der, read_rttm
from services.diarizer.stream import StreamDiarizer, merge_turns

from .conftest import ROOT
from .helpers import collect, complete_record, completed

CONVERSATIONS = ROOT / "data" / "conversations"


def sample() -> tuple[Path, Path]:
    base = models.package_dir("pyannote.audio") / "sample"
    return base / "sample.wav", base / "sample.rttm"


@pytest.fixture(scope="module")
def diarizer() -> Iterator[Diarizer]:
    import torch

    # As the service runs it: with the test stack's services beside it, more threads than cores
    # make OpenMP spin and everything on the machine slow down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Diarizer()
    torch.set_num_threads(threads)


def run_stream(diarizer, audio: Path, **hints) -> tuple[list[Turn], list[Turn], StreamDiarizer]:
    pcm, sr = sf.read(audio, dtype="int16")
    assert sr == 16000
    sd = StreamDiarizer(diarizer, **hints)
    incremental = []
    for i in range(0, len(pcm), 1600):  # 100 ms chunks, as they arrive from the audio topic
        incremental += sd.push(pcm[i : i + 1600])
    incremental += sd.flush()
    return incremental, sd.full_turns(), sd


def test_two_speaker_conversation_incremental_and_full(diarizer):
    inc, full, _sd = run_stream(diarizer, CONVERSATIONS / "conv_2spk_clean.flac")
    ref = read_rttm(CONVERSATIONS / "conv_2spk_clean.rttm")
    for turns in (inc, full):
        score = der(ref, turns)
        assert score["der"] <= 0.10 and score["hyp_speakers"] == 2, score


def test_one_reader_stays_one_speaker_live_and_in_the_full_pass(diarizer, speech_dir):
    """The finding: a single-speaker real recording got a second speaker for a 1 s turn. The five
    LibriVox readings joined with pauses (28.7 s, one reader): one label live and in the full pass."""
    live, full, _sd = run_stream(diarizer, speech_dir / "austen_passage.flac")
    assert {t.speaker for t in live} == {t.speaker for t in full} == {"SPEAKER_00"}, (live, full)


def one_voice(spans: list[tuple[float, float]]) -> np.ndarray:
    """The real sample's stretches (seconds) where only one of its two speakers talks, joined."""
    pcm, _ = sf.read(sample()[0], dtype="int16")
    gap = np.zeros(4000, np.int16)
    return np.concatenate([np.concatenate([pcm[int(a * 16000) : int(b * 16000)], gap]) for a, b in spans])


@pytest.mark.parametrize(
    "voice, seed, rt60_s, snr_db",
    [
        ("reader", 21, 1.2, 10),
        ("reader", 22, 0.9, 15),
        ("sample 91", 21, 1.2, 10),
        ("sample 91", 22, 0.9, 15),
        ("sample 90", 22, 0.9, 15),
    ],
)
def test_one_voice_in_a_noisy_hall_is_one_speaker(diarizer, speech_dir, voice, seed, rt60_s, snr_db):
    """The finding: one man speaking in a large hall over a crowd got a second speaker for a
    second of his speech in the full pass. Here: real voices (the LibriVox reader, and each of the
    real sample's two speakers alone) put in a synthetic hall over a ten-talker babble
    (tests/rooms.py); two to four speakers before. The sample's voices, these seeds and these
    rooms were not looked at while the change was made (bench.diarization --hall is what was);
    of the reader's two sentences here, 0930 is new to it and 0880 is not."""
    from .rooms import in_a_hall

    if voice == "reader":
        names = ["sense_and_sensibility_01_austen_64kb-0930.wav", "sense_and_sensibility_01_austen_64kb-0880.wav"]
        pcm = np.concatenate([np.concatenate([read_pcm_file(speech_dir / n), np.zeros(4000, np.int16)]) for n in names])
    else:
        spans = {"sample 90": [(11.1, 14.4), (18.6, 21.4), (28.6, 30.0)], "sample 91": [(14.8, 17.8), (21.9, 27.8)]}
        pcm = one_voice(spans[voice])
    sd = StreamDiarizer(diarizer)
    mixed = in_a_hall(pcm, seed, rt60_s, snr_db)
    for i in range(0, len(mixed), 1600):
        sd.push(mixed[i : i + 1600])
    sd.flush()
    full = sd.full_turns()
    assert sum(t.end_ms - t.start_ms for t in full) > 0.5 * len(pcm) / 16, full  # the voice was heard
    assert {t.speaker for t in full} == {"SPEAKER_00"}, full


def test_incremental_labels_are_published_once_in_time_order(diarizer):
    pcm, _ = sf.read(CONVERSATIONS / "conv_3spk_overlap.flac", dtype="int16")
    sd = StreamDiarizer(diarizer, block_s=6.0)
    covered, seen_labels = 0, []
    for i in range(0, len(pcm), 1600):
        for t in sd.push(pcm[i : i + 1600]):
            assert t.start_ms >= covered - 1 and t.end_ms <= sd.emitted_ms  # only audio not published before
            if t.speaker not in seen_labels:
                seen_labels.append(t.speaker)
        covered = sd.emitted_ms
    assert seen_labels == [f"SPEAKER_{i:02d}" for i in range(len(seen_labels))]  # named by first appearance
    assert len(sd._buf) <= (sd.block_ms + sd.context_ms) * 16  # bounded: context plus one block


def test_speaker_count_hint_is_applied_by_the_full_pass(diarizer):
    _, full, _ = run_stream(diarizer, CONVERSATIONS / "conv_4spk_noisy.flac", num_speakers=4)
    score = der(read_rttm(CONVERSATIONS / "conv_4spk_noisy.rttm"), full)
    assert score["hyp_speakers"] == 4 and score["der"] <= 0.10, score


def test_real_two_speaker_recording(diarizer):
    audio, rttm = sample()
    _, full, _ = run_stream(diarizer, audio)
    score = der(read_rttm(rttm), full)
    assert score["hyp_speakers"] == 2 and score["der"] <= 0.10, score  # measured 4.3% (docs/measurements.md)


def test_speaker_count_without_hints_on_the_noisy_four_speaker_conversation(diarizer):
    # a stray cluster of ~1 s of mixed audio used to become a fifth speaker here
    _, full, _ = run_stream(diarizer, CONVERSATIONS / "conv_4spk_noisy.flac")
    score = der(read_rttm(CONVERSATIONS / "conv_4spk_noisy.rttm"), full)
    assert score["hyp_speakers"] == 4 and score["der"] <= 0.10, score


def test_one_chunk_shortcut_gives_the_pipelines_turns(diarizer):
    """Blocks skip pyannote's embedding and clustering when the window fits one segmentation chunk;
    that must not change where speech and speaker changes are (only label names may differ)."""
    import torch

    audio, _ = sample()
    pcm, _ = sf.read(audio, dtype="int16")
    for start_s in (2, 8, 14, 20):
        window = pcm[start_s * 16000 : (start_s + 10) * 16000]
        fast, _ = diarizer(window)
        out = diarizer.pipeline(
            {"waveform": torch.from_numpy(window.astype(np.float32) / 32768.0)[None], "sample_rate": 16000}
        )
        slow = [
            (round(s.start * 1000), round(s.end * 1000))
            for s, _, _ in out.speaker_diarization.itertracks(yield_label=True)
        ]
        assert fast, start_s
        # the pipeline may merge local speakers (and so turns); every boundary of its turns is one of ours
        ours = {b for t in fast for b in (t.start_ms, t.end_ms)}
        assert all(any(abs(b - o) <= 20 for o in ours) for s, e in slow for b in (s, e)), (start_s, fast, slow)


def test_full_pass_folds_a_speaker_with_too_little_speech_into_its_nearest():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=192), rng.normal(size=192)
    sd = StreamDiarizer(None, min_speaker_s=2.0)
    # three block clusters: A (20 s), B (15 s), and 1 s of something close to A but below the merge threshold
    near_a = a + 1.2 * rng.normal(size=192)
    from services.diarizer.stream import Block

    sd.blocks = [
        Block(np.stack([a]), np.array([20000.0]), [(0, 0, 20000)]),
        Block(np.stack([b]), np.array([15000.0]), [(0, 20000, 35000)]),
        Block(np.stack([near_a]), np.array([1000.0]), [(0, 35000, 36000)]),
    ]
    sd._sums = [a, b, near_a]
    labels = {t.speaker for t in sd.full_turns()}
    assert len(labels) == 2
    sd.min_speaker_ms = 500  # 1 s of speech is then a speaker of its own
    assert len({t.speaker for t in sd.full_turns()}) == 3


def test_merge_turns_joins_touching_turns_of_one_speaker():
    turns = [Turn("A", 0, 500), Turn("A", 500, 900), Turn("B", 800, 1200), Turn("A", 1500, 1800)]
    assert merge_turns(turns) == [Turn("A", 0, 900), Turn("B", 800, 1200), Turn("A", 1500, 1800)]


# ---- end to end ------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_speakers_reach_the_final_transcript(live_stack):
    settings, _ = live_stack
    from services.ingest.core import Ingest

    from .helpers import wav_bytes

    sid = f"conv-{time.time_ns()}"
    # the conversation's first 30.7 s: its first nine turns, three of each speaker, overlaps
    # included, cut in the pause before the tenth (the rest repeats them at twice the decoding)
    pcm, _ = sf.read(CONVERSATIONS / "conv_3spk_overlap.flac", dtype="int16")
    opening = io.BytesIO(wav_bytes(pcm[: 30_700 * 16]))
    Ingest(settings).publish_file(opening, stream_id=sid, metadata={"num_speakers": "3"})
    final = complete_record(settings, sid, timeout=180)
    turns = [Turn(t["speaker"], t["start_ms"], t["end_ms"]) for t in final["turns"]]
    ref = [t for t in read_rttm(CONVERSATIONS / "conv_3spk_overlap.rttm") if t.start_ms < 30_700]
    assert len(ref) == 9 and all(sum(t.speaker == s for t in ref) == 3 for s in {t.speaker for t in ref})
    score = der(ref, turns)
    assert score["hyp_speakers"] == 3 and score["der"] <= 0.15, score
    assert final["words"] and all(w["speaker"] in {t.speaker for t in turns} for w in final["words"])
    records = [r for t, r in collect(settings, settings.results_topic, completed(sid), 30) if r["stream_id"] == sid]
    kinds = [str(r["kind"]) for r in records]
    assert "SPEAKERS" in kinds and kinds.index("SPEAKERS") < kinds.index("STREAM_COMPLETE")  # live, before the end
    speakers = [
        r
        for t, r in collect(
            settings,
            settings.speakers_topic,
            lambda rs: any(r["stream_id"] == sid and str(r["kind"]) == "FULL" for t, r in rs),
            30,
        )
        if r["stream_id"] == sid
    ]
    assert speakers[-1]["kind"] == "FULL" and speakers[-1]["model_version"].startswith("pyannote.audio 4.0.7")
    assert all(r["compute_ms"] > 0 for r in speakers if r["kind"] == "INCREMENTAL" and r["turns"])
