"""The doors under hostile clients: ingest's WebSocket endpoint against what an attacker sends.

An ingest runs in this process (so its admission counters and partition slots can be read after
each case) on the live stack's broker, publishing to an audio topic of its own that no decoder
reads: floods and decode bombs load the broker only. The stream-id race runs two real ingest
replicas against the stack's own audio topic, so its transcripts are the pipeline's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from hark import broker, kafka, security
from hark.storage import archived_meta
from hark.tenants import create_token, revoke_tokens
from services.ingest.live import LiveStream
from services.ingest.server import IngestServer

from .conftest import ROOT
from .helpers import collect, complete_record, running

pytestmark = pytest.mark.e2e

SILENCE = b"\x00\x00" * 3200  # 0.2 s at 16 kHz


@pytest.fixture(scope="module")
def doors(live_stack):
    settings, _ = live_stack
    s = dataclasses.replace(
        settings,
        topic_prefix=f"hark-doors-{os.getpid()}.",  # topics no decoder reads
        ingest_max_streams=4,
        tenant_max_connections=3,
        live_pace_factor=2.0,
        live_burst_seconds=2.0,
        max_upload_seconds=300.0,
        upload_idle_timeout_s=3.0,
    )
    kafka.ensure_topics(s)
    with running(s) as (server, url):
        yield server, url, s


def settled(server: IngestServer, timeout: float = 15.0) -> dict:
    """The server's counters once no stream is open (what a leak would keep above zero)."""
    deadline = time.monotonic() + timeout
    while (h := server.health())["open_streams"] or h["open_partition_slots"]:
        assert time.monotonic() < deadline, f"slots still held: {h}"
        time.sleep(0.05)
    return h


async def _exchange(url: str, frames: list, text_bytes: bool = False) -> tuple[list[dict], int | None]:
    """Connect, send ``frames`` after ready (bytes as binary, str as text, bytes as a text frame
    when ``text_bytes``, None: close), then read until the server closes: (its messages, its close
    code)."""
    answers: list[dict] = []
    async with connect(url, max_size=None) as ws:
        try:
            answers.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            if answers[0]["type"] == "ready":
                for f in frames:
                    if f is None:
                        await ws.close()
                    elif text_bytes and isinstance(f, bytes):
                        await ws.send(f, text=True)
                    else:
                        await ws.send(f)
            while True:
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                if answers[-1]["type"] != "ready":
                    await ws.close()
        except ConnectionClosed as e:
            return answers, e.rcvd.code if e.rcvd else None
    return answers, None


HOSTILE_TEXT = {
    "nesting 200,000 deep": "[" * 200_000,  # raised RecursionError in the parser: a leaked slot each
    "nesting 3,000 deep, under the length cap": "[" * 3000,
    "a 4,000-digit type": '{"type": ' + "9" * 4000 + "}",
    "not JSON": "end",
    "another type": '{"type": "start"}',
    "an array": '[{"type": "end"}]',
    "a NUL": "\x00",
    "a lone surrogate escape": '{"type": "\\ud800"}',
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEXT))
def test_a_hostile_text_frame_ends_the_stream_with_a_reason_and_releases_its_slots(doors, case):
    server, url, _ = doors
    sid = f"hostile-{abs(hash(case))}-{time.time_ns()}"
    answers, code = asyncio.run(_exchange(f"{url}?stream_id={sid}", [SILENCE, HOSTILE_TEXT[case]]))
    assert [a["type"] for a in answers] == ["ready", "error"] and answers[1]["error"] == "bad_message", answers
    assert code == 1008 and answers[1]["reason"]
    settled(server)
    meta = archived_meta(server.ingest.store, sid)
    assert meta["status"] == "ERROR" and meta["total_samples"] == 3200  # what arrived is a stream


