"""Downstream consumers: the captions page in real headless Chromium, search over n-best, exports."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import srt
import webvtt

from services.captions import exports
from services.captions.index import TranscriptIndex

from .conftest import ROOT, run_hark
from .helpers import collect, complete_record, completed

ARTIFACTS = Path(os.environ.get("HARK_TEST_ARTIFACTS", ROOT / ".hark" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def wait_indexed(settings, sid: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if settings.index_file.exists():
            idx = TranscriptIndex(settings.index_file)
            try:
                st = idx.stream(sid)
            finally:
                idx.close()
            if st and st["complete"]:
                return st
        time.sleep(0.2)
    raise AssertionError(f"{sid} was not indexed as complete in {timeout} s")


@pytest.fixture(scope="module")
def passage(live_stack, speech_dir):
    """The 28.7 s real passage through the pipeline, indexed by the stack's captions service."""
    settings, _ = live_stack
    from services.ingest.core import Ingest

    sid = f"passage-{time.time_ns()}"
    Ingest(settings).publish_file(speech_dir / "austen_passage.flac", stream_id=sid)
    complete_record(settings, sid, timeout=120)
    return sid, wait_indexed(settings, sid)["complete"]


# ---- exports, parsed back --------------------------------------------------------------------------
def test_exports_parse_back(live_stack, passage, tmp_path):
    settings, _ = live_stack
    sid, final = passage
    env = {"HARK_DATA_DIR": str(settings.data_dir)}
    words = final["words"]
    assert len(words) > 60

    out = tmp_path / "c.vtt"
    assert run_hark("export", sid, "--format", "vtt", "-o", str(out), env_extra=env).returncode == 0
    captions = webvtt.read(str(out))
    assert len(captions) >= 4
    assert " ".join(c.text.replace("\n", " ") for c in captions).split()[:3] == ["And", "Mr.", "John"]
    starts = [c.start_in_seconds for c in captions]
    assert starts == sorted(starts) and all(
        c.end_in_seconds <= n.start_in_seconds + 1e-3 for c, n in zip(captions, captions[1:])
    )

    res = run_hark("export", sid, "--format", "srt", env_extra=env)
    subs = list(srt.parse(res.stdout))
    assert [s.content for s in subs] == [f"{c.voice}: {c.text}" if c.voice else c.text for c in captions]
    assert {c.voice for c in captions} == {"SPEAKER_00"}  # one reader: the diarizer found one speaker

    ctm = run_hark("export", sid, "--format", "ctm", env_extra=env).stdout.splitlines()
    assert len(ctm) == len(words)
    f = ctm[2].split()
    assert f[0] == sid and f[1] == "1" and float(f[2]) == words[2]["start_ms"] / 1000 and f[4] == words[2]["word"]

    as_json = json.loads(run_hark("export", sid, "--format", "json", env_extra=env).stdout)
    assert as_json["text"] == final["text"] and as_json["kind"] == "STREAM_COMPLETE"

    rttm = [line.split() for line in run_hark("export", sid, "--format", "rttm", env_extra=env).stdout.splitlines()]
    assert len(rttm) == len(final["turns"]) >= 1
    for f, t in zip(rttm, final["turns"]):  # NIST RTTM: SPEAKER file chan start dur <NA> <NA> name <NA> <NA>
        assert f[0] == "SPEAKER" and f[1] == sid and f[7] == t["speaker"] == "SPEAKER_00" and len(f) == 10
        assert (
            abs(float(f[3]) - t["start_ms"] / 1000) < 1e-3
            and abs(float(f[4]) - (t["end_ms"] - t["start_ms"]) / 1000) < 1e-3
        )
    missing = run_hark("export", "no-such-stream", "--format", "vtt", env_extra=env)
    assert missing.returncode == 1 and "no stream 'no-such-stream'" in missing.stderr


