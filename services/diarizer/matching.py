"""Matching a stream's speakers to a tenant's enrolled voices by cosine similarity: what the
diarizer's passes (``stream.StreamDiarizer``) and enrollment's callers (``voices``) share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def similarities(speakers: np.ndarray, voices: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """(speakers, voices) cosine similarities; ``speakers`` rows are unit vectors."""
    vecs = np.stack([v for _, v in voices]).astype(np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    return np.asarray(speakers, dtype=np.float64) @ vecs.T


def match(speakers: np.ndarray, voices: Sequence[tuple[str, np.ndarray]], threshold: float) -> dict[int, str]:
    """Speaker row -> enrolled name: one name per speaker and one speaker per name (Hungarian
    assignment on cosine similarity), only where the similarity reaches ``threshold``."""
    if not len(voices) or not len(speakers):
        return {}
    sim = similarities(speakers, voices)
    rows, cols = linear_sum_assignment(-sim)
    return {int(r): voices[c][0] for r, c in zip(rows, cols) if sim[r, c] >= threshold}
