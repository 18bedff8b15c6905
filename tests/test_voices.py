"""Named voices: enrolled voiceprints, kept sealed per tenant, name speakers in the diarizer's passes."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from hark.config import Settings
from hark.keys import Keyring, StreamErased, master_key, open_key_store
from hark.voices import VoiceError, VoiceStore, check_name
from services.diarizer.scoring import read_rttm
from services.diarizer.voices import voiceprint

from .conftest import ROOT, run_hark
from .helpers import complete_record, wav_bytes

CONV = ROOT / "data" / "conversations"


def alone(name: str, who: str) -> np.ndarray:
    """``who``'s speech in a committed conversation, without the moments another voice overlaps it."""
    pcm, _ = sf.read(CONV / f"{name}.flac", dtype="int16")
    ref = read_rttm(CONV / f"{name}.rttm")
    parts = []
    for t in ref:
        others = [o for o in ref if o.speaker != who and o.start_ms < t.end_ms and o.end_ms > t.start_ms]
        if t.speaker == who and not others:
            parts += [pcm[t.start_ms * 16 : t.end_ms * 16], np.zeros(8000, np.int16)]
    return np.concatenate(parts)


def speaker_at(turns, start_ms: int, end_ms: int) -> str | None:
    """The label that covers most of [start_ms, end_ms)."""
    cover: dict[str, int] = {}
    for t in turns:
        cover[t.speaker] = cover.get(t.speaker, 0) + max(0, min(end_ms, t.end_ms) - max(start_ms, t.start_ms))
    return max(cover, key=lambda k: cover[k]) if cover and max(cover.values()) > 0 else None


