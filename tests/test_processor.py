"""A new consumer of the audio topic is a Processors and nothing else.

The one here is services/activity, a voice-activity detector (speech where a 20 ms frame's energy
is within 35 dB of the stream's loudest frame so far), written against the processor contract
only. The StreamRunner runs it on the session stack's real broker, in its own consumer group,
beside the real services: it gets the stream, its records land on its own topic in transactions,
once. Declared (services/activity/spec.py) and registered by one entry point, it also runs under
`hark up --with activity`, logged in as itself and held to its own topics.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import NewTopic

from hark import kafka, security, stack
from hark.config import Settings
from hark.runtime import StreamRunner
from services.activity.service import ActivityProcessors
from services.diarizer.scoring import read_rttm
from services.ingest.core import Ingest

from .conftest import ROOT, run_hark
from .helpers import collect

pytestmark = pytest.mark.e2e


def speech_ms(turns) -> int:
    return sum(t["end_ms"] - t["start_ms"] for t in turns)


def overlap_ms(a, b) -> int:
    return sum(max(0, min(x["end_ms"], y["end_ms"]) - max(x["start_ms"], y["start_ms"])) for x in a for y in b)


def test_a_processor_is_all_a_new_audio_consumer_needs(live_stack):
    settings, _ = live_stack
    tag = time.time_ns()
    topic, sid = f"test.activity.{tag}", f"activity-{tag}"
    admin = kafka.admin(settings)  # kept referenced: a collected client cancels its requests
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    runner = StreamRunner(settings, ActivityProcessors(topic, f"test-activity-{tag}"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        conversation = ROOT / "data" / "conversations" / "conv_2spk_clean.flac"
        Ingest(settings).publish_file(conversation, stream_id=sid)
        recs = collect(
            settings, topic, lambda rs: any(r["stream_id"] == sid and r["kind"] == "FULL" for _, r in rs), timeout=120
        )
    finally:
        runner.stop()
        thread.join(60)
    assert not thread.is_alive()
    mine = [r for _, r in recs if r["stream_id"] == sid]
    full = [r for r in mine if r["kind"] == "FULL"]
    incremental = [t for r in mine if r["kind"] == "INCREMENTAL" for t in r["turns"]]
    assert len(full) == 1 and full[0]["end_status"] == "COMPLETE"  # once, though other streams ran beside it
    turns = full[0]["turns"]
    assert incremental == turns[: len(incremental)] and len(incremental) >= len(turns) - 1
    reference = [t.__dict__ for t in read_rttm(conversation.with_suffix(".rttm"))]
    # most of the reference's speech is found, and most of what is found is speech
    assert overlap_ms(turns, reference) >= 0.8 * speech_ms(reference), (turns, reference)
    assert overlap_ms(turns, reference) >= 0.7 * speech_ms(turns), (turns, reference)


def _read(bootstrap: str, login: dict[str, str], topic: str, group: str) -> int:
    """Records ``login`` reads from ``topic`` in a few seconds (none when refused)."""
    conf = {"bootstrap.servers": bootstrap, **login, "group.id": group, "enable.auto.commit": False, "log_level": 0}
    c = Consumer(conf)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(8)])
    read, deadline = 0, time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            read += sum(1 for m in c.consume(100, 0.3) if not m.error())
        return read
    finally:
        c.close()


def test_an_opt_in_service_runs_under_hark_up_as_its_own_principal(tmp_path, speech_dir):
    env = {"HARK_DATA_DIR": str(tmp_path / "d"), "HARK_PARTITIONS": "2", "HARK_IDLE_TIMEOUT_S": "10"}
    # the passes it does not need off: every stack start costs the tests' CPU
    proc = run_hark(
        "up", "--with", "activity", "--replicas", "offline_asr=0,diarizer=0,captions=0", env_extra=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    try:
        state = json.loads(run_hark("status", "--json", env_extra=env).stdout)
        settings = stack.client_settings(Settings.load(environ={**os.environ, **env}), state)
        assert [s["name"] for s in state["services"]].count("activity") == 1
        assert "hark-activity" in state["groups"] and "hark-activity" in state["lag"]
        topic = settings.topic("activity")  # its own topic, made by the stack
        sid = Ingest(settings).publish_file(speech_dir / "goforward.wav").stream_id
        recs = collect(
            settings, topic, lambda rs: any(r["stream_id"] == sid and r["kind"] == "FULL" for _, r in rs), timeout=90
        )
        full = [r for t, r in recs if t == "SpeakerTurns" and r["stream_id"] == sid and r["kind"] == "FULL"]
        assert len(full) == 1 and full[0]["end_status"] == "COMPLETE", full
        assert full[0]["turns"] and all(t["speaker"] == "SPEECH" for t in full[0]["turns"])
        # logged in as itself: it reads its input and nothing it was not granted
        creds = security.Credentials.load(Path(state["credentials"]))
        login = creds.client("activity")
        grant = security.grants(settings, ("activity",))["activity"]
        assert grant.reads == (settings.audio_topic,) and topic in grant.writes
        # it sees only its own topics, not even the names of the others
        as_activity = Settings(bootstrap=settings.bootstrap, kafka_extra=login)
        visible = {t for t in kafka.admin(as_activity).list_topics(timeout=10).topics if not t.startswith("__")}
        assert visible == {settings.audio_topic, topic, settings.deadletter_topic}, visible
        # a record on a topic it was not granted (a tombstone, which every service skips): the
        # owner reads it, activity does not
        p = kafka.producer(settings)
        for other in (settings.results_topic, settings.online_topic):
            p.produce(other, key=b"acl-probe", value=None, partition=0)
        assert p.flush(10) == 0 and p.delivery_error is None
        for other in (settings.results_topic, settings.online_topic):
            assert _read(settings.bootstrap, settings.kafka_extra, other, "hark-tail-probe") > 0, other
            assert _read(settings.bootstrap, login, other, "hark-activity") == 0, other
        assert _read(settings.bootstrap, login, settings.audio_topic, "hark-activity") > 0  # its input it reads
    finally:
        assert run_hark("down", env_extra=env).returncode == 0
