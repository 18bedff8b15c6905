"""End to end: real Apache Kafka broker, real service processes, real pocketsphinx, real speech."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from hark import kafka, records, serde, stack
from hark.audio import read_pcm_file
from hark.records import now_ms
from hark.wer import WerScore, score
from services.offline_asr.stream import DETECT_SURE

from .conftest import HARK, ROOT, run_hark
from .helpers import collect, complete_record, completed

pytestmark = pytest.mark.e2e


def test_hark_run_transcribes_real_speech_and_reports_a_bad_file(tmp_path, speech_dir, references):
    """The main job: starts its own stack, transcribes every file, fails one garbage file cleanly,
    while another process keeps one of the two cores busy from the moment that stack is ready
    until the end: the client waits for a pipeline that is slow but moving (a fixed clock failed
    6 of 9 such files)."""
    files = [str(speech_dir / n) for n in references if n != "austen_passage.flac"]
    assert len(files) >= 9
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....WAVEfmt " + os.urandom(3000))
    out = tmp_path / "run.jsonl"
    env = {**os.environ, "HARK_DATA_DIR": str(tmp_path / "data")}
    args = [*HARK, "run", *files, str(garbage), "--fast", "--json", str(out), "--quiet"]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    busy = None
    try:
        # the busy core from the stack's readiness on (its start under load is not what this tests,
        # and took half a minute more): every file is published and transcribed beside it
        deadline = time.monotonic() + 300
        while run.poll() is None and time.monotonic() < deadline and not _ephemeral_stack_ready(tmp_path / "data"):
            time.sleep(0.1)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        stdout, stderr = run.communicate(timeout=900)
    finally:
        run.kill()
        if busy is not None:
            busy.kill()
    proc = subprocess.CompletedProcess(args, run.returncode, stdout, stderr)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hark:")]
    assert len(errors) == 1 and "garbage.wav" in errors[0] and "not a readable audio file" in errors[0]

    rows = {r["source"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[str(garbage)]["status"] == "FAILED"
    online, offline = WerScore(0, 0), WerScore(0, 0)
    shown_early = shown_late = 0.0
    for f in files:
        r = rows[f]
        assert r["status"] == "COMPLETE" and r["final_source"] == "offline", r
        assert "whisper-base" in r["models"]["offline"]
        for w in r["words"]:
            assert 0 <= w["start"] < w["end"] <= r["duration_s"] + 0.05
            assert 0 <= w["confidence"] <= 1
        speakers = {t["speaker"] for t in r["turns"]}
        assert len(speakers) <= 1, (f, r["turns"])  # one reader per file
        assert {w["speaker"] for w in r["words"]} <= speakers | {None}
        assert set(r["latency"]) >= {"partial_p50_ms", "partial_p95_ms", "final_after_close_ms"}
        lat = r["latency"]  # time to accurate text: offline text covering each word, after its audio
        assert lat["accurate_words_measured"] == len(r["words"]) > 0, (f, lat)
        assert 0 < lat["accurate_p50_ms"] <= lat["accurate_p95_ms"] < 600_000, (f, lat)
        caption = [lat[f"caption_wer_{d}s"] for d in (1, 2, 4)]  # what a viewer read 1, 2 and 4 s after each word
        assert all(0 <= x <= 1.5 for x in caption), (f, lat)
        shown_late += caption[2]
        shown_early += caption[0]
        online += score(references[os.path.basename(f)], r["online_text"])
        offline += score(references[os.path.basename(f)], r["final_text"])
    assert offline.ref_words > 100
    assert shown_late <= shown_early, (shown_early, shown_late)  # Whisper's text has come by +4 s
    # words as written (the finding: "ill -sposed"): a hyphenated word is one word everywhere
    # (Whisper hears "ill-disposed", or "ill-sposed" with 2 s of encoder padding: one word either way)
    ill = rows[str(speech_dir / "sense_and_sensibility_01_austen_64kb-0880.wav")]
    assert [w for w in ill["words"] if w["word"].lower().startswith("ill-") and len(w["word"]) > 6], ill["words"]
    assert not [w for r in rows.values() for w in r.get("words", []) if w["word"][:1] in "-'"]
    assert online.wer <= 0.40, f"online WER {online.wer:.3f}"
    assert offline.wer <= 0.10 and offline.wer <= 0.4 * online.wer, f"offline {offline.wer:.3f} online {online.wer:.3f}"
    # the stack it started is gone, its folder too, and none of its processes is left
    assert not any((tmp_path / "data" / "stacks").iterdir())
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path).encode() in _cmdline(p)]
    # and librdkafka's own log lines stay off the terminal (`hark -v` shows them)
    assert "|FAIL|" not in proc.stderr and "%3|" not in proc.stderr + proc.stdout, proc.stderr[-2000:]


def _ephemeral_stack_ready(data: Path) -> bool:
    """Whether the stack `hark run` started under ``data`` says it is ready."""
    return any((stack.read_state(d) or {}).get("status") == "ready" for d in data.glob("stacks/*"))


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return b""


def test_realtime_run_measures_partial_latency(live_stack, speech_dir, tmp_path):
    settings, _ = live_stack
    out = tmp_path / "rt.jsonl"
    proc = run_hark(
        "run",
        str(speech_dir / "forever_input_2_16k.wav"),
        "--json",
        str(out),
        "--quiet",
        "--bootstrap",
        settings.bootstrap,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = map(json.loads, out.read_text().splitlines())
    lat = row["latency"]
    assert row["final_text"] and lat["words_measured"] == len(row["words"]) > 0
    # real-time pacing: the stream took its duration to publish, so latencies are small next to it
    assert lat["partial_p50_ms"] <= lat["partial_p95_ms"] < 1000 * row["duration_s"]
    assert 0 <= lat["final_after_close_ms"] < 10000


def test_websocket_live_pcm_at_another_rate(live_stack, speech_dir, references):
    settings, state = live_stack
    pcm16 = read_pcm_file(speech_dir / "forever_input_2_16k.wav")
    import av

    frame = av.AudioFrame.from_ndarray(pcm16[None, :], format="s16", layout="mono")
    frame.sample_rate = 16000
    r = av.AudioResampler(format="s16", layout="stereo", rate=44100)
    stereo = b"".join(f.to_ndarray().tobytes() for f in r.resample(frame) + r.resample(None))
    sid = f"ws-live-{time.time_ns()}"

    async def client():
        url = f"{state['ingest_url']}?stream_id={sid}&sample_rate=44100&channels=2"
        async with connect(url) as ws:
            assert json.loads(await ws.recv()) == {"type": "ready", "stream_id": sid}
            step = 44100 * 2 * 2 // 10  # 100 ms of stereo s16
            for i in range(0, len(stereo), step):
                await ws.send(stereo[i : i + step])
            await ws.send(json.dumps({"type": "end"}))
            return json.loads(await ws.recv())

    done = asyncio.run(client())
    assert done["type"] == "done" and abs(done["seconds"] - len(pcm16) / 16000) < 0.1
    rec = complete_record(settings, sid)
    assert rec["status"] == "COMPLETE"
    assert score(references["forever_input_2_16k.wav"], rec["text"]).wer <= 0.5


def test_websocket_refuses_oversize_messages_and_bad_parameters(live_stack):
    settings, state = live_stack
    sid = f"ws-bad-{time.time_ns()}"

    async def oversize():
        async with connect(f"{state['ingest_url']}?stream_id={sid}", max_size=None) as ws:
            await ws.recv()
            await ws.send(b"\x00" * (settings.max_ws_message_bytes + 2))
            with pytest.raises(ConnectionClosed) as e:
                await ws.recv()
            return e.value.rcvd.code

    async def bad_rate():
        async with connect(f"{state['ingest_url']}?stream_id={sid}-rate&sample_rate=5") as ws:
            return json.loads(await ws.recv())

    assert asyncio.run(oversize()) == 1009
    reply = asyncio.run(bad_rate())
    assert reply["type"] == "error" and reply["error"] == "bad_sample_rate" and "5 Hz" in reply["reason"]
    # the refused live stream was closed (ABORTED), so downstream released it
    assert complete_record(settings, sid)["status"] == "ABORTED"
    dl = collect(
        settings, settings.deadletter_topic, lambda recs: any(r.get("stream_id") == f"{sid}-rate" for _, r in recs)
    )
    assert any(r["error_type"] == "bad_sample_rate" for _, r in dl if r.get("stream_id") == f"{sid}-rate")


def test_malformed_records_are_dead_lettered_and_other_streams_finish(live_stack, speech_dir):
    settings, _ = live_stack
    from services.ingest.core import Ingest

    bad = f"bad-{time.time_ns()}"
    p = kafka.producer(settings)
    p.produce(settings.audio_topic, key=bad.encode(), value=b"\x00\x00\x00\x00\x07garbage")
    p.produce(
        settings.audio_topic,
        key=bad.encode(),
        value=serde.encode(
            "AudioChunk",
            records.AudioChunk(
                stream_id=bad,
                tenant="t",
                seq=1,
                offset_samples=0,
                sample_rate=16000,
                pcm=b"\x01\x02\x03",
                published_at_ms=now_ms(),
            ),
        ),
    )
    p.produce(
        settings.audio_topic,
        key=bad.encode(),
        value=serde.encode(
            "AudioChunk",
            records.AudioChunk(
                stream_id=bad,
                tenant="t",
                seq=2,
                offset_samples=0,
                sample_rate=8000,
                pcm=b"\x00\x00" * 800,
                published_at_ms=now_ms(),
            ),
        ),
    )
    p.flush(10)
    good = Ingest(settings).publish_file(speech_dir / "goforward.wav")
    assert complete_record(settings, good.stream_id)["text"]
    dl = collect(settings, settings.deadletter_topic, lambda recs: sum(r.get("stream_id") == bad for _, r in recs) >= 3)
    reasons = {r["error_type"]: r for _, r in dl if r.get("stream_id") == bad}
    assert {"malformed_record", "bad_pcm", "bad_sample_rate"} <= set(reasons)
    assert reasons["malformed_record"]["source_topic"] == settings.audio_topic
    assert reasons["bad_pcm"]["payload"] and "odd byte count" in reasons["bad_pcm"]["reason"]


def test_concurrent_streams_are_spread_over_the_audio_partitions(live_stack, speech_dir):
    """Ingest places each new stream on the least loaded audio partition (not the id's hash, which
    piles streams onto one online_asr replica): twice as many streams as partitions put exactly two
    on each (by hash: 4% of the time with 4 partitions), and every record of a stream stays on its
    partition, in order and once, so every pass still sees it whole, also when several threads
    publish at once."""
    import io
    import threading

    from services.ingest.core import Ingest

    settings, _ = live_stack
    wav = (speech_dir / "goforward.wav").read_bytes()  # 2.7 s: 16 records a stream
    ingest, run = Ingest(settings), time.time_ns()
    partition_count = kafka.topic_partitions(settings)[settings.audio_topic]
    sids = [f"spread-{run}-{i}" for i in range(2 * partition_count)]
    records: dict[str, int] = {}  # stream -> records published (start, chunks, end)

    def publish(sid: str) -> None:
        records[sid] = ingest.publish_file(io.BytesIO(wav), stream_id=sid).chunks + 2

    threads = [threading.Thread(target=publish, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ingest.producer.failures == 0
    assert len(records) == len(sids)
    c = kafka.tail_consumer(settings, settings.audio_topic, from_beginning=True)
    seen: dict[str, list[tuple[int, int]]] = {sid: [] for sid in sids}  # (partition, seq) per record

    def read(timeout: float) -> None:
        for m in c.consume(500, timeout):
            if not m.error() and m.key() and m.key().decode() in seen and m.value():
                seen[m.key().decode()].append((m.partition(), serde.decode_message(m, ingest.keys)[1]["seq"]))

    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and any(len(seen[sid]) < n for sid, n in records.items()):
            read(0.1)
        # then on to the end of every partition: a copy of any record would be there by now
        ends = [
            TopicPartition(
                settings.audio_topic, p, c.get_watermark_offsets(TopicPartition(settings.audio_topic, p), timeout=10)[1]
            )
            for p in range(partition_count)
        ]
        while time.monotonic() < deadline and any(pos.offset < end.offset for pos, end in zip(c.position(ends), ends)):
            read(0.1)
    finally:
        c.close()
    partitions = {sid: {p for p, _ in recs} for sid, recs in seen.items()}
    assert all(len(ps) == 1 for ps in partitions.values()), partitions
    assert sorted(next(iter(ps)) for ps in partitions.values()) == sorted(list(range(partition_count)) * 2)
    assert all([q for _, q in seen[sid]] == list(range(n)) for sid, n in records.items()), seen
    done = collect(settings, settings.results_topic, lambda recs: all(completed(sid)(recs) for sid in sids))
    assert {
        r["stream_id"]: r["status"] for _, r in done if r["stream_id"] in sids and r["kind"] == "STREAM_COMPLETE"
    } == dict.fromkeys(sids, "COMPLETE")  # and each stream is transcribed as usual


def test_replay_reproduces_an_archived_stream(live_stack, speech_dir, tmp_path):
    settings, _ = live_stack
    first = tmp_path / "first.jsonl"
    proc = run_hark(
        "run",
        str(speech_dir / "cards_005.wav"),
        "--fast",
        "--quiet",
        "--json",
        str(first),
        "--bootstrap",
        settings.bootstrap,
    )
    assert proc.returncode == 0, proc.stderr
    original = json.loads(first.read_text())
    again = tmp_path / "again.jsonl"
    new_id = f"replayed-{time.time_ns()}"
    proc = run_hark(
        "replay",
        original["stream_id"],
        "--as",
        new_id,
        "--fast",
        "--quiet",
        "--json",
        str(again),
        "--bootstrap",
        settings.bootstrap,
    )
    assert proc.returncode == 0, proc.stderr
    replayed = json.loads(again.read_text())
    assert replayed["stream_id"] == new_id
    assert replayed["final_text"] == original["final_text"] and original["final_text"]
    missing = run_hark("replay", "no-such-stream", "--fast", "--quiet", "--bootstrap", settings.bootstrap)
    assert missing.returncode == 1 and "no archived stream" in missing.stderr


def test_stream_without_end_is_closed_after_idle_timeout(live_stack, speech_dir):
    settings, _ = live_stack
    sid = f"idle-{time.time_ns()}"
    pcm = read_pcm_file(speech_dir / "goforward.wav").tobytes()
    p = kafka.producer(settings)
    p.produce(
        settings.audio_topic,
        key=sid.encode(),
        value=serde.encode(
            "StreamStart",
            records.StreamStart(
                stream_id=sid,
                tenant="t",
                seq=0,
                language="en-US",
                source_format="test",
                source_name=None,
                sample_rate=16000,
                source_sample_rate=16000,
                source_channels=1,
                archive_prefix=None,
                started_at_ms=now_ms(),
                metadata={},
            ),
        ),
    )
    for i, off in enumerate(range(0, len(pcm), 3200), start=1):
        p.produce(
            settings.audio_topic,
            key=sid.encode(),
            value=serde.encode(
                "AudioChunk",
                records.AudioChunk(
                    stream_id=sid,
                    tenant="t",
                    seq=i,
                    offset_samples=off // 2,
                    sample_rate=16000,
                    pcm=pcm[off : off + 3200],
                    published_at_ms=now_ms(),
                ),
            ),
        )
    p.flush(10)
    rec = complete_record(settings, sid, timeout=30)  # HARK_IDLE_TIMEOUT_S=4 in the test stack
    assert rec["status"] == "IDLE_TIMEOUT" and "forward" in rec["text"]


def test_a_killed_service_is_restarted_and_streams_still_complete(live_stack, speech_dir):
    settings, _ = live_stack
    d = stack.stack_dir(settings, "pytest")
    before = {s["name"]: s for s in stack.read_state(d)["services"]}["online_asr"]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = {s["name"]: s for s in stack.read_state(d)["services"]}["online_asr"]
        if after["restarts"] == before["restarts"] + 1 and stack.pid_alive(after["pid"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("online_asr was not restarted")
    from services.ingest.core import Ingest

    summary = Ingest(settings).publish_file(speech_dir / "goforward.wav")
    assert "forward" in complete_record(settings, summary.stream_id, timeout=60)["text"]


def test_publish_and_tail_clis(live_stack, speech_dir):
    settings, _ = live_stack
    sid = f"cli-{time.time_ns()}"
    import subprocess

    from .conftest import HARK, ROOT

    tail = subprocess.Popen(
        [*HARK, "tail", "--stream", sid, "--exit-on-complete", "--bootstrap", settings.bootstrap],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert tail.stderr is not None and tail.stderr.readline().startswith("hark: following")  # positioned
        pub = run_hark(
            "publish", str(speech_dir / "austen_passage.flac"), "--stream-id", sid, "--bootstrap", settings.bootstrap
        )
        assert pub.returncode == 0, pub.stderr
        assert pub.stdout.startswith(sid) and "144 chunks" in pub.stdout  # 143 full 200 ms chunks + a 130 ms one
        # published, not yet transcribed: export waits while the pipeline moves (a stall of 30 s fails it)
        exported = run_hark("export", sid, "--format", "json", "--wait", "30")
        assert exported.returncode == 0, exported.stderr
        assert "Dashwood" in json.loads(exported.stdout)["text"]
        out, err = tail.communicate(timeout=60)
    finally:
        tail.kill()
    lines = out.splitlines()
    assert tail.returncode == 0, err
    assert lines[-1] == "-- stream complete (COMPLETE) --"
    online = [line for line in lines[:-1] if not line.startswith("(offline ")]
    offline = [line for line in lines[:-1] if line.startswith("(offline ")]
    assert len(online) == 5 and "amiable" in online[4]  # five read sentences
    assert len(offline) >= 2 and "Dashwood" in offline[0]  # pause-cut Whisper windows of >= 10 s
    bad = run_hark("publish", str(speech_dir / "references.tsv"), "--bootstrap", settings.bootstrap)
    assert bad.returncode == 1 and "references.tsv" in bad.stderr
    # a stream that never comes: given up once nothing has moved for the wait, naming what it waited for
    gone = run_hark("export", f"{sid}-never", "--format", "json", "--wait", "3")
    assert gone.returncode == 1 and "nothing moved for 3 s (waiting for" in gone.stderr, gone.stderr


def test_a_live_stream_survives_a_pause_longer_than_the_idle_timeout(live_stack, speech_dir):
    """The finding: a live client pausing longer than the idle timeout lost the rest of its stream
    (completed as IDLE_TIMEOUT while the client was told done). The stack's idle timeout is 4 s."""
    settings, state = live_stack
    sid = f"pause-{time.time_ns()}"
    silence = b"\x00\x00" * 16000  # 1 s: lets the online pass end the utterance before the pause
    first = read_pcm_file(speech_dir / "sense_and_sensibility_01_austen_64kb-0880.wav").tobytes() + silence
    second = read_pcm_file(speech_dir / "sense_and_sensibility_01_austen_64kb-0930.wav").tobytes() + silence
    pause_s = 2 * settings.idle_timeout_s

    async def client():
        async with connect(f"{state['ingest_url']}?stream_id={sid}") as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            for part in (first, second):
                for i in range(0, len(part), 16000):
                    await ws.send(part[i : i + 16000])
                    await asyncio.sleep(0.1)
                if part is first:
                    await asyncio.sleep(pause_s)  # the client says nothing at all
            await ws.send(json.dumps({"type": "end"}))
            return json.loads(await ws.recv())

    assert asyncio.run(client())["type"] == "done"
    recs = collect(settings, settings.results_topic, completed(sid), timeout=120)
    complete = next(r for t, r in recs if r["stream_id"] == sid and r["kind"] == "STREAM_COMPLETE")
    assert complete["status"] == "COMPLETE"
    text = complete["text"].lower()
    assert "disposed" in text and "amiable" in text  # both sides of the pause
    online = [
        r["utterance_id"] for t, r in recs if r["stream_id"] == sid and r["kind"] == "FINAL" and r["source"] == "online"
    ]
    assert len(online) >= 2 and online == sorted(set(online)), online  # numbering never restarts


