"""What ``hark run`` / ``hark replay`` / ``hark tail`` show on a terminal: caption lines and a live
status line."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from hark.audio import TARGET_RATE


class RunProgress(Protocol):
    """What the status line reads of a run (``session.StreamRun``)."""

    @property
    def stream_id(self) -> str: ...

    @property
    def samples_published(self) -> int: ...

    @property
    def expected_seconds(self) -> float | None: ...

    @property
    def partial_text(self) -> str: ...

    @property
    def done(self) -> bool: ...


def caption_line(rec: dict) -> str | None:
    """The line a terminal commits for a Result FINAL (None for other kinds)."""
    if str(rec["kind"]) != "FINAL":
        return None
    turns = speaker_lines(rec["words"])
    text = " ".join(turns) if turns else rec["text"]
    if rec["source"] in ("offline", "provisional"):  # Whisper's text that replaces this range of the captions
        return f"({rec['source']} {rec['start_ms'] / 1000:.1f}-{rec['end_ms'] / 1000:.1f} s) {text}"
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

    def status(self, runs: Sequence[RunProgress], force: bool = False, waiting: str | None = None) -> None:
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


def language(r: dict) -> str:
    """The language as the heading shows it: detected ones with their probability, an unsure
    detection said so (its text is decoded in the fallback language)."""
    lang, p = r.get("language"), r.get("language_probability")
    if p is None:
        return f"{lang}, " if lang and lang != "und" else ""
    if lang == "und":
        return f"language not determined (p {p:.2f}, decoded in the fallback language), "
    return f"{lang} detected (p {p:.2f}), "


def report_runs(results: list[dict], json_path: str | None) -> int:
    """Each run's transcript and latency on stdout (a failure's reason on stderr), and every run
    as a JSON line in ``json_path``; returns how many failed."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    failed = 0
    for r in results:
        if r["status"] == "FAILED":
            failed += 1
            print(f"hark: {r['source']}: {r['error']}", file=sys.stderr)
            continue
        lat = r["latency"]
        print(f"== {r['source']} ({r['stream_id']}, {r['duration_s']:.1f} s, {language(r)}{r['status']})")
        lines = speaker_lines([{"word": w["word"], "speaker": w["speaker"]} for w in r["words"]])
        print("\n".join(lines) if lines else (r["final_text"] or "(no speech recognised)"))
        print(
            f"   partial latency p50 {lat['partial_p50_ms']} ms, p95 {lat['partial_p95_ms']} ms; accurate text "
            f"p50 {lat['accurate_p50_ms']} ms, p95 {lat['accurate_p95_ms']} ms; final {lat['final_after_close_ms']} ms "
            "after close"
        )
        if r["status"] not in ("COMPLETE",):
            failed += 1
            print(f"hark: {r['source']}: stream ended {r['status']}", file=sys.stderr)
    return failed
