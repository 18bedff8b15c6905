"""What several test modules share: reading a topic until a condition holds, an ingest server
running in this process."""

from __future__ import annotations

import asyncio
import io
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hark import broker, kafka, serde
from hark.keys import Keyring
from services.ingest.server import IngestServer


def collect(settings, topic: str, until, timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Read ``topic`` from the beginning until ``until(records)`` is true. A timeout says what the
    reader saw: its errors, and each partition's last stable offset against its high watermark
    (an open transaction holds read_committed readers at the first)."""
    c = kafka.tail_consumer(settings, topic, from_beginning=True)
    keys = Keyring.for_settings(settings)
    out: list[tuple[str, dict]] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for m in c.consume(500, 0.1):
                if m.error():
                    errors.append(str(m.error()))
                    continue
                try:
                    out.append(serde.decode_message(m, keys))
                except serde.SerdeError:  # bad records other tests put on the topic, tombstones
                    continue
            if until(out):
                return out
        positions = {tp.partition: tp.offset for tp in c.position(c.assignment())}
    finally:
        c.close()
    raise AssertionError(
        f"timed out on {topic}; got {len(out)} records; reader errors {errors[-5:]}; "
        f"positions {positions}; {stable_offsets(settings, topic)}"
    )


def stable_offsets(settings, topic: str) -> str:
    """Each partition's last stable offset and high watermark, where they differ."""
    from confluent_kafka import IsolationLevel, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    adm = kafka.admin(settings)
    parts = adm.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {}
    for level in (IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED):
        futures = adm.list_offsets(
            {TopicPartition(topic, p): OffsetSpec.latest() for p in parts}, isolation_level=level, request_timeout=10
        )
        ends[level] = {tp.partition: f.result().offset for tp, f in futures.items()}
    held = {
        p: (ends[IsolationLevel.READ_COMMITTED][p], ends[IsolationLevel.READ_UNCOMMITTED][p])
        for p in parts
        if ends[IsolationLevel.READ_COMMITTED][p] != ends[IsolationLevel.READ_UNCOMMITTED][p]
    }
    return f"partitions held by an open transaction (stable, high): {held}" if held else "no open transaction"


def completed(stream_id):
    return lambda recs: any(
        t == "Result" and r["stream_id"] == stream_id and r["kind"] == "STREAM_COMPLETE" for t, r in recs
    )


def complete_record(settings, stream_id, timeout=60.0) -> dict:
    recs = collect(settings, settings.results_topic, completed(stream_id), timeout)
    return next(r for t, r in recs if r["stream_id"] == stream_id and r["kind"] == "STREAM_COMPLETE")


def wav_bytes(pcm) -> bytes:
    """16 kHz mono int16 samples as a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def segments_holding(log_root: Path, topic: str, needle: str) -> int:
    """How many times ``needle`` appears in ``topic``'s segment files under a broker's log folder,
    read with Kafka's own DumpLogSegments (what kafka-dump-log.sh runs)."""
    files = sorted(str(f) for f in log_root.glob(f"**/{topic}-*/*.log"))
    if not files:  # the topic is not there (yet)
        return 0
    libs = str(broker.libs_dir()) + "/*"
    out = subprocess.run(
        [broker.java_binary(), "-cp", libs, "kafka.tools.DumpLogSegments", "--files", ",".join(files), "--print-data-log"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.count(needle)


@contextmanager
def running(settings) -> Iterator[tuple[IngestServer, str]]:
    """An IngestServer serving on a thread of its own (its own event loop) until the block ends."""
    server = IngestServer(settings)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    task: asyncio.Task | None = None

    async def main() -> None:
        nonlocal task
        up = asyncio.Event()
        task = asyncio.create_task(server.serve("127.0.0.1", 0, up))
        await up.wait()
        started.set()
        try:
            await task
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60), "ingest did not start"
    try:
        yield server, f"ws://127.0.0.1:{server.port}/v1/streams"
    finally:
        assert task is not None
        loop.call_soon_threadsafe(task.cancel)
        thread.join(60)