# ---- the store: no model ---------------------------------------------------------------------------
def test_voices_are_sealed_per_tenant_and_erased_for_good(tmp_path):
    s = Settings.load(data_dir=str(tmp_path), voiceprint_retention_days=30)
    store = VoiceStore(s)
    vec = np.random.default_rng(1).normal(size=192)
    store.enroll("acme", "Alice", vec, 12.0, "m")
    store.enroll("acme", "Bob Smith", -vec, 9.0, "m")
    assert [v.name for v in store.load("acme")] == ["Alice", "Bob Smith"]
    assert store.load("globex") == []  # another tenant sees nothing
    with pytest.raises(VoiceError, match="no voice named"):
        store.remove("globex", "Alice")
    objects = store.store.list("voices/")
    assert len(objects) == 2
    raw = {k: store.store.get(k) for k in objects}
    assert not any(
        b"Alice" in b or b"acme" in b or b"acme" in k.encode() for k, b in raw.items()
    )  # sealed, names hashed
    # a new enrollment of the same name replaces the old one, whose key is gone
    store.enroll("acme", "Alice", vec + 0.1, 15.0, "m")
    assert sorted(v.name for v in store.load("acme")) == ["Alice", "Bob Smith"]
    alice = next(v for v in store.load("acme") if v.name == "Alice")
    assert alice.speech_s == 15.0
    alice_obj = next(k for k in store.store.list("voices/") if k.endswith(alice.key_id))
    alice_copy = store.store.get(alice_obj)  # a backup, say
    entries = store.remove("acme", "Alice")
    assert len(entries) == 1 and entries[0]["key_deleted"]
    assert [v.name for v in store.load("acme")] == ["Bob Smith"]
    # copies taken before the replacement and the removal do not open any more, in any process
    ring = Keyring(open_key_store(s), master_key(s))
    with pytest.raises(StreamErased):
        ring.open(alice.key_id, alice_copy, alice_obj.encode())
    bob = _key_of(store, "acme", "Bob Smith")
    for k, b in raw.items():
        kid = k.rsplit("/", 1)[-1]
        if kid == bob:
            assert json.loads(ring.open(kid, b, k.encode()))["name"] == "Bob Smith"
        else:
            with pytest.raises(StreamErased):
                ring.open(kid, b, k.encode())
    audit = [json.loads(line) for line in (tmp_path / "audit" / "erasures.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["reason"]) for e in audit] == [
        ("voice", "replaced by a new enrollment"),
        ("voice", "request"),
    ]
    # retention: a voice older than the period is not used, and the sweep erases it
    later = int(time.time() * 1000) + 31 * 86_400_000
    assert store.load("acme", now_ms=later) == []
    assert len(store.sweep(now_ms=later)) == 1 and store.store.list("voices/") == []


def _key_of(store: VoiceStore, tenant: str, name: str) -> str:
    return next(v.key_id for v in store.load(tenant) if v.name == name)


@pytest.mark.parametrize("name", ["", "SPEAKER_01", "Al\nice", "<b>x</b>", "x" * 49, "Bob ", "1abc", "A  B"])
def test_voice_names_that_are_refused(name):
    with pytest.raises(VoiceError):
        check_name(name)


@pytest.mark.parametrize("name", ["Alice", "Bob Smith", "O'Neil", "Dr. J-P Sartre", "Z"])
def test_voice_names_that_are_accepted(name):
    assert check_name(name) == name


# ---- the diarizer: real models -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def diarizer():
    import torch

    from services.diarizer.pipeline import Diarizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the service runs it
    yield Diarizer()
    torch.set_num_threads(threads)


def enroll_slt_and_rms(diarizer) -> list[tuple[str, np.ndarray]]:
    """slt as Alice and rms as Carol, each enrolled from the two conversations other than conv_2spk_clean."""
    out = []
    for who, name in (("slt", "Alice"), ("rms", "Carol")):
        recordings = [(f"{who} in {c}", alone(c, who)) for c in ("conv_3spk_overlap", "conv_4spk_noisy")]
        out.append((name, voiceprint(diarizer, recordings, Settings.load().voice_match_threshold)[0]))
    return out


def test_an_enrolled_voice_is_named_live_and_in_the_full_pass_and_nobody_else_is(diarizer):
    from services.diarizer.stream import StreamDiarizer

    voices = enroll_slt_and_rms(diarizer)  # Carol (rms) is not in the conversation: she must name nobody
    pcm, _ = sf.read(CONV / "conv_2spk_clean.flac", dtype="int16")
    sd = StreamDiarizer(diarizer, voices=voices, name_threshold=Settings.load().voice_match_threshold)
    live = []
    for i in range(0, len(pcm), 1600):
        live += sd.push(pcm[i : i + 1600])
    live += sd.flush()
    full = sd.full_turns()
    ref = read_rttm(CONV / "conv_2spk_clean.rttm")
    for r in ref:  # slt's turns are Alice's, awb's the one anonymous speaker's
        assert speaker_at(full, r.start_ms, r.end_ms) == ("Alice" if r.speaker == "slt" else "SPEAKER_00"), r
    named_live = [t for t in live if t.speaker == "Alice"]
    assert named_live, live  # live labels follow once confident...
    # ...and on slt's speech: live turns end at speaker changes only to within a piece (0.5 s)
    slt_ms = sum(
        max(0, min(t.end_ms, r.end_ms) - max(t.start_ms, r.start_ms))
        for t in named_live
        for r in ref
        if r.speaker == "slt"
    )
    assert slt_ms >= 0.9 * sum(t.end_ms - t.start_ms for t in named_live), named_live
    for r in ref:
        if r.speaker == "awb":
            assert speaker_at(live, r.start_ms, r.end_ms) != "Alice", r
    assert "Carol" not in {t.speaker for t in live + full}


def test_enrolling_a_recording_of_two_voices_is_refused(diarizer):
    pcm, _ = sf.read(CONV / "conv_2spk_clean.flac", dtype="int16")
    pcm = pcm[: 14_900 * 16]  # its first four turns: slt, awb, slt, awb (6.0 s and 6.7 s of speech)
    with pytest.raises(VoiceError, match="more than one voice"):
        voiceprint(diarizer, [("conv_2spk_clean.flac", pcm)], Settings.load().voice_match_threshold)


# ---- end to end ------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_an_enrolled_voice_is_named_in_its_tenants_streams_and_absent_from_anothers(live_stack, tmp_path):
    from services.ingest.core import Ingest

    settings, _ = live_stack
    files = []
    for c in ("conv_3spk_overlap", "conv_4spk_noisy"):
        files.append(tmp_path / f"slt-{c}.wav")
        files[-1].write_bytes(wav_bytes(alone(c, "slt")))
    r = run_hark("speakers", "enroll", "Alice", *map(str, files), "--tenant", "acme")
    assert r.returncode == 0, r.stderr
    ours, theirs = f"named-{time.time_ns()}", f"unnamed-{time.time_ns()}"
    Ingest(settings).publish_file(CONV / "conv_2spk_clean.flac", stream_id=ours, tenant="acme")
    # the other tenant's stream: the same recording's first 15 s (slt, awb, slt again), enough of
    # the enrolled voice to be named were the tenants' voices mixed, at a third of the decoding
    pcm, _ = sf.read(CONV / "conv_2spk_clean.flac", dtype="int16")
    opening = io.BytesIO(wav_bytes(pcm[: 15 * 16000]))
    Ingest(settings).publish_file(opening, stream_id=theirs, tenant="globex")
    final = complete_record(settings, ours, timeout=240)
    other = complete_record(settings, theirs, timeout=240)
    ref = read_rttm(CONV / "conv_2spk_clean.rttm")
    words = [w for w in final["words"] if w.get("speaker")]
    assert words
    for r in ref:  # each reference turn's words: Alice's when slt speaks (word times are Whisper's, so by majority)
        said = [w["speaker"] for w in words if r.start_ms <= (w["start_ms"] + w["end_ms"]) // 2 < r.end_ms]
        if said:
            assert (max(set(said), key=said.count) == "Alice") == (r.speaker == "slt"), (r, said)
    assert "Alice" not in json.dumps(other) and other["words"]  # another tenant's stream: never the name
    listed = run_hark("speakers", "list", "--tenant", "globex", "--json")
    assert listed.returncode == 0 and listed.stdout.strip() == ""
    listed = run_hark("speakers", "list", "--tenant", "acme", "--json")
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["Alice"]
    removed = run_hark("speakers", "remove", "Alice", "--tenant", "acme")
    assert removed.returncode == 0 and json.loads(removed.stdout)["key_deleted"]
    assert run_hark("speakers", "list", "--tenant", "acme").stdout.strip() == ""
