"""Named voices on the diarizer's side: enrolling a voiceprint from recordings (matching a
stream's speakers to the enrolled voices is ``matching``'s). No Kafka, no store (``hark.voices``
keeps them).

A voiceprint is what the full pass computes for a speaker: the speech-weighted mean of the unit
CAM++ centroids of that speaker's clusters in every block. Enrollment runs the same StreamDiarizer
over the recordings, so an enrolled voice and a stream's speaker are measured alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hark.voices import VoiceError

from .stream import StreamDiarizer

MIN_ENROLL_S = 5.0  # less speech than this gives a voiceprint too noisy to name anyone by
OTHER_VOICE_SHARE = 0.2  # a second speaker with more of a recording's speech than this: refused


def speakers_of(diarizer, pcm: np.ndarray, **kw) -> tuple[dict[str, tuple[np.ndarray, float]], list]:
    """The full pass over a recording: its speakers, label -> (unit centroid, speech ms), and turns."""
    sd = StreamDiarizer(diarizer, **kw)
    for i in range(0, len(pcm), 16000):
        sd.push(pcm[i : i + 16000])
    sd.flush()
    turns = sd.full_turns()
    return sd.final, turns


def voiceprint(
    diarizer,
    recordings: Sequence[tuple[str, np.ndarray]],
    threshold: float,
    same_voice: float = 0.65,
    one_voice: bool = True,
) -> tuple[np.ndarray, float]:
    """One voice from recordings of it (name, 16 kHz int16 PCM): (unit vector, seconds of speech).
    A recording with a second voice of any size, or recordings that are not the same voice, are
    refused: a voiceprint of two people would name the wrong one. ``one_voice=False`` takes the
    main voice of each recording instead (the benchmark, to score every voice it has).

    In noise the full pass may split one voice in two (measured: 0.70 similar halves of one flite
    voice at 20 dB SNR). Within a recording, a cluster at least ``same_voice`` similar to the main
    one (the diarizer's link threshold: the live pass would call them one speaker) is not another
    voice; only clusters as similar as a name needs (``threshold``) join the voiceprint."""
    total = np.zeros(diarizer.embedding.dimension)
    speech = 0.0
    prints = []
    for name, pcm in recordings:
        found = sorted(speakers_of(diarizer, pcm)[0].values(), key=lambda s: -s[1])
        if not found:
            raise VoiceError(f"{name}: no speech found")
        all_ms = sum(ms for _, ms in found)
        same = [(v, ms) for v, ms in found if float(v @ found[0][0]) >= threshold]
        others = [ms for v, ms in found if float(v @ found[0][0]) < same_voice]
        if one_voice and others and max(others) > OTHER_VOICE_SHARE * all_ms:
            raise VoiceError(
                f"{name}: more than one voice ({len(others) + 1} speakers found): enroll a recording of one person"
            )
        vec = np.sum([v * ms for v, ms in same], axis=0)
        vec = vec / max(float(np.linalg.norm(vec)), 1e-9)
        ms = sum(ms for _, ms in same)
        prints.append((name, vec))
        total += vec * ms
        speech += ms / 1000
    for (a, va), (b, vb) in zip(prints, prints[1:]):
        if float(va @ vb) < threshold:
            raise VoiceError(f"{a} and {b} do not sound like the same voice (similarity {float(va @ vb):.2f})")
    if speech < MIN_ENROLL_S:
        raise VoiceError(f"only {speech:.1f} s of speech: a voiceprint needs at least {MIN_ENROLL_S:g} s")
    return total / max(float(np.linalg.norm(total)), 1e-9), speech
