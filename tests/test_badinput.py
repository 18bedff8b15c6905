"""The bad-input corpus (tests/corpus.py) through the live stack while a good stream runs.

Every case is handled with a reason: a refused file raises AudioError of the expected kind (what
a producer sees) and leaves a dead-letter record with that reason; an accepted one completes.
Malformed and unknown-version records on every topic are dead-lettered by each service that
consumes the topic. Afterwards no service has crashed and the good stream has its transcript.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time

import pytest

from hark import kafka, stack
from hark.audio import AudioError, read_pcm_file

from . import corpus
from .helpers import collect, complete_record

pytestmark = pytest.mark.e2e

# who consumes what: a bad record on a topic is dead-lettered by each of these
CONSUMERS = {
    "audio": {"online_asr", "offline_asr", "diarizer"},
    "transcripts.online": {"results"},
    "transcripts.offline": {"results"},
    "speakers": {"results"},
    "results": {"captions"},
}


def test_bad_input_corpus_is_handled_with_reasons_and_crashes_nothing(live_stack, speech_dir):
    settings, _state = live_stack
    from services.ingest.core import Ingest

    def processes() -> dict[tuple[str, int], int]:  # the shared stack: other tests may have killed one before
        state = stack.status(stack.stack_dir(settings, "pytest"))
        assert state is not None
        return {(s["name"], s["replica"]): s["pid"] for s in state["services"]}

    before = processes()
    speech = read_pcm_file(speech_dir / "goforward.wav")
    small = dataclasses.replace(settings, max_stream_seconds=5.0, max_upload_bytes=1 << 20)
    cases = [(c, settings) for c in corpus.bad_inputs(speech)] + [
        (corpus.too_long(speech, 5.0), small),
        (corpus.too_large(1 << 20), small),
    ]

    good_id = f"good-beside-bad-{time.time_ns()}"
    good = threading.Thread(
        target=lambda: Ingest(settings).publish_file(
            speech_dir / "austen_passage.flac", stream_id=good_id, realtime=True
        )
    )
    good.start()

    t = time.time_ns()
    outcomes, refused = {}, {}
    for case, s in cases:
        sid = f"bad-{case.name.replace('.', '-')}-{t}"
        try:
            Ingest(s).publish_file(io.BytesIO(case.data), stream_id=sid)
            outcomes[case.name] = corpus.ACCEPTED
        except AudioError as e:
            assert e.reason and len(e.reason.splitlines()) == 1, (case.name, e.reason)
            outcomes[case.name] = e.kind
            refused[sid] = e.kind
    assert outcomes == {c.name: c.expect for c, _ in cases}

    # a live stream that goes on past the maximum length is cut off with a reason
    live_id = f"bad-endless-{t}"
    pub = _live_publisher(small, live_id)
    with pytest.raises(AudioError) as raised:
        for _ in range(100):  # 10 s of audio against a 5 s maximum
            pub.push(speech[:1600].tobytes())
    assert raised.value.kind == "too_long"
    pub.finish("ERROR", raised.value.reason)
    Ingest(small).reject(raised.value, stream_id=live_id, tenant="default")
    refused[live_id] = "too_long"

    # malformed and unknown-version records on every topic
    bad_sid = f"bad-records-{t}"
    records = corpus.bad_records(settings, bad_sid)
    p = kafka.producer(settings)
    for topic, value, _ in records:
        p.produce(topic, key=bad_sid.encode(), value=value)
    p.flush(10)

    expected = {}  # (service, error_type) -> count for bad_sid
    for topic, _, kind in records:
        for svc in CONSUMERS[topic[len(settings.topic_prefix) :]]:
            expected[(svc, kind)] = expected.get((svc, kind), 0) + 1

    def dead(recs):
        return [r for _, r in recs if r.get("stream_id") in refused or r.get("stream_id") == bad_sid]

    def complete(recs):
        got = dead(recs)
        per = {}
        for r in got:
            if r["stream_id"] == bad_sid:
                per[(r["service"], r["error_type"])] = per.get((r["service"], r["error_type"]), 0) + 1
        return {r["stream_id"] for r in got if r["stream_id"] in refused} == set(refused) and per == expected

    letters = dead(collect(settings, settings.deadletter_topic, complete, timeout=120))
    for r in letters:
        assert r["reason"], r
        if r["stream_id"] in refused:
            assert r["service"] == "ingest" and r["error_type"] == refused[r["stream_id"]], r
        else:
            assert r["source_topic"] and r["source_offset"] is not None and r["payload"], r

    good.join(120)
    rec = complete_record(settings, good_id, timeout=180)
    assert rec["status"] == "COMPLETE" and "Dashwood" in rec["text"]
    # nothing crashed: every service is the process it was before the bad input, and healthy
    assert processes() == before
    for svc in stack.status(stack.stack_dir(settings, "pytest"))["services"]:
        assert svc["alive"] and svc["health"] == "ok", svc


def _live_publisher(settings, sid):
    from hark.audio import SourceInfo
    from services.ingest.core import Ingest
    from services.ingest.publisher import StreamPublisher

    pub = StreamPublisher(Ingest(settings), sid, "default", SourceInfo("raw/pcm_s16le@16000x1", 16000, 1))
    pub.start()
    return pub
