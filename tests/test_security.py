"""Tenants, tokens, erasure and retention against the live stack, with real service processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from hark import broker, kafka, security
from hark.audio import AudioError
from hark.erasure import retention_sweep
from hark.storage import archive_prefix, open_store
from hark.tenants import create_token

from .conftest import ROOT, run_hark
from .helpers import collect, complete_record

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secured(live_stack, tmp_path_factory):
    """An ingest endpoint and a captions server of the live stack that require tenant tokens."""
    settings, state = live_stack
    creds = security.Credentials.load(Path(state["credentials"]))  # each server logs in as itself
    d = tmp_path_factory.mktemp("secured")
    tokens = d / "tokens"
    acme, globex = create_token(tokens, "acme"), create_token(tokens, "globex")
    ingest_port, captions_port = broker.free_ports(2)
    env = {
        **os.environ,
        "HARK_TOKENS_FILE": str(tokens),
        "HARK_BOOTSTRAP": settings.bootstrap,
        "HARK_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
        "HARK_INDEX_PATH": str(d / "index.sqlite"),
        "HARK_HEALTH_PORT": "0",
        # as `hark up` gives them: the page records through this ingest, which admits that page
        "HARK_INGEST_PORT": str(ingest_port),
        "HARK_CAPTIONS_PORT": str(captions_port),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "services.ingest", "--port", str(ingest_port)],
            env={**env, **creds.env("ingest")},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(d / "ingest.log", "wb"),
        ),
        subprocess.Popen(
            [sys.executable, "-m", "hark_cli", "serve", "--port", str(captions_port)],
            env={**env, **creds.env("captions")},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(d / "captions.log", "wb"),
        ),
    ]
    base = f"http://127.0.0.1:{captions_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # both up: ingest accepts connections, captions answers
        try:
            socket.create_connection(("127.0.0.1", ingest_port), timeout=1).close()
            urllib.request.urlopen(base + "/api/streams", timeout=1)
        except urllib.error.HTTPError:  # 401: it is up
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield {
            "ingest": f"ws://127.0.0.1:{ingest_port}/v1/streams",
            "captions": base,
            "acme": acme,
            "globex": globex,
            "tokens": tokens,
            "index": d / "index.sqlite",
        }
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def upload(url: str, data: bytes, headers: dict | None = None) -> dict:
    async def client():
        async with connect(url, additional_headers=headers or {}) as ws:
            first = json.loads(await ws.recv())
            if first["type"] != "ready":
                return first
            for i in range(0, len(data), 16384):
                await ws.send(data[i : i + 16384])
            await ws.send(json.dumps({"type": "end"}))
            return json.loads(await ws.recv())

    return asyncio.run(client())


def get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def audio(url: str, token: str | None, byte_range: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if byte_range:
        headers["Range"] = byte_range
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_tokens_map_to_tenants_and_each_tenant_sees_only_its_streams(live_stack, secured, speech_dir):
    settings, _ = live_stack
    data = (speech_dir / "goforward.wav").read_bytes()
    t = time.time_ns()
    # no token, an unknown token, another tenant's name: refused with a reason, nothing published
    assert upload(f"{secured['ingest']}?stream_id=anon-{t}&format=file", data) == {
        "type": "error",
        "error": "unauthorized",
        "reason": "a token is required (Authorization: Bearer TOKEN or ?token=)",
    }
    assert upload(f"{secured['ingest']}?stream_id=bad-{t}&format=file&token=nope", data)["error"] == "unauthorized"
    assert (
        upload(
            f"{secured['ingest']}?stream_id=spoof-{t}&format=file&tenant=globex",
            data,
            {"Authorization": f"Bearer {secured['acme']}"},
        )["error"]
        == "forbidden"
    )

    a, g = f"acme-{t}", f"globex-{t}"
    assert (
        upload(f"{secured['ingest']}?stream_id={a}&format=file", data, {"Authorization": f"Bearer {secured['acme']}"})[
            "type"
        ]
        == "done"
    )
    assert upload(f"{secured['ingest']}?stream_id={g}&format=file&token={secured['globex']}", data)["type"] == "done"
    # a stream id is a global key: another tenant cannot publish into it
    assert (
        upload(f"{secured['ingest']}?stream_id={a}&format=file&token={secured['globex']}", data)["error"]
        == "stream_exists"
    )
    assert complete_record(settings, a)["tenant"] == "acme"
    assert complete_record(settings, g)["tenant"] == "globex"

    base = secured["captions"]
    for sid, token in ((a, secured["acme"]), (g, secured["globex"])):
        deadline = time.monotonic() + 30  # the captions server indexes asynchronously
        while time.monotonic() < deadline:
            code, body = get(f"{base}/api/streams/{sid}/export?format=json", token)
            if code == 200:
                break
            time.sleep(0.3)
        assert code == 200 and json.loads(body)["stream_id"] == sid
    assert get(f"{base}/api/streams")[0] == 401
    assert get(f"{base}/api/streams", "wrong")[0] == 401
    streams = {s["stream_id"]: s["tenant"] for s in json.loads(get(f"{base}/api/streams", secured["acme"])[1])}
    assert a in streams and g not in streams and set(streams.values()) == {"acme"}
    hits = json.loads(get(f"{base}/api/search?q=forward", secured["acme"])[1])["hits"]
    assert hits and {h["stream_id"] for h in hits} <= set(streams)
    assert get(f"{base}/api/streams/{g}/export?format=vtt", secured["acme"])[0] == 404  # as if it did not exist
    assert get(f"{base}/api/streams/{g}/events", secured["acme"])[0] == 404
    assert get(f"{base}/api/streams/{g}/export?format=vtt", secured["globex"])[0] == 200
    # the archived audio: its tenant hears it (a range of it), another tenant gets 404
    assert audio(f"{base}/api/streams/{g}/audio", secured["acme"])[0] == 404
    assert audio(f"{base}/api/streams/{g}/audio", None)[0] == 401
    code, head = audio(f"{base}/api/streams/{g}/audio", secured["globex"], "bytes=0-11")
    assert code == 206 and head[:4] == b"RIFF" and head[8:12] == b"WAVE" and len(head) == 12
    # the page sets a cookie from ?token= so its own requests carry it
    with urllib.request.urlopen(f"{base}/?token={secured['acme']}", timeout=10) as r:
        assert "hark_token=" in r.headers.get("Set-Cookie", "") and "HttpOnly" in r.headers.get("Set-Cookie", "")


def test_a_revoked_token_stops_working_without_a_restart(secured, speech_dir):
    """The finding: a revoked token worked until the servers restarted."""
    from hark.tenants import create_token

    token = create_token(secured["tokens"], "acme")
    base = secured["captions"]
    deadline = time.monotonic() + 5  # the servers look at the file at most once a second
    while get(f"{base}/api/streams", token)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(f"{base}/api/streams", token)[0] == 200
    proc = run_hark("token", "revoke", token, "--file", str(secured["tokens"]))
    assert proc.returncode == 0 and "1 token(s) removed" in proc.stderr, proc.stderr
    deadline = time.monotonic() + 5
    while get(f"{base}/api/streams", token)[0] != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(f"{base}/api/streams", token)[0] == 401
    data = (speech_dir / "goforward.wav").read_bytes()
    refused = upload(f"{secured['ingest']}?format=file&token={token}", data)
    assert refused == {"type": "error", "error": "unauthorized", "reason": "unknown token"}
    assert get(f"{base}/api/streams", secured["acme"])[0] == 200  # the tenant's other token still works


def test_erase_removes_audio_index_entries_and_results_and_is_audited(live_stack, secured, speech_dir):
    settings, _ = live_stack
    sid = f"erase-me-{time.time_ns()}"
    data = (speech_dir / "forever_input_2_16k.wav").read_bytes()
    assert upload(f"{secured['ingest']}?stream_id={sid}&format=file&token={secured['acme']}", data)["type"] == "done"
    complete_record(settings, sid)
    base, token = secured["captions"], secured["acme"]
    deadline = time.monotonic() + 30
    while get(f"{base}/api/streams/{sid}/export?format=vtt", token)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    store = open_store(settings)
    assert store.list(archive_prefix(sid))

    proc = run_hark("erase", sid, "--reason", "test", "--bootstrap", settings.bootstrap)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["archive_objects"] >= 3
    # acme's own topics too where a login made them (tests/test_published.py, test_clients_doc.py)
    assert report["tombstones"][0] == settings.results_topic
    assert set(report["tombstones"][1:]) <= {settings.published_topic("acme"), settings.produce_topic("acme")}
    assert store.list(archive_prefix(sid)) == []
    # the secured captions server has its own index: it erases the stream when it reads the tombstone
    deadline = time.monotonic() + 30
    while get(f"{base}/api/streams/{sid}/export?format=vtt", token)[0] != 404 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert get(f"{base}/api/streams/{sid}/export?format=vtt", token)[0] == 404
    assert sid not in get(f"{base}/api/streams", token)[1]
    assert all(h["stream_id"] != sid for h in json.loads(get(f"{base}/api/search?q=forever", token)[1])["hits"])
    # the stack's own captions index too (erased directly by `hark erase`)
    assert run_hark("export", sid, "--format", "json").returncode == 1
    # the tombstone is on the results topic, after the stream's records
    c = kafka.tail_consumer(settings, settings.results_topic, from_beginning=True)
    try:
        tomb, deadline = None, time.monotonic() + 20
        while tomb is None and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if not m.error() and m.key() == sid.encode() and m.value() is None:
                    tomb = m
    finally:
        c.close()
    assert tomb is not None
    audit = [json.loads(line) for line in (settings.data_dir / "audit" / "erasures.jsonl").read_text().splitlines()]
    entry = next(
        e for e in audit if e.get("kind", "stream") == "stream" and e["stream_id"] == sid
    )  # voices are audited there too
    assert entry["tenant"] == "acme" and entry["reason"] == "test" and "text" not in json.dumps(entry)


def _live_client(url: str, pcm: bytes, out: dict) -> None:
    """Publishes ``pcm`` in real time over one live connection until the server ends it or the
    audio runs out; ``out`` gets every message the server sent."""

    async def client():
        async with connect(url) as ws:
            out["messages"] = [json.loads(await ws.recv())]
            try:
                for i in range(0, len(pcm), 6400):  # 200 ms messages at real-time pace
                    await ws.send(pcm[i : i + 6400])
                    await asyncio.sleep(0.2)
                await ws.send(json.dumps({"type": "end"}))
            except ConnectionClosed:
                pass
            try:  # what the server said before it closed (messages received stay readable)
                while True:
                    out["messages"].append(json.loads(await ws.recv()))
            except ConnectionClosed as e:
                out["closed"] = e.rcvd.code if e.rcvd else None

    asyncio.run(client())


def _records_of(settings, sid: str, keys) -> tuple[list[tuple[str, int]], list[tuple[str, str, dict, int]]]:
    """Every record keyed ``sid`` on every hark topic: (the ones sealed with an erased key as
    (topic, timestamp ms), the readable ones as (topic, type, record, timestamp ms))."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from hark import serde

    c = kafka.consumer(settings, f"hark-tail-scan-{time.time_ns()}", **{"enable.partition.eof": True})
    parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in settings.all_topics for p in range(settings.partitions)]
    c.assign(parts)
    sealed: list[tuple] = []  # (topic, timestamp)
    readable: list[tuple] = []  # (topic, record type, record, timestamp)
    eof: set[tuple] = set()  # (topic, partition)
    deadline = time.monotonic() + 60
    try:
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error():
                    eof.add((m.topic(), m.partition()))
                    continue
                if m.key() != sid.encode() or m.value() is None:
                    continue
                try:
                    rtype, rec = serde.decode_message(m, keys)
                except serde.Erased:
                    sealed.append((m.topic(), m.timestamp()[1]))
                    continue
                readable.append((m.topic(), rtype, rec, m.timestamp()[1]))
    finally:
        c.close()
    assert len(eof) == len(parts), "the scan did not reach the end of every partition"
    return sealed, readable


