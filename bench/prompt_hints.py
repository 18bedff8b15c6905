"""Does the online pass help the offline one? `python -m bench.prompt_hints`

Issue 3 asks to keep a combination of the two passes only where it measurably helps. For every
file of the real-speech set this decodes with Whisper base (as offline_asr does) three ways:
  none      no prompt (what offline_asr does for a stream's first window)
  1best     the online 1-best text as the prompt
  nbest     the distinct words of the online top-5 n-best as the prompt
and prints corpus WER for each. No Kafka; the online output comes from the same recogniser
and settings online_asr uses.
"""

from __future__ import annotations

from pathlib import Path

from hark.audio import read_pcm_file
from hark.wer import WerScore, load_references, score
from services.offline_asr.decoder import WhisperDecoder
from services.online_asr.recognizer import DecoderPool, StreamRecognizer

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech"


def online_pass(pool: DecoderPool, pcm: bytes):
    d = pool.acquire()
    try:
        r = StreamRecognizer(d)
        events = []
        for i in range(0, len(pcm), 3200):
            events += r.feed(pcm[i : i + 3200])
        return [e for e in events + r.finish() if e.kind == "FINAL"]
    finally:
        pool.release(d)


def main() -> None:
    refs = load_references(SPEECH / "references.tsv")
    pool, whisper = DecoderPool(1), WhisperDecoder("base")
    totals = {k: WerScore(0, 0) for k in ("online", "none", "1best", "nbest")}
    for name, ref in refs.items():
        if name == "austen_passage.flac":
            continue
        pcm = read_pcm_file(SPEECH / name)
        finals = online_pass(pool, pcm.tobytes())
        one_best = " ".join(f.text for f in finals)
        nbest_words = " ".join(dict.fromkeys(w for f in finals for t, _ in f.nbest for w in t.split()))
        totals["online"] += score(ref, one_best)
        for key, prompt in (("none", None), ("1best", one_best), ("nbest", nbest_words)):
            hyp = whisper.decode(pcm, 0, prompt=prompt).text
            totals[key] += score(ref, hyp)
            print(f"{key:>6} {name}: {hyp}")
    print()
    for key, t in totals.items():
        print(f"{key:>8}: WER {t.wer:.1%} ({t.errors}/{t.ref_words})")


if __name__ == "__main__":
    main()