def test_odd_frames_and_numbers_leave_nothing_open_and_more_of_them_than_slots_lock_no_one_out(doors):
    server, url, settings = doors
    cases = [
        ([SILENCE, b"\xff\xfe\xfd"], True),  # a text frame that is not UTF-8: the protocol closes (1007)
        ([SILENCE, b"\x00", None], False),  # half a sample, then a clean close without end
        ([SILENCE, '{"type": "end", "n": 1e999999}'], False),  # a number past float: inf, still an end
    ]
    for frames, text_bytes in cases:
        answers, code = asyncio.run(_exchange(url, frames, text_bytes))
        assert code != 1011, (frames, answers, code)  # never an internal error
        settled(server)
    assert settled(server)["connections"] == 0
    # the finding: 32 frames of nesting filled every slot until a restart; here 2 x the limit of 4
    for _ in range(2 * settings.ingest_max_streams):
        answers, _ = asyncio.run(_exchange(url, ["[" * 200_000]))
        assert answers[-1]["error"] == "bad_message"
    answers, _ = asyncio.run(_exchange(f"{url}?tenant=other", [SILENCE, '{"type": "end"}']))
    assert [a["type"] for a in answers] == ["ready", "done"]
    for bad in ("%C2%B2", "1" * 4301, "-16000", "16000%0A"):  # ², too many digits, a sign, a newline
        answers, _ = asyncio.run(_exchange(f"{url}?sample_rate={bad}", []))
        assert answers[0]["error"] == "bad_parameter" and "sample_rate" in answers[0]["reason"], answers
    settled(server)


def test_a_defect_inside_ingest_still_ends_the_stream_and_tells_the_client(doors, monkeypatch):
    server, url, _ = doors

    def broken(self, message):
        raise RuntimeError("a defect")

    monkeypatch.setattr(LiveStream, "_take", broken)
    sid = f"defect-{time.time_ns()}"
    answers, code = asyncio.run(_exchange(f"{url}?stream_id={sid}", [SILENCE]))
    assert answers[-1]["error"] == "internal" and code == 1011, answers
    settled(server)
    assert archived_meta(server.ingest.store, sid)["status"] == "ERROR"


