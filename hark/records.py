"""Result records that more than one service writes onto the results topic.

The results service merges finals, speaker turns and the offline pass; online_asr writes its
PARTIAL caption updates there itself (README "Topics and schemas"). Both build them here so the
two cannot drift apart.
"""
from __future__ import annotations

from .runtime import now_ms


def result_record(rec: dict, kind: str, source: str, index: int, **fields) -> dict:
    """A Result (kind, source, utterance/segment ``index``) from an Online/OfflineTranscript record."""
    out = {"stream_id": rec["stream_id"], "tenant": rec["tenant"], "kind": kind, "source": source,
           "utterance_id": index, "text": rec["text"], "start_ms": rec["start_ms"], "end_ms": rec["end_ms"],
           "words": rec["words"], "nbest": rec["nbest"], "online_text": None, "turns": [], "status": None,
           "final_source": None, "truncated": False, "audio_published_at_ms": rec["audio_published_at_ms"],
           "emitted_at_ms": now_ms(), "model_name": rec["model_name"], "model_version": rec["model_version"]}
    out.update(fields)
    return out


class FinalsSeen:
    """Which online utterances of a stream already have their FINAL, for the readers of the results
    topic. PARTIALs come from online_asr and FINALs through the results service, so a partial that a
    producer re-sent can, rarely, land after its utterance's FINAL: it is stale, and dropped. Bounded:
    the streams seen least recently are forgotten first."""

    def __init__(self, max_streams: int = 10_000):
        self.max_streams = max_streams
        self._last_final: dict[str, float] = {}

    def update(self, rec: dict) -> bool:
        """Note ``rec``; False for a stale PARTIAL (its utterance, or its stream, is final already)."""
        sid, kind = rec["stream_id"], str(rec["kind"])
        last = self._last_final.pop(sid, -1)
        if kind == "PARTIAL":
            fresh = rec["utterance_id"] > last
        else:
            fresh = True
            if kind == "STREAM_COMPLETE":
                last = float("inf")
            elif kind == "FINAL" and rec["source"] == "online":
                last = max(last, rec["utterance_id"])
        self._last_final[sid] = last  # re-inserted: dicts keep insertion order, so the oldest is first
        while len(self._last_final) > self.max_streams:
            del self._last_final[next(iter(self._last_final))]
        return fresh
