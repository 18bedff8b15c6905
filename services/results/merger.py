"""Per-stream merge of decoder outputs into Result records; no Kafka here.

Now: online partials and finals become caption updates, and the online STREAM_END becomes a
STREAM_COMPLETE record carrying the whole transcript. The offline pass and speaker turns
(issues 3 and 4) arrive as further inputs to the same per-stream state.

Memory per stream is bounded: the transcript kept for STREAM_COMPLETE stops growing at
``max_words`` (it is then marked truncated; the per-utterance FINAL records still hold every
word), and a stream's state is dropped when it completes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hark.runtime import now_ms


@dataclass
class StreamTranscript:
    tenant: str
    finals: dict[int, dict] = field(default_factory=dict)  # utterance id -> online FINAL record
    words: int = 0
    truncated: bool = False
    last_published_at_ms: int = 0


def _result(rec: dict, kind: str, **fields) -> dict:
    out = {"stream_id": rec["stream_id"], "tenant": rec["tenant"], "kind": kind, "source": "online",
           "utterance_id": rec["utterance_id"], "text": rec["text"], "start_ms": rec["start_ms"],
           "end_ms": rec["end_ms"], "words": rec["words"], "nbest": rec["nbest"], "online_text": None,
           "turns": [], "status": None, "truncated": False,
           "audio_published_at_ms": rec["audio_published_at_ms"], "emitted_at_ms": now_ms(),
           "model_name": rec["model_name"], "model_version": rec["model_version"]}
    out.update(fields)
    return out


class ResultsMerger:
    def __init__(self, max_words: int = 20000):
        self.max_words = max_words
        self.streams: dict[str, StreamTranscript] = {}

    def is_open(self, stream_id: str) -> bool:
        return stream_id in self.streams

    def on_online(self, rec: dict) -> list[dict]:
        sid, kind = rec["stream_id"], str(rec["kind"])
        st = self.streams.get(sid)
        if st is None:
            st = self.streams[sid] = StreamTranscript(rec["tenant"])
        st.last_published_at_ms = max(st.last_published_at_ms, rec["audio_published_at_ms"])
        if kind == "PARTIAL":
            return [_result(rec, "PARTIAL")]
        if kind == "FINAL":
            if rec["utterance_id"] not in st.finals:
                if st.words + len(rec["words"]) > self.max_words:
                    st.truncated = True
                else:
                    st.finals[rec["utterance_id"]] = rec
                    st.words += len(rec["words"])
            return [_result(rec, "FINAL")]
        if kind == "STREAM_END":
            del self.streams[sid]
            finals = [st.finals[k] for k in sorted(st.finals)]
            text = " ".join(f["text"] for f in finals if f["text"])
            words = [w for f in finals for w in f["words"]]
            return [_result(rec, "STREAM_COMPLETE", utterance_id=-1, text=text, online_text=text,
                            start_ms=finals[0]["start_ms"] if finals else 0, end_ms=rec["end_ms"],
                            words=words, nbest=[], status=rec.get("end_status") or "COMPLETE",
                            truncated=st.truncated, audio_published_at_ms=st.last_published_at_ms)]
        raise ValueError(f"unknown online transcript kind {kind}")
