"""The settings table of docs/configuration.md, generated from ``Settings``' own fields: each one's
environment variable, default, accepted range (``config_limits``) and meaning (its metadata).

``python -m hark.config_table`` prints it."""

from __future__ import annotations

import dataclasses

from hark.config import Settings
from hark.config_limits import CHOICES, RANGES


def _accepts(name: str) -> str:
    if name in RANGES:
        return "..".join(str(int(v)) if float(v).is_integer() else f"{v:g}" for v in RANGES[name])
    return " / ".join(CHOICES.get(name, ()))


def _shown(f: dataclasses.Field, value: object) -> str:
    if "shown" in f.metadata:  # a default computed on this machine (data_dir): the one it usually is
        return str(f.metadata["shown"])
    return repr(value) if isinstance(value, str) else str(value)


def reference_markdown() -> str:
    """The settings table: a row per ``HARK_*`` variable, in the order of Settings' fields, with a
    heading row where a field opens a section (its ``section`` metadata)."""
    defaults = Settings()
    rows = []
    for f in dataclasses.fields(Settings):
        if f.name == "kafka_extra":  # HARK_KAFKA_<PROPERTY>, not a variable of its own
            continue
        if f.metadata.get("section"):
            rows.append(f"| **{f.metadata['section']}** | | | |")
        doc = str(f.metadata.get("doc", "")).replace("|", "\\|")
        shown = _shown(f, getattr(defaults, f.name))
        rows.append(f"| `HARK_{f.name.upper()}` | `{shown}` | {_accepts(f.name)} | {doc} |")
    return "| variable | default | accepts | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
