"""Captions that are right sooner: caption WER at a delay (hark/caption_timeline.py) on a timeline
built by hand, and the drafts' LocalAgreement (services/offline_asr/drafts.py)."""

from __future__ import annotations

import numpy as np

from hark.caption_timeline import CaptionBoard, caption_scores, read_at
from services.offline_asr.drafts import Drafter, Stretch
from services.offline_asr.windows import Window

FINAL = [
    ("the", 0, 300),
    ("cat", 300, 600),
    ("sat", 600, 900),
    ("on", 1000, 1200),
    ("the", 1200, 1400),
    ("mat", 1400, 1800),
]
T0 = 10_000  # each word's end was published at T0 + its end: real-time pace


def words(*ws):
    return [{"word": w, "start_ms": s, "end_ms": e} for w, s, e in ws]


def rec(kind, source, utt, start, end, *ws):
    return {"kind": kind, "source": source, "utterance_id": utt, "start_ms": start, "end_ms": end, "words": words(*ws)}


EVENTS = [
    (10_400, rec("PARTIAL", "online", 0, 0, 400, ("the", 0, 300), ("cap", 300, 400))),
    (10_950, rec("PARTIAL", "online", 0, 0, 900, ("the", 0, 300), ("cat", 300, 600), ("sad", 600, 900))),
    (11_300, rec("FINAL", "online", 0, 0, 900, ("the", 0, 300), ("cat", 300, 600), ("sad", 600, 900))),
    (11_900, rec("PARTIAL", "online", 1, 1000, 1800, ("on", 1000, 1200), ("a", 1200, 1400), ("mat", 1400, 1800))),
    # a draft: its words may still change (tentative), replacing the online text of its range
    (
        12_500,
        rec(
            "PARTIAL",
            "provisional",
            0,
            0,
            1800,
            *[(w, s, e) for w, s, e in FINAL[:4]],
            ("a", 1200, 1400),
            ("mat", 1400, 1800),
        ),
    ),
    # the next draft commits the first three words; the tentative words after them stay
    (13_000, rec("FINAL", "provisional", 0, 0, 1000, *FINAL[:3])),
    (13_600, rec("FINAL", "offline", 0, 0, 1800, *FINAL)),
    # an online record inside text a later pass already replaced is not shown
    (13_700, rec("PARTIAL", "online", 1, 1000, 1800, ("on", 1000, 1200), ("a", 1200, 1400), ("hat", 1400, 1800))),
]
ENDED = [T0 + e for _, _, e in FINAL]


def test_what_a_viewer_reads_at_each_delay():
    read = read_at(EVENTS, words(*FINAL), ENDED, (1000, 2000, 4000))
    # +1 s: pocketsphinx's "sad" and "a" are on screen for "sat" and "the"; "mat" is the draft's
    assert read[1000] == [["the"], ["cat"], ["sad"], ["on"], ["a"], ["mat"]]
    # +2 s: the draft replaced "sad"; its tentative "a" is still there at 13.4 s
    assert read[2000] == [["the"], ["cat"], ["sat"], ["on"], ["a"], ["mat"]]
    assert read[4000] == [[w] for w, _, _ in FINAL]  # the window's text, and no late online partial

    scores = caption_scores(EVENTS, words(*FINAL), ENDED)
    assert {d: (s.errors, s.ref_words) for d, s in scores.items()} == {1000: (2, 6), 2000: (1, 6), 4000: (0, 6)}
    human = caption_scores(EVENTS, words(*FINAL), ENDED, reference="The cat sat on the hat.")
    assert {d: s.errors for d, s in human.items()} == {1000: 3, 2000: 2, 4000: 1}


def test_nothing_on_screen_yet_is_a_deletion():
    early = caption_scores(EVENTS, words(*FINAL), [t - 3000 for t in ENDED], (0,))
    assert early[0].errors == 6


