"""Diarization error rate with pyannote.metrics (0.25 s collar, overlapped speech scored)."""

from __future__ import annotations

from pathlib import Path

from .pipeline import Turn


def read_rttm(path: Path) -> list[Turn]:
    turns = []
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if f and f[0] == "SPEAKER":
            start = float(f[3])
            turns.append(Turn(f[7], int(round(start * 1000)), int(round((start + float(f[4])) * 1000))))
    return turns


def der(reference: list[Turn], hypothesis: list[Turn], collar: float = 0.25) -> dict:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns):
        a = Annotation()
        for i, t in enumerate(turns):
            a[Segment(t.start_ms / 1000, t.end_ms / 1000), i] = t.speaker
        return a

    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    detail = metric(annotation(reference), annotation(hypothesis), detailed=True)
    total = detail["total"] or 1.0
    return {
        "der": detail["diarization error rate"],
        "missed": detail["missed detection"] / total,
        "false_alarm": detail["false alarm"] / total,
        "confusion": detail["confusion"] / total,
        "ref_speakers": len({t.speaker for t in reference}),
        "hyp_speakers": len({t.speaker for t in hypothesis}),
    }
