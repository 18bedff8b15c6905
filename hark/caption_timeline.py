"""What a viewer reads: one stream's captions as the captions page composes them from the results
topic, replayed from the records a reader received, and scored at a delay after each word ended.

The board follows the page's rules (services/captions/page.html, ``apply``). Text of a range is
replaced in one direction, by tier: online (pocketsphinx PARTIAL and FINAL), draft words that may
still change (provisional PARTIAL), committed draft words (provisional FINAL), the window's text
(offline FINAL). A record of a higher tier removes the lower tiers' words whose middle lies in its
[start_ms, end_ms); a record of a lower tier that a higher one already covers whole is not shown.
An utterance's online record replaces that utterance's previous one; a stream shows one tentative
draft tail, the newest.

Caption WER at a delay d: each word of the final transcript owns the audio from its start to the
next word's start (the first word also everything before it). At the moment the word's end was
published plus d, the words the board shows in that stretch are what the viewer reads there. Those
words, in order, are the stream's hypothesis at d, scored against the final transcript (and, in
benches, against the human reference). Edit distance is taken over runs of ``RUN_WORDS`` final
words, so an hour-long stream costs seconds; an error is never hidden by it, and a word read at the
seam of two runs cannot be matched across it (a slight overcount).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .wer import WerScore, edit_distance, normalise, score

DELAYS_MS = (1000, 2000, 4000)
RUN_WORDS = 40
SLACK_MS = 2000  # a word's middle lies this close to its record's range, at most

ONLINE, TENTATIVE, COMMITTED, WINDOW = 0, 1, 2, 3


def tier(rec: dict) -> int | None:
    """The tier of a caption record (None: not a caption)."""
    kind, source = str(rec["kind"]), rec.get("source")
    if kind not in ("PARTIAL", "FINAL"):
        return None
    if source == "online":
        return ONLINE
    if source == "provisional":
        return TENTATIVE if kind == "PARTIAL" else COMMITTED
    return WINDOW if source == "offline" and kind == "FINAL" else None


@dataclass
class Shown:
    tier: int
    start_ms: int
    end_ms: int
    words: list[tuple[str, int, int]]  # word, start_ms, end_ms


@dataclass
class CaptionBoard:
    """The captions on screen, record by record."""

    segs: dict[tuple, Shown] = field(default_factory=dict)

    def apply(self, rec: dict) -> None:
        t = tier(rec)
        if t is None:
            return
        s, e = rec["start_ms"], rec["end_ms"]
        words = [(w["word"], w["start_ms"], w["end_ms"]) for w in rec.get("words") or []]
        if any(h.tier > t and h.start_ms <= s and e <= h.end_ms for h in self.segs.values()):
            return  # already replaced by a later pass's text
        if t == ONLINE:
            key: tuple = ("online", rec["utterance_id"])
        elif t == TENTATIVE:
            key = ("tentative",)
        else:
            key = (t, rec["utterance_id"], s)
        self.segs.pop(key, None)
        if t == ONLINE:  # it shows only its words outside the higher tiers' text
            higher = [
                (h.start_ms, h.end_ms) for h in self.segs.values() if h.tier > t and h.start_ms < e and h.end_ms > s
            ]
            self.segs[key] = Shown(t, s, e, [w for w in words if not _inside(w, higher)])
            return
        for k, low in list(self.segs.items()):
            if low.tier < t and low.start_ms < e and low.end_ms > s:
                kept = [w for w in low.words if not _inside(w, [(s, e)])]
                if kept:
                    low.words = kept
                else:
                    del self.segs[k]
        self.segs[key] = Shown(t, s, e, words)

    def words(self) -> list[tuple[str, int, int]]:
        return [w for seg in self.segs.values() for w in seg.words]


def _inside(w: tuple[str, int, int], ranges: Iterable[tuple[int, int]]) -> bool:
    mid = (w[1] + w[2]) / 2
    return any(s <= mid < e for s, e in ranges)


def read_at(
    events: Sequence[tuple[int, dict]],
    final_words: Sequence[dict],
    ended_at_ms: Sequence[int],
    delays_ms: Sequence[int] = DELAYS_MS,
) -> dict[int, list[list[str]]]:
    """Per delay, per final word: the words the board showed in the word's stretch of audio at
    ``ended_at_ms[i] + delay`` (``events``: (received_ms, record), in the order received)."""
    bounds = [w["start_ms"] for w in final_words[1:]]
    looks = sorted((ended_at_ms[i] + d, d, i) for d in delays_ms for i in range(len(final_words)))
    board, j = CaptionBoard(), 0
    read: dict[int, list[list[str]]] = {d: [[] for _ in final_words] for d in delays_ms}
    for at, d, i in looks:
        while j < len(events) and events[j][0] <= at:
            board.apply(events[j][1])
            j += 1
        lo = final_words[i]["start_ms"] if i else float("-inf")
        hi = bounds[i] if i < len(bounds) else float("inf")
        near = (
            w
            for seg in board.segs.values()
            if seg.start_ms <= hi + SLACK_MS and seg.end_ms >= lo - SLACK_MS
            for w in seg.words
        )
        read[d][i] = [
            w[0] for w in sorted((w for w in near if lo <= (w[1] + w[2]) / 2 < hi), key=lambda w: w[1] + w[2])
        ]
    return read


def caption_scores(
    events: Sequence[tuple[int, dict]],
    final_words: Sequence[dict],
    ended_at_ms: Sequence[int],
    delays_ms: Sequence[int] = DELAYS_MS,
    reference: str | None = None,
) -> dict[int, WerScore]:
    """Caption WER at each delay, against the final transcript, or against ``reference`` (the
    human one) when given."""
    out = {}
    for d, read in read_at(events, final_words, ended_at_ms, delays_ms).items():
        if reference is not None:
            out[d] = score(reference, " ".join(w for ws in read for w in ws))
            continue
        total = WerScore(0, 0)
        for r in range(0, len(final_words), RUN_WORDS):
            ref = normalise(" ".join(w["word"] for w in final_words[r : r + RUN_WORDS]))
            hyp = normalise(" ".join(w for ws in read[r : r + RUN_WORDS] for w in ws))
            total += WerScore(edit_distance(ref, hyp), len(ref))
        out[d] = total
    return out
