"""The Record button on real speech: every file of the real-speech set spoken into the captions
page by headless Chromium's fake microphone, as a person would (press Record, speak, press Stop).

For each recording: the page's final transcript (scored against the reference), the first
partial's delay after the first speech (speech found in what ingest archived of the stream; the
page's clock on both sides), and the time from Stop to the finished transcript on the page.
Prints a table and a summary, writes bench/out/record.json. tests/test_record.py uses the same
helpers for its browser tests.

    python -m bench.record [--files N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from hark import stack
from hark.config import Settings
from hark.keys import open_archive
from hark.storage import archived_pcm
from hark.wer import load_references, score

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "data" / "speech"
OUT = ROOT / "bench" / "out"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER = ["--no-sandbox", "--headless=new", "--autoplay-policy=no-user-gesture-required"]
LEAD_S = 2.0  # silence before the speech: the page opens its capture after the fake device starts playing


def microphone(wav: Path) -> list[str]:
    """Chromium's flags for a fake microphone that plays ``wav`` once, with the prompt granted."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop"]  # fmt: skip


def as_microphone_wav(src: Path, dst: Path, seconds: float | None = None) -> float:
    """``src`` as a 48 kHz mono 16-bit WAV (what the fake device plays most reliably), after
    LEAD_S of silence and before a second of it; returns the speech's duration in seconds."""
    x, rate = sf.read(src, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    x = x[: int(seconds * rate)] if seconds else x
    y = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(x)), rate, 48000).numpy()
    pad = np.zeros(int(LEAD_S * 48000), np.float32)
    sf.write(dst, np.concatenate([pad, y, np.zeros(48000, np.float32)]), 48000, "PCM_16")
    return len(x) / rate


