"""Streaming recognition of one stream with pocketsphinx; no Kafka here.

StreamRecognizer is fed PCM as it arrives and returns events: PARTIAL hypotheses while an
utterance goes on (rate-limited, only when the text changed) and a FINAL per utterance with
word times, the n-best list and the lattice. SpeechGate decides where utterances start and
end; only speech reaches the decoder.

A pocketsphinx Decoder costs ~90 MB and ~0.3 s to build, so decoders live in a pool: a stream
takes one for its whole life (cepstral mean normalisation adapts across utterances; a cold
one costs accuracy) and returns it at stream end; the next stream gets it reset (fresh front
end, initial CMN), so a stream's text never depends on which decoder it got.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from dataclasses import dataclass, field
from importlib.metadata import version

from pocketsphinx import Decoder

from hark import records
from hark.vad import SpeechGate

SAMPLE_RATE = 16000
FRAME_MS = 10  # decoder frame rate: 100 frames/s
MODEL_NAME = "pocketsphinx/en-us"
MODEL_VERSION = version("pocketsphinx")
_FILLERS = {"<s>", "</s>", "<sil>", "[noise]", "<unk>"}


class CapacityError(RuntimeError):
    pass


@dataclass
class Word:
    word: str
    start_ms: int
    end_ms: int
    confidence: float

    def as_record(self) -> records.Word:
        return records.Word(
            word=self.word,
            start_ms=self.start_ms,
            end_ms=self.end_ms,
            confidence=round(float(self.confidence), 4),
            speaker=None,
        )


@dataclass
class Event:
    kind: str  # PARTIAL | FINAL
    utterance_id: int
    text: str
    start_ms: int
    end_ms: int
    words: list[Word] = field(default_factory=list)
    nbest: list[tuple[str, float]] = field(default_factory=list)
    lattice: bytes | None = None


# Search cap: pocketsphinx keeps at most this many HMMs active per frame (its default, 30000, is
# never reached on easy audio but is on ours). `python -m bench.online_search` on data/speech
# (174 words): 30000: WER 27.0%, 0.119 CPU-s per audio second; 5000: 26.4%, 0.087;
# 3000: 27.0%, 0.078; 2000: 30.5%, 0.067; 1500: 35.1%, 0.062.
MAX_HMM_PER_FRAME = 3000


class DecoderPool:
    def __init__(self, max_size: int, max_hmm_per_frame: int = MAX_HMM_PER_FRAME, **search_options):
        self.max_size = max_size
        self.max_hmm_per_frame = max_hmm_per_frame
        self.search_options = search_options  # more pocketsphinx options (bench.online_search tries some)
        self._free: list[Decoder] = []
        self._lock = threading.Lock()
        self.in_use = 0
        self._initial_cmn: str | None = None

    def _new(self) -> Decoder:
        # First pass only (no fwdflat/bestpath re-search after end_utt): finals then extend what
        # partials showed instead of rewriting it. Measured on data/speech (105 words): WER 31.1%
        # vs 36.9% with both passes, RTF 0.139 vs 0.154, words first shown by a final 1 vs 8.
        d = Decoder(
            samprate=SAMPLE_RATE,
            loglevel="FATAL",
            fwdflat=False,
            bestpath=False,
            maxhmmpf=self.max_hmm_per_frame,
            **self.search_options,
        )
        if self._initial_cmn is None:
            self._initial_cmn = d.get_cmn(False)
        d.set_cmn(self._initial_cmn)  # the same state as a pooled one (acquire): results never depend on which
        return d

    def prewarm(self, n: int) -> None:
        with self._lock:
            while len(self._free) + self.in_use < min(n, self.max_size):
                self._free.append(self._new())

    def acquire(self) -> Decoder:
        with self._lock:
            if self._free:
                d = self._free.pop()
                d.reinit_feat()  # forget the last stream's noise estimate and cepstral mean
                d.set_cmn(self._initial_cmn)
            elif self.in_use >= self.max_size:
                raise CapacityError(f"all {self.max_size} decoders are in use")
            else:
                d = self._new()
            self.in_use += 1
            return d

    def release(self, d: Decoder) -> None:
        with self._lock:
            self.in_use -= 1
            self._free.append(d)

    @property
    def size(self) -> int:
        return self.in_use + len(self._free)


def clean_word(w: str) -> str | None:
    w = w.lower()
    if w in _FILLERS or (w.startswith("++") and w.endswith("++")) or (w.startswith("[") and w.endswith("]")):
        return None
    paren = w.find("(")  # pronunciation variants: "was(2)" -> "was"
    return w[:paren] if paren > 0 else w


class StreamRecognizer:
    def __init__(
        self,
        decoder: Decoder,
        *,
        base_ms: int = 0,
        partial_interval_ms: int = 100,
        nbest: int = 5,
        keep_lattice: bool = True,
        max_utterance_ms: int = 30000,
    ):
        self.decoder = decoder
        self.base_ms = base_ms
        self.partial_interval_ms = partial_interval_ms
        self.nbest_n = nbest
        self.keep_lattice = keep_lattice
        self.max_utterance_ms = max_utterance_ms
        self.gate = SpeechGate()
        self._frame_bytes = self.gate.frame_bytes
        self._buf = b""
        self.samples = 0  # fed so far (stream position = base_ms + samples / 16)
        self.in_utterance = False
        self.utterance_id = 0
        self._utt_start_ms = 0
        self._last_partial_text = ""
        self._last_partial_at_ms = -(10**9)
        # The state at the last end of speech in the last fed chunk, or None. There the VAD is
        # fresh and the decoder holds only its cepstral mean, so this small dict (positions, next
        # utterance id, cepstral mean, bytes of the chunk consumed) resumes the stream exactly.
        self.boundary: dict | None = None
        self._skip = 0
        # Speech frames go to the decoder in one process_raw call per chunk, not one per 30 ms VAD
        # frame: the same finals, ~3% less CPU (0.111 vs 0.114 CPU-s per audio second, data/speech,
        # medians of 5). Flushed before the decoder is read.
        self._pending: list[bytes] = []

    @property
    def position_ms(self) -> int:
        return self.base_ms + self.samples * 1000 // SAMPLE_RATE

    def restore(self, boundary: dict) -> None:
        """Continue from a ``boundary`` of another recognizer of this stream: the next ``feed``
        must start with the chunk it was taken in, whose first ``skip_bytes`` were consumed."""
        self.base_ms, self.samples = boundary["base_ms"], boundary["samples"]
        self.utterance_id = boundary["utterance_id"]
        self.gate.frames = boundary["gate_frames"]
        self._last_partial_at_ms = boundary["last_partial_at_ms"]
        self.decoder.reinit_feat()
        self.decoder.set_cmn(boundary["cmn"])
        self._skip = boundary["skip_bytes"]

    def feed(self, pcm: bytes) -> list[Event]:
        if self._skip:
            pcm, self._skip = pcm[self._skip :], 0
        events: list[Event] = []
        self.boundary = None
        buf = self._buf + pcm
        fb, i = self._frame_bytes, 0
        while len(buf) - i >= fb:
            events += self._frame(buf[i : i + fb])
            i += fb
            if not self.gate.in_speech and not self.gate.ring:  # just ended: a clean resume point
                consumed = i - len(self._buf)
                # The cepstral mean's running weights cannot be read out: set it from its own
                # text here too, so an uninterrupted stream and a resumed one hold the same state.
                cmn = self.decoder.get_cmn(False)
                self.decoder.reinit_feat()  # a fresh front end: its noise estimate cannot be read out
                self.decoder.set_cmn(cmn)
                self.boundary = {
                    "base_ms": self.base_ms,
                    "samples": self.samples + consumed // 2,
                    "utterance_id": self.utterance_id,
                    "gate_frames": self.gate.frames,
                    "last_partial_at_ms": self._last_partial_at_ms,
                    "cmn": cmn,
                    "skip_bytes": consumed,
                }
        self._buf = buf[i:]
        self.samples += len(pcm) // 2
        self._flush()
        if self.in_utterance and self.position_ms - self._last_partial_at_ms >= self.partial_interval_ms:
            partial = self._partial()
            if partial:
                events.append(partial)
        return events

    def finish(self) -> list[Event]:
        """End of stream: close any open utterance (the sub-frame remainder is too short to matter)."""
        self._buf = b""
        if self.in_utterance:
            final = self._end()
            if final:
                return [final]
        return []

    def _frame(self, frame: bytes) -> list[Event]:
        transition, frames, first_ms = self.gate.push(frame)
        if transition == "start":
            self._start(first_ms)
        self._pending += frames
        if transition == "end":
            final = self._end()
            return [final] if final else []
        if self.in_utterance and self.position_ms - self._utt_start_ms >= self.max_utterance_ms:
            # Decoder memory grows with utterance length: cut endless speech/noise into pieces.
            final = self._end()
            self._start(self.gate.frames * self.gate.frame_ms)
            return [final] if final else []
        return []

    def _flush(self) -> None:
        if self._pending:
            self.decoder.process_raw(b"".join(self._pending), False, False)
            self._pending.clear()

    def _start(self, gate_ms: int) -> None:
        self.decoder.start_utt()
        self.in_utterance = True
        self._utt_start_ms = self.base_ms + gate_ms
        self._last_partial_text = ""

    def _words(self) -> list[Word]:
        out = []
        for seg in self.decoder.seg():
            w = clean_word(seg.word)
            if w:
                out.append(
                    Word(
                        w,
                        self._utt_start_ms + seg.start_frame * FRAME_MS,
                        self._utt_start_ms + (seg.end_frame + 1) * FRAME_MS,
                        seg.prob,
                    )
                )
        return out

    def _partial(self) -> Event | None:
        self._last_partial_at_ms = self.position_ms
        hyp = self.decoder.hyp()
        text = " ".join(filter(None, map(clean_word, hyp.hypstr.split()))) if hyp else ""
        if not text or text == self._last_partial_text:
            return None
        self._last_partial_text = text
        return Event("PARTIAL", self.utterance_id, text, self._utt_start_ms, self.position_ms, self._words())

    def _end(self) -> Event | None:
        self._flush()
        self.decoder.end_utt()
        self.in_utterance = False
        hyp = self.decoder.hyp()
        text = " ".join(filter(None, map(clean_word, hyp.hypstr.split()))) if hyp else ""
        if not text and not self._last_partial_text:
            return None  # noise the decoder made nothing of, and nobody saw a caption for it
        words = self._words() if text else []
        nbest: dict[str, float] = {}
        if text:  # entries that differ only in pronunciation variants collapse into one
            # nbest() is None when the search kept no lattice to walk (a tight maxwpf does that)
            for h in itertools.islice(self.decoder.nbest() or (), self.nbest_n * 4):
                t = " ".join(filter(None, map(clean_word, h.hypstr.split())))
                if t and t not in nbest:
                    nbest[t] = float(h.score)
                    if len(nbest) == self.nbest_n:
                        break
        end_ms = words[-1].end_ms if words else self.position_ms
        ev = Event(
            "FINAL",
            self.utterance_id,
            text,
            self._utt_start_ms,
            end_ms,
            words,
            list(nbest.items()),
            self._lattice() if text and self.keep_lattice else None,
        )
        self.utterance_id += 1
        return ev

    def _lattice(self) -> bytes | None:
        fd, path = tempfile.mkstemp(suffix=".lat")
        os.close(fd)
        try:
            self.decoder.get_lattice().write(path)
            with open(path, "rb") as f:
                return f.read()
        except Exception:  # a lattice is a bonus; an utterance without one is still a result
            return None
        finally:
            os.unlink(path)
