"""Client side of ``hark run`` / ``hark replay``: publish streams, follow the results topic.

Two latencies, for every word, from the moment ingest published the chunk holding the word's end:
- partial: until the word first appeared (in a partial, or in the online final itself) on the
  results topic, as seen by this consumer;
- accurate: until Whisper's text covering the word first reached the results topic: a provisional
  FINAL (part of a window still growing) or the offline FINAL of its window (the results service's
  emit time; one clock on one machine);
- settled: until the offline FINAL of its window, the final transcript's own text, did.

And what a viewer reads: caption WER 1, 2 and 4 s after each word's audio was published, the
captions as the page composes them from the records this client received (hark/caption_timeline.py).

The client waits while the pipeline moves, not for a fixed time: records on the results topic (any
stream's) and commits of the consumer groups it waits for count as progress; a stream fails only
when nothing moved for ``stall_timeout_s``, and the error names the stage that stalled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hark import kafka, serde
from hark.audio import TARGET_RATE, AudioError
from hark.caption_timeline import DELAYS_MS, caption_scores, tier
from hark.config import Settings
from hark.keys import Keyring
from hark.records import now_ms
from hark.wer import WerScore

from .display import Display, caption_line


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
    provisional_ranges: list[tuple[int, int, int]] = field(default_factory=list)  # the same, of provisional FINALs
    provisional_texts: list[tuple[int, str]] = field(default_factory=list)  # their start and text
    last_received_ms: dict[str, int] = field(default_factory=dict)  # "offline" / "speakers": the last one's arrival
    # the caption records as received, for caption WER (bounded: beyond, it is not measured)
    caption_events: list[tuple[int, dict]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.error is not None or self.complete is not None

    def on_chunk(self, seq: int, offset: int, n: int, published_ms: int) -> None:
        self.chunk_published_at_ms.append(published_ms)
        self.samples_published = offset + n

    def on_result(self, rec: dict, received_ms: int) -> str | None:
        """Track one Result; return the line to commit to the screen for a FINAL."""
        kind = str(rec["kind"])
        if tier(rec) is not None and len(self.caption_events) < MAX_CAPTION_EVENTS:
            self.caption_events.append((received_ms, _caption(rec)))
        if kind == "STREAM_COMPLETE":
            self.complete, self.complete_received_ms = rec, received_ms
            return None
        if kind in ("SPEAKERS", "ALTERNATIVES"):
            self.last_received_ms[kind.lower()] = received_ms
            return None
        if rec["source"] in ("offline", "provisional"):
            if kind == "FINAL":
                ranges = self.offline_ranges if rec["source"] == "offline" else self.provisional_ranges
                ranges.append((rec["start_ms"], rec["end_ms"], rec["emitted_at_ms"]))
                if rec["source"] == "provisional":
                    self.provisional_texts.append((rec["start_ms"], rec["text"]))
                self.last_received_ms[rec["source"]] = received_ms
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

    def accurate_latency_ms(self, settled: bool = False) -> list[int]:
        """Per word of the final transcript (when its text came from the offline pass): the first
        Whisper FINAL covering the word's end (``settled``: the offline one of its window), emitted,
        minus the publishing of that audio."""
        c = self.complete or {}
        if c.get("final_source") != "offline" or not self.chunk_published_at_ms:
            return []
        ranges = self.offline_ranges + ([] if settled else self.provisional_ranges)
        out = []
        for w in c.get("words", []):
            covering = [em for s, e, em in ranges if s < w["end_ms"] <= e]
            if covering:
                out.append(min(covering) - self.published_ms(w["end_ms"]))
        return out

    def published_ms(self, end_ms: int) -> int:
        """When the chunk holding the audio just before ``end_ms`` was published."""
        idx = min(max(end_ms - 1, 0) // self.chunk_ms, len(self.chunk_published_at_ms) - 1)
        return self.chunk_published_at_ms[idx]

    def caption_scores(self, reference: str | None = None) -> dict[int, WerScore] | None:
        """Caption errors at 1, 2 and 4 s, against the final transcript or ``reference`` (None: no
        final words, or too many records to keep)."""
        words = (self.complete or {}).get("words", [])
        if not words or not self.chunk_published_at_ms or len(self.caption_events) >= MAX_CAPTION_EVENTS:
            return None
        ended = [self.published_ms(w["end_ms"]) for w in words]
        return caption_scores(self.caption_events, words, ended, DELAYS_MS, reference)

    def first_text(self) -> str:
        """The text Whisper first gave each stretch: provisional text where a draft came, the final
        transcript's words elsewhere (what captions showed before each window settled)."""
        words = (self.complete or {}).get("words", [])
        drafted = [(s, e) for s, e, _ in self.provisional_ranges]
        rest = [
            (w["start_ms"], w["word"])
            for w in words
            if not any(s <= (w["start_ms"] + w["end_ms"]) // 2 < e for s, e in drafted)
        ]
        return " ".join(t for _, t in sorted(rest + self.provisional_texts, key=lambda x: x[0]) if t)

    def after_close(self, received_ms: int | None) -> int | None:
        return received_ms - self.end_published_ms if received_ms and self.end_published_ms else None

    def summary(self) -> dict:
        out = {"stream_id": self.stream_id, "source": self.source}
        if self.error:
            return {**out, "status": "FAILED", "error": self.error}
        c = self.complete or {}
        lat = np.array(self.word_latency_ms) if self.word_latency_ms else None
        accurate, settled = self.accurate_latency_ms(), self.accurate_latency_ms(settled=True)
        caption = {d: x.wer for d, x in (self.caption_scores() or {}).items()}
        online_text = c.get("online_text") if c else " ".join(self.online_finals[k] for k in sorted(self.online_finals))
        return {
            **out,
            "status": c.get("status", "INCOMPLETE") if c else "INCOMPLETE",
            "language": c.get("language") if c else None,
            "language_probability": None
            if c.get("language_probability") is None
            else round(c["language_probability"], 3),
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
                "settled_p50_ms": round(float(np.percentile(settled, 50)), 1) if settled else None,
                "settled_p95_ms": round(float(np.percentile(settled, 95)), 1) if settled else None,
                **{f"caption_wer_{d // 1000}s": _round(caption.get(d)) for d in DELAYS_MS},
                "final_after_close_ms": self.after_close(self.complete_received_ms),  # and what it waited for:
                "offline_after_close_ms": self.after_close(self.last_received_ms.get("offline")),
                "speakers_after_close_ms": self.after_close(self.last_received_ms.get("speakers")),
            },
        }


MAX_CAPTION_EVENTS = 100_000  # about an hour and a half of speech's partials


def _caption(rec: dict) -> dict:
    """What the caption board needs of a record."""
    keep = ("kind", "source", "utterance_id", "start_ms", "end_ms")
    return {k: rec[k] for k in keep} | {
        "words": [{"word": w["word"], "start_ms": w["start_ms"], "end_ms": w["end_ms"]} for w in rec["words"]]
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


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
