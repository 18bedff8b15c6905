"""Language detection as the offline pass does it (services/offline_asr/stream.py): Whisper's
guess on a window, kept when its probability is >= 0.5, else English.

Two sets: sentences spoken by espeak-ng voices in six languages (tests/tts.py), and the real
English recordings in data/speech (a wrong guess there would turn good English into another
language). Reports accuracy per language and the real-English false-detection rate.

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


def decided(dec: WhisperDecoder, pcm) -> tuple[str, float]:
    lang, prob = dec.detect(pcm)
    return (lang if prob >= DETECT_SURE else "en"), prob


def main() -> None:
    import argparse

    from hark.config import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-input", action="store_true", help="detect on Whisper's 30 s input, not the decode's")
    args = ap.parse_args()
    dec = WhisperDecoder(encode_pad_s=Settings.load().offline_encode_pad_s, detect_trimmed=not args.full_input)
    per_lang, rows = {}, []
    for lang, sentences in SENTENCES.items():
        hits = 0
        for s in sentences:
            got, prob = decided(dec, say(s, lang))
            hits += got == lang
            rows.append({"voice": lang, "detected": got, "p": round(prob, 3)})
        per_lang[lang] = f"{hits}/{len(sentences)}"
    names = [line.split("\t")[0] for line in (SPEECH / "references.tsv").read_text().splitlines() if "\t" in line]
    english = Counter(decided(dec, read_pcm_file(SPEECH / n))[0] for n in names if not n.startswith("#"))
    synth_ok = sum(int(v.split("/")[0]) for v in per_lang.values())
    synth_n = sum(len(s) for s in SENTENCES.values())
    report = {
        "synthetic_accuracy": round(synth_ok / synth_n, 3),
        "per_language": per_lang,
        "real_english_files": sum(english.values()),
        "real_english_detected": dict(english),
        "rows": rows,
    }
    print(json.dumps(report, indent=1))
    print(
        f"language detection: {synth_ok}/{synth_n} synthetic sentences in 6 languages right; "
        f"real English recordings: {english.get('en', 0)}/{sum(english.values())} kept English"
    )


if __name__ == "__main__":
    main()