def test_speaker_labels_in_caption_exports():
    words = [
        {"word": w, "start_ms": i * 400, "end_ms": i * 400 + 300, "confidence": 0.9, "speaker": spk}
        for i, (w, spk) in enumerate([("hello", "A"), ("there.", "A"), ("hi", "B"), ("you", "B")])
    ]
    result = {
        "stream_id": "s",
        "words": words,
        "turns": [{"speaker": "A", "start_ms": 0, "end_ms": 700}, {"speaker": "B", "start_ms": 800, "end_ms": 1500}],
    }
    vtt = webvtt.from_string(exports.to_vtt(result))
    assert [(c.voice, c.text) for c in vtt] == [("A", "hello there."), ("B", "hi you")]
    assert [s.content for s in srt.parse(exports.to_srt(result))] == ["A: hello there.", "B: hi you"]
    rttm = [line.split() for line in exports.to_rttm(result).splitlines()]
    assert rttm == [
        ["SPEAKER", "s", "1", "0.000", "0.700", "<NA>", "<NA>", "A", "<NA>", "<NA>"],
        ["SPEAKER", "s", "1", "0.800", "0.700", "<NA>", "<NA>", "B", "<NA>", "<NA>"],
    ]


# ---- search over 1-best and n-best ----------------------------------------------------------------
def test_search_finds_a_word_only_in_an_alternative_and_indexing_is_idempotent(live_stack, passage, tmp_path):
    settings, _ = live_stack
    sid, _final = passage
    env = {"HARK_DATA_DIR": str(settings.data_dir)}
    idx = TranscriptIndex(settings.index_file)
    try:
        rows = idx.db.execute("SELECT source, rank, norm FROM hyps WHERE stream_id = ?", (sid,)).fetchall()
    finally:
        idx.close()
    best = {w for r in rows if r["source"] == "1best" for w in r["norm"].split()}
    nbest = {w for r in rows if r["rank"] > 0 for w in r["norm"].split()}  # a decoder's n-best entries
    alternative_only = sorted(nbest - best, key=len, reverse=True)
    assert alternative_only, "the decoders' n-best lists held no word outside the 1-best"
    word = alternative_only[0]
    res = run_hark("search", word, "--stream", sid, "--json", env_extra=env)
    assert res.returncode == 0, res.stderr
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert hits and all(h["source"] == "alternative" and h["stream_id"] == sid for h in hits)
    assert set(hits[0]) == {"stream_id", "start", "end", "speaker", "text", "marked", "source", "pass"}

    # a 1-best word: 1-best hits come first, narrowed to the word's own times
    hits = [
        json.loads(x)
        for x in run_hark("search", "Dashwood", "--stream", sid, "--json", env_extra=env).stdout.splitlines()
    ]
    assert hits[0]["source"] == "1best" and hits[0]["end"] - hits[0]["start"] < 2.0
    assert [h["source"] for h in hits] == sorted((h["source"] for h in hits), key=lambda s: s != "1best")

    # idempotent: the whole results topic indexed, then read again into the same index, changes nothing
    # (a fresh index: the live one keeps growing as late n-best records arrive)
    records = [
        (r, settings.results_topic, 0, 0)
        for t, r in collect(settings, settings.results_topic, completed(sid), timeout=30)
        if t == "Result"
    ]
    idx = TranscriptIndex(tmp_path / "replayed.sqlite")
    try:

        def count():
            return idx.db.execute("SELECT count(*), sum(source = '1best') FROM hyps").fetchone()[:]

        idx.apply(records)
        before = count()
        idx.apply(records)
        assert count() == before and before[0] > 0
    finally:
        idx.close()


