"""Drafts of a window still growing: which audio to decode and which words to keep; no Kafka,
no model here.

A window is decoded once it ends at a pause with ``offline_min_window_s`` pending; until then its
audio is drafted in stretches of at least ``due_ms``. A stretch ends at its latest pause, or,
inside speech, where the audio pending ends; there the words ending within ``DRAFT_TAIL_MS`` of
the cut are left for the next stretch (the cut may split a word, and Whisper's word ends are off
by ~0.2 s). Each stretch starts where the last one's kept words ended, and a window's cut starts
afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

from .windows import StreamWindows, Window

DRAFT_TAIL_MS = 500
DRAFT_RETRY_MS = 1000  # a stretch that kept no word is tried again once this much more audio is there


@dataclass
class Stretch:
    window: Window  # the audio, from the draft's start
    at_pause: bool


@dataclass
class Drafter:
    due_ms: int  # 0: no drafts
    drafted_ms: int  # drafts cover the pending audio up to here
    tried_ms: int = 0  # where the pending audio ended at the last stretch taken

    def undrafted_ms(self, windows: StreamWindows) -> int:
        """Pending audio no draft covers, once a stretch is due (``due_ms`` of it, and more audio
        since the last try); else 0."""
        start = max(self.drafted_ms, windows.start_ms)
        if not self.due_ms or windows.end_ms - start < self.due_ms:
            return 0
        return windows.end_ms - start if windows.end_ms - self.tried_ms >= DRAFT_RETRY_MS else 0

    def stretch(self, windows: StreamWindows, max_ms: int) -> Stretch | None:
        """The next stretch to decode (None: it holds no speech, and is drafted as silence)."""
        start = max(self.drafted_ms, windows.start_ms)
        pauses = [p for p in windows.pauses_after(start + self.due_ms - 1) if p <= start + max_ms]
        stop = pauses[-1] if pauses else min(windows.end_ms, start + max_ms)
        self.tried_ms = windows.end_ms
        w = windows.audio(start, stop)
        if not w.has_speech:
            self.drafted_ms = stop
            return None
        return Stretch(w, bool(pauses))

    def keep(self, s: Stretch, words: list[dict]) -> list[dict]:
        """The words of a decoded stretch that its draft keeps; the stretch's audio is trimmed to
        them and the next stretch starts after them."""
        if not s.at_pause:
            words = [w for w in words if w["end_ms"] <= s.window.end_ms - DRAFT_TAIL_MS]
        if words:
            self.drafted_ms = s.window.end_ms if s.at_pause else words[-1]["end_ms"]
            s.window.pcm = s.window.pcm[: (self.drafted_ms - s.window.start_ms) * 16]
        return words
