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
TAG = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")


def check_language(tag: str) -> str:
    """``tag`` (a BCP 47 tag such as en-US) if its language is one hark decodes, else ValueError."""
    if not TAG.fullmatch(tag or ""):
        raise ValueError(f"language {tag!r} is not a language tag such as en or en-US")
    if tag.split("-")[0] not in WHISPER:
        raise ValueError(f"language {tag.split('-')[0]!r} is not one the offline model decodes")
    return tag
