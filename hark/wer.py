"""Word error rate with the normalisation used for every figure in docs/measurements.md.

Lower case, punctuation dropped, digits spelt out as words, the usual spoken forms of a few
abbreviations (as Whisper's English normaliser does: "Mr." is scored as "mister"); then
Levenshtein distance over words, summed over a set (corpus WER = edits / reference words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))
    return " ".join(_ONES[int(d)] for d in str(n))


_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "jr": "junior", "sr": "senior", "vs": "versus"}


def normalise(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    words = (w.strip("'") for w in text.split())
    return [_ABBREVIATIONS.get(w, w) for w in words if w]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass
class WerScore:
    errors: int
    ref_words: int

    @property
    def wer(self) -> float:
        return self.errors / self.ref_words if self.ref_words else 0.0

    def __add__(self, other: WerScore) -> WerScore:
        return WerScore(self.errors + other.errors, self.ref_words + other.ref_words)


def score(reference: str, hypothesis: str) -> WerScore:
    ref = normalise(reference)
    return WerScore(edit_distance(ref, normalise(hypothesis)), len(ref))


def load_references(path) -> dict[str, str]:
    refs = {}
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, _, text = line.rstrip("\n").partition("\t")
                refs[name] = text
    return refs
