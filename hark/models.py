"""Model weights the project relies on, checked by sha256 (`hark models verify`, run by setup).

Weights come only from installed packages: nothing is downloaded at run time. A mismatch means
a different package build than the one measured, so WER figures would not hold.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

# package -> {relative path inside the package: sha256}
MANIFEST: dict[str, dict[str, str]] = {
    "pocketsphinx": {  # pocketsphinx 5.1.1 wheel: CMU en-us acoustic model, LM and dictionary
        "model/en-us/en-us/mdef": "2360f9a86889c1cfee8bd618a0269387911e5fb2920a594f506b18b8c79683b0",
        "model/en-us/en-us/means": "832019e32cac12eb318964f96f469034acb12d0348eeddc3831831a100cb4dd4",
        "model/en-us/en-us/variances": "b00d696f85e96834fc10f8e5f06428d8c4db6bffdbe5845b6f69bf6efbc48fa5",
        "model/en-us/en-us/transition_matrices": "c1f7f28ea43177be734be1f88bd7f1b9a853d0e660f8599c67c6eaeca8bb539a",
        "model/en-us/en-us/sendump": "8c9564c0d5bef69ca9d9bf1014abe162f071644cf02cf1fa8a483c3dc165a7a8",
        "model/en-us/en-us/feat.params": "c982c5f75e2a30c34d2c9ef1f6b129a5a00e67e3e927565076b58664cc2404c9",
        "model/en-us/en-us/noisedict": "7295b07df2c204c4f87c6782b6be1a3859d7006d4e3864181c955d6dab105a33",
        "model/en-us/en-us.lm.bin": "db21d0642286677699e6dbc859d2e5395570222361999387ce60f6e1d01995d6",
        "model/en-us/cmudict-en-us.dict": "20b5c293e1f311fb375fe067e500ec5636f4fc7af5594967263696def9b23bfe",
    },
}


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify() -> list[str]:
    """Return a list of problems (empty when every file is present and matches)."""
    problems = []
    for package, files in MANIFEST.items():
        try:
            base = package_dir(package)
        except FileNotFoundError as e:
            problems.append(str(e))
            continue
        for rel, expected in files.items():
            path = base / rel
            if not path.is_file():
                problems.append(f"{package}: missing {rel}")
            elif (got := sha256(path)) != expected:
                problems.append(f"{package}: {rel} sha256 {got[:12]}... != expected {expected[:12]}...")
    return problems
