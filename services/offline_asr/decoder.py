"""Full-context decoding of a window (<= 30 s) of 16 kHz mono PCM with Whisper; no Kafka here.

``decode`` gives the 1-best text with word times and probabilities (faster-whisper, beam
search). ``nbest`` gives several whole-window hypotheses with scores; it costs roughly another
decode, so the service runs it when it has nothing more urgent to do; the window's encoding is
kept from its decode, so the n-best pays for the beam search only.

An unprompted window's encoder sees the window and ``encode_pad_s`` of padding, not Whisper's full 30 s: its cost
grows with the frames it is given (0.12 s for 10 s of audio, 0.80 s padded to 30 s, int8 on
2 cores), and CTranslate2 accepts the shorter input. ``python -m bench.encoder_pad`` measures
each padding's cost and WER; the default is 2 s (docs/measurements.md). Decoding is beam search
only, so a window gives the same text every time it is decoded (after a restart, in a replay).

Silence at a window's edges is cut off before decoding (``edges``), half a second of it kept each
side: a 1.1 s clip after 2 s of silence, as a person leaves it before speaking into the captions
page, came out "10 of clubs 10 of clubs" with its silence and "10 of clubs" without (bench.record).

A trimmed input can set off a repetition loop that Whisper's 30 s input does not (whisper
tiny.en read the 2.8 s "go forward ten meters" about 45 times (179 words) on one CPU, and once on another): a
decode whose text compresses like a loop is done again on the full 30 s, which is deterministic
too, so a restart or a replay takes the same path.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib.metadata import version

import numpy as np

from hark import models
from hark.languages import AUTO
from hark.vad import speech_span

from .text import apart, apart_words, join_words, looping

MAX_WINDOW_S = 30.0  # Whisper's receptive field
FRAMES_PER_S = 100  # Whisper's mel frames
FULL_FRAMES = int(MAX_WINDOW_S * FRAMES_PER_S)


def encoder_frames(samples: int, pad_s: float) -> int:
    """Mel frames the encoder is given for a window of ``samples``: the audio and ``pad_s`` of
    padding, even (the encoder's stride-2 convolution), at most Whisper's 30 s."""
    full = int(MAX_WINDOW_S * FRAMES_PER_S)
    frames = int(np.ceil((samples / 16000 + pad_s) * FRAMES_PER_S))
    return min(full, frames + frames % 2)


@dataclass
class Decoded:
    text: str
    words: list[dict] = field(default_factory=list)  # hark.Word records, stream-relative ms
    language: str = "en"
    decode_s: float = 0.0


def choose_device(device: str = "auto", compute_type: str = "auto") -> tuple[str, str]:
    """CUDA with float16 where a GPU is visible, else CPU with int8 (float32 is ~5x slower)."""
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def whisper_language(tag: str | None) -> str:
    return (tag or "en").split("-")[0].lower() or "en"


# Whisper's temperatures: beam search only. faster-whisper's default falls back to sampling at
# 0.2, 0.4, ... when a decode looks unsure (log-prob < -1, compression ratio > 2.4), and sampling
# makes a window's text differ from one decode to the next: a window re-decoded after a restart
# got other words than the first time (the chaos tests at 2 s of padding), and seeding CTranslate2
# did not make it repeat. ``python -m bench.encoder_pad --temperatures both`` measures the WER
# cost of going without it (docs/measurements.md).
DETERMINISTIC = (0.0,)
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # faster-whisper's default


def edges(pcm: np.ndarray) -> tuple[int, int]:
    """The window without the silence at its edges (hark.vad.speech_span), as sample indices."""
    return speech_span(pcm.astype("<i2", copy=False).tobytes())


# Encoder outputs kept for reuse: a window's language detection, its decode and its n-best (run
# later, when the service is idle, behind at most NBEST_QUEUE other windows) give the encoder the
# same features, and each encoding of a window costs 0.80 s (10 s of audio padded to 30 s, 2 cores).
# Each entry is <= 30 s of features and their encoding (~4 MB for whisper-base).
ENCODED_KEEP = 10


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def _trimmed_model():
    from faster_whisper import WhisperModel

    class TrimmedWhisper(WhisperModel):
        """faster-whisper pads every segment to 3000 frames before ``encode``; this cuts that
        padding back to ``frames`` (0: keep it), set around each call by WhisperDecoder, and
        answers an input it encoded recently from ``encoded`` (the same bytes, the same output)."""

        frames = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.encoded: OrderedDict[tuple, object] = OrderedDict()
            self.encoded_hits = 0

        def encode(self, features):
            if self.frames and features.shape[-1] > self.frames:
                features = features[..., : self.frames]
            if features.ndim == 3 and features.shape[0] > 1:
                return super().encode(features)  # a batch of drafts: used once, and several MB a window
            key = (features.shape, _digest(features))
            if key in self.encoded:
                self.encoded.move_to_end(key)
                self.encoded_hits += 1
                return self.encoded[key]
            out = self.encoded[key] = super().encode(features)
            while len(self.encoded) > ENCODED_KEEP:
                self.encoded.popitem(last=False)
            return out

    return TrimmedWhisper


class WhisperDecoder:
    def __init__(
        self,
        model: str = "base",
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
        beam_size: int = 5,
        encode_pad_s: float = MAX_WINDOW_S,
        temperatures: tuple[float, ...] = DETERMINISTIC,
        detect_trimmed: bool = True,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.temperatures = temperatures
        self.detect_trimmed = detect_trimmed

        path = models.whisper_path(model)
        self.device, self.compute_type = choose_device(device, compute_type)
        self.encode_pad_s = encode_pad_s
        self.model = _trimmed_model()(
            str(path),
            device=self.device,
            compute_type=self.compute_type,
            cpu_threads=cpu_threads or (os.cpu_count() or 1),
        )
        self.beam_size = beam_size
        self.model_name = f"whisper-{model}" if model in models.WHISPER else f"whisper:{path.name}"
        self.model_version = (
            f"faster-whisper {version('faster-whisper')}, ctranslate2 {version('ctranslate2')}, "
            f"{self.device}/{self.compute_type}"
        )
        self.english_only = not self.model.model.is_multilingual
        self.loops = 0  # decodes and n-best lists done again on the 30 s input
        # windows whose decode looped on the trimmed input: their n-best is given the 30 s input
        # (on the trimmed one, tiny.en's best hypothesis read the clip twice)
        self.looped: OrderedDict[bytes, None] = OrderedDict()

    def frames(self, samples: int, prompted) -> int:
        """The encoder's input for a window: a prompted one (hotwords, previous text) keeps Whisper's
        30 s, since with a prompt and 2 s of padding Whisper repeated the passage's last sentence
        (tests/test_offline.py), and the synthetic dev set of bench.encoder_pad did not show it."""
        return encoder_frames(samples, MAX_WINDOW_S if prompted else self.encode_pad_s)

    def detect(self, pcm: np.ndarray) -> tuple[str, float]:
        """The language spoken in ``pcm`` (Whisper's code) and its probability."""
        if self.english_only:
            return "en", 1.0
        pcm = pcm[slice(*edges(pcm))]
        # on the decode's input, so the decode reuses the encoding (bench.languages: the same
        # answers as on Whisper's 30 s input, and a short window's detection cost a 30 s encoding)
        self.model.frames = self.frames(len(pcm), None) if self.detect_trimmed else 0
        lang, prob, _ = self.model.detect_language(features=self.features(pcm))
        return lang, float(prob)

    def features(self, pcm: np.ndarray) -> np.ndarray:
        """The window's mel features as ``transcribe`` gives its encoder (without the extractor's
        last frame), so that detection and n-best share the decode's encoding."""
        audio = pcm[: int(MAX_WINDOW_S * 16000)].astype(np.float32) / 32768.0
        return self.model.feature_extractor(audio)[..., :-1]

    def decode(
        self,
        pcm: np.ndarray,
        offset_ms: int,
        *,
        prompt: str | None = None,
        language: str = "en",
        hotwords: tuple[str, ...] = (),
    ) -> Decoded:
        t0 = time.perf_counter()
        a, b = edges(pcm)
        pcm, offset_ms = pcm[a:b], offset_ms + a // 16
        audio = pcm.astype(np.float32) / 32768.0
        frames = self.frames(len(pcm), prompt or hotwords)
        text, words, lang = self._transcribe(audio, frames, offset_ms, prompt, language, hotwords)
        if frames < FULL_FRAMES and looping(text):
            self.loops += 1
            self.looped[_digest(pcm)] = None
            while len(self.looped) > ENCODED_KEEP:
                self.looped.popitem(last=False)
            text, words, lang = self._transcribe(audio, FULL_FRAMES, offset_ms, prompt, language, hotwords)
        return Decoded(text, words, lang, time.perf_counter() - t0)

    def _transcribe(
        self, audio: np.ndarray, frames: int, offset_ms: int, prompt, language: str, hotwords: tuple[str, ...]
    ) -> tuple[str, list[dict], str]:
        self.model.frames = frames
        segments, info = self.model.transcribe(
            audio,
            language=None if self.english_only or language == AUTO else language,  # None: Whisper detects
            beam_size=self.beam_size,
            word_timestamps=True,
            initial_prompt=prompt or None,
            # the stream's terms, as prompt tokens ahead of the previous text (faster-whisper)
            hotwords=", ".join(hotwords) or None,
            # Segments of one window conditioning on each other is how Whisper's repetition loops start.
            condition_on_previous_text=False,
            temperature=list(self.temperatures),
            vad_filter=False,
        )  # windows are already cut at pauses
        words: list[dict] = []
        texts = []
        for seg in segments:
            texts.append(seg.text.strip())
            words += join_words(
                [(w.word, offset_ms + int(round(w.start * 1000)), offset_ms + int(round(w.end * 1000)), w.probability)
                 for w in seg.words or []]
            )  # fmt: skip
        lang = info.language
        return apart(" ".join(t for t in texts if t), lang), apart_words(words, lang), lang

    def decode_batch(
        self, pcms: list[np.ndarray], offsets_ms: list[int], *, language: str = "en", beam_size: int = 0
    ) -> list[Decoded]:
        """Several unprompted windows (drafts of different streams) in one CTranslate2 call.

        Beam search is mostly matrix-vector work per window, and a batch turns it into
        matrix-matrix work: 4 draft-sized stretches cost about half the CPU of 4 decodes
        (``python -m bench.draft_batch``). Each window's encoder input is padded to the longest
        one's, so its text may differ slightly from a decode of it alone: drafts are
        provisional and are replaced by their window's own decode, which stays unbatched and
        deterministic. A text that loops is decoded again alone."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import BatchedInferencePipeline, TranscriptionOptions

        beam_size = beam_size or self.beam_size
        if not pcms:  # every due stretch held no speech
            return []
        spans = [edges(p) for p in pcms]
        pcms = [p[a:b] for p, (a, b) in zip(pcms, spans)]
        offsets_ms = [o + a // 16 for o, (a, _) in zip(offsets_ms, spans)]
        if len(pcms) == 1 and beam_size == self.beam_size:
            return [self.decode(pcms[0], offsets_ms[0], language=language)]
        t0 = time.perf_counter()
        m = self.model
        lang = None if self.english_only else whisper_language(language)
        tok = Tokenizer(m.hf_tokenizer, m.model.is_multilingual, task="transcribe", language=lang or "en")
        frames = max(self.frames(len(p), None) for p in pcms)
        feats = np.stack([np.pad(f, ((0, 0), (0, max(0, FULL_FRAMES - f.shape[1]))))[:, :FULL_FRAMES]
                          for f in map(self.features, pcms)])  # fmt: skip
        # each window on a timeline of its own, one after the other, as faster-whisper lays out the
        # clips of one recording (its word-time heuristics look at the previous clip's last word)
        # (starting on whole 10 ms, as faster-whisper rounds its word times to 0.01 s)
        starts = np.cumsum([0] + [-(-len(p) // 160) for p in pcms]) / 100
        meta = [{"offset": float(starts[i]), "duration": len(p) / 16000} for i, p in enumerate(pcms)]
        options = TranscriptionOptions(
            beam_size=beam_size, best_of=5, patience=1, length_penalty=1, repetition_penalty=1,
            no_repeat_ngram_size=0, log_prob_threshold=None, no_speech_threshold=None,
            compression_ratio_threshold=None, condition_on_previous_text=False, prompt_reset_on_temperature=0.5,
            temperatures=[0.0], initial_prompt=None, prefix=None, suppress_blank=True, suppress_tokens=[-1],
            without_timestamps=False, max_initial_timestamp=0.0, word_timestamps=True,
            prepend_punctuations="\"'“¿([{-", append_punctuations="\"'.。,，!！?？:：”)]}、",
            multilingual=False, max_new_tokens=None, clip_timestamps="0", hallucination_silence_threshold=None,
            hotwords=None,
        )  # fmt: skip
        m.frames = frames
        batch = BatchedInferencePipeline(m).forward(feats, tok, meta, options)
        took = (time.perf_counter() - t0) / len(pcms)
        out = []
        for i, segments in enumerate(batch):
            shift = offsets_ms[i] - int(round(starts[i] * 1000))
            text = " ".join(
                t for t in (tok.decode([x for x in s["tokens"] if x < tok.eot]).strip() for s in segments) if t
            )
            if looping(text):
                out.append(self.decode(pcms[i], offsets_ms[i], language=language))
                continue
            words = join_words([(w["word"], shift + int(round(w["start"] * 1000)), shift + int(round(w["end"] * 1000)),
                                 w["probability"]) for s in segments for w in s.get("words") or []])  # fmt: skip
            out.append(Decoded(apart(text, lang or "en"), apart_words(words, lang or "en"), lang or "en", took))
        return out

    def nbest(
        self, pcm: np.ndarray, n: int, *, prompt: str | None = None, language: str = "en"
    ) -> list[tuple[str, float]]:
        """Up to ``n`` distinct whole-window hypotheses, best first, with length-normalised log-prob scores."""
        pcm = pcm[slice(*edges(pcm))]  # as decode gave it
        # the frames set here, not left from the last decode (whose window may have been shorter)
        frames = FULL_FRAMES if _digest(pcm) in self.looped else self.frames(len(pcm), prompt)
        out = self._nbest(pcm, n, prompt, language, frames)
        if frames < FULL_FRAMES and out and looping(out[0][0]):
            self.loops += 1
            out = self._nbest(pcm, n, prompt, language, FULL_FRAMES)
        return out

    def _nbest(
        self, pcm: np.ndarray, n: int, prompt: str | None, language: str, frames: int
    ) -> list[tuple[str, float]]:
        from faster_whisper.tokenizer import Tokenizer

        m = self.model
        features = self.features(pcm)
        self.model.frames = frames
        features = np.pad(features, ((0, 0), (0, max(0, frames - features.shape[1]))))[:, :frames]
        tok = Tokenizer(
            m.hf_tokenizer, m.model.is_multilingual, task="transcribe", language=None if self.english_only else language
        )
        previous = tok.encode(" " + prompt.strip())[-(m.max_length // 2 - 1) :] if prompt else []
        request = m.get_prompt(tok, previous, without_timestamps=True)
        result = m.model.generate(
            m.encode(features),
            [request],
            beam_size=max(self.beam_size, n),
            num_hypotheses=n,
            return_scores=True,
            max_length=m.max_length,
        )[0]
        out: dict[str, float] = {}
        for ids, score in zip(result.sequences_ids, result.scores):
            text = apart(tok.decode([i for i in ids if i < tok.eot]).strip(), language)  # as the decode's
            if text and text not in out:
                out[text] = float(score)
        return list(out.items())