# ---- the captions page in headless Chromium ---------------------------------------------------------
@pytest.mark.e2e
def test_captions_page_in_headless_chromium(live_stack, speech_dir, passage):
    from playwright.sync_api import sync_playwright

    settings, state = live_stack
    base = state["captions_url"]
    sid = f"page-{time.time_ns()}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            # opened before the stream exists
            page.goto(f"{base}streams/{sid}")
            from services.ingest.core import Ingest

            publisher = threading.Thread(
                target=lambda: Ingest(settings).publish_file(
                    speech_dir / "austen_passage.flac", stream_id=sid, realtime=True
                )
            )
            publisher.start()
            page.wait_for_selector("#captions .seg.partial", timeout=20000)  # provisional text while speaking
            page.wait_for_selector("#captions .seg.final", timeout=20000)  # committed online text
            page.screenshot(path=str(ARTIFACTS / "captions-online.png"))
            # a draft's words that may still change, dimmed, then the words two drafts agreed on
            page.wait_for_selector("#captions .seg.tentative", timeout=30000)
            page.wait_for_selector("#captions .seg.provisional", timeout=30000)  # Whisper on a window growing
            page.wait_for_selector("#captions .seg.offline", timeout=60000)  # offline text replaced online text
            page.screenshot(path=str(ARTIFACTS / "captions-live.png"))  # offline, online and provisional text
            publisher.join(60)
            page.wait_for_selector("#status[data-complete='1']", timeout=60000)
            page.wait_for_selector("#transcript .word", timeout=10000)  # the final transcript replaces the live view
            page.screenshot(path=str(ARTIFACTS / "captions-complete.png"))
            text = page.inner_text("#transcript")
            assert "Dashwood" in text and "amiable" in text
            assert page.locator("#captions .seg.partial").count() == 0 and page.is_hidden("#captions")
            assert page.locator("#captions .seg.provisional").count() == 0  # each replaced by its window's text
            assert page.locator("#captions .seg.tentative").count() == 0
            events = page.evaluate("window.harkEvents")
            finals = [e for e in events if e["kind"] == "FINAL"]
            drafts = [e for e in finals if e["source"] == "provisional"]
            for d in drafts:  # each came before the offline text of its window
                window = next(
                    e for e in finals if e["source"] == "offline" and e["start_ms"] <= d["start_ms"] < e["end_ms"]
                )
                assert finals.index(d) < finals.index(window) and d["end_ms"] <= window["end_ms"]
            live = [e for e in events if not e["history"] and e["kind"] == "PARTIAL"]
            assert len(live) >= 10, "partials arrived live, not only at the end"
            delays = sorted(e["received_ms"] - e["emitted_at_ms"] for e in live)
            p95 = delays[int(0.95 * (len(delays) - 1))]
            print(
                f"\ncaption delay results->page over {len(delays)} partials: p50 {delays[len(delays) // 2]} ms, "
                f"p95 {p95} ms"
            )
            assert p95 < 5000  # a functional bound (live, not batched); the target is measured by make bench

            # a finished stream opened later: its history, and the list and search pages
            page.goto(f"{base}streams/{passage[0]}")
            page.wait_for_selector("#status[data-complete='1']", timeout=10000)
            assert "Dashwood" in page.inner_text("#transcript")
            assert page.locator("#captions .seg.offline").count() >= 2  # its history, under the final transcript
            page.goto(base)
            page.wait_for_selector(f"tr[data-stream='{sid}']", timeout=10000)
            page.fill("#q", "leisure")
            page.click("#search button")
            page.wait_for_selector(".hit", timeout=10000)
            assert sid in page.inner_text("#hits")
            page.screenshot(path=str(ARTIFACTS / "captions-list.png"))
        finally:
            browser.close()