def speech_onset_ms(settings: Settings, sid: str) -> float:
    """When speech starts in what ingest archived of the stream: the first 20 ms whose RMS is
    above -34 dBFS (the files' lead-in is digital zero)."""
    pcm = np.frombuffer(b"".join(archived_pcm(open_archive(settings), sid)), dtype="<i2").astype(np.float32) / 32768
    frames = pcm[: len(pcm) // 320 * 320].reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(axis=1)) > 0.02)
    if not loud.size:
        raise AssertionError(f"no speech in the archived audio of {sid}")
    return float(loud[0] * 20)


_SHOWN = (  # the audio each caption with text covers, and its words
    "[...document.querySelectorAll('#captions .seg')].map(s => [+s.dataset.start, +s.dataset.end,"
    " [...s.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join(' ').trim()])"
    ".filter(s => s[2])"
)


def record_on_page(page, base: str, seconds: float, shot: Path | None = None, **options) -> dict:
    """Open the page, set the options, press Record, let the microphone play ``seconds`` of speech
    (and its lead-in), press Stop and wait for the finished transcript. ``shot``: a screenshot of
    the recording view when 60% of the speech has been said. Returns what the page saw."""
    page.goto(base)
    for name in ("language", "hotwords"):
        if name in options:
            page.fill(f"#rec-{name}", options[name])
    if "speakers" in options:
        page.select_option("#rec-speakers", str(options["speakers"]))
    page.click("#record")
    page.wait_for_selector("#recorder[data-state='recording']", timeout=20000)
    sid = page.evaluate("window.harkRecorder.streamId")
    page.wait_for_function("() => window.harkRecorder.firstAudioMs !== null", timeout=10000)
    started = page.evaluate("window.harkRecorder.firstAudioMs") / 1000
    if shot:
        page.wait_for_selector("#captions .seg", timeout=20000)
        time.sleep(max(0.0, started + LEAD_S + 0.6 * seconds - time.time()))
        page.screenshot(path=str(shot))
    shown = []  # the live captions every half second: text replaced, never blanked
    while time.time() < started + LEAD_S + seconds + 0.5:
        shown.append(page.evaluate(_SHOWN))
        time.sleep(0.5)
    seen = {
        "url": page.url,
        "elapsed": page.inner_text("#elapsed"),
        "max_level": page.evaluate("window.harkRecorder.maxLevel"),
    }
    page.click("#stop")
    stopped = time.monotonic()
    page.wait_for_selector("#status[data-complete='1']", timeout=180000)
    return {
        **seen,
        "stream_id": sid,
        "shown": shown,
        "stop_to_transcript_s": round(time.monotonic() - stopped, 2),
        "first_audio_ms": page.evaluate("window.harkRecorder.firstAudioMs"),
        "status": page.inner_text("#status"),
        "events": page.evaluate("window.harkEvents"),
        "words": page.evaluate("[...document.querySelectorAll('#transcript .word')].map(e => e.textContent)"),
    }


def first_partial_ms(settings: Settings, seen: dict) -> tuple[float, float]:
    """(the first non-empty live partial's arrival after the first speech, the speech's onset in
    the stream), both in ms."""
    partials = [e for e in seen["events"] if e["kind"] == "PARTIAL" and (e["text"] or "").strip() and not e["history"]]
    if not partials:
        raise AssertionError(f"no live partial reached the page for {seen['stream_id']}")
    onset = speech_onset_ms(settings, seen["stream_id"])
    return partials[0]["received_ms"] - (seen["first_audio_ms"] + onset), onset


def main(argv=None) -> None:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(prog="python -m bench.record")
    p.add_argument("--files", type=int, default=0, help="the first N files of the real-speech set (0: all)")
    a = p.parse_args(argv)
    refs = load_references(SPEECH / "references.tsv")
    names = sorted(refs)[: a.files or None]
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hark-bench-record-") as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings.load(data_dir=tmp / "data")
        print(f"starting the embedded stack in {tmp} ...", flush=True)
        state = stack.launch(settings, name="bench-record")
        settings = stack.client_settings(settings, state)
        try:
            with sync_playwright() as pw:
                for name in names:
                    wav = tmp / (Path(name).stem + ".wav")
                    seconds = as_microphone_wav(SPEECH / name, wav)
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER + microphone(wav))
                    try:
                        page = browser.new_context(permissions=["microphone"]).new_page()
                        seen = record_on_page(page, state["captions_url"], seconds, language="en")
                    finally:
                        browser.close()
                    partial, onset = first_partial_ms(settings, seen)
                    s = score(refs[name], " ".join(seen["words"]))
                    rows.append({"file": name, "seconds": round(seconds, 2), "wer": round(s.wer, 4),
                                 "errors": s.errors, "ref_words": s.ref_words, "first_partial_ms": round(partial),
                                 "onset_ms": round(onset), "stop_to_transcript_s": seen["stop_to_transcript_s"],
                                 "hypothesis": " ".join(seen["words"]), "status": seen["status"]})  # fmt: skip
                    r = rows[-1]
                    print(f"{name:48s} {r['seconds']:6.1f} s  WER {100 * r['wer']:5.1f}%  first partial "
                          f"{r['first_partial_ms']:5d} ms  Stop -> transcript {r['stop_to_transcript_s']:5.1f} s", flush=True)  # fmt: skip
        finally:
            stack.stop(stack.stack_dir(settings, "bench-record"))
    errors, words = sum(r["errors"] for r in rows), sum(r["ref_words"] for r in rows)
    partials = [r["first_partial_ms"] for r in rows]
    finish = [r["stop_to_transcript_s"] for r in rows]
    summary = {
        "recordings": len(rows),
        "audio_s": round(sum(r["seconds"] for r in rows), 1),
        "corpus_wer": round(errors / max(words, 1), 4),
        "first_partial_p50_ms": round(float(np.percentile(partials, 50))),
        "first_partial_max_ms": max(partials),
        "stop_to_transcript_p50_s": round(float(np.percentile(finish, 50)), 2),
        "stop_to_transcript_max_s": max(finish),
    }
    (OUT / "record.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(
        f"\n{summary['recordings']} recordings, {summary['audio_s']} s of speech: page transcript WER "
        f"{100 * summary['corpus_wer']:.1f}% ({errors}/{words}); first partial after the first speech p50 "
        f"{summary['first_partial_p50_ms']} ms, max {summary['first_partial_max_ms']} ms; Stop -> finished "
        f"transcript p50 {summary['stop_to_transcript_p50_s']} s, max {summary['stop_to_transcript_max_s']} s"
    )


if __name__ == "__main__":
    main()
