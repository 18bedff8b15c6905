"""What Whisper's output is made into: words as written, number runs apart, and the test for a
repetition loop; no model here."""

from __future__ import annotations

import re
import zlib


def join_words(pieces: list[tuple[str, int, int, float]]) -> list[dict]:
    """Words as written, from Whisper's word pieces (text, start ms, end ms, probability).

    The tokenizer marks where a word begins with a leading space; a piece without one continues
    the word before it ("ill" + "-disposed", "don" + "'t", "well" + "-" + "known"). Whisper
    returns such continuations as pieces of their own, and joining every piece with a space
    wrote "ill -disposed". The first piece of a segment always begins a word."""
    out: list[dict] = []
    for text, start, end, prob in pieces:
        token = text.strip()
        if not token:
            continue
        if out and not text[:1].isspace():
            w = out[-1]
            w["word"] += token
            w["end_ms"] = max(w["end_ms"], end)
            w["confidence"] = min(w["confidence"], round(float(prob), 4))  # a word is as sure as its least sure piece
            continue
        out.append(
            {"word": token, "start_ms": start, "end_ms": end, "confidence": round(float(prob), 4), "speaker": None}
        )
    return out


# Numbers Whisper ran together: "eleven twenty seven fifty seven" (a time and a number) came out
# "11,27,57", which a reader, a search for "27" and a number-aware scorer all take as one number.
# In English text, digit groups joined by commas that are not thousands (groups of three after the
# first) are written apart: "11 27 57". Not elsewhere: a comma is the decimal mark in German,
# French, Spanish ("3,5"). Runs joined by points are left alone: a version, an address or a date
# ("3.12.1", "192.168.1.1", "12.05.2024") looks the same.
_RUN = re.compile(r"(?<![\w.,])(\d+(?:,\d+)+)(?![\w]|[.,]\d)")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")


def apart(text: str, language: str = "en") -> str:
    """``text`` with comma runs that are not one number written apart (see _RUN), in English."""
    if language.split("-")[0].lower() != "en":
        return text
    return _RUN.sub(lambda m: m[1] if _THOUSANDS.fullmatch(m[1]) else m[1].replace(",", " "), text)


def apart_words(words: list[dict], language: str = "en") -> list[dict]:
    """The words, each number run written apart made several words sharing its time evenly."""
    out = []
    for w in words:
        parts = apart(w["word"], language).split()
        if len(parts) == 1:
            out.append(w)
            continue
        step = (w["end_ms"] - w["start_ms"]) / len(parts)
        for i, part in enumerate(parts):
            start, end = w["start_ms"] + round(i * step), w["start_ms"] + round((i + 1) * step)
            out.append({**w, "word": part, "start_ms": start, "end_ms": end})
    return out


# Whisper's own test of a repetition loop (its temperature fallback uses it): a text that zlib
# compresses more than 2.4 times. Speech without loops stays under 2 on this repo's recordings
# (tests/test_offline.py); a short text compresses less than 1.
LOOP_RATIO = 2.4
# A loop too short for the ratio: a sentence of at least this many words read again at once
# (tiny.en on a 2.8 s clip read it twice on one CPU). Speech repeats a sentence word for word
# rarely, and then the 30 s decode, which is kept, repeats it too.
LOOP_SENTENCE_WORDS = 3
# The same across any punctuation: this many words or more read again at once. People restart a
# phrase ("I want to, I want to go") but rarely four words of it; a false alarm costs a 30 s decode.
LOOP_SPAN_WORDS = 4


def looping(text: str) -> bool:
    raw = text.encode()
    if raw and len(raw) / len(zlib.compress(raw)) > LOOP_RATIO:
        return True
    sentences = [" ".join(re.findall(r"[\w']+", s.lower())) for s in re.split(r"(?<=[.!?])\s+", text)]
    if any(a == b and len(a.split()) >= LOOP_SENTENCE_WORDS for a, b in zip(sentences, sentences[1:])):
        return True
    # a stretch of words read again at once, wherever the punctuation fell ("Call me at 11.27.57.
    # Please. Call me at 11.27.57. Please.")
    words = re.findall(r"[\w']+", text.lower())
    return any(
        words[i : i + k] == words[i + k : i + 2 * k]
        for k in range(LOOP_SPAN_WORDS, len(words) // 2 + 1)
        for i in range(len(words) - 2 * k + 1)
    )
