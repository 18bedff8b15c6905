"""``hark compare``: archived streams re-decoded by two (or more) offline model versions.

Each stream's archived PCM is read segment by segment, cut into the same pause-cut windows the
offline service uses, and decoded by each version with the service's settings, so a version
scores here what it would produce in the pipeline. A stream is scored by WER against its
reference where one is known (a references file keyed by stream id or source file name, or the
stream metadata's ``reference``); every stream is also scored for agreement with the first
version (1 - the WER of its text against the first version's), which needs no reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hark.config import Settings
from hark.keys import open_archive
from hark.languages import AUTO
from hark.storage import ObjectStore, archived_meta, archived_pcm
from hark.wer import WerScore, score

from .decoder import MAX_WINDOW_S, WhisperDecoder, whisper_language
from .stream import choose_language, decoded_in
from .windows import StreamWindows


@dataclass
class VersionReport:
    model: str
    version: str
    streams: int = 0
    audio_s: float = 0.0
    decode_s: float = 0.0
    wer: WerScore = field(default_factory=lambda: WerScore(0, 0))
    scored_streams: int = 0
    agreement: WerScore = field(default_factory=lambda: WerScore(0, 0))

    def row(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "streams": self.streams,
            "audio_s": round(self.audio_s, 2),
            "rtf": round(self.decode_s / self.audio_s, 3) if self.audio_s else None,
            "scored_streams": self.scored_streams,
            "ref_words": self.wer.ref_words,
            "errors": self.wer.errors,
            "wer": round(self.wer.wer, 4) if self.wer.ref_words else None,
            "agreement": round(1 - self.agreement.wer, 4) if self.agreement.ref_words else None,
        }


def transcribe_archived(
    store: ObjectStore, stream_id: str, decoder: WhisperDecoder, settings: Settings, language: str = "en"
) -> tuple[str, float, float]:
    """(text, audio seconds, decode seconds) of an archived stream, in bounded windows; a stream of
    language "auto" gets the offline pass's rule (stream.choose_language): its sure guess, else the
    fallback language."""
    windows = StreamWindows(
        0, int(settings.offline_min_window_s * 1000), int(min(settings.offline_max_window_s, MAX_WINDOW_S) * 1000)
    )
    texts, audio_s, decode_s = [], 0.0, 0.0
    chosen, detections = (None if language == AUTO else language), 0

    def run(ws):
        nonlocal audio_s, decode_s, chosen, detections
        for w in ws:
            if chosen is None:
                detections += 1
                chosen = choose_language(decoder, w.pcm, detections)[0]
            d = decoder.decode(w.pcm, w.start_ms, language=decoded_in(chosen, settings.offline_language_fallback))
            audio_s += len(w.pcm) / 16000
            decode_s += d.decode_s
            if d.text:
                texts.append(d.text)

    for pcm in archived_pcm(store, stream_id):
        run(windows.push(pcm))
    run(windows.flush())
    return " ".join(texts), audio_s, decode_s


def reference_for(stream_id: str, meta: dict, references: dict[str, str]) -> str | None:
    if stream_id in references:
        return references[stream_id]
    name = Path(meta.get("source_name") or "").name
    if name in references:
        return references[name]
    return (meta.get("metadata") or {}).get("reference")


def compare(
    settings: Settings,
    stream_ids: list[str],
    models: list[str],
    references: dict[str, str] | None = None,
    on_stream=None,
) -> dict:
    if len(models) < 2:
        raise ValueError("compare needs at least two model versions, e.g. --models base,tiny.en")
    store = open_archive(settings)
    metas = {}
    for sid in stream_ids:
        try:
            metas[sid] = archived_meta(store, sid)
        except KeyError:
            raise LookupError(f"no archived stream {sid!r} in {store.uri}") from None
    s = settings
    decoders = [
        WhisperDecoder(
            m,
            s.offline_device,
            s.offline_compute_type,
            s.offline_cpu_threads,
            s.offline_beam_size,
            s.offline_encode_pad_s,
        )
        for m in models
    ]
    reports = [VersionReport(d.model_name, d.model_version) for d in decoders]
    streams = []
    for sid in stream_ids:
        meta = metas[sid]
        ref = reference_for(sid, meta, references or {})
        versions: list[dict] = []
        row = {"stream_id": sid, "source_name": meta.get("source_name"), "reference": ref, "versions": versions}
        baseline = None
        for decoder, report in zip(decoders, reports):
            text, audio_s, decode_s = transcribe_archived(
                store, sid, decoder, s, whisper_language(meta.get("language"))
            )
            report.streams += 1
            report.audio_s += audio_s
            report.decode_s += decode_s
            entry: dict = {"model": decoder.model_name, "text": text}
            if ref is not None:
                sc = score(ref, text)
                report.wer += sc
                report.scored_streams += 1
                entry["wer"] = round(sc.wer, 4)
            if baseline is None:
                baseline = text
            else:
                report.agreement += score(baseline, text)
            versions.append(entry)
        streams.append(row)
        if on_stream:
            on_stream(row)
    return {"versions": [r.row() for r in reports], "streams": streams}


def render_table(report: dict) -> str:
    head = (
        f"{'model':<18} {'streams':>7} {'audio s':>8} {'RTF':>6} {'scored':>6} {'ref words':>9} {'errors':>6} "
        f"{'WER':>7} {'agree':>7}  version"
    )
    lines = [head, "-" * len(head)]
    for v in report["versions"]:
        wer = f"{100 * v['wer']:.1f}%" if v["wer"] is not None else "-"
        agree = f"{100 * v['agreement']:.1f}%" if v["agreement"] is not None else "(base)"
        lines.append(
            f"{v['model']:<18} {v['streams']:>7} {v['audio_s']:>8.1f} {v['rtf']:>6.3f} {v['scored_streams']:>6} "
            f"{v['ref_words']:>9} {v['errors']:>6} {wer:>7} {agree:>7}  {v['version']}"
        )
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1)
