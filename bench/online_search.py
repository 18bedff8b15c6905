"""The online decoder's search cap: WER and CPU per audio second for several values.

    python -m bench.online_search                # 30000 (pocketsphinx's default) 5000 3000 2000 1500
    python -m bench.online_search --caps 3000,4000
    python -m bench.online_search --caps 3000 --options ds=2,pbeam=1e-40   # other search settings, one at a time

Decodes all of data/speech in this process (the 12 utterances and the joined passage, 174 words),
fed in 100 ms chunks; the fastest of ``--rounds`` passes per value. No Kafka.
"""

from __future__ import annotations

import argparse

from hark.wer import load_references

from .pipeline import SPEECH, direct_decode


def number(text: str) -> int | float:
    """pocketsphinx takes integers (ds=2) and floats (beams such as pbeam=1e-40)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.online_search")
    ap.add_argument("--caps", default="30000,5000,3000,2000,1500", help="max active HMMs per frame to try")
    ap.add_argument("--options", default="", help="pocketsphinx options name=value to try one at a time, at each cap")
    ap.add_argument("--rounds", type=int, default=3, help="passes over every setting; the fastest of each is kept")
    a = ap.parse_args()
    refs = load_references(SPEECH / "references.tsv")
    files = [SPEECH / n for n in refs]
    options: list[dict] = [{}] + [{k: number(v)} for k, v in (kv.split("=", 1) for kv in a.options.split(",") if kv)]
    settings = [(int(cap), extra) for cap in a.caps.split(",") for extra in options]
    # Rounds interleave the settings: this machine's speed drifts by tens of percent over minutes,
    # and a setting measured only in a slow minute would look costlier than it is.
    best: dict[int, dict] = {}
    for _ in range(a.rounds):
        for i, (cap, extra) in enumerate(settings):
            r = direct_decode(files, refs, max_hmm_per_frame=cap, **extra)
            if i not in best or r["cpu_s"] < best[i]["cpu_s"]:
                best[i] = r
    base = best[0]["rtf"]
    for i, (cap, extra) in enumerate(settings):
        label = "".join(f", {k}={v}" for k, v in extra.items())
        print(
            f"max HMMs per frame {cap:>6}{label}: WER {best[i]['wer']:.1%} ({best[i]['ref_words']} words), "
            f"{best[i]['rtf']:.3f} CPU-s per audio second ({best[i]['rtf'] / base:.0%} of the first)",
            flush=True,
        )


if __name__ == "__main__":
    main()