def test_hotwords_recover_a_term_missed_without_them(live_stack, tmp_path):
    """The finding: "started on metoprolol and lisinopril" came out as "that a Pral Lala and
    lies in a pral". The same audio with the terms as the stream's hotwords, through the stack."""
    from .tts import say, wav_bytes

    settings, _ = live_stack
    f = tmp_path / "clinic.wav"
    f.write_bytes(wav_bytes(say("The patient was started on metoprolol and lisinopril yesterday morning.")))
    texts = {}
    for label, extra in (("plain", []), ("hot", ["--hotwords", "metoprolol,lisinopril"])):
        out = tmp_path / f"{label}.jsonl"
        proc = run_hark(
            "run", str(f), "--fast", "--quiet", "--json", str(out), "--bootstrap", settings.bootstrap, *extra
        )
        assert proc.returncode == 0, proc.stderr
        texts[label] = json.loads(out.read_text())["final_text"].lower()
    assert "metoprolol" not in texts["plain"] and "lisinopril" not in texts["plain"], texts
    assert "metoprolol" in texts["hot"] and "lisinopril" in texts["hot"], texts
    # bounded: too many terms are refused with the reason, before anything is published
    many = ",".join(f"term{i}" for i in range(60))
    bad = run_hark("publish", str(f), "--hotwords", many, "--bootstrap", settings.bootstrap)
    assert bad.returncode == 1 and "60 hotwords, more than the 50 a stream may have" in bad.stderr