def test_the_board_follows_the_page():
    b = CaptionBoard()
    b.apply(rec("FINAL", "provisional", 0, 1000, 2000, ("b", 1000, 1500)))
    # an online final overlapping a draft keeps only its words outside the draft's range
    b.apply(rec("FINAL", "online", 3, 0, 2500, ("x", 0, 500), ("y", 1200, 1400), ("z", 2100, 2400)))
    assert sorted(b.words()) == [("b", 1000, 1500), ("x", 0, 500), ("z", 2100, 2400)]
    # one tentative tail, the newest; it replaces online text in its range for good
    b.apply(rec("PARTIAL", "provisional", 0, 2000, 3000, ("t1", 2000, 2600)))
    b.apply(rec("PARTIAL", "provisional", 0, 2600, 3400, ("t2", 2600, 3400)))
    assert sorted(b.words()) == [("b", 1000, 1500), ("t2", 2600, 3400), ("x", 0, 500)]
    # results of other kinds are not captions
    b.apply({"kind": "SPEAKERS", "source": "diarizer", "utterance_id": -1, "start_ms": 0, "end_ms": 9000})
    assert len(b.words()) == 3


def test_a_draft_keeps_what_it_and_the_draft_before_agree_on():
    def said(*ws):
        return [{"word": w, "start_ms": s, "end_ms": e} for w, s, e in ws]

    def stretch(start, ms, at_pause=False):
        return Stretch(Window(start, np.zeros(ms * 16, np.int16)), at_pause)

    d = Drafter(1000, 0, agree=True)
    kept, tentative = d.keep(stretch(0, 3000), said(("The", 0, 300), ("cat", 300, 700), ("sa", 2600, 3000)))
    assert kept == [] and [w["word"] for w in tentative] == ["The", "cat", "sa"] and d.drafted_ms == 0
    s = stretch(0, 4000)  # a second more: the first two words read alike (case and commas aside)
    kept, tentative = d.keep(s, said(("the", 0, 300), ("cat,", 300, 700), ("sat", 2600, 3100), ("on", 3300, 3600)))
    assert [w["word"] for w in kept] == ["the", "cat,"] and [w["word"] for w in tentative] == ["sat", "on"]
    assert d.drafted_ms == 700 and s.window.end_ms == 700  # the next draft starts after the kept words
    kept, tentative = d.keep(stretch(700, 3600), said(("sat", 2600, 3100), ("upon", 3300, 3900)))
    assert [w["word"] for w in kept] == ["sat"] and [w["word"] for w in tentative] == ["upon"]
    kept, tentative = d.keep(stretch(3100, 1500, at_pause=True), said(("upon", 3300, 3900), ("it", 4000, 4200)))
    assert len(kept) == 2 and tentative == [] and d.drafted_ms == 4600  # at a pause every word is kept
    # without agreement, the words ending 0.5 s before a cut inside speech are kept, none tentative
    plain = Drafter(1000, 0)
    kept, tentative = plain.keep(stretch(0, 3000), said(("The", 0, 300), ("cat", 300, 2400), ("sa", 2600, 3000)))
    assert [w["word"] for w in kept] == ["The", "cat"] and tentative == []


def test_a_draft_decoded_from_its_window_s_start_keeps_only_new_words_and_says_none_twice():
    def said(*ws):
        return [{"word": w, "start_ms": s, "end_ms": e} for w, s, e in ws]

    d = Drafter(1000, 1000, agree=True, context_ms=30_000, said=["a", "cat"])
    s = Stretch(Window(0, np.zeros(4000 * 16, np.int16)), False, 1000)  # kept up to 1 s; decoded from 0
    first = said(("A", 0, 400), ("cat", 500, 900), ("cat,", 1000, 1200), ("sat", 1300, 1800), ("on", 2000, 2300))
    kept, tentative = d.keep(s, first)  # the words before 1 s are not its own; "cat," is heard twice
    assert kept == [] and [w["word"] for w in tentative] == ["sat", "on"]
    s = Stretch(Window(0, np.zeros(5000 * 16, np.int16)), False, 1000)
    kept, tentative = d.keep(s, first[:4] + said(("on", 2000, 2300), ("it", 2400, 2600)))
    assert [w["word"] for w in kept] == ["sat", "on"] and [w["word"] for w in tentative] == ["it"]
    assert d.drafted_ms == 2300 and d.said[-2:] == ["sat", "on"]
