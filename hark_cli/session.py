"""Client side of ``hark run`` / ``hark replay``: publish streams, follow the results topic.

Two latencies, for every word, from the moment ingest published the chunk holding the word's end:
- partial: until the word first appeared (in a partial, or in the online final itself) on the
  results topic, as seen by this consumer;
- accurate: until the offline text covering the word (the final transcript's text) first reached
  the results topic (the results service's emit time; one clock on one machine).

The client waits while the pipeline moves, not for a fixed time: records on the results topic (any
stream's) and commits of the consumer groups it waits for count as progress; a stream fails only
when nothing moved for ``stall_timeout_s``, and the error names the stage that stalled.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hark import kafka, serde
from hark.audio import TARGET_RATE, AudioError
from hark.config import Settings
from hark.keys import Keyring
from hark.records import now_ms


@dataclass
class StreamRun:
    source: str
    stream_id: str
    publish: Callable[[StreamRun], object]  # does the publishing; returns a StreamSummary
    chunk_ms: int
    chunk_published_at_ms: list[int] = field(default_factory=list)
    samples_published: int = 0
    expected_seconds: float | None = None
    start_delay_s: float = 0.0  # a load test's streams do not all start on the same millisecond
    error: str | None = None
    end_published_ms: int | None = None
    complete: dict | None = None
    complete_received_ms: int | None = None
    online_finals: dict[int, str] = field(default_factory=dict)
    partial_text: str = ""
    word_latency_ms: list[int] = field(default_factory=list)
    # per measured word, where its latency went: (word end in the stream, waited for more audio
    # [newest chunk the record reflects - chunk holding the word's end], audio -> results record
    # [results emitted - that newest chunk published], results topic -> this client)
    word_latency_parts: list[tuple[int, int, int, int]] = field(default_factory=list)
    _first_seen: dict[int, list[tuple[str, int, int, int, int, int]]] = field(default_factory=dict)
    offline_ranges: list[tuple[int, int, int]] = field(default_factory=list)  # start, end, emitted_at_ms
    last_received_ms: dict[str, int] = field(default_factory=dict)  # "offline" / "speakers": the last one's arrival

    @property
    def done(self) -> bool:
        return self.error is not None or self.complete is not None

    def on_chunk(self, seq: int, offset: int, n: int, published_ms: int) -> None:
        self.chunk_published_at_ms.append(published_ms)
        self.samples_published = offset + n

    def on_result(self, rec: dict, received_ms: int) -> str | None:
        """Track one Result; return the line to commit to the screen for a FINAL."""
        kind = str(rec["kind"])
        if kind == "STREAM_COMPLETE":
            self.complete, self.complete_received_ms = rec, received_ms
            return None
        if kind in ("SPEAKERS", "ALTERNATIVES"):
            self.last_received_ms[kind.lower()] = received_ms
            return None
        if rec["source"] == "offline":
            if kind == "FINAL":
                self.offline_ranges.append((rec["start_ms"], rec["end_ms"], rec["emitted_at_ms"]))
                self.last_received_ms["offline"] = received_ms
            return caption_line(rec)
        utt = rec["utterance_id"]
        seen = self._first_seen.setdefault(utt, [])
        for w in rec["words"]:
            if not any(s[0] == w["word"] and _overlap(s[1], s[2], w["start_ms"], w["end_ms"]) for s in seen):
                seen.append(
                    (
                        w["word"],
                        w["start_ms"],
                        w["end_ms"],
                        received_ms,
                        rec["audio_published_at_ms"],
                        rec["emitted_at_ms"],
                    )
                )
        if kind == "PARTIAL":
            self.partial_text = rec["text"]
            return None
        for w in rec["words"]:  # FINAL
            first = min(
                (s[3:] for s in seen if s[0] == w["word"] and _overlap(s[1], s[2], w["start_ms"], w["end_ms"])),
                default=(received_ms, rec["audio_published_at_ms"], rec["emitted_at_ms"]),
            )
            if self.chunk_published_at_ms:
                idx = min(w["end_ms"] // self.chunk_ms, len(self.chunk_published_at_ms) - 1)
                received, audio_published, emitted = first
                self.word_latency_ms.append(received - self.chunk_published_at_ms[idx])
                self.word_latency_parts.append(
                    (
                        w["end_ms"],
                        audio_published - self.chunk_published_at_ms[idx],
                        emitted - audio_published,
                        received - emitted,
                    )
                )
        self._first_seen.pop(utt, None)
        self.online_finals[utt] = rec["text"]
        self.partial_text = ""
        return caption_line(rec)

    def accurate_latency_ms(self) -> list[int]:
        """Per word of the final transcript (when its text came from the offline pass): the first
        offline FINAL covering the word's end, emitted, minus the publishing of that audio."""
        c = self.complete or {}
        if c.get("final_source") != "offline" or not self.chunk_published_at_ms:
            return []
        out = []
        for w in c.get("words", []):
            covering = [em for s, e, em in self.offline_ranges if s < w["end_ms"] <= e]
            if covering:
                idx = min(max(w["end_ms"] - 1, 0) // self.chunk_ms, len(self.chunk_published_at_ms) - 1)
                out.append(min(covering) - self.chunk_published_at_ms[idx])
        return out

    def after_close(self, received_ms: int | None) -> int | None:
        return received_ms - self.end_published_ms if received_ms and self.end_published_ms else None

    def summary(self) -> dict:
        out = {"stream_id": self.stream_id, "source": self.source}
        if self.error:
            return {**out, "status": "FAILED", "error": self.error}
        c = self.complete or {}
        lat = np.array(self.word_latency_ms) if self.word_latency_ms else None
        accurate = self.accurate_latency_ms()
        online_text = c.get("online_text") if c else " ".join(self.online_finals[k] for k in sorted(self.online_finals))
        return {
            **out,
            "status": c.get("status", "INCOMPLETE") if c else "INCOMPLETE",
            "language": c.get("language") if c else None,
            "duration_s": round(self.samples_published / TARGET_RATE, 3),
            "online_text": online_text or "",
            "final_text": c.get("text", online_text or ""),
            "words": [
                {
                    "word": w["word"],
                    "start": w["start_ms"] / 1000,
                    "end": w["end_ms"] / 1000,
                    "confidence": w["confidence"],
                    "speaker": w["speaker"],
                }
                for w in c.get("words", [])
            ],
            "turns": [
                {"speaker": t["speaker"], "start": t["start_ms"] / 1000, "end": t["end_ms"] / 1000}
                for t in c.get("turns", [])
            ],
            "final_source": c.get("final_source"),
            "truncated": c.get("truncated", False),
            "models": {c["final_source"]: f"{c['model_name']} ({c['model_version']})"} if c else {},
            "latency": {
                "partial_p50_ms": None if lat is None else round(float(np.percentile(lat, 50)), 1),
                "partial_p95_ms": None if lat is None else round(float(np.percentile(lat, 95)), 1),
                "words_measured": 0 if lat is None else int(lat.size),
                "accurate_p50_ms": round(float(np.percentile(accurate, 50)), 1) if accurate else None,
                "accurate_p95_ms": round(float(np.percentile(accurate, 95)), 1) if accurate else None,
                "accurate_words_measured": len(accurate),
                "final_after_close_ms": self.after_close(self.complete_received_ms),  # and what it waited for:
                "offline_after_close_ms": self.after_close(self.last_received_ms.get("offline")),
                "speakers_after_close_ms": self.after_close(self.last_received_ms.get("speakers")),
            },
        }


def caption_line(rec: dict) -> str | None:
    """The line a terminal commits for a Result FINAL (None for other kinds)."""
    if str(rec["kind"]) != "FINAL":
        return None
    turns = speaker_lines(rec["words"])
    text = " ".join(turns) if turns else rec["text"]
    if rec["source"] == "offline":  # full-context text that replaces this range of the captions
        return f"(offline {rec['start_ms'] / 1000:.1f}-{rec['end_ms'] / 1000:.1f} s) {text}"
    return text


def speaker_lines(words: list[dict]) -> list[str]:
    """``SPEAKER: words`` per run of one speaker's words; [] when no word has a speaker."""
    if not any(w.get("speaker") for w in words):
        return []
    out: list[tuple[str, list[str]]] = []
    for w in words:
        who = w.get("speaker") or (out[-1][0] if out else "?")  # an unlabelled word stays with its neighbours
        if out and out[-1][0] == who:
            out[-1][1].append(w["word"])
        else:
            out.append((who, [w["word"]]))
    return [f"{who}: {' '.join(ws)}" for who, ws in out]


def read_results(consumer, timeout: float, keys: Keyring):
    """Result records from one poll of a results-topic reader (errors, foreign records and erased
    streams' records skipped). ``keys``: the installation's Keyring, which opens sealed records."""
    for msg in kafka.consume_ready(consumer, 200, timeout):
        if msg.error():
            continue
        try:
            rtype, rec = serde.decode_message(msg, keys)
        except serde.SerdeError:
            continue
        if rtype == "Result":
            yield rec


def _overlap(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class Display:
    """Live partials and a progress bar on a terminal; plain committed lines otherwise."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.out, self.quiet = stream, quiet
        self.tty = stream.isatty() and not quiet
        self._last = 0.0

    def commit(self, line: str) -> None:
        if self.quiet:
            return
        self.out.write(("\r\x1b[2K" if self.tty else "") + line + "\n")
        self.out.flush()

    def status(self, runs: list[StreamRun], force: bool = False, waiting: str | None = None) -> None:
        if not self.tty or (time.monotonic() - self._last < 0.1 and not force):
            return
        self._last = time.monotonic()
        width = shutil.get_terminal_size((100, 20)).columns
        done = sum(r.samples_published for r in runs) / TARGET_RATE
        total = sum(r.expected_seconds or r.samples_published / TARGET_RATE for r in runs) or 1.0
        frac = min(1.0, done / total)
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        finished = sum(r.done for r in runs)
        live = next((r for r in reversed(runs) if r.partial_text), None)
        line = f"[{bar}] {frac:4.0%} {finished}/{len(runs)} done"
        if waiting and frac >= 1.0:
            line += f" | waiting for {waiting}"
        if live:
            line += f" | {live.stream_id}: "
            room = max(0, width - 1 - len(line))
            line += live.partial_text[-room:] if room else ""
        self.out.write("\r\x1b[2K" + line[: width - 1])
        self.out.flush()

    def clear(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")
            self.out.flush()


class Progress:
    """Whether the pipeline moves: records on the results topic, and the commits of the consumer
    groups a stream waits for (read every ``period_s``). ``waiting_for`` names the group furthest
    behind, for the display and for the error when nothing moves."""

    def __init__(self, settings: Settings, groups: list[str], period_s: float = 3.0):
        self.settings, self.groups, self.period_s = settings, groups, period_s
        self.moved_at = time.monotonic()
        self._committed: dict[str, int] = {}
        self._checked = 0.0
        self.lag: dict[str, int] = {}

    def record_seen(self) -> None:
        self.moved_at = time.monotonic()

    def poll(self) -> None:
        if time.monotonic() - self._checked < self.period_s:
            return
        self._checked = time.monotonic()
        try:
            lags = kafka.group_lag(self.settings, self.groups, timeout=5)
        except Exception:  # the broker is down: that is no progress, and the stall timer says so
            return
        for group, info in lags.items():
            if "error" in info:
                continue
            committed = sum(r["committed"] for r in info["partitions"])
            if committed != self._committed.get(group, committed):
                self.moved_at = time.monotonic()
            self._committed[group], self.lag[group] = committed, info["lag"]

    @property
    def still_s(self) -> float:
        return time.monotonic() - self.moved_at

    def waiting_for(self) -> str:
        behind = {g: n for g, n in self.lag.items() if n > 0}
        if not behind:
            return "the results service"
        group = max(behind, key=lambda g: behind[g])
        return f"{group.removeprefix('hark-')} ({behind[group]} records behind)"


def follow(
    settings: Settings,
    runs: list[StreamRun],
    display: Display,
    stall_timeout_s: float = 120.0,
    groups: list[str] | None = None,
) -> None:
    """Publish every run concurrently and consume results until each completes or fails; a run
    that has ended publishing fails only when the pipeline has not moved for ``stall_timeout_s``."""
    from hark.stack import GROUPS

    tail = kafka.tail_consumer(settings, settings.results_topic)
    keys = Keyring.for_settings(settings)
    by_id = {r.stream_id: r for r in runs}
    progress = Progress(settings, GROUPS if groups is None else groups)

    def publish(run: StreamRun) -> None:
        try:
            time.sleep(run.start_delay_s)
            run.publish(run)
            run.end_published_ms = now_ms()
        except AudioError as e:
            run.error = e.reason
        except Exception as e:  # the broker went away, the archive is full...
            run.error = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=publish, args=(r,), daemon=True, name=f"publish-{r.stream_id}") for r in runs]
    for t in threads:
        t.start()
    try:
        while not all(r.done for r in runs):
            for rec in read_results(tail, 0.05, keys):
                progress.record_seen()
                run = by_id.get(rec["stream_id"])
                if run is None:
                    continue
                line = run.on_result(rec, now_ms())
                if line:
                    display.commit(f"[{run.stream_id}] {line}")
            if any(not r.done and r.end_published_ms is None for r in runs):
                progress.record_seen()  # still publishing: the clock starts when the audio is all in
            waiting = [r for r in runs if not r.done and r.end_published_ms is not None]
            if waiting:
                progress.poll()
                if progress.still_s > stall_timeout_s:
                    for r in waiting:
                        r.error = f"nothing moved for {progress.still_s:.0f} s: waiting for {progress.waiting_for()}"
            display.status(runs, waiting=progress.waiting_for() if waiting else None)
    finally:
        display.clear()
        tail.close()


def expected_seconds(path: str) -> float | None:
    try:
        import av

        with av.open(path) as c:
            return c.duration / 1_000_000 if c.duration else None
    except Exception:
        return None


def file_runs(
    ingest,
    files: list[str],
    realtime: bool,
    settings: Settings,
    tenant: str = "default",
    metadata: dict | None = None,
    **options,  # language, hotwords: as Ingest.publish_file takes them
) -> list[StreamRun]:
    from hark.records import new_stream_id

    runs = []
    for f in files:

        def publish(run: StreamRun, path=f):
            return ingest.publish_file(
                path,
                stream_id=run.stream_id,
                tenant=tenant,
                realtime=realtime,
                on_chunk=run.on_chunk,
                metadata=metadata,
                **options,
            )

        runs.append(
            StreamRun(f, new_stream_id(Path(f).stem), publish, settings.chunk_ms, expected_seconds=expected_seconds(f))
        )
    return runs