# ---- the stream's audio, served in ranges ------------------------------------------------------------
def test_archived_audio_is_a_wav_served_in_ranges_one_segment_at_a_time(tmp_path):
    import asyncio
    import io

    import numpy as np
    import soundfile as sf

    from hark.storage import FilesystemStore
    from services.captions.audio import NoAudio, byte_range, open_audio

    store = FilesystemStore(tmp_path)
    pcm = (np.random.default_rng(0).normal(size=16000 * 5) * 3000).astype("<i2")
    seg = 2 * 16000 * 2  # 2 s segments: 2 + 2 + 1
    raw = pcm.tobytes()
    for i in range(3):
        store.put(f"streams/s1/pcm/{i:06d}.s16le", raw[i * seg : (i + 1) * seg])
    store.put(
        "streams/s1/meta.json",
        json.dumps({"tenant": "acme", "segment_seconds": 2, "status": "COMPLETE", "total_samples": len(pcm)}).encode(),
    )
    audio = open_audio(store, "s1", "acme")

    def read(a, b):
        async def go():
            return b"".join([x async for x in audio.read(a, b)])

        return asyncio.run(go())

    whole = read(0, audio.size)
    assert audio.size == 44 + len(raw) and len(whole) == audio.size
    back, rate = sf.read(io.BytesIO(whole), dtype="int16")
    assert rate == 16000 and np.array_equal(back, pcm)
    for a, b in [(0, 10), (40, 50), (44 + seg - 3, 44 + seg + 5), (100, audio.size), (44 + 2 * seg, audio.size)]:
        assert read(a, b) == whole[a:b], (a, b)
    assert byte_range("bytes=100-", audio.size) == (100, audio.size)
    assert byte_range("bytes=0-0", audio.size) == (0, 1)
    assert byte_range("bytes=-10", audio.size) == (audio.size - 10, audio.size)
    assert byte_range(None, audio.size) is None
    for bad in ("bytes=abc", f"bytes={audio.size}-", "bytes=-0", "items=0-1", "bytes=5-2"):
        with pytest.raises(ValueError):
            byte_range(bad, audio.size)
    with pytest.raises(NoAudio):  # another tenant's stream: as if it did not exist
        open_audio(store, "s1", "globex")
    with pytest.raises(NoAudio):
        open_audio(store, "nothing", None)


def test_search_marks_the_matched_words():
    from services.captions.index import marked

    assert marked("Mr. Dashwood had then leisure", ["mister", "dashwood"]) == [
        ["Mr. Dashwood", True],
        [" had then leisure", False],
    ]
    assert marked("he was 42 years old", ["forty", "two", "years"]) == [
        ["he was ", False],
        ["42 years", True],
        [" old", False],
    ]
    assert marked("nothing here", ["else"]) == [["nothing here", False]]


