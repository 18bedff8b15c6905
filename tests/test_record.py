"""Caption me: a person speaks into the captions page and reads their words as they say them.

Headless Chromium's fake capture device plays real recordings as the microphone (48 kHz WAVs
made from data/), so the page's whole path runs: getUserMedia, the AudioWorklet, ingest's
WebSocket (with a one-use ticket where tokens are on), the pipeline, and the page's live and
final views. The doors are tested in the same way: a denied microphone, a refused token, a full
ingest, another site's page, a ticket used twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.record import BROWSER, CHROMIUM, as_microphone_wav, first_partial_ms, microphone, record_on_page
from hark import broker, kafka
from hark.config import Settings
from hark.keys import open_archive
from hark.storage import archived_meta
from hark.tenants import Access, AccessDenied, create_token, revoke_tokens
from hark.tickets import Redeemer, _b64, _unb64, issue
from hark.wer import score

from .conftest import ROOT
from .helpers import running

ARTIFACTS = Path(os.environ.get("HARK_TEST_ARTIFACTS", ROOT / ".hark" / "test-artifacts"))


def blanked_ms(before: list, after: list, step: int = 50) -> int:
    """The longest stretch of audio (ms) that a caption with text covered in ``before`` and none
    covers in ``after`` (captions as [start_ms, end_ms, text])."""

    def covered(shown: list) -> set[int]:
        return {t for s, e, _ in shown for t in range(int(s) // step, int(e) // step)}

    lost, run, longest = covered(before) - covered(after), 0, 0
    for t in range(max(lost, default=-1) + 1):
        run = run + 1 if t in lost else 0
        longest = max(longest, run)
    return longest * step


@pytest.fixture(scope="module")
def mics(tmp_path_factory, speech_dir) -> dict[str, tuple[Path, float]]:
    d = tmp_path_factory.mktemp("microphone")
    return {
        "passage": (d / "passage.wav", as_microphone_wav(speech_dir / "austen_passage.flac", d / "passage.wav")),
        "conversation": (
            d / "conversation.wav",
            as_microphone_wav(ROOT / "data" / "conversations" / "conv_2spk_clean.flac", d / "conversation.wav", 30.5),
        ),
    }


@pytest.mark.e2e
def test_a_person_records_on_the_page_reads_live_captions_then_the_transcript_with_audio(live_stack, mics, references):
    from playwright.sync_api import sync_playwright

    settings, state = live_stack
    wav, seconds = mics["passage"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER + microphone(wav))
        try:
            page = browser.new_context(permissions=["microphone"], viewport={"width": 1100, "height": 800}).new_page()
            seen = record_on_page(
                page, state["captions_url"], seconds, shot=ARTIFACTS / "record-live.png",
                language="en", hotwords="Dashwood, Norland", speakers=1,
            )  # fmt: skip
            page.screenshot(path=str(ARTIFACTS / "record-done.png"), full_page=True)
            # the finished view: the archived audio playing, downloads, the recording's summary
            page.wait_for_function("() => document.getElementById('player').readyState >= 1", timeout=10000)
            duration = page.evaluate("document.getElementById('player').duration")
            assert page.locator("#downloads a").count() == 5 and page.is_visible("#downloads")
            assert "COMPLETE" in page.inner_text("#status")
            assert page.get_attribute("#rec-message", "data-reason") == "complete"
        finally:
            browser.close()
    sid = seen["stream_id"]
    assert seen["url"].endswith(f"/streams/{sid}")  # the page became the stream's own as it recorded
    minutes, secs = seen["elapsed"].split(":")
    assert seen["max_level"] > 0.05 and 60 * int(minutes) + float(secs) >= seconds, seen  # meter and clock ran
    # live text is replaced, never blanked: a window or draft that covers the start of a sentence
    # leaves the rest of it in place. Half a second apart, no stretch of audio that had text loses
    # it for longer than a pause between words (a trimmed caption ends at its last word's end)
    blanks = [blanked_ms(a, b) for a, b in zip(seen["shown"], seen["shown"][1:])]
    worst = max(range(len(blanks)), key=blanks.__getitem__)
    print(f"longest stretch of audio whose text went between two samples: {blanks[worst]} ms")
    (ARTIFACTS / "record-shown.json").write_text(json.dumps(seen["shown"]))
    assert blanks[worst] <= 1000, (seen["shown"][worst], seen["shown"][worst + 1])
    # live: partials, then finals, arrived on this page while the person spoke
    assert any(e["kind"] == "FINAL" and not e["history"] and e["emitted_at_ms"] for e in seen["events"])
    wer = score(references["austen_passage.flac"], " ".join(seen["words"]))
    print(f"page transcript WER {wer.wer:.3f} ({wer.ref_words} reference words)")
    assert wer.wer <= 0.10, (wer.wer, seen["words"])  # the offline pass's bound in test_e2e
    assert seconds + 0.3 <= duration <= seconds + 4.0, duration  # the lead-in, the speech, the tail
    first_partial, onset = first_partial_ms(settings, seen)
    print(f"first partial {first_partial:.0f} ms after the first speech (onset {onset:.0f} ms into the stream)")
    assert 0 < first_partial <= 1500, first_partial
    # the page's options reached the stream
    meta = archived_meta(open_archive(settings), sid)
    assert meta["metadata"].get("num_speakers") == "1" and meta["language"] == "en", meta
    assert meta["hotwords"] == ["Dashwood", "Norland"] and meta["status"] == "COMPLETE", meta


@pytest.mark.e2e
def test_a_two_speaker_conversation_recorded_on_the_page_gets_two_speakers(live_stack, mics):
    from playwright.sync_api import sync_playwright

    _, state = live_stack
    wav, seconds = mics["conversation"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER + microphone(wav))
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            record_on_page(page, state["captions_url"], seconds)  # speakers: "don't know"
            lanes = page.evaluate("[...document.querySelectorAll('#timeline .lane')].length")
            speakers = set(
                page.evaluate("[...document.querySelectorAll('#transcript .word')].map(e => e.dataset.speaker)")
            )
        finally:
            browser.close()
    assert lanes == 2 and len(speakers - {""}) == 2, (lanes, speakers)


@pytest.mark.e2e
def test_a_denied_microphone_says_so_and_what_to_do(live_stack):
    from playwright.sync_api import sync_playwright

    _, state = live_stack
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[*BROWSER, "--use-fake-device-for-media-stream"])
        try:
            page = browser.new_context(permissions=[]).new_page()  # the prompt is dismissed: denied
            page.goto(state["captions_url"])
            page.click("#record")
            page.wait_for_selector("#rec-message[data-reason='microphone']", timeout=10000)
            text = page.inner_text("#rec-message")
            assert "denied" in text and "press Record again" in text, text
            assert page.evaluate("window.harkRecorder === undefined")  # nothing was opened
            assert not page.is_disabled("#record")  # and the button is there for the next try
        finally:
            browser.close()


@contextmanager
def captions_server(settings: Settings, port: int) -> Iterator[str]:
    """The captions app on ``port`` in this process (no results follower: nothing to index)."""
    import uvicorn

    from services.captions.app import create_app
    from services.captions.follower import Hub

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, Hub(), None),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=1,  # a page's open event stream does not hold the test up
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "captions did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def doors(live_stack, tmp_path_factory):
    """An ingest and a captions server with tokens on, each knowing the other's port only by the
    settings the embedded stack gives them (captions_port, ingest_port), publishing to topics no
    decoder reads."""
    settings, _ = live_stack
    tokens = tmp_path_factory.mktemp("record-tokens") / "tokens"
    s = dataclasses.replace(
        settings, topic_prefix=f"hark-record-{os.getpid()}.", tokens_file=str(tokens), captions_port=broker.free_port()
    )
    kafka.ensure_topics(s)
    acme = create_token(tokens, "acme")
    with running(s) as (ingest, url):
        c = dataclasses.replace(s, ingest_port=ingest.port)
        with captions_server(c, c.captions_port) as base:
            yield s, tokens, acme, base, url


@pytest.mark.e2e
def test_with_tokens_only_a_token_holder_records_and_a_refused_token_shows_its_message(doors, mics):
    from playwright.sync_api import sync_playwright

    s, tokens, _, base, _ = doors
    acme = create_token(tokens, "acme")  # this test's own: it revokes it
    time.sleep(1.2)  # the servers reload the tokens file twice a second
    wav, _ = mics["passage"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER + microphone(wav))
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            assert page.goto(base).status == 401  # no token: no page, no Record button
            page.goto(f"{base}?token={acme}")  # the token becomes the page's HttpOnly cookie
            page.click("#record")
            page.wait_for_selector("#recorder[data-state='recording']", timeout=20000)
            assert "token" not in page.url and acme not in page.content()  # the page never holds the token
            page.wait_for_function("() => window.harkRecorder.sentBytes > 96000", timeout=10000)  # a second of audio
            page.click("#stop")
            page.wait_for_selector("#recorder[data-state='stopped']", timeout=20000)
            sid = page.evaluate("window.harkRecorder.streamId")
            meta = archived_meta(open_archive(s), sid)
            assert meta["tenant"] == "acme" and meta["status"] == "COMPLETE", meta
            # the token is revoked: the next Record is refused with the reason, the microphone released
            second = create_token(tokens, "acme")
            page.goto(base)  # the page, loaded while its token was good
            revoke_tokens(tokens, acme)
            time.sleep(1.2)  # the servers reload the tokens file twice a second
            page.click("#record")
            page.wait_for_selector("#rec-message[data-reason='unauthorized']", timeout=10000)
            text = page.inner_text("#rec-message")
            assert "token was refused" in text and "unknown token" in text, text
            page.goto(f"{base}?token={second}")
            assert page.locator("#record").is_enabled()
        finally:
            browser.close()


@contextmanager
def ingest_and_page(s: Settings, **overrides) -> Iterator[tuple[object, str]]:
    """An ingest of its own (``overrides`` to its settings) and a captions page that records into it."""
    mine = dataclasses.replace(s, captions_port=broker.free_port(), **overrides)
    with (
        running(mine) as (ingest, _),
        captions_server(dataclasses.replace(mine, ingest_port=ingest.port), mine.captions_port) as base,
    ):
        yield ingest, base


@pytest.mark.e2e
def test_a_full_ingest_shows_its_reason_on_the_page(doors, mics):
    from playwright.sync_api import sync_playwright

    s, _tokens, _acme, _base, _ = doors
    wav, _ = mics["passage"]
    token = create_token(s.tokens_file, "acme")
    with ingest_and_page(s, ingest_max_connections=0) as (_, base), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER + microphone(wav))
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            page.goto(f"{base}?token={token}")
            page.click("#record")
            page.wait_for_selector("#recorder[data-state='refused']", timeout=20000)
            text = page.inner_text("#rec-message")
            assert "ingest is full right now" in text and "Try again in a minute" in text, text
        finally:
            browser.close()


@pytest.mark.e2e
def test_a_dropped_connection_keeps_what_arrived_and_the_page_says_so(doors, mics):
    from playwright.sync_api import sync_playwright

    s, _tokens, _acme, _base, _ = doors
    wav, _ = mics["passage"]
    token = create_token(s.tokens_file, "acme")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER + microphone(wav))
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            with ingest_and_page(s) as (_, base):
                page.goto(f"{base}?token={token}")
                page.click("#record")
                page.wait_for_function("() => window.harkRecorder && window.harkRecorder.sentBytes > 192000")
                sid = page.evaluate("window.harkRecorder.streamId")
            # ingest went away mid-sentence (its server stopped): the page says what happened
            page.wait_for_selector("#recorder[data-state='dropped']", timeout=20000)
            text = page.inner_text("#rec-message")
            assert "dropped after 0:" in text and "What arrived is kept" in text, text
        finally:
            browser.close()
    meta = archived_meta(open_archive(s), sid)  # and what arrived is a stream, ended, not lost
    assert meta["status"] == "ABORTED" and meta["total_samples"] >= 2 * 16000, meta


@pytest.mark.e2e
def test_a_ticket_opens_its_one_stream_once_and_other_pages_are_refused(doors):
    s, _tokens, acme, _base, url = doors

    async def attempt(ticket: str, sid: str, origin: str | None = None) -> dict:
        headers = {"Origin": origin} if origin else None
        async with connect(f"{url}?stream_id={sid}&ticket={ticket}", additional_headers=headers) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if first["type"] == "ready":
                await ws.send(b"\x00\x00" * 1600)
                await ws.send(json.dumps({"type": "end"}))
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), 20)
                except ConnectionClosed:
                    pass
            return first

    sid = f"rec-ticket-{time.time_ns()}"
    ticket = issue(acme, "acme", sid)
    page_origin = f"http://127.0.0.1:{s.captions_port}"
    assert asyncio.run(attempt(ticket, sid, origin=page_origin))["type"] == "ready"  # the page's origin
    again = asyncio.run(attempt(ticket, sid))
    assert again["type"] == "error" and "used already" in again["reason"], again
    other = asyncio.run(attempt(issue(acme, "acme", sid + "-a"), sid + "-b"))
    assert other["type"] == "error" and "another stream" in other["reason"], other
    forged = asyncio.run(attempt(issue("hark_not-a-token", "acme", sid + "-c"), sid + "-c"))
    assert forged["type"] == "error" and forged["error"] == "unauthorized", forged
    with pytest.raises(InvalidStatus) as refused:  # another site's page, at the handshake
        asyncio.run(attempt(issue(acme, "acme", sid + "-d"), sid + "-d", origin="http://evil.example"))
    assert refused.value.response.status_code == 403


def test_tickets_expire_and_die_with_their_token(tmp_path):
    tokens = tmp_path / "tokens"
    token = create_token(tokens, "acme")
    access = Access.load(Settings(tokens_file=str(tokens)))
    redeem = Redeemer(access).redeem
    now = time.time()
    assert redeem(issue(token, "acme", "s1", now=now), "s1", now=now)[0] == "acme"
    with pytest.raises(AccessDenied, match="expired"):
        redeem(issue(token, "acme", "s2", ttl_s=60, now=now), "s2", now=now + 61)
    with pytest.raises(AccessDenied, match="forged"):  # a tenant of the ticket's own choosing
        t = issue(token, "acme", "s3", now=now).split(".")
        body = json.loads(_unb64(t[1]))
        redeem(".".join([t[0], _b64(json.dumps({**body, "t": "globex"}).encode()), t[2]]), "s3", now=now)
    with pytest.raises(AccessDenied, match="malformed"):
        redeem("v1.not-json.x", "s4", now=now)
    pending = issue(token, "acme", "s5", now=now)
    revoke_tokens(tokens, token)
    access._checked = 0.0  # reload now rather than in half a second
    with pytest.raises(AccessDenied, match="revoked"):
        redeem(pending, "s5", now=now)


@pytest.mark.e2e
def test_the_page_allows_scripts_by_hash_and_connects_only_to_itself_and_ingest(live_stack):
    import urllib.request

    _, state = live_stack
    with urllib.request.urlopen(state["captions_url"]) as r:
        policy = dict(part.strip().split(" ", 1) for part in r.headers["Content-Security-Policy"].split(";"))
    scripts = policy["script-src"].split()
    assert all(s.startswith("'sha256-") for s in scripts[:-1]) and scripts[-1] == "'strict-dynamic'", scripts
    ingest = state["ingest_url"].split("/v1/")[0]
    assert policy["connect-src"].split() == ["'self'", ingest], policy["connect-src"]


@pytest.mark.e2e
def test_a_page_that_is_not_a_secure_context_says_it_needs_https(doors):
    """Served under a name other than loopback's over plain http (as on a LAN), the browser gives
    no microphone: the page says so and how to fix it, with the button off."""
    from playwright.sync_api import sync_playwright

    s, _tokens, acme, _base, _ = doors
    with ingest_and_page(s, captions_allowed_hosts="hark.test") as (_, base), sync_playwright() as pw:
        lan = base.replace("127.0.0.1", "hark.test")
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=[*BROWSER, "--host-resolver-rules=MAP hark.test 127.0.0.1"]
        )
        try:
            page = browser.new_page()
            page.goto(f"{lan}?token={acme}")
            assert page.evaluate("window.isSecureContext") is False
            assert page.is_disabled("#record")
            assert page.get_attribute("#rec-message", "data-reason") == "insecure"
            text = page.inner_text("#rec-message")
            assert "https://" in text and "localhost" in text and "docs/deployment.md" in text, text
        finally:
            browser.close()


def _post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.e2e
def test_the_record_endpoint_refuses_other_sites_other_bodies_and_other_tenants(doors):
    import urllib.error
    import urllib.request

    _, tokens, acme, base, url = doors
    globex = create_token(tokens, "globex")
    time.sleep(1.2)  # the servers reload the tokens file twice a second
    ok = {"Authorization": f"Bearer {acme}", "Content-Type": "application/json"}
    status, answer = _post(f"{base}api/record", b'{"language": "en", "speakers": 2}', ok)
    assert status == 200 and answer["tenant"] == "acme" and "ticket=" in answer["url"], answer
    assert acme not in answer["url"] and answer["url"].startswith(url + "?")
    sid = answer["stream_id"]
    assert _post(f"{base}api/record", b"{}", {**ok, "Origin": "http://evil.example"})[0] == 403
    assert (
        _post(f"{base}api/record", b"language=en", {**ok, "Content-Type": "application/x-www-form-urlencoded"})[0]
        == 415
    )
    assert _post(f"{base}api/record", b"{" + b" " * (17 << 10) + b"}", ok)[0] == 413
    status, answer = _post(f"{base}api/record", b'{"speakers": 99}', ok)
    assert status == 400 and "speakers" in answer["reason"], answer
    status, answer = _post(f"{base}api/record", b'{"language": "xx-nope"}', ok)
    assert status == 400 and answer["error"] == "bad_option", answer

    # the page that asked follows its new stream before anything of it is indexed; no other tenant does
    def events(token: str) -> int:
        req = urllib.request.Request(f"{base}api/streams/{sid}/events", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert events(acme) == 200 and events(globex) == 404

    # a malformed ticket, ASCII or not, is refused as unauthorized, not a server error
    async def opened(ticket: str) -> dict:
        async with connect(f"{url}?stream_id=x-{time.time_ns()}&ticket={ticket}") as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 20))

    for bad in ("v1.%C3%A9.%C3%A9", "v1." + "A" * 40 + "." + "%C3%A9" * 43, "v2.e30." + "A" * 43, "%00"):
        answer = asyncio.run(opened(bad))
        assert answer["type"] == "error" and answer["error"] == "unauthorized", (bad, answer)


def test_a_tenant_asking_without_end_is_held_to_its_own_rate_and_its_own_ids():
    from services.captions.record import MAX_PENDING, RATE, Recordings

    r = Recordings()
    assert all(r.allow("acme", now=100.0) for _ in range(RATE)) and not r.allow("acme", now=100.0)
    assert r.allow("globex", now=100.0) and r.allow("acme", now=161.0)  # another tenant; a minute later
    r.add("globex-1", "globex")
    for i in range(MAX_PENDING + 10):
        r.add(f"acme-{i}", "acme")
    assert r.handed_to("globex-1", "globex") and not r.handed_to("globex-1", "acme")
    assert r.handed_to(f"acme-{MAX_PENDING + 9}", "acme") and not r.handed_to("acme-0", "acme")