def _index_mentions(path: Path, sid: str) -> int:
    """Times the stream id occurs in the index's files, the WAL included (every row of a stream
    carries its id; an erased one keeps only its entry in the erased table)."""
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.read_bytes().count(sid.encode()) for f in files if f.exists())


def test_erasing_a_live_stream_stops_it_and_leaves_nothing_readable_anywhere(live_stack, secured, speech_dir):
    """The erasure finding: a live stream erased mid-way kept writing behind the tombstone, its
    records stayed readable in the log, and its id could be published again."""
    from hark.audio import read_pcm_file
    from hark.keys import Keyring, master_key, open_key_store

    settings, _ = live_stack
    sid = f"erase-live-{time.time_ns()}"
    names = [f"sense_and_sensibility_01_austen_64kb-{n}.wav" for n in ("0870", "0890", "0920", "0880")]
    pcm = b"".join(read_pcm_file(speech_dir / n).tobytes() for n in names)  # ~25 s
    out: dict = {}
    url = f"{secured['ingest']}?stream_id={sid}&format=pcm_s16le&token={secured['acme']}"
    client = ThreadPoolExecutor(1).submit(_live_client, url, pcm, out)

    # live: text of it reaches the results topic, the archive, and the secured captions index (an
    # online final, so the online topic holds some too: a draft of offline text can come first)
    def has_text(recs):
        return any(
            r["stream_id"] == sid and r["kind"] == "FINAL" and r["source"] == "online" and r["text"].strip()
            for t, r in recs
        )

    collect(settings, settings.results_topic, has_text, timeout=60)
    base, token = secured["captions"], secured["acme"]
    deadline = time.monotonic() + 20
    while sid not in get(f"{base}/api/streams", token)[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    page: dict = {}
    page_open = threading.Event()

    def watch():  # an open page of the stream
        req = urllib.request.Request(f"{base}/api/streams/{sid}/events", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            page_open.set()  # the server subscribes the page to the stream before it answers
            for line in r:
                if line.startswith(b"data:") and json.loads(line[5:])["kind"] == "ERASED":
                    page["told"] = True
                    return

    watcher = ThreadPoolExecutor(1).submit(watch)
    assert _index_mentions(secured["index"], sid) > 1
    while not page_open.wait(0.2):  # the page is open before the erase, or the watcher says why not
        assert not watcher.done(), watcher.exception()
    assert not client.done(), "the stream ended before it could be erased live"

    erased_at = time.time() * 1000
    proc = run_hark("erase", sid, "--reason", "test-live", "--bootstrap", settings.bootstrap)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["key_deleted"] is True

    # the live connection is ended with the reason, well before its audio ran out
    client.result(timeout=60)
    assert out["messages"][-1] == {
        "type": "error",
        "error": "stream_erased",
        "reason": f"stream {sid} was erased; no more of its audio is accepted",
    }
    assert time.time() * 1000 - erased_at < 10_000
    watcher.result(timeout=30)
    assert page.get("told"), "an open page of the stream was not told"

    # A fixed wait, on purpose: what it stands for is "no record of the stream is still on its way",
    # an absence no reader can observe; the check below then finds any record written later than
    # 3 s after the erase took effect.
    time.sleep(3)
    # read as a process that never saw the key would (this one cached it while the stream was live)
    keys = Keyring(open_key_store(settings), master_key(settings))
    sealed, readable = _records_of(settings, sid, keys)
    # the stream's audio, transcripts and results, all sealed with the erased key
    assert {t for t, _ in sealed} >= {settings.audio_topic, settings.online_topic, settings.results_topic}
    assert len(sealed) > 20
    for topic, rtype, rec, _ts in readable:  # only the content-free notices that it ended
        if rtype == "StreamEnd":
            assert str(rec["status"]) == "ERASED", (topic, rec)
        else:
            assert rec.get("end_status") == "ERASED" and not rec.get("text") and not rec.get("words"), (topic, rec)
    # nothing of the stream was written after the erase took effect (ingest checks each second)
    assert [(t, ts - erased_at) for t, ts in sealed if ts > erased_at + 3000] == []
    # the key is gone, the archive and the index hold nothing of it
    assert not keys.store.exists(f"{sid}.key") and keys.store.exists(f"{sid}.erased")
    assert open_store(settings).list(archive_prefix(sid)) == []
    deadline = time.monotonic() + 20
    while _index_mentions(secured["index"], sid) > 1 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _index_mentions(secured["index"], sid) == 1  # the erased table's entry: no row, no WAL page
    assert _index_mentions(settings.index_file, sid) <= 1
    assert get(f"{base}/api/streams/{sid}/export?format=json", token)[0] == 404
    assert audio(f"{base}/api/streams/{sid}/audio", token)[0] == 404  # its audio is gone from the page too

    # the id is not silently reused
    again = upload(f"{secured['ingest']}?stream_id={sid}&format=file&token={secured['acme']}", b"RIFF")
    assert again == {
        "type": "error",
        "error": "stream_erased",
        "reason": f"stream id {sid!r} was erased and cannot be used again; choose another id",
    }


def test_admission_limits_refuse_at_the_door_with_a_reason(live_stack, secured, speech_dir, tmp_path):
    """The finding: every stream was accepted and then dropped downstream. An ingest with limits
    of one open stream per tenant and 12 s of audio per tenant per hour refuses past them."""
    settings, state = live_stack
    creds = security.Credentials.load(Path(state["credentials"]))
    port = broker.free_port()
    env = {
        **os.environ,
        **creds.env("ingest"),
        "HARK_TOKENS_FILE": str(secured["tokens"]),
        "HARK_BOOTSTRAP": settings.bootstrap,
        "HARK_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
        "HARK_HEALTH_PORT": "0",
        "HARK_TENANT_MAX_STREAMS": "1",
        "HARK_TENANT_AUDIO_SECONDS_PER_HOUR": "12",
    }
    log = open(tmp_path / "ingest.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ingest", "--port", str(port)], env=env, cwd=ROOT, stderr=log
    )
    url = f"ws://127.0.0.1:{port}/v1/streams"
    acme, globex = secured["acme"], secured["globex"]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)

        async def one_open_stream_per_tenant():
            async with connect(f"{url}?token={acme}") as first:
                assert json.loads(await first.recv())["type"] == "ready"
                async with connect(f"{url}?token={acme}") as second:
                    refused = json.loads(await second.recv())
                async with connect(f"{url}?token={globex}") as other:  # another tenant is not held back
                    assert json.loads(await other.recv())["type"] == "ready"
                    await other.send(json.dumps({"type": "end"}))
                    assert json.loads(await other.recv())["type"] == "done"
                await first.send(json.dumps({"type": "end"}))
                assert json.loads(await first.recv())["type"] == "done"
            return refused

        refused = asyncio.run(one_open_stream_per_tenant())
        assert refused["type"] == "error" and refused["error"] == "tenant_limit", refused
        assert "has 1 streams open, its limit" in refused["reason"]

        files = ["sense_and_sensibility_01_austen_64kb-0870.wav", "sense_and_sensibility_01_austen_64kb-0920.wav"]
        first, second = (upload(f"{url}?format=file&token={acme}", (speech_dir / f).read_bytes()) for f in files)
        assert first["type"] == "done" and first["seconds"] > 7  # 7.1 s of 12
        assert second["type"] == "error" and second["error"] == "quota", second  # crossed the quota mid-way
        third = upload(f"{url}?format=file&token={acme}", (speech_dir / "goforward.wav").read_bytes())
        assert third["type"] == "error" and third["error"] == "quota" and "its quota is 12 s" in third["reason"]
        assert (
            upload(f"{url}?format=file&token={globex}", (speech_dir / "goforward.wav").read_bytes())["type"] == "done"
        )
    finally:
        proc.terminate()
        proc.wait(10)