LANGUAGES = {  # espeak-ng voice: a sentence
    "es": "El paciente empezó a tomar la medicina ayer por la mañana y se siente mucho mejor.",
    "de": "Der Patient hat gestern angefangen, das Medikament zu nehmen, und fühlt sich besser.",
    "fr": "Le patient a commencé à prendre le médicament hier matin et se sent beaucoup mieux.",
}


def test_languages_are_detected_and_transcribed_in_their_language(live_stack, tmp_path):
    """The finding: a stream's language came only from its metadata (default English), and the
    online pass turned any other language into English-looking nonsense."""
    from .tts import say, wav_bytes

    settings, _ = live_stack
    files = []
    for voice, sentence in LANGUAGES.items():
        files.append(tmp_path / f"{voice}.wav")
        files[-1].write_bytes(wav_bytes(say(sentence, voice)))
    unsure = tmp_path / "unsure.wav"  # French that Whisper base guesses at p 0.3 (as Hebrew)
    unsure.write_bytes(wav_bytes(say("Pouvez-vous m'indiquer le chemin de la gare, s'il vous plaît ?", "fr")))
    out = tmp_path / "auto.jsonl"  # no language given: the offline pass detects it
    proc = run_hark("run", *map(str, files + [unsure]), "--fast", "--quiet", "--json", str(out), "--bootstrap", settings.bootstrap)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "language not determined (p 0." in proc.stdout and "fr detected (p " in proc.stdout, proc.stdout
    rows = {os.path.basename(r["source"])[:-4]: r for r in map(json.loads, out.read_text().splitlines())}
    # too unsure to name: "und" with its probability, decoded in the fallback language (English)
    und = rows.pop("unsure")
    assert und["language"] == "und" and und["final_text"] and und["language_probability"] < DETECT_SURE, und
    for voice, row in rows.items():
        assert row["language"] == voice and row["final_source"] == "offline", row
        assert row["language_probability"] >= DETECT_SURE, row
        # in its language: robotic voices cost words (French ~50% WER), an English rendering ~100%
        assert score(LANGUAGES[voice], row["final_text"]).wer <= 0.6, (voice, row["final_text"])
    # declared: the online pass, English only, stays silent instead of writing nonsense
    out = tmp_path / "es.jsonl"
    es = run_hark("run", str(files[0]), "--language", "es", "--fast", "--quiet", "--json", str(out), "--bootstrap", settings.bootstrap)  # fmt: skip
    assert es.returncode == 0, es.stderr
    row = json.loads(out.read_text())
    assert row["online_text"] == "" and row["language"] == "es" and "paciente" in row["final_text"].lower()