def test_a_live_flood_is_held_to_the_pace_factor_then_refused(doors):
    server, url, settings = doors
    message = b"\x01\x00" * 16000  # 1 s of audio per message

    async def flood() -> tuple[float, dict]:
        async with connect(f"{url}?tenant=flooder", max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 60:  # as fast as the server lets it
                    await ws.send(message)
                    # a send that fits the socket's buffers completes without yielding, and where they
                    # are large (tcp_rmem up to 32 MB) this loop would not read the server's answer for
                    # many seconds: a client that also reads, as every real one does
                    await asyncio.sleep(0)
            except ConnectionClosed:
                pass
            return time.monotonic() - t0, json.loads(await ws.recv())

    elapsed, reply = asyncio.run(flood())
    assert reply["error"] == "too_fast" and "format=file" in reply["reason"], reply
    published = server.ingest.admission.used("flooder")
    # refused once its audio ran more than the burst ahead of the clock: one message past it at most
    assert 0 < published <= elapsed + settings.live_burst_seconds + 1.0, (published, elapsed)
    settled(server)

    # a client that fell behind (a stall of 3 s) sends its backlog at once: held to the pace, not refused
    async def catching_up() -> tuple[dict, float]:
        async with connect(f"{url}?tenant=stalled") as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            t0 = time.monotonic()
            await ws.send(SILENCE * 5)
            await asyncio.sleep(4)
            await ws.send(SILENCE * 15)  # the 3 s it could not send, and the second since
            await ws.send(json.dumps({"type": "end"}))
            return json.loads(await ws.recv()), time.monotonic() - t0

    done, took = asyncio.run(catching_up())
    assert done["type"] == "done" and done["seconds"] == 4.0, done
    assert took >= 4.0 + (3.0 - settings.live_burst_seconds) / settings.live_pace_factor - 0.1  # it was held


def _silent_flac(path: Path, seconds: int) -> Path:
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16", format="FLAC") as f:
        block = np.zeros(16000 * 60, dtype=np.int16)
        for _ in range(seconds // 60):
            f.write(block)
    return path


def test_decode_bombs_are_capped_and_a_live_stream_is_served_beside_them(doors, tmp_path):
    server, url, _ = doors
    bomb = _silent_flac(tmp_path / "bomb.flac", 3600).read_bytes()  # an hour of silence
    assert len(bomb) < 1 << 20

    async def scenario() -> tuple[list[float], list[dict], list[int]]:
        async def upload(i: int) -> dict:
            async with connect(f"{url}?format=file&tenant=bomber{i}", max_size=None) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(bomb)
                await ws.send(json.dumps({"type": "end"}))
                return json.loads(await asyncio.wait_for(ws.recv(), 300))

        bombs = [asyncio.create_task(upload(i)) for i in range(3)]
        while server.ingest.admission.used("bomber0") < 60:  # they are publishing
            await asyncio.sleep(0.05)
        waits, in_flight = [], []
        for _ in range(3):
            t0 = time.monotonic()
            async with connect(f"{url}?tenant=listener") as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                waits.append(time.monotonic() - t0)
                in_flight.append(sum(not b.done() for b in bombs))  # bombs still decoding when it was served
                await ws.send(json.dumps({"type": "end"}))
                assert json.loads(await ws.recv())["type"] == "done"
        return waits, await asyncio.gather(*bombs), in_flight

    waits, replies, in_flight = asyncio.run(scenario())
    # at least one live stream was served while bombs decoded (a fast machine ends them sooner)
    assert in_flight[0], "the bombs finished before the live stream was measured: nothing was shown"
    assert max(waits) < 1.0, waits  # was 53-61 s behind six bombs on asyncio's default pool
    for r in replies:
        assert r["type"] == "error" and r["error"] == "too_long" and "300 s" in r["reason"], r
    settled(server)


def test_uploads_count_in_admission_and_connections_are_capped_per_tenant_and_in_all(doors):
    server, url, settings = doors

    async def scenario() -> dict:
        out: dict = {}
        holders = []
        try:
            for _ in range(settings.tenant_max_connections):  # uploads that send a little, then hold
                ws = await connect(f"{url}?format=file&tenant=holder", max_size=None)
                holders.append(ws)
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(b"\x00" * 100_000)
            async with connect(f"{url}?format=file&tenant=holder") as ws:
                out["tenant"] = json.loads(await ws.recv())
            out["counted"] = server.health()["open_streams"]
            async with connect(f"{url}?format=file&tenant=other") as ws:  # the 4th stream: the replica's last
                out["other"] = json.loads(await ws.recv())
                async with connect(f"{url}?tenant=third") as ws2:
                    out["full"] = json.loads(await ws2.recv())
                await ws.send(json.dumps({"type": "end"}))
                out["empty"] = json.loads(await ws.recv())
        finally:
            for ws in holders:
                await ws.close()
        return out

    out = asyncio.run(scenario())
    assert out["tenant"]["error"] == "tenant_limit", out
    assert out["counted"] == settings.tenant_max_connections
    assert out["other"]["type"] == "ready" and out["full"]["error"] == "capacity", out
    assert out["empty"]["error"] == "empty", out
    settled(server)
    # an upload that stops sending is ended, and its slot given back
    answers, _ = asyncio.run(_exchange(f"{url}?format=file", [b"RIFF"]))
    assert answers[-1]["error"] == "idle", answers
    settled(server)


def test_revoking_a_token_ends_its_open_stream_and_keeps_what_arrived(doors, tmp_path):
    _, _, settings = doors
    tokens = tmp_path / "tokens"
    token = create_token(tokens, "acme")
    with running(dataclasses.replace(settings, tokens_file=str(tokens))) as (server, url):

        async def scenario() -> tuple[dict, float, str]:
            sid = f"revoked-{time.time_ns()}"
            async with connect(f"{url}?stream_id={sid}&token={token}") as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                for _ in range(5):
                    await ws.send(SILENCE)
                    await asyncio.sleep(0.2)
                revoke_tokens(tokens, "acme")
                t0 = time.monotonic()
                try:
                    while True:  # a client that goes on talking
                        await ws.send(SILENCE)
                        await asyncio.sleep(0.05)
                except ConnectionClosed:
                    pass
                return json.loads(await ws.recv()), time.monotonic() - t0, sid

        reply, took, sid = asyncio.run(scenario())
        assert reply["error"] == "unauthorized", reply
        assert took < 2.0, took  # the tokens file is looked at twice a second, the token four times
        settled(server)
        meta = archived_meta(server.ingest.store, sid)
        assert meta["status"] == "ERROR" and meta["total_samples"] >= 5 * 3200


def test_a_tokens_file_in_the_data_dir_is_enforced_once_it_exists(doors, tmp_path):
    _, _, settings = doors
    with running(dataclasses.replace(settings, data_dir=tmp_path, tokens_file="")) as (_, url):
        first, _ = asyncio.run(_exchange(url, ['{"type": "end"}']))
        assert first[0]["type"] == "ready"
        token = create_token(tmp_path / "tokens", "acme")  # what `hark token create acme` writes
        deadline = time.monotonic() + 10
        while (answers := asyncio.run(_exchange(url, ['{"type": "end"}']))[0])[0]["type"] == "ready":
            assert time.monotonic() < deadline, "anonymous streams still accepted"
            time.sleep(0.2)
        assert answers[0]["error"] == "unauthorized"
        assert asyncio.run(_exchange(f"{url}?token={token}", ['{"type": "end"}']))[0][0]["type"] == "ready"


# ---- one stream id, two tenants, two ingest replicas ---------------------------------------------
def _replica(live_stack, tokens: Path, log: Path) -> tuple[subprocess.Popen, str]:
    settings, state = live_stack
    creds = security.Credentials.load(Path(state["credentials"]))
    port = broker.free_port()
    env = {
        **os.environ,
        **creds.env("ingest"),
        "HARK_TOKENS_FILE": str(tokens),
        "HARK_BOOTSTRAP": settings.bootstrap,
        "HARK_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
        "HARK_HEALTH_PORT": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ingest", "--port", str(port)], env=env, cwd=ROOT, stderr=open(log, "wb")
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"ws://127.0.0.1:{port}/v1/streams"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"ingest replica did not start: {log.read_text()[-2000:]}")


def test_one_stream_id_is_claimed_once_across_tenants_and_replicas(live_stack, tmp_path):
    settings, _ = live_stack
    tokens = tmp_path / "tokens"
    acme, globex = create_token(tokens, "acme"), create_token(tokens, "globex")
    replicas = [_replica(live_stack, tokens, tmp_path / f"ingest{i}.log") for i in range(2)]
    # four contenders per id, each with audio of its own length: the length names the owner
    contenders = [(acme, 0, 5), (globex, 1, 7), (acme, 1, 9), (globex, 0, 11)]  # token, replica, 0.2 s pieces
    ids = [f"race-{i}-{time.time_ns()}" for i in range(6)]

    async def race(sid: str) -> list[dict]:
        async def one(token: str, replica: int, pieces: int) -> dict:
            async with connect(f"{replicas[replica][1]}?stream_id={sid}&token={token}") as ws:
                first = json.loads(await ws.recv())
                if first["type"] != "ready":
                    return first
                for _ in range(pieces):
                    await ws.send(SILENCE)
                await ws.send(json.dumps({"type": "end"}))
                return json.loads(await ws.recv())

        return await asyncio.gather(*(one(*c) for c in contenders))

    try:
        results = {sid: asyncio.run(race(sid)) for sid in ids}
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(10)
    owners = {}
    for sid, replies in results.items():
        won = [(c, r) for c, r in zip(contenders, replies) if r["type"] == "done"]
        assert len(won) == 1, (sid, replies)
        assert all(r["error"] == "stream_exists" for r in replies if r["type"] != "done"), replies
        (token, _, pieces), reply = won[0]
        owners[sid] = ("acme" if token == acme else "globex", pieces * 3200)
        assert reply["chunks"] == pieces
    # the log holds each id's owner's audio and nobody else's, and the transcript is the owner's
    records = collect(
        settings,
        settings.audio_topic,
        lambda recs: all(any(t == "StreamEnd" and r["stream_id"] == sid for t, r in recs) for sid in ids),
    )
    for sid, (tenant, samples) in owners.items():
        mine = [(t, r) for t, r in records if r["stream_id"] == sid]
        assert {r["tenant"] for _, r in mine} == {tenant}, (sid, tenant)
        assert sum(len(r["pcm"]) // 2 for t, r in mine if t == "AudioChunk") == samples
        assert [r["status"] for t, r in mine if t == "StreamEnd"] == ["COMPLETE"]
        assert complete_record(settings, sid, timeout=120)["tenant"] == tenant
