"""The streaming recogniser on real speech, without Kafka."""

import numpy as np
import pytest

from hark.audio import read_pcm_file
from hark.vad import SpeechGate
from hark.wer import score
from services.online_asr.recognizer import CapacityError, DecoderPool, StreamRecognizer, clean_word


@pytest.fixture(scope="module")
def pool():
    return DecoderPool(2)


def decode(pool, pcm: bytes, chunk: int = 3200, **kw):
    d = pool.acquire()
    try:
        r = StreamRecognizer(d, **kw)
        events = []
        for i in range(0, len(pcm), chunk):
            events += r.feed(pcm[i : i + chunk])
        return events + r.finish()
    finally:
        pool.release(d)


def test_real_speech_gives_partials_then_finals_with_words_nbest_and_lattice(pool, speech_dir, references):
    name = "austen_passage.flac"
    events = decode(pool, read_pcm_file(speech_dir / name).tobytes())
    finals = [e for e in events if e.kind == "FINAL"]
    partials = [e for e in events if e.kind == "PARTIAL"]
    assert len(finals) == 5  # five read sentences separated by pauses
    assert len(partials) > 3 * len(finals)
    assert [f.utterance_id for f in finals] == list(range(5))
    text = " ".join(f.text for f in finals)
    assert score(references[name], text).wer < 0.40
    for f in finals:
        assert f.words and f.start_ms <= f.words[0].start_ms
        starts = [w.start_ms for w in f.words]
        assert starts == sorted(starts) and all(w.end_ms > w.start_ms for w in f.words)
        assert 1 <= len(f.nbest) <= 5 and len({t for t, _ in f.nbest}) == len(f.nbest)
        assert f.lattice and len(f.lattice) > 1000
    # utterances are in stream time: sentence k starts after sentence k-1 ends
    assert all(b.start_ms >= a.end_ms for a, b in zip(finals, finals[1:]))


def test_chunk_size_does_not_change_the_result(pool, speech_dir):
    pcm = read_pcm_file(speech_dir / "goforward.wav").tobytes()
    a = [e.text for e in decode(pool, pcm, 3200) if e.kind == "FINAL"]
    b = [e.text for e in decode(pool, pcm, 1234) if e.kind == "FINAL"]
    assert a == b and a


def test_a_final_without_an_nbest_list_is_still_a_final(speech_dir):
    """pocketsphinx's nbest() is None when its search kept nothing to walk: with at most 10 words
    per frame (maxwpf) it is for this card; the utterance is still a FINAL, with its 1-best text."""
    pool = DecoderPool(1, maxwpf=10)
    finals = [e for e in decode(pool, read_pcm_file(speech_dir / "cards_002.wav").tobytes()) if e.kind == "FINAL"]
    assert [f.text for f in finals] == ["for queen of posts"] and finals[0].nbest == []


def test_silence_gives_nothing(pool):
    assert decode(pool, b"\x00\x00" * 16000 * 3) == []


def test_base_offset_shifts_word_times(pool, speech_dir):
    pcm = read_pcm_file(speech_dir / "goforward.wav").tobytes()
    plain = [e for e in decode(pool, pcm) if e.kind == "FINAL"][0]
    shifted = [e for e in decode(pool, pcm, base_ms=60000) if e.kind == "FINAL"][0]
    assert [w.start_ms + 60000 for w in plain.words] == [w.start_ms for w in shifted.words]


def test_endless_speech_is_cut_into_bounded_utterances(pool, speech_dir):
    speech = read_pcm_file(speech_dir / "austen_passage.flac")
    # remove the pauses so the gate never sees an end of speech
    voiced = speech[np.abs(speech) > 0].tobytes()
    events = decode(pool, voiced, max_utterance_ms=5000)
    finals = [e for e in events if e.kind == "FINAL"]
    assert len(finals) >= 4
    assert all(f.end_ms - f.start_ms <= 5500 for f in finals)


def test_speech_gate_passes_frames_without_lag(speech_dir):
    gate = SpeechGate()
    silence = np.zeros(480, dtype="<i2").tobytes()
    speech = read_pcm_file(speech_dir / "austen_passage.flac")[: 16000 * 3].tobytes()
    assert all(gate.push(silence)[0] is None for _ in range(20))
    transitions = [gate.push(speech[i : i + 960]) for i in range(0, len(speech) - 959, 960)]
    starts = [i for i, t in enumerate(transitions) if t[0] == "start"]
    assert starts, "three seconds of read speech never opened the gate"
    i = starts[0]
    assert len(transitions[i][1]) == gate.maxlen  # the window is replayed once at the start
    assert all(len(t[1]) == 1 for t in transitions[i + 1 :] if t[0] is None)  # then frames flow as they come


def test_pool_is_bounded_and_reuses_decoders():
    p = DecoderPool(1)
    d = p.acquire()
    with pytest.raises(CapacityError):
        p.acquire()
    p.release(d)
    assert p.acquire() is d


@pytest.mark.parametrize(
    "raw, clean", [("was(2)", "was"), ("<sil>", None), ("++noise++", None), ("[noise]", None), ("Hello", "hello")]
)
def test_clean_word(raw, clean):
    assert clean_word(raw) == clean


def test_a_resumed_recognizer_continues_exactly_like_an_uninterrupted_one(pool, speech_dir):
    """The online checkpoint: a boundary taken at an end of speech, restored into another decoder
    that has decoded other audio meanwhile, continues with the same utterances, ids and times."""
    pcm = read_pcm_file(speech_dir / "austen_passage.flac").tobytes()
    whole = [(e.utterance_id, e.text, e.start_ms, e.end_ms) for e in decode(pool, pcm) if e.kind == "FINAL"]
    d1, d2 = pool.acquire(), pool.acquire()
    try:
        first, events, cut = StreamRecognizer(d1), [], None
        for i in range(0, len(pcm), 3200):
            events += first.feed(pcm[i : i + 3200])
            if first.boundary and sum(e.kind == "FINAL" for e in events) == 2:
                cut, boundary = i, first.boundary
                break
        assert cut, "no second final"
        events = [e for e in events if e.start_ms < 1_000_000]
        other = StreamRecognizer(d2)  # noise: it would move a carried-over noise estimate most
        other.feed((np.random.RandomState(0).randn(16000 * 5) * 3000).astype("<i2").tobytes())
        other.finish()
        resumed = StreamRecognizer(d2)
        resumed.restore(boundary)
        for i in range(cut, len(pcm), 3200):  # from the chunk the boundary was taken in
            events += resumed.feed(pcm[i : i + 3200])
        events += resumed.finish()
    finally:
        pool.release(d1)
        pool.release(d2)
    assert [(e.utterance_id, e.text, e.start_ms, e.end_ms) for e in events if e.kind == "FINAL"] == whole
