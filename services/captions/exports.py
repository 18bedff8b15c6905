"""Standard exports of a stream's merged transcript (its STREAM_COMPLETE result); no I/O here.

- vtt / srt: captions cut from the words: a cue ends at a speaker change, a pause of 1 s or
  more, a sentence end after 2 s, 7 s of speech or 84 characters (two 42-character lines);
  speaker-prefixed where known
  (WebVTT voice tags ``<v NAME>``, SubRip ``NAME: ``).
- json: the merged record itself.
- rttm: the speaker turns (NIST RTTM ``SPEAKER`` lines); none until the diarizer fills turns. A
  named voice's spaces become ``_`` (RTTM fields are space-separated).
- ctm: word times and confidences (NIST CTM: ``file channel start duration word confidence``).
"""

from __future__ import annotations

import json
import re

FORMATS = ("vtt", "srt", "json", "rttm", "ctm")
MAX_CUE_MS, MAX_CUE_CHARS, PAUSE_MS, LINE_CHARS, SENTENCE_CUE_MS = 7000, 84, 1000, 42, 2000


def join_words(words: list[str]) -> str:
    """Whisper splits "ill-disposed" into "ill" + "-disposed" and "it's" into "it" + "'s"."""
    out = ""
    for w in words:
        out += w if (out and w[0] in "-'’,.?!") else (" " + w if out else w)
    return out


def cues(words: list[dict]) -> list[dict]:
    out: list[dict] = []
    cur: list[dict] = []

    def close():
        if cur:
            out.append(
                {
                    "start_ms": cur[0]["start_ms"],
                    "end_ms": cur[-1]["end_ms"],
                    "speaker": cur[0].get("speaker"),
                    "text": join_words([w["word"] for w in cur]),
                }
            )
            cur.clear()

    for w in words:
        if cur:
            text_len = sum(len(x["word"]) + 1 for x in cur) + len(w["word"])
            sentence_end = cur[-1]["word"][-1:] in ".?!" and cur[-1]["end_ms"] - cur[0]["start_ms"] >= SENTENCE_CUE_MS
            if (
                w.get("speaker") != cur[0].get("speaker")
                or w["start_ms"] - cur[-1]["end_ms"] >= PAUSE_MS
                or sentence_end
                or w["end_ms"] - cur[0]["start_ms"] > MAX_CUE_MS
                or text_len > MAX_CUE_CHARS
            ):
                close()
        cur.append(w)
    close()
    for prev, nxt in zip(out, out[1:]):  # players expect cues that do not overlap
        prev["end_ms"] = min(prev["end_ms"], nxt["start_ms"])
    return out


def _lines(text: str) -> str:
    """Two balanced lines of at most ~42 characters for a cue's text."""
    if len(text) <= LINE_CHARS:
        return text
    words, best = text.split(), None
    for i in range(1, len(words)):
        a, b = " ".join(words[:i]), " ".join(words[i:])
        cost = abs(len(a) - len(b))
        if best is None or cost < best[0]:
            best = (cost, a + "\n" + b)
    return best[1] if best else text


def _ts(ms: int, sep: str) -> str:
    h, rem = divmod(max(0, int(ms)), 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms_ = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms_:03d}"


def _captions(result: dict, header: list[str], ms_sep: str, speaker: str) -> str:
    """Numbered cues; ``speaker`` formats a known speaker's prefix from {s}."""
    parts = list(header)
    for i, c in enumerate(cues(result["words"]), start=1):
        text = (speaker.format(s=c["speaker"]) if c["speaker"] else "") + _lines(c["text"])
        parts += [str(i), f"{_ts(c['start_ms'], ms_sep)} --> {_ts(c['end_ms'], ms_sep)}", text, ""]
    return "\n".join(parts)


def to_vtt(result: dict) -> str:
    return _captions(result, ["WEBVTT", ""], ".", "<v {s}>")


def to_srt(result: dict) -> str:
    return _captions(result, [], ",", "{s}: ")


def to_rttm(result: dict) -> str:
    sid = result["stream_id"]
    return "".join(
        f"SPEAKER {sid} 1 {t['start_ms'] / 1000:.3f} {(t['end_ms'] - t['start_ms']) / 1000:.3f} "
        f"<NA> <NA> {'_'.join(t['speaker'].split())} <NA> <NA>\n"  # a field: a named voice's spaces joined
        for t in result.get("turns") or []
    )


def to_ctm(result: dict) -> str:
    sid = result["stream_id"]
    return "".join(
        f"{sid} 1 {w['start_ms'] / 1000:.3f} {(w['end_ms'] - w['start_ms']) / 1000:.3f} {w['word']} "
        f"{w['confidence']:.4f}\n"
        for w in result["words"]
    )


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1) + "\n"


def filename(stream_id: str, fmt: str) -> str:
    """A download's file name, safe in a header: the stream id's letters, digits and . _ - kept."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", stream_id) + f".{fmt}"


def export(result: dict, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    return {"vtt": to_vtt, "srt": to_srt, "json": to_json, "rttm": to_rttm, "ctm": to_ctm}[fmt](result)