def test_websocket_file_upload(live_stack, speech_dir, references):
    settings, state = live_stack
    sid = f"ws-file-{time.time_ns()}"
    data = (speech_dir / "goforward.wav").read_bytes()

    async def client():
        async with connect(f"{state['ingest_url']}?stream_id={sid}&format=file") as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            for i in range(0, len(data), 16384):
                await ws.send(data[i : i + 16384])
            await ws.send(json.dumps({"type": "end"}))
            return json.loads(await ws.recv())

    done = asyncio.run(client())
    with wave.open(str(speech_dir / "goforward.wav")) as w:  # 2.7 s: 14 chunks of 200 ms
        chunks = -(-w.getnframes() * 1000 // (w.getframerate() * settings.chunk_ms))
    assert done["type"] == "done" and done["chunks"] == chunks
    assert "forward" in complete_record(settings, sid)["text"]


def test_up_status_down_and_an_online_only_stack(tmp_path, speech_dir):
    """`hark up --replicas offline_asr=0`: `hark status` tells what runs, results completes streams
    on the online pass alone, and `hark down` leaves no process behind."""
    env = {"HARK_DATA_DIR": str(tmp_path / "d"), "HARK_PARTITIONS": "2", "HARK_MAX_STREAMS": "1"}
    up = run_hark("up", "--replicas", "offline_asr=0", env_extra=env, timeout=120)
    assert up.returncode == 0, up.stderr
    pids = []
    try:
        st = run_hark("status", "--json", env_extra=env)
        assert st.returncode == 0, st.stderr
        state = json.loads(st.stdout)
        assert state["status"] == "ready" and state["broker"]["alive"]
        assert {s["name"] for s in state["services"]} == set(stack.SERVICES) - {"offline_asr"}
        for s in state["services"]:
            assert s["alive"] and s["health"] == "ok" and s["pid"] > 0
        assert state["topics"] == {
            f"hark.{t}": 2
            for t in ("audio", "transcripts.online", "transcripts.offline", "speakers", "results", "deadletter")
        }
        text = run_hark("status", env_extra=env).stdout
        assert "online_asr" in text and "partitions" in text
        pids = [s["pid"] for s in state["services"]] + [state["broker"]["pid"], state["supervisor_pid"]]
        out = tmp_path / "o.jsonl"
        run = run_hark(
            "run",
            str(speech_dir / "goforward.wav"),
            "--fast",
            "--quiet",
            "--json",
            str(out),
            "--bootstrap",
            state["bootstrap"],
            env_extra=env,
        )
        assert run.returncode == 0, run.stderr
        row = json.loads(out.read_text())
        assert row["final_source"] == "online" and row["final_text"] == row["online_text"] != ""

        # Overload is said, never hidden: with room for one stream per service (HARK_MAX_STREAMS=1),
        # two live streams at once. A pass that refuses one makes its final status DEGRADED, naming
        # the pass (the finding: refused streams still ended COMPLETE), and `hark run` says so.
        out2 = tmp_path / "two.jsonl"
        names = ["sense_and_sensibility_01_austen_64kb-0870.wav", "sense_and_sensibility_01_austen_64kb-0920.wav"]
        two = run_hark(
            "run", *[str(speech_dir / n) for n in names], "--quiet", "--json", str(out2),
            "--bootstrap", state["bootstrap"], env_extra=env,
        )  # fmt: skip
        rows = [json.loads(line) for line in out2.read_text().splitlines()]
        statuses = [r["status"] for r in rows]
        degraded = [st for st in statuses if st != "COMPLETE"]
        assert degraded, statuses  # the two overlap: some pass had room for one only
        for st in degraded:  # which pass refused which stream depends on the order each read them
            assert re.fullmatch(r"DEGRADED \((online|diarizer)( and diarizer)? refused the stream: at capacity\)", st)
        assert two.returncode == 1 and "stream ended DEGRADED" in two.stderr
    finally:
        down = run_hark("down", env_extra=env)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert pids and not any(stack.pid_alive(p) for p in pids)
    assert run_hark("status", env_extra=env).returncode == 1


def test_a_stalled_archive_write_holds_up_only_its_own_connection(live_stack, speech_dir):
    """The finding: one client sending 128 MiB raised another's connect time from 4 ms to 955 ms
    (blocking work on the event loop). Here one upload's archive write is held until the test
    lets it go; another client must connect, publish and finish meanwhile."""
    import threading

    from services.ingest.server import IngestServer

    settings, _ = live_stack
    server = IngestServer(settings)
    inner = server.ingest.store.inner
    entered, release = threading.Event(), threading.Event()

    class StalledStore(type(inner)):  # the archive's own class, with a source write that waits
        def put(self, key, data, length=None):
            if "/source." in key:
                entered.set()
                release.wait(30)
            return inner.put(key, data, length)

    stalled = StalledStore.__new__(StalledStore)
    stalled.__dict__.update(inner.__dict__)
    server.ingest.store.inner = stalled
    data = (speech_dir / "goforward.wav").read_bytes()

    async def scenario():
        up = asyncio.Event()
        serving = asyncio.create_task(server.serve("127.0.0.1", 0, up))
        await up.wait()
        url = f"ws://127.0.0.1:{server.port}/v1/streams"

        async def upload(q: str, body: bytes) -> dict:
            async with connect(f"{url}?{q}") as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(body)
                await ws.send(json.dumps({"type": "end"}))
                return json.loads(await ws.recv())

        first = asyncio.create_task(upload("format=file", data))
        assert await asyncio.to_thread(entered.wait, 30)  # its archive write has begun, and waits
        other = await asyncio.wait_for(upload("format=pcm_s16le", b"\x00\x00" * 16000), 20)
        assert not first.done()  # still held: the other stream was served meanwhile
        release.set()
        done = await asyncio.wait_for(first, 60)
        serving.cancel()
        return other, done

    other, done = asyncio.run(scenario())
    assert other["type"] == "done" and done["type"] == "done"