def test_retention_sweep_erases_only_streams_older_than_the_period(live_stack, speech_dir, tmp_path):
    settings, _ = live_stack
    from hark.keys import Keyring, SealedStore
    from hark.storage import FilesystemStore
    from services.ingest.core import Ingest

    # its own archive: the sweep must not touch other tests'
    store = SealedStore(FilesystemStore(tmp_path / "archive"), Keyring.for_settings(settings))
    sid = Ingest(settings, store=store).publish_file(speech_dir / "goforward.wav").stream_id
    s = type(settings)(**{**settings.__dict__, "archive_retention_days": 1.0})
    now = int(time.time() * 1000)
    assert sid not in [e["stream_id"] for e in retention_sweep(s, store, now_ms=now)]
    assert store.list(archive_prefix(sid))
    erased = retention_sweep(s, store, now_ms=now + 2 * 86_400_000)  # two days later
    assert sid in [e["stream_id"] for e in erased]
    assert store.list(archive_prefix(sid)) == []


# ---- the broker ------------------------------------------------------------------------------
def _probe(bootstrap: str, topics: list[str], login: dict[str, str], group: str) -> tuple[dict, dict]:
    """What ``login`` can do on each topic: (records read from its start, the result of writing a
    tombstone, which every service skips)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    base = {"bootstrap.servers": bootstrap, **login, "log_level": 0}
    reads = dict.fromkeys(topics, 0)
    c = Consumer({**base, "group.id": group, "enable.auto.commit": False, "isolation.level": "read_committed"})
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(8)])
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for m in c.consume(500, 0.3):
            if not m.error():
                reads[str(m.topic())] += 1
    c.close()
    writes: dict[str, str | None] = {}
    p = Producer({**base, "message.timeout.ms": 5000})

    def delivered(topic: str):
        return lambda err, _m: writes.__setitem__(topic, err and err.name())

    for t in topics:
        p.produce(t, key=b"acl-probe", value=None, on_delivery=delivered(t))
    p.flush(10)
    return reads, writes


def test_the_broker_refuses_strangers_and_holds_each_service_to_its_topics(live_stack):
    settings, state = live_stack
    creds = security.Credentials.load(Path(state["credentials"]))
    topics = settings.all_topics
    assert oct(Path(state["credentials"]).stat().st_mode & 0o777) == "0o600"
    # every topic holds a record to read (a tombstone: every service skips it)
    _, admin_writes = _probe(settings.bootstrap, topics, creds.client("admin"), "hark-tail-probe")
    assert all(v is None for v in admin_writes.values()), admin_writes

    # no credentials, or a wrong password: nothing read, nothing written, not even the topic list
    # every probe waits on the broker, not on a core: all at once
    strangers = [{}, {**creds.client("ingest"), "sasl.password": "guess"}]
    grants = security.grants(settings)
    with ThreadPoolExecutor(len(strangers) + len(grants)) as pool:
        denied = [pool.submit(_probe, settings.bootstrap, topics, login, "hark-tail-probe") for login in strangers]
        probes = {
            p: pool.submit(
                _probe, settings.bootstrap, topics, creds.client(p), g.groups[0] if g.groups else "hark-tail-probe"
            )
            for p, g in grants.items()
        }
    for login, probe in zip(strangers, denied):
        reads, writes = probe.result()
        assert not any(reads.values()) and all(w is not None for w in writes.values()), (login, reads, writes)
        with pytest.raises(kafka.KafkaException):
            kafka.admin(type(settings)(bootstrap=settings.bootstrap, kafka_extra=login)).list_topics(timeout=3)

    # each service: exactly the topics of its grant, topic by topic
    seen = {}
    for principal, grant in grants.items():
        reads, writes = probes[principal].result()
        seen[principal] = ({t for t in topics if reads[t]}, {t for t in topics if writes[t] is None})
        assert seen[principal] == (set(grant.reads), set(grant.writes)), (principal, reads, writes)
    # and what that means, said plainly
    assert settings.results_topic not in seen["diarizer"][0] and settings.audio_topic not in seen["captions"][0]
    assert {p for p, (_, w) in seen.items() if settings.audio_topic in w} == {"ingest"}
    assert {p for p, (r, _) in seen.items() if settings.results_topic in r} == {"captions"}
    # ingest sees which online_asr replica holds which audio partition (it places streams by
    # that), and no other group
    as_ingest = kafka.admin(type(settings)(bootstrap=settings.bootstrap, kafka_extra=creds.client("ingest")))
    assert kafka.group_assignment(as_ingest, kafka.ONLINE_GROUP, settings.audio_topic, 10)
    with pytest.raises(kafka.KafkaException, match="AUTHORIZATION"):
        kafka.group_assignment(as_ingest, "hark-results", settings.results_topic, 10)


# ---- input checked at the door ------------------------------------------------------------------
def test_ids_languages_and_query_parameters_are_checked_whole(live_stack, secured):
    from services.ingest.publisher import check_stream_id

    with pytest.raises(AudioError):
        check_stream_id("abc\n")  # a trailing newline used to pass the id check
    assert check_stream_id("abc.def_1-2") == "abc.def_1-2"
    base, token = secured["captions"], secured["acme"]
    for bad in ("abc", "-1", "0", "100000", "1.5"):  # used to answer 500, or no limit at all for -1
        code, body = get(f"{base}/api/search?q=forward&limit={bad}", token)
        assert code == 400 and "limit" in body, (bad, code, body)
    assert get(f"{base}/api/search?q=forward&limit=3", token)[0] == 200
    # a language no model decodes is refused at the door, not by the offline pass 600 s later
    sid = f"lang-{time.time_ns()}"
    reply = upload(f"{secured['ingest']}?stream_id={sid}&format=file&language=xx&token={token}", b"RIFF")
    assert reply["type"] == "error" and reply["error"] == "bad_language", reply


def test_closed_doors_by_default_hosts_origins_headers_and_file_modes(live_stack, secured, tmp_path):
    from websockets.exceptions import InvalidStatus

    base, token = secured["captions"], secured["acme"]
    # DNS rebinding: a page whose own name now points at 127.0.0.1 asks with its own Host
    req = urllib.request.Request(
        f"{base}/api/streams", headers={"Host": "attacker.example", "Authorization": f"Bearer {token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    with urllib.request.urlopen(f"{base}/?token={token}", timeout=10) as r:
        csp, page = r.headers["Content-Security-Policy"], r.read().decode()
        assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp and csp.count("'sha256-") == page.count("<script>") + page.count("<style>")
    # a stream id lands in the page as an attribute value, escaped
    with urllib.request.urlopen(f"{base}/streams/a%22b%3Cc?token={token}", timeout=10) as r:
        assert 'content="a&quot;b&lt;c"' in r.read().decode()
    # the transcripts index is the owner's alone
    index = Path(os.environ.get("HARK_DATA_DIR", "")) / "index" / "transcripts.sqlite"
    assert index.exists() and oct(index.stat().st_mode & 0o777) == "0o600"

    # a web page's WebSocket (it sends its Origin) may not publish unless it is the captions
    # page's own (its Record button); a client that sends none may
    async def connect_with(origin):
        async with connect(f"{secured['ingest']}?token={token}", origin=origin) as ws:
            return json.loads(await ws.recv())["type"]

    for other in ("http://attacker.example", "http://127.0.0.1:1", base.replace("http://", "https://evil.")):
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(connect_with(other))
        assert refused.value.response.status_code == 403
    assert asyncio.run(connect_with(None)) == "ready"
    assert asyncio.run(connect_with(base.rstrip("/"))) == "ready"
    assert asyncio.run(connect_with(base.rstrip("/").replace("127.0.0.1", "localhost"))) == "ready"
    # the page may connect to itself and that ingest, nowhere else
    ingest_origin = secured["ingest"].split("/v1/")[0]
    assert f"connect-src 'self' {ingest_origin};" in csp, csp
    # nothing under the data folder is open to other users: logs, state, archive, index, the broker's log
    assert exposed_under(Path(os.environ["HARK_DATA_DIR"])) == []


def exposed_under(root: Path) -> list[str]:
    """Every file or folder under ``root`` (``root`` too) that grants its group or others anything:
    files are to be 0600 and folders 0700 (the umask of every hark process and the 0700 data folder)."""
    found = _exposed(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found += _exposed(Path(folder) / name)
    return found


def _exposed(path: Path) -> list[str]:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:  # the live stack removed it meanwhile (a rolled log segment, a temp file)
        return []
    if stat.S_ISLNK(mode) or not mode & 0o077:
        return []
    return [f"{stat.filemode(mode)} {path}"]