# ---- the transcript page: audio, time, speakers, search that lands ------------------------------------
@pytest.mark.e2e
def test_transcript_page_plays_seeks_follows_the_final_speakers_and_lands_search_hits(live_stack):
    from playwright.sync_api import sync_playwright

    from services.ingest.core import Ingest

    settings, state = live_stack
    base = state["captions_url"]
    sid = f"page2spk-{time.time_ns()}"
    Ingest(settings).publish_file(ROOT / "data" / "conversations" / "conv_2spk_clean.flac", stream_id=sid)
    complete_record(settings, sid, timeout=180)
    final = wait_indexed(settings, sid)["complete"]
    assert len({t["speaker"] for t in final["turns"]}) == 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox", "--headless=new", "--autoplay-policy=no-user-gesture-required", "--mute-audio"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{base}streams/{sid}")
            page.wait_for_selector("#status[data-complete='1']", timeout=20000)
            page.wait_for_selector("#transcript .word", timeout=10000)
            # every word's speaker on the page is the final transcript's (the full pass), in order
            shown = page.evaluate(
                "[...document.querySelectorAll('#transcript .word')].map(e => [e.textContent, e.dataset.speaker])"
            )
            assert shown == [[w["word"], w.get("speaker") or ""] for w in final["words"]]
            # each turn shows its speaker and start time; the timeline has a lane per speaker
            assert page.locator("#transcript .turn .speaker").count() >= 2
            assert page.locator("#timeline .turn").count() == len(final["turns"])
            assert page.locator("#timeline .lane").count() == 2
            # the archived audio loads and plays
            page.wait_for_function("() => document.getElementById('player').readyState >= 1", timeout=10000)
            duration = page.evaluate("document.getElementById('player').duration")
            assert abs(duration - final["words"][-1]["end_ms"] / 1000) < 3.0, duration
            page.evaluate("document.getElementById('player').play()")
            page.wait_for_function("() => document.getElementById('player').currentTime > 0.5", timeout=10000)
            page.evaluate("document.getElementById('player').pause()")

            def position() -> float:
                return page.evaluate("document.getElementById('player').currentTime")

            # a click on a word seeks to it, and the word is the one highlighted
            i = len(final["words"]) // 2
            page.click(f"#transcript .word[data-i='{i}']")
            assert abs(position() - final["words"][i]["start_ms"] / 1000) <= 0.5
            page.wait_for_selector(f"#transcript .word.now[data-i='{i}']", timeout=5000)
            page.screenshot(path=str(ARTIFACTS / "transcript-page.png"), full_page=True)
            # keyboard: a turn's time button and a timeline turn, focused and activated with Enter
            when = page.locator("#transcript .turn .when").nth(1)
            when.focus()
            page.keyboard.press("Enter")
            assert abs(position() - int(when.get_attribute("data-start")) / 1000) <= 0.5
            bar = page.locator("#timeline .turn").nth(2)
            bar.focus()
            page.keyboard.press("Enter")
            assert abs(position() - final["turns"][2]["start_ms"] / 1000) <= 0.5
            # labelled controls
            assert sid in page.get_attribute("#player", "aria-label")
            assert page.get_attribute("#timeline", "aria-label") and bar.get_attribute("aria-label")
            # downloads of every export
            links = page.locator("#downloads a")
            assert links.count() == len(exports.FORMATS)
            vtt = page.request.get(base.rstrip("/") + page.get_attribute("#downloads a[data-format='vtt']", "href"))
            assert vtt.ok and vtt.text().startswith("WEBVTT") and "attachment" in vtt.headers["content-disposition"]
            rttm = page.request.get(base.rstrip("/") + page.get_attribute("#downloads a[data-format='rttm']", "href"))
            assert rttm.text().count("SPEAKER ") == len(final["turns"])

            # search: the matched word marked, the hit opens the page at its time with the audio there
            word = next(w for w in final["words"] if len(w["word"].strip(",.?!")) >= 7)
            query = word["word"].strip(",.?!'")
            page.goto(base)
            assert page.locator("label[for='q']").count() == 1
            page.fill("#q", query)
            page.keyboard.press("Enter")  # submits the form from the keyboard
            hit = page.locator(f"#hits a[href^='/streams/{sid}?t=']").first
            hit.wait_for(timeout=10000)
            assert query.lower() in hit.locator("xpath=..").locator("mark").first.inner_text().lower()
            at = float(hit.get_attribute("href").split("?t=")[1])
            page.screenshot(path=str(ARTIFACTS / "search-hits.png"))
            hit.click()
            page.wait_for_selector("#status[data-complete='1']", timeout=20000)
            page.wait_for_function(
                f"() => Math.abs(document.getElementById('player').currentTime - {at}) <= 0.5", timeout=10000
            )
        finally:
            browser.close()


@pytest.mark.e2e
def test_page_of_a_stream_in_another_language_says_whose_captions_it_shows(live_stack):
    import io

    from playwright.sync_api import sync_playwright

    from services.ingest.core import Ingest

    from .tts import say, wav_bytes

    settings, state = live_stack
    sid = f"page-es-{time.time_ns()}"
    speech = say("El paciente empezó a tomar la medicina ayer por la mañana y se siente mucho mejor.", "es")
    Ingest(settings).publish_file(io.BytesIO(wav_bytes(speech)), stream_id=sid)  # language: auto
    assert complete_record(settings, sid, timeout=120)["language"] == "es"
    wait_indexed(settings, sid)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page()
            page.goto(f"{state['captions_url']}streams/{sid}")
            page.wait_for_selector("#status[data-complete='1']", timeout=20000)
            assert page.is_visible("#language") and page.get_attribute("#language", "data-language") == "es"
            assert "paciente" in page.inner_text("#transcript").lower()
        finally:
            browser.close()
