"""The languages a stream may declare: the ones the offline model (Whisper) decodes.

A stream's language is checked where it enters (ingest), so a tag no model knows is refused
with a reason at the door instead of failing the offline pass later. The list is Whisper's own
(faster_whisper.tokenizer; a test keeps the two equal).
"""

from __future__ import annotations

import re

WHISPER = (
    "af", "am", "ar", "as", "az", "ba", "be", "bg", "bn", "bo", "br", "bs", "ca", "cs", "cy", "da", "de", "el",
    "en", "es", "et", "eu", "fa", "fi", "fo", "fr", "gl", "gu", "ha", "haw", "he", "hi", "hr", "ht", "hu", "hy",
    "id", "is", "it", "ja", "jw", "ka", "kk", "km", "kn", "ko", "la", "lb", "ln", "lo", "lt", "lv", "mg", "mi",
    "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "oc", "pa", "pl", "ps", "pt", "ro", "ru",
    "sa", "sd", "si", "sk", "sl", "sn", "so", "sq", "sr", "su", "sv", "sw", "ta", "te", "tg", "th", "tk", "tl",
    "tr", "tt", "uk", "ur", "uz", "vi", "yi", "yo", "zh", "yue",
)  # fmt: skip
AUTO = "auto"  # no language given: the offline pass detects it
UNDETERMINED = "und"  # BCP 47: a stream without speech has no language
TAG = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")


def check_language(tag: str) -> str:
    """``tag`` (a BCP 47 tag such as en-US, or "auto") if its language is one hark decodes, else
    ValueError."""
    if tag == AUTO:
        return tag
    if not TAG.fullmatch(tag or ""):
        raise ValueError(f"language {tag!r} is not a language tag such as en or en-US")
    if tag.split("-")[0] not in WHISPER:
        raise ValueError(f"language {tag.split('-')[0]!r} is not one the offline model decodes")
    return tag


# Hotwords: terms a stream is likely to contain. Whisper reads them as prompt tokens, at most half
# its 448-token context (faster-whisper cuts beyond 223), so the whole list is bounded in characters.
MAX_HOTWORDS, MAX_HOTWORD_CHARS, MAX_HOTWORDS_CHARS = 50, 60, 600


def check_hotwords(terms: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Terms (a comma list or a sequence) stripped and de-duplicated, or ValueError naming what
    is wrong: too many, too long, control characters."""
    if terms is None:
        return ()
    raw = terms.split(",") if isinstance(terms, str) else list(terms)
    out: list[str] = []
    for t in raw:
        t = " ".join(t.split())
        if not t:
            continue
        if any(not c.isprintable() for c in t):
            raise ValueError(f"hotword {t[:20]!r} contains control characters")
        if len(t) > MAX_HOTWORD_CHARS:
            raise ValueError(f"hotword {t[:20]!r}... is longer than {MAX_HOTWORD_CHARS} characters")
        if t not in out:
            out.append(t)
    if len(out) > MAX_HOTWORDS:
        raise ValueError(f"{len(out)} hotwords, more than the {MAX_HOTWORDS} a stream may have")
    if sum(len(t) + 2 for t in out) > MAX_HOTWORDS_CHARS:
        raise ValueError(f"hotwords longer than {MAX_HOTWORDS_CHARS} characters in all")
    return tuple(out)
