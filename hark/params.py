"""Numbers that arrive from the network (query parameters, headers), parsed strictly.

``int()`` takes more than a count should: a sign, spaces, underscores, any Unicode decimal digit,
and it raises on a string of more than 4,300 digits; ``str.isdigit()`` admits superscripts that
``int()`` then refuses. Either way a hostile value would surface as a 500. A count here is one to
nine ASCII digits within a range, and anything else is a ValueError whose message names the
parameter and the range, ready to answer 400 with.
"""

from __future__ import annotations

import re

_COUNT = re.compile(r"[0-9]{1,9}")


def parse_count(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """``raw`` as a whole number in ``lo..hi``; ``default`` when the parameter is absent (None).
    An empty value is not absent: it is refused like any other malformed one."""
    if raw is None:
        return default
    if not _COUNT.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise ValueError(f"{name} must be a whole number {lo}..{hi}")
    return int(raw)


MAX_SPEAKERS = 32  # the diarizer's bound on a stream's speaker hints


def speakers_metadata(raw: str | None) -> dict[str, str]:
    """A client's ``speakers`` parameter (how many people speak) as stream metadata for the
    diarizer (``num_speakers``); nothing when absent. ValueError for anything but 1..32."""
    n = parse_count(raw, "speakers", 0, 1, MAX_SPEAKERS)
    return {"num_speakers": str(n)} if n else {}
