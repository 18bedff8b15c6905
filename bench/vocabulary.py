"""Hotwords: term recall and WER with and without a stream's terms, and no loss on ordinary speech.

Domain set: sentences full of rare terms (drugs, names, products), spoken by espeak-ng (tests/tts.py);
each sentence's terms are its hotwords, nothing is tuned. Ordinary speech: the real recordings in
data/speech decoded with the domain set's whole term list as hotwords (terms they do not contain)
and without. The offline decoder alone (services/offline_asr/decoder.py), as the pass runs it.

    python -m bench.vocabulary
"""

from __future__ import annotations

import json
from pathlib import Path

from hark.audio import read_pcm_file
from hark.wer import WerScore, normalise, score
from services.offline_asr.decoder import WhisperDecoder
from tests.tts import say

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"

DOMAIN = [
    ("The patient was started on metoprolol and lisinopril yesterday morning.", ["metoprolol", "lisinopril"]),
    ("We switched her from warfarin to apixaban after the scan.", ["warfarin", "apixaban"]),
    ("Give two hundred milligrams of amiodarone and recheck the potassium.", ["amiodarone"]),
    ("His levothyroxine dose stays the same, but stop the atorvastatin.", ["levothyroxine", "atorvastatin"]),
    ("Order an echocardiogram and a troponin before the angioplasty.", ["echocardiogram", "troponin", "angioplasty"]),
    ("Siobhan Nakamura will present the Kubernetes migration on Thursday.", ["Siobhan", "Nakamura", "Kubernetes"]),
    ("The Zyntrax router replaced the old Fortinet firewall last week.", ["Zyntrax", "Fortinet"]),
    ("Please ask Dr. Okonkwo about the gabapentin prescription.", ["Okonkwo", "gabapentin"]),
    ("Our Grafana dashboards read from Prometheus and Loki.", ["Grafana", "Prometheus", "Loki"]),
    ("Add omeprazole to the discharge letter for Mrs. Przybylski.", ["omeprazole", "Przybylski"]),
]


def term_hits(text: str, terms: list[str]) -> int:
    words = " ".join(normalise(text))
    return sum(1 for t in terms if " ".join(normalise(t)) in words)


def main() -> None:
    dec = WhisperDecoder()
    all_terms = tuple(t for _, terms in DOMAIN for t in terms)
    rows, recall = [], {"without": 0, "with": 0}
    wer = {"without": WerScore(0, 0), "with": WerScore(0, 0)}
    for sentence, terms in DOMAIN:
        pcm = say(sentence)
        out = {}
        for label, hot in (("without", ()), ("with", tuple(terms))):
            text = dec.decode(pcm, 0, language="en", hotwords=hot).text
            recall[label] += term_hits(text, terms)
            wer[label] += score(sentence, text)
            out[label] = text
        rows.append({"sentence": sentence, **out})
    n_terms = sum(len(t) for _, t in DOMAIN)
    refs = dict(
        line.split("\t", 1) for line in (SPEECH / "references.tsv").read_text().splitlines() if not line.startswith("#")
    )
    ordinary = {"without": WerScore(0, 0), "with": WerScore(0, 0)}
    for name, ref in refs.items():
        pcm = read_pcm_file(SPEECH / name)
        for label, hot in (("without", ()), ("with", all_terms)):
            ordinary[label] += score(ref.strip(), dec.decode(pcm, 0, language="en", hotwords=hot).text)
    report: dict = {
        "domain_sentences": len(DOMAIN),
        "domain_terms": n_terms,
        "term_recall": {k: round(v / n_terms, 3) for k, v in recall.items()},
        "domain_wer": {k: round(v.wer, 4) for k, v in wer.items()},
        "ordinary_wer_with_unrelated_hotwords": {k: round(v.wer, 4) for k, v in ordinary.items()},
        "ordinary_ref_words": ordinary["without"].ref_words,
        "rows": rows,
    }
    print(json.dumps(report, indent=1))
    print(
        f"term recall {report['term_recall']['without']:.0%} -> {report['term_recall']['with']:.0%} with hotwords "
        f"({n_terms} terms); domain WER {wer['without'].wer:.1%} -> {wer['with'].wer:.1%}; "
        f"ordinary speech WER {ordinary['without'].wer:.1%} -> {ordinary['with'].wer:.1%} "
        f"with {len(all_terms)} unrelated hotwords"
    )


if __name__ == "__main__":
    main()
