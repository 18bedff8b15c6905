"""Language detection as the offline pass does it (services/offline_asr/stream.py): Whisper's
guess on a window, taken at probability >= DETECT_SURE, else "und" (decoded in the fallback
language).

Two sets: sentences spoken by espeak-ng voices in six languages (tests/tts.py), and the real
English recordings in data/speech (a wrong guess there would turn good English into another
language). Reports, per set, the clips given their language, "und" and a wrong language, and
the threshold the rule chooses on these sets: the lowest on a 0.05 grid at which no clip is
given a wrong language (DETECT_SURE is that value; tests/test_offline.py checks it on other
clips).

    python -m bench.languages
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hark.audio import read_pcm_file
from services.offline_asr.decoder import WhisperDecoder
from services.offline_asr.stream import DETECT_SURE
from tests.tts import say

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"

SENTENCES = {
    "es": [
        "Mañana vamos a visitar a mis abuelos en el pueblo.",
        "La reunión empieza a las diez y termina antes del almuerzo.",
        "No encuentro las llaves del coche por ninguna parte.",
    ],
    "de": [
        "Morgen fahren wir mit dem Zug nach Berlin.",
        "Die Besprechung beginnt um zehn Uhr und endet vor dem Mittagessen.",
        "Ich kann meine Autoschlüssel nirgendwo finden.",
    ],
    "fr": [
        "Demain nous allons rendre visite à mes grands-parents.",
        "La réunion commence à dix heures et se termine avant le déjeuner.",
        "Je ne trouve mes clés de voiture nulle part.",
    ],
    "it": [
        "Domani andiamo a trovare i nonni in campagna.",
        "La riunione comincia alle dieci e finisce prima di pranzo.",
        "Non trovo le chiavi della macchina da nessuna parte.",
    ],
    "pt": [
        "Amanhã vamos visitar os meus avós na aldeia.",
        "A reunião começa às dez horas e termina antes do almoço.",
        "Não encontro as chaves do carro em lado nenhum.",
    ],
    "nl": [
        "Morgen gaan we met de trein naar Amsterdam.",
        "De vergadering begint om tien uur en eindigt voor de lunch.",
        "Ik kan mijn autosleutels nergens vinden.",
    ],
}


GRID = [round(0.05 * i, 2) for i in range(1, 20)]


def chosen_threshold(rows: list[dict]) -> float | None:
    """The lowest threshold on GRID at which no row's guess at or above it is wrong (None: none)."""
    return next((t for t in GRID if all(r["guess"] == r["truth"] for r in rows if r["p"] >= t)), None)


def outcome(rows: list[dict], threshold: float) -> dict[str, int]:
    n = Counter("und" if r["p"] < threshold else "right" if r["guess"] == r["truth"] else "wrong" for r in rows)
    return {k: n.get(k, 0) for k in ("right", "und", "wrong")}


def main() -> None:
    import argparse

    from hark.config import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-input", action="store_true", help="detect on Whisper's 30 s input, not the decode's")
    args = ap.parse_args()
    dec = WhisperDecoder(encode_pad_s=Settings.load().offline_encode_pad_s, detect_trimmed=not args.full_input)

    def row(truth: str, name: str, pcm) -> dict:
        guess, p = dec.detect(pcm)
        return {"truth": truth, "clip": name, "guess": guess, "p": round(p, 3)}

    synthetic = [row(lang, s, say(s, lang)) for lang, sentences in SENTENCES.items() for s in sentences]
    names = [line.split("\t")[0] for line in (SPEECH / "references.tsv").read_text().splitlines() if "\t" in line]
    real = [row("en", n, read_pcm_file(SPEECH / n)) for n in names if not n.startswith("#")]
    chosen = chosen_threshold(synthetic + real)
    syn, en = outcome(synthetic, DETECT_SURE), outcome(real, DETECT_SURE)
    report = {
        "threshold_chosen": chosen,
        "DETECT_SURE": DETECT_SURE,
        "synthetic_6_languages": syn,
        "real_english": en,
        "at_0.5": {"synthetic": outcome(synthetic, 0.5), "real_english": outcome(real, 0.5)},
        "rows": synthetic + real,
    }
    print(json.dumps(report, indent=1))
    print(
        f"language detection at p >= {DETECT_SURE} (the rule chooses {chosen} on this set): synthetic sentences in "
        f"6 languages {syn['right']} right, {syn['und']} und, {syn['wrong']} wrong of {len(synthetic)}; real "
        f"English {en['right']} en, {en['und']} und, {en['wrong']} wrong of {len(real)}"
    )


if __name__ == "__main__":
    main()
