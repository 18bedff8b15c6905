"""Drafts of a window still growing: which audio to decode and which words to keep; no Kafka,
no model here.

A window is decoded once it ends at a pause with ``offline_min_window_s`` pending; until then its
audio is drafted in stretches of at least ``due_ms``. A stretch ends at its latest pause, or,
inside speech, where the audio pending ends; there the words ending within ``DRAFT_TAIL_MS`` of
the cut are left for the next stretch (the cut may split a word, and Whisper's word ends are off
by ~0.2 s). Each stretch starts where the last one's kept words ended, and a window's cut starts
afresh.

With ``agree`` (LocalAgreement-2, as whisper_streaming commits), a stretch cut inside speech keeps
the words that this draft and the one before it read alike from the stretch's start, and no tail
rule: the words after them are tentative, shown until the next draft (which starts where the kept
words end and reads the tentative ones' audio again). A stretch ending at a pause keeps every word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .windows import StreamWindows, Window

DRAFT_TAIL_MS = 500
MAX_NGRAM = 5  # the longest repeat of the kept words' end that a draft's first words are checked for
DRAFT_RETRY_MS = 1000  # a stretch that kept no word is tried again once this much (or due_ms) more audio is there


@dataclass
class Stretch:
    window: Window  # the audio decoded: from the draft's start, or up to ``context_ms`` before it
    at_pause: bool
    from_ms: int = -1  # where the audio no draft kept yet starts (-1: the window's start)

    def __post_init__(self) -> None:
        self.from_ms = self.window.start_ms if self.from_ms < 0 else self.from_ms


@dataclass
class Drafter:
    due_ms: int  # 0: no drafts
    drafted_ms: int  # drafts cover the pending audio up to here
    tried_ms: int = 0  # where the pending audio ended at the last stretch taken
    agree: bool = False  # keep what two successive drafts agree on (LocalAgreement-2)
    heard: list[dict] = field(default_factory=list)  # the last draft's words after those it kept
    context_ms: int = 0  # decode from this much before the words not kept yet (within the window)
    said: list[str] = field(default_factory=list)  # the last words kept (``context_ms``: not said twice)

    def undrafted_ms(self, windows: StreamWindows) -> int:
        """Pending audio no draft covers, once a stretch is due (``due_ms`` of it, and more audio
        since the last try); else 0."""
        start = max(self.drafted_ms, windows.start_ms)
        if not self.due_ms or windows.end_ms - start < self.due_ms:
            return 0
        retry = min(DRAFT_RETRY_MS, self.due_ms)
        return windows.end_ms - start if windows.end_ms - self.tried_ms >= retry else 0

    def stretch(self, windows: StreamWindows, max_ms: int) -> Stretch | None:
        """The next stretch to decode (None: it holds no speech, and is drafted as silence)."""
        start = max(self.drafted_ms, windows.start_ms)
        begin = max(windows.start_ms, start - self.context_ms)
        pauses = [p for p in windows.pauses_after(start + self.due_ms - 1) if p <= begin + max_ms]
        stop = pauses[-1] if pauses else min(windows.end_ms, begin + max_ms)
        self.tried_ms = windows.end_ms
        w = windows.audio(start, stop)
        if not w.has_speech:
            self.drafted_ms = stop
            return None
        return Stretch(windows.audio(begin, stop) if begin < start else w, bool(pauses), start)

    def keep(self, s: Stretch, words: list[dict]) -> tuple[list[dict], list[dict]]:
        """The words of a decoded stretch that its draft keeps, and those it shows as tentative
        (``agree`` only); the stretch's audio is trimmed to the kept ones and the next stretch
        starts after them."""
        tentative: list[dict] = []
        if s.from_ms > s.window.start_ms:  # decoded with the kept words' audio before it, as context
            words = unsaid([w for w in words if w["start_ms"] + w["end_ms"] >= 2 * s.from_ms], self.said)
        if not s.at_pause and self.agree:
            n = agreed([w for w in self.heard if w["end_ms"] > s.from_ms], words)
            words, tentative = words[:n], words[n:]
        elif not s.at_pause:
            words = [w for w in words if w["end_ms"] <= s.window.end_ms - DRAFT_TAIL_MS]
        self.heard = tentative
        self.said = (self.said + [_plain(w["word"]) for w in words])[-MAX_NGRAM:]
        if words:
            self.drafted_ms = s.window.end_ms if s.at_pause else words[-1]["end_ms"]
            s.window.pcm = s.window.pcm[: (self.drafted_ms - s.window.start_ms) * 16]
        return words, tentative


def agreed(before: list[dict], now: list[dict]) -> int:
    """How many words, from the first, two drafts read alike (case and punctuation aside)."""
    n = 0
    while n < min(len(before), len(now)) and _plain(before[n]["word"]) == _plain(now[n]["word"]):
        n += 1
    return n


def unsaid(words: list[dict], said: list[str]) -> list[dict]:
    """``words`` less the first n that repeat the last n kept (n up to MAX_NGRAM): a word whose
    middle fell after the cut is heard again in the next draft, with times a little off."""
    for n in range(min(MAX_NGRAM, len(said), len(words)), 0, -1):
        if [_plain(w["word"]) for w in words[:n]] == said[-n:]:
            return words[n:]
    return words


def _plain(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())
