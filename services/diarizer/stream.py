"""Diarization of an open-ended stream in bounded blocks; no Kafka here.

Incremental: every ``block_s`` of new audio, pyannote's segmentation runs on that block plus
``context_s`` of audio before it and finds the speech turns. CAM++ embeddings of ~0.5 s pieces of
those turns (each embedded with 1.5 s around it) are clustered within the block
(``cluster_threshold``), and the block's clusters are linked to the stream's speakers by the
cosine similarity of their centroids (Hungarian assignment); a cluster with no match above ``link_threshold`` becomes a new speaker. Turns of the new part are
emitted at once and their labels never change: they run ``block_s`` plus compute behind the audio.

Full: at the end, every block's clusters are re-assigned with the whole stream known (see
``full_turns``; ``num/min/max_speakers`` hints apply), and all turns are relabelled. No audio is
kept for it: memory is the context, one block, and one centroid per cluster per block (~1 MB
per hour; capped at ``max_blocks``).

Names: with a tenant's enrolled voices, a speaker is named in the full pass, and in live turns
once it has ``live_name_min_s`` of speech, when it matches a voice (``matching.match``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment

from .matching import match
from .pipeline import Turn

MIN_SPEECH_MS = 500  # a local speaker with less speech than this cannot found a new global speaker
# Identity is decided per ~0.5 s piece of speech (finer pieces put the label change nearer the
# speaker change: full-pass DER on the real sample 11.1% -> 8.2% against 0.75-1.5 s pieces), each
# embedded with 1.5 s of audio around it (CAM++ needs ~1 s to be reliable).
PIECE_MS, EMBED_MS = 500, 1500


@dataclass
class Block:
    centroids: np.ndarray  # (local speakers, dim)
    speech_ms: np.ndarray  # (local speakers,)
    turns: list[tuple[int, int, int]] = field(default_factory=list)  # (local index, start_ms, end_ms), emitted part


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


def _waves(window: np.ndarray, start_ms: int, subs: list[tuple[int, int]], regions: list) -> list[np.ndarray]:
    """Each piece's audio for its embedding: at least EMBED_MS around it, within its region."""
    waves = []
    for (s, e), region in zip(subs, regions):
        c = (s + e) // 2
        ws = max(region[0], min(c - EMBED_MS // 2, region[1] - EMBED_MS))
        we = min(region[1], ws + max(EMBED_MS, e - s))
        waves.append(window[(ws - start_ms) * 16 : (we - start_ms) * 16].astype(np.float32) / 32768.0)
    return waves


def _around(turn: tuple[int, int], speech: list[tuple[int, int]], gap_ms: int = 200) -> tuple[int, int]:
    """The stretch of speech (turns that touch or overlap, any speaker) that contains ``turn``."""
    s, e = turn
    grown = True
    while grown:
        grown = False
        for a, b in speech:
            if a - gap_ms <= e and b + gap_ms >= s and (a < s or b > e):
                s, e, grown = min(s, a), max(e, b), True
    return s, e


def merge_turns(turns: list[Turn], gap_ms: int = 0) -> list[Turn]:
    """Join a speaker's turns that touch (or are ``gap_ms`` apart); order by start."""
    out: list[Turn] = []
    last: dict[str, Turn] = {}
    for t in sorted(turns, key=lambda t: (t.start_ms, t.speaker)):
        prev = last.get(t.speaker)
        if prev is not None and t.start_ms - prev.end_ms <= gap_ms:
            prev.end_ms = max(prev.end_ms, t.end_ms)
            continue
        t = Turn(t.speaker, t.start_ms, t.end_ms)
        out.append(t)
        last[t.speaker] = t
    return out


class StreamDiarizer:
    def __init__(
        self,
        diarizer,
        *,
        block_s: float = 6.0,
        context_s: float = 4.0,
        link_threshold: float = 0.65,
        cluster_threshold: float = 0.4,
        merge_threshold: float = 0.8,
        min_speaker_s: float = 2.0,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        max_blocks: int = 2400,
        voices: Sequence[tuple[str, np.ndarray]] = (),
        name_threshold: float = 0.6,
        live_name_min_s: float = 4.0,
    ):
        self.diarizer = diarizer
        self.block_ms, self.context_ms = int(block_s * 1000), int(context_s * 1000)
        self.link_threshold, self.cluster_threshold = link_threshold, cluster_threshold
        self.merge_threshold = merge_threshold
        self.min_speaker_ms = min_speaker_s * 1000
        self.num_speakers, self.min_speakers = num_speakers, min_speakers
        self.max_speakers = num_speakers or max_speakers
        self.max_blocks = max_blocks
        # enrolled voices of the stream's tenant: (name, unit vector)
        self.voices, self.name_threshold, self.live_name_min_s = list(voices), name_threshold, live_name_min_s
        self._names: dict[int, str] = {}  # global speaker -> the enrolled name its live turns carry
        self._speech_s: list[float] = []  # global speakers' linked speech
        self.final: dict[str, tuple[np.ndarray, float]] = {}  # full pass: label -> (unit centroid, speech ms)
        self._buf = np.zeros(0, dtype=np.int16)
        self._buf_start_ms = 0
        self.emitted_ms = 0  # audio up to here has its turns published
        self._sums: list[np.ndarray] = []  # global speakers: sum of linked unit centroids x speech seconds
        self.blocks: list[Block] = []
        self.one_voice_blocks = True  # off only to measure what the rule changes (bench.diarization --hall)
        self.compute_s = 0.0
        self.audio_ms = 0

    def start_at(self, ms: int) -> None:
        """Join a stream mid-way: its audio starts at ``ms``."""
        self.emitted_ms = self._buf_start_ms = ms

    @property
    def speakers(self) -> int:
        return len(self._sums)

    def label(self, index: int) -> str:
        return self._names.get(index) or f"SPEAKER_{index:02d}"

    # -- incremental ----------------------------------------------------------------------------
    def push(self, pcm: np.ndarray) -> list[Turn]:
        self._buf = np.concatenate([self._buf, pcm])
        self.audio_ms += len(pcm) // 16
        out = []
        while self._buf_start_ms + len(self._buf) // 16 - self.emitted_ms >= self.block_ms:
            out += self._block(self.emitted_ms + self.block_ms)
        return out

    def flush(self) -> list[Turn]:
        end = self._buf_start_ms + len(self._buf) // 16
        return self._block(end) if end - self.emitted_ms >= 300 else []

    def _block(self, end_ms: int) -> list[Turn]:
        start_ms = max(self._buf_start_ms, self.emitted_ms - self.context_ms)
        a, b = (start_ms - self._buf_start_ms) * 16, (end_ms - self._buf_start_ms) * 16
        window = self._buf[a:b]
        turns, secs = self.diarizer(window, max_speakers=self.max_speakers)
        t0 = time.perf_counter()
        # pyannote's segmentation finds the speech and where it changes (its turns, overlaps
        # included); identity comes from CAM++ embeddings of short pieces of those turns, clustered
        # within the block and linked to the stream's speakers.
        speech = [(start_ms + t.start_ms, start_ms + t.end_ms) for t in turns]
        subs, regions = self._pieces(speech, end_ms)
        emb = self._embed(_waves(window, start_ms, subs, regions))
        # Where the segmentation model hears one voice in the whole window (context and block), the
        # block is one speaker: in a reverberant hall over a crowd, CAM++ pieces of one voice fell
        # below the cluster threshold from each other and one speaker became two to four
        # (tests/test_diarizer.py). Where it hears more, the pieces decide, as before.
        one_voice = self.one_voice_blocks and len({t.speaker for t in turns}) == 1
        local, valid = self._cluster(emb, most=1 if one_voice else None)
        k = int(local.max()) + 1 if len(local) else 0
        cents = np.zeros((k, emb.shape[1]))
        speech_ms = np.zeros(k)
        for i, (s, e) in enumerate(subs):
            if local[i] >= 0:
                speech_ms[local[i]] += e - s
                if valid[i]:
                    cents[local[i]] += _unit(emb[i]) * (e - s)
        first = [min((s for i, (s, _) in enumerate(subs) if local[i] == c), default=0) for c in range(k)]
        mapping = self._link(_unit(cents), speech_ms, order=sorted(range(k), key=lambda r: first[r]))
        self._name_live()
        block = Block(cents, speech_ms)
        emitted = []
        for i, (s, e) in enumerate(subs):
            g = mapping.get(int(local[i])) if local[i] >= 0 else None
            if g is not None:
                emitted.append(Turn(self.label(g), s, e))
                block.turns.append((int(local[i]), s, e))
        self.compute_s += secs + time.perf_counter() - t0
        self.blocks.append(block)
        if len(self.blocks) > self.max_blocks:
            self.blocks.pop(0)
        self.emitted_ms = end_ms
        keep_from = max(self._buf_start_ms, end_ms - self.context_ms)
        self._buf = self._buf[(keep_from - self._buf_start_ms) * 16 :]
        self._buf_start_ms = keep_from
        return merge_turns(emitted)

    def _pieces(self, speech: list[tuple[int, int]], end_ms: int) -> tuple[list[tuple[int, int]], list]:
        """The new part of each speech turn, cut into pieces of about PIECE_MS: (the pieces, and
        for each the region its embedding window may reach)."""
        subs: list[tuple[int, int]] = []
        regions: list[tuple[int, int]] = []
        for s, e in speech:
            s2, e2 = max(s, self.emitted_ms), min(e, end_ms)
            if e2 - s2 < 100:
                continue
            # a turn shorter than EMBED_MS embeds with the speech around it: a short clean window
            # gave noisier identities than a longer one that crosses a change (live labels on the
            # real sample: 5 speakers found instead of 2)
            region = (s, e) if e - s >= EMBED_MS else _around((s, e), speech)
            n = max(1, int(round((e2 - s2) / PIECE_MS)))
            bounds = np.linspace(s2, e2, n + 1).astype(int)
            subs += [(int(x), int(y)) for x, y in zip(bounds, bounds[1:])]
            regions += [region] * n
        return subs, regions

    def _cluster(self, emb: np.ndarray, most: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each piece's cluster within the block (-1: none), and which pieces had an embedding;
        at most ``most`` clusters."""
        valid = np.isfinite(emb).all(axis=1)
        local = np.full(len(emb), -1)
        if valid.sum() == 1 or (most == 1 and valid.any()):
            local[valid] = 0
        elif valid.sum() > 1:
            z = linkage(_unit(emb[valid]), method="average", metric="cosine")
            local[valid] = fcluster(z, self.cluster_threshold, criterion="distance") - 1
            if most and local.max() + 1 > most:
                local[valid] = fcluster(z, most, criterion="maxclust") - 1
        for short in np.nonzero(~valid)[0]:  # too short to embed: the nearest embedded neighbour's cluster
            near = [j for j in np.argsort(np.abs(np.arange(len(emb)) - short)) if valid[j]]
            local[short] = local[near[0]] if near else -1
        return local, valid

    def _embed(self, waves: list[np.ndarray]) -> np.ndarray:
        """(pieces, dim) CAM++ embeddings; NaN rows for windows too short to embed."""
        emb = np.full((len(waves), self.diarizer.embedding.dimension), np.nan)
        for i, w in enumerate(waves):  # one at a time: batching (per length) measured no faster on CPU
            emb[i] = self.diarizer.embedding(torch.from_numpy(w)[None, None])[0]
        return emb

    def _link(self, local: np.ndarray, speech_ms: np.ndarray, order: list[int] | None = None) -> dict[int, int | None]:
        """Local speaker index -> global speaker index (None: too little speech to place). New
        speakers are numbered in ``order`` (first appearance), so labels appear in time order."""
        mapping: dict[int, int | None] = {}
        if len(local) == 0:
            return mapping
        if self._sums:
            glob = _unit(np.stack(self._sums))
            sim = local @ glob.T
            rows, cols = linear_sum_assignment(-sim)
            for r, c in zip(rows, cols):
                full = self.max_speakers is not None and len(self._sums) >= self.max_speakers
                if local[r].any() and (sim[r, c] >= self.link_threshold or full):
                    mapping[r] = int(c)
        for r in order if order is not None else range(len(local)):
            if r in mapping:
                continue
            full = self.max_speakers is not None and len(self._sums) >= self.max_speakers
            if not local[r].any():  # no embedding: nothing to place it by
                mapping[r] = None
                continue
            if full or speech_ms[r] < MIN_SPEECH_MS:
                if self._sums:  # place it with its nearest speaker
                    mapping[r] = int(np.argmax(local[r] @ _unit(np.stack(self._sums)).T))
                else:
                    mapping[r] = None
                continue
            self._sums.append(np.zeros(local.shape[1]))
            self._speech_s.append(0.0)
            mapping[r] = len(self._sums) - 1
        for r, g in mapping.items():
            if g is not None:
                self._sums[g] = self._sums[g] + local[r] * (speech_ms[r] / 1000)
                self._speech_s[g] += speech_ms[r] / 1000
        return mapping

    def _name_live(self) -> None:
        """Live turns carry a speaker's enrolled name once the speaker has ``live_name_min_s`` of
        speech and matches one voice clearly (see ``matching.match``); a name once given stays."""
        if not self.voices:
            return
        ready = [
            g for g in range(len(self._sums)) if g not in self._names and self._speech_s[g] >= self.live_name_min_s
        ]
        if not ready:
            return
        taken = set(self._names.values())
        free = [(n, v) for n, v in self.voices if n not in taken]
        for g, name in match(_unit(np.stack([self._sums[g] for g in ready])), free, self.name_threshold).items():
            self._names[ready[g]] = name

    # -- full -----------------------------------------------------------------------------------
    def full_turns(self) -> list[Turn]:
        """Every kept block's clusters re-assigned with the whole stream known; all turns relabelled.

        Starts from the incremental speakers and moves each block cluster to its nearest speaker
        centroid until nothing moves (k-means over centroids weighted by speech); speakers whose
        centroids end up closer than ``merge_threshold`` are merged, and the closest are merged
        further down to ``num_speakers``/``max_speakers``. Fewer than ``num_speakers``/``min_speakers``:
        the block clusters are clustered agglomeratively to that count.
        """
        items = [
            (bi, li)
            for bi, blk in enumerate(self.blocks)
            for li in range(len(blk.centroids))
            if blk.centroids[li].any()
        ]
        if not items:
            return []
        x = _unit(np.stack([self.blocks[bi].centroids[li] for bi, li in items]).astype(np.float64))
        w = np.array([self.blocks[bi].speech_ms[li] for bi, li in items]) + 1.0
        cents = _unit(np.stack(self._sums)) if self._sums else x[:1]
        labels = np.argmax(x @ cents.T, axis=1)
        for _ in range(20):
            cents = np.stack(
                [
                    _unit((x[labels == k] * w[labels == k, None]).sum(axis=0)) if (labels == k).any() else cents[k]
                    for k in range(len(cents))
                ]
            )
            new = np.argmax(x @ cents.T, axis=1)
            if (new == labels).all():
                break
            labels = new
        most = self.num_speakers or self.max_speakers
        least = self.num_speakers or self.min_speakers
        labels = self._merge_close(labels, x, w, most, least)
        if least and len(set(labels.tolist())) < least and len(items) >= least:  # too few: split by clustering
            labels = fcluster(linkage(x, method="average", metric="cosine"), least, criterion="maxclust") - 1
        cluster_of = {item: int(lab) for item, lab in zip(items, labels)}
        ks = sorted(set(cluster_of.values()))
        cents = np.stack([_unit((x[labels == k] * w[labels == k, None]).sum(axis=0)) for k in ks])
        named = {ks[i]: name for i, name in match(cents, self.voices, self.name_threshold).items()}
        label_of: dict[int, str] = {}  # enrolled names; the others SPEAKER_NN by first appearance
        turns = []
        for bi, blk in enumerate(self.blocks):
            for li, s, e in sorted(blk.turns, key=lambda t: t[1]):
                c = cluster_of.get((bi, li))
                if c is None:
                    continue
                if c not in label_of:
                    label_of[c] = named.get(c) or f"SPEAKER_{sum(k not in named for k in label_of):02d}"
                turns.append(Turn(label_of[c], s, e))
        self.final = {label_of[k]: (cents[i], float(w[labels == k].sum())) for i, k in enumerate(ks) if k in label_of}
        return merge_turns(turns)

    def _merge_close(
        self, labels: np.ndarray, x: np.ndarray, w: np.ndarray, most: int | None, least: int | None
    ) -> np.ndarray:
        """Merge the two closest speakers while they are closer than merge_threshold; then a speaker
        with less than ``min_speaker_s`` of speech in the stream (or 10% of it) joins its nearest (a
        second or so of mixed or odd audio is not a participant); then the two closest while there
        are more than ``most``. Never below ``least``."""
        while True:
            ks = sorted(set(labels.tolist()))
            if len(ks) < 2 or (least and len(ks) <= least):
                return labels
            cents = np.stack([_unit((x[labels == k] * w[labels == k, None]).sum(axis=0)) for k in ks])
            sim = cents @ cents.T - 2 * np.eye(len(ks))
            i, j = np.unravel_index(np.argmax(sim), sim.shape)
            if sim[i, j] < self.merge_threshold:
                speech = np.array([w[labels == k].sum() for k in ks])
                small = int(np.argmin(speech))
                if speech[small] < min(self.min_speaker_ms, 0.1 * speech.sum()):  # short streams: relative
                    i, j = int(np.argmax(sim[small])), small  # type: ignore[assignment]
                elif not (most and len(ks) > most):
                    return labels
            labels = np.where(labels == ks[j], ks[i], labels)
