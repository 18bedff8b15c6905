"""Per-stream merge of decoder outputs into Result records; no Kafka here.

- Online FINALs become caption updates (source "online"). online_asr writes its PARTIALs onto the
  results topic itself (they need no merging; a hop less for the live captions); one found on the
  online topic (an online_asr from before that change) is passed on as before.
- An offline SEGMENT becomes a FINAL with source "offline" covering [start_ms, end_ms): caption
  consumers replace the online text of that range with it. Offline NBEST become ALTERNATIVES.
- STREAM_COMPLETE is emitted once every pass in ``wait_for`` has ended for the stream; its text
  and words come from the offline pass when that finished, else from the online pass (then
  ``final_source`` says "online"). A stream whose offline pass has not ended ``offline_timeout_s``
  after its online end is completed with the online text (``expire``).
- Diarizer INCREMENTAL turns become SPEAKERS results (labels never change) and label the words of
  later FINALs; the FULL turns (whole stream) label the STREAM_COMPLETE words (largest time
  overlap) and fill its ``turns``.
- An offline SEGMENT with ``variant`` "provisional" (Whisper on the stretch of a window still
  growing) becomes a FINAL with source "provisional": captions show it in place of the online text
  of its range until the offline FINAL of the window holding it arrives. It is not kept for
  STREAM_COMPLETE, and one arriving after its window's text is dropped. One with ``variant``
  "tentative" (the draft's words after those it kept, which the next draft may read otherwise)
  becomes a PARTIAL with source "provisional": captions show the newest in place of the online
  text of its range, marked as still changing.
- Offline records of an A/B candidate model (``variant`` "candidate") are not served: they stay on
  the offline topic for comparison.

Memory per stream is bounded and does not grow with the stream: the parts kept for
STREAM_COMPLETE go to a ``Parts`` store (a file, in the service) and stop growing at ``max_words``
per pass (then ``truncated``; the FINAL records still hold every word); a stream's state and parts
are dropped when it completes.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from hark.declaration import passes
from hark.languages import UNDETERMINED
from hark.records import Result, Turn, Word, now_ms, result_record
from hark.runtime import REFUSED, RecentIds

from .parts import MemoryParts, Parts

PASSES = passes()  # the services' declarations say which passes there are (hark/declaration.py)
MAX_TURNS = 20000  # incremental turns kept per stream to label words (~16 h of conversation)
MAX_COMPLETED = 100_000  # stream ids remembered after completion (~5 MB)
KEPT = ("text", "words", "start_ms", "end_ms")  # of each FINAL/SEGMENT, for STREAM_COMPLETE


@dataclass
class PassState:
    stream_id: str
    name: str
    store: Parts  # the parts themselves (on disk in the service): here only what counts them
    parts: int = 0
    words: int = 0
    truncated: bool = False
    dropped: set = field(default_factory=set)  # indices past max_words (the caption was still sent)
    ended: str | None = None  # end status once the pass is done
    model: tuple[str, str] | None = None

    def has(self, index: int) -> bool:
        return index in self.dropped or self.store.has(self.stream_id, self.name, index)

    def add(self, index: int, rec: dict, max_words: int) -> bool:
        """False for an index seen before (the merge stays right if an input record repeats)."""
        if self.has(index):
            return False
        if self.words + len(rec["words"]) > max_words:
            self.truncated = True
            self.dropped.add(index)
            return True
        # what STREAM_COMPLETE is made of, not the whole record: an online FINAL's n-best held
        # a third of what it held (288 -> 219 bytes a word kept an hour in, python -m bench.merge_state)
        self.store.add(self.stream_id, self.name, index, {k: rec[k] for k in KEPT})
        self.parts += 1
        self.words += len(rec["words"])
        return True

    def ordered(self) -> list[dict]:
        return self.store.ordered(self.stream_id, self.name)


def text(parts: list[dict]) -> str:
    return " ".join(p["text"] for p in parts if p["text"])


@dataclass
class StreamTranscript:
    tenant: str
    passes: dict[str, PassState]
    last_published_at_ms: int = 0
    online_ended_at: float | None = None  # monotonic, for the offline timeout
    turns: list[Turn] = field(default_factory=list)  # incremental speaker turns so far
    full_turns: list[Turn] | None = None  # the diarizer's FULL turns once it ended
    language: str | None = None  # the stream's (given, or detected by the offline pass)
    language_p: float | None = None  # the detection's probability (None: given)
    unsure: bool = False  # the offline pass said "und" with a probability: it decodes in its fallback language
    last_seen: float = field(default_factory=time.monotonic)


def english(language: str | None) -> bool:
    """Whether the online pass (an English model) may caption a stream of this language: yes
    until another one is known."""
    return not language or language == UNDETERMINED or language.split("-")[0].lower() == "en"


def assign_speakers(words: list[Word], turns: list[Turn], reach_ms: int = 1000) -> list[Word]:
    """Each word gets the speaker whose turn overlaps it most (else the nearest within reach_ms)."""
    if not turns:
        return words
    turns = sorted(turns, key=lambda t: t["start_ms"])
    starts = [t["start_ms"] for t in turns]
    out = []
    for w in words:
        hi = bisect.bisect_right(starts, w["end_ms"])
        best, best_score = None, None
        for t in turns[max(0, hi - 64) : hi + 1]:  # turns are short: the ones near the word suffice
            overlap = min(w["end_ms"], t["end_ms"]) - max(w["start_ms"], t["start_ms"])
            score = overlap if overlap > 0 else overlap - 1  # any overlap beats a near miss
            if best_score is None or score > best_score:
                best, best_score = t, score
        speaker = best["speaker"] if best is not None and best_score is not None and best_score > -reach_ms else None
        out.append(Word(**{**w, "speaker": speaker}))
    return out


class ResultsMerger:
    def __init__(
        self,
        max_words: int = 20000,
        wait_for: tuple[str, ...] = PASSES,
        offline_timeout_s: float = 600.0,
        abandon_after_s: float = 4 * 3600.0,
        parts: Parts | None = None,
        fallback_language: str = "en",
    ):
        unknown = set(wait_for) - set(PASSES)
        if unknown or "online" not in wait_for:
            raise ValueError(f"wait_for must include 'online' and only name {PASSES}, got {wait_for}")
        self.max_words, self.wait_for, self.offline_timeout_s = max_words, tuple(wait_for), offline_timeout_s
        self.fallback_language = fallback_language  # what the offline pass decodes a stream it is unsure of in
        # a live stream may pause for as long as it may last (no record comes while it is silent)
        self.abandon_after_s = max(offline_timeout_s, abandon_after_s)
        self.streams: dict[str, StreamTranscript] = {}
        self.parts = parts if parts is not None else MemoryParts()
        self.completed = RecentIds(MAX_COMPLETED)  # a record after its stream completed must not reopen it
        self.abandoned = 0

    def is_open(self, stream_id: str) -> bool:
        return stream_id in self.streams

    def drop(self, stream_id: str) -> None:
        """Forget an open stream unpublished (erased, abandoned, or moved to another replica)."""
        self.streams.pop(stream_id, None)
        self.parts.drop(stream_id)

    def late(self, rec: dict) -> bool:
        """A record of a stream completed already (an NBEST computed late, a repeated input): ignored."""
        return rec["stream_id"] in self.completed and rec["stream_id"] not in self.streams

    def _state(self, rec: dict) -> StreamTranscript:
        st = self.streams.get(rec["stream_id"])
        if st is None:
            sid = rec["stream_id"]
            passes = {p: PassState(sid, p, self.parts) for p in PASSES}
            st = self.streams[sid] = StreamTranscript(rec["tenant"], passes)
        st.last_published_at_ms = max(st.last_published_at_ms, rec["audio_published_at_ms"])
        st.last_seen = time.monotonic()
        return st

    def on_online(self, rec: dict) -> list[Result]:
        if self.late(rec):
            return []
        kind, st = str(rec["kind"]), self._state(rec)
        p = st.passes["online"]
        p.model = (rec["model_name"], rec["model_version"])
        if kind == "PARTIAL":  # online_asr now writes these to the results topic itself; an older one did not
            return [result_record(rec, "PARTIAL", "online", rec["utterance_id"])]
        if kind == "FINAL":
            if not p.add(rec["utterance_id"], rec, self.max_words):
                return []
            if not english(st.language or (self.fallback_language if st.unsure else None)):  # English-only
                return []  # online text of it is noise; captions come with the offline pass
            return [self._labelled(rec, result_record(rec, "FINAL", "online", rec["utterance_id"]))]
        if kind == "STREAM_END":
            p.ended = rec.get("end_status") or "COMPLETE"
            st.online_ended_at = time.monotonic()
            return self._maybe_complete(rec["stream_id"], rec)
        raise ValueError(f"unknown online transcript kind {kind}")

    def on_speakers(self, rec: dict) -> list[Result]:
        if self.late(rec):
            return []
        kind, st = str(rec["kind"]), self._state(rec)
        p = st.passes["diarizer"]
        p.model = (rec["model_name"], rec["model_version"])
        if kind == "INCREMENTAL":
            room = MAX_TURNS - len(st.turns)
            st.turns += rec["turns"][: max(0, room)]
            if not rec["turns"]:
                return []
            span = {"start_ms": min(t["start_ms"] for t in rec["turns"]), "end_ms": rec["covered_until_ms"]}
            speakers = {**rec, **span, "text": "", "words": [], "nbest": []}
            return [result_record(speakers, "SPEAKERS", "diarizer", -1, turns=rec["turns"])]
        if kind == "FULL":
            p.ended = rec.get("end_status") or "COMPLETE"
            st.full_turns = rec["turns"]
            return self._maybe_complete(rec["stream_id"], rec)
        raise ValueError(f"unknown speaker turns kind {kind}")

    def _labelled(self, rec: dict, result: Result) -> Result:
        st = self.streams.get(rec["stream_id"])
        if st is not None and st.turns and result["words"]:
            result["words"] = assign_speakers(result["words"], st.turns)
        return result

    def on_offline(self, rec: dict) -> list[Result]:
        variant = rec.get("variant", "primary")
        if variant in ("provisional", "tentative"):
            return self._provisional(rec, "FINAL" if variant == "provisional" else "PARTIAL")
        if variant != "primary":
            return []  # an A/B candidate's output: kept on the offline topic, not served
        kind = str(rec["kind"])
        if kind == "NBEST":  # may arrive after the stream completed: no state needed
            return [result_record(rec, "ALTERNATIVES", "offline", rec["segment_index"], words=[])]
        if self.late(rec):
            return []
        st = self._state(rec)
        p = st.passes["offline"]
        p.model = (rec["model_name"], rec["model_version"])
        if rec.get("language") and rec["language"] != UNDETERMINED:
            st.language = rec["language"]
        if rec.get("language_probability") is not None:
            st.language_p = rec["language_probability"]
            st.unsure = rec.get("language") == UNDETERMINED
        if kind == "SEGMENT":
            if not p.add(rec["segment_index"], rec, self.max_words):
                return []
            return [self._labelled(rec, result_record(rec, "FINAL", "offline", rec["segment_index"]))]
        if kind == "STREAM_END":
            p.ended = rec.get("end_status") or "COMPLETE"
            return self._maybe_complete(rec["stream_id"], rec)
        raise ValueError(f"unknown offline transcript kind {kind}")

    def _provisional(self, rec: dict, kind: str) -> list[Result]:
        if self.late(rec) or str(rec["kind"]) != "SEGMENT":
            return []
        st = self._state(rec)
        p = st.passes["offline"]
        if p.ended or p.has(rec["segment_index"]):
            return []  # the window's own text is out: it must not be overwritten by a draft of it
        return [self._labelled(rec, result_record(rec, kind, "provisional", rec["segment_index"]))]

    def expire(self, now: float | None = None) -> list[Result]:
        """Complete streams whose offline pass is overdue, with the online text (``now``: a
        monotonic time, default the present)."""
        now, out = time.monotonic() if now is None else now, []
        for sid, st in list(self.streams.items()):
            if st.online_ended_at is not None and now - st.online_ended_at > self.offline_timeout_s:
                out += self._complete(sid, reason="offline pass did not finish in time")
            elif st.online_ended_at is None and now - st.last_seen > self.abandon_after_s:
                # no record for longer than a stream may last and no online end: records of a
                # stream whose start this process never saw (it joined mid-way), or whose end
                # was lost. Dropped, not completed: its STREAM_COMPLETE would be partial.
                self.drop(sid)
                self.abandoned += 1
        return out

    def _maybe_complete(self, sid: str, rec: dict) -> list[Result]:
        st = self.streams[sid]
        if all(st.passes[p].ended for p in self.wait_for):
            return self._complete(sid)
        return []

    def _complete(self, sid: str, reason: str | None = None) -> list[Result]:
        st = self.streams.pop(sid)
        self.completed.add(sid)
        online, offline = st.passes["online"], st.passes["offline"]
        final, source = (offline, "offline") if offline.ended and offline.parts else (online, "online")
        ordered = final.ordered()
        final_text = text(ordered)
        online_text = text(online.ordered()) if final is offline else final_text
        self.parts.drop(sid)
        name, version = final.model or online.model or ("", "")
        status = online.ended or "INCOMPLETE"
        refused = [name for name, p in st.passes.items() if p.ended == REFUSED]
        if refused:  # a pass had no room for the stream: its transcript lacks what that pass adds
            status = f"DEGRADED ({' and '.join(refused)} refused the stream: at capacity)"
        turns = st.full_turns if st.full_turns is not None else st.turns
        words = assign_speakers([w for part in ordered for w in part["words"]], turns)
        return [
            Result(
                stream_id=sid,
                tenant=st.tenant,
                kind="STREAM_COMPLETE",
                source=source,
                utterance_id=-1,
                text=final_text,
                start_ms=ordered[0]["start_ms"] if ordered else 0,
                end_ms=ordered[-1]["end_ms"] if ordered else 0,
                words=words,
                nbest=[],
                online_text=online_text,
                turns=turns,
                status=status if not reason else f"{status} ({reason})",
                final_source=source,
                language=st.language or UNDETERMINED,
                language_probability=st.language_p,
                truncated=final.truncated,
                audio_published_at_ms=st.last_published_at_ms,
                emitted_at_ms=now_ms(),
                model_name=name,
                model_version=version,
            )
        ]
