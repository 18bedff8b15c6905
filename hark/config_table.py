"""The settings table of docs/configuration.md, generated from ``Settings``' source: each field's
environment variable, default, accepted range and the comment above it."""

from __future__ import annotations

from hark.config import Settings
from hark.config_limits import CHOICES, RANGES


def reference_markdown() -> str:
    """The settings table of docs/configuration.md, from this class: each field's environment
    variable, default and the comment above it (``python -m hark.config > table``)."""
    import inspect
    import re

    rows, comment = [], []
    for line in inspect.getsource(Settings).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("# ").strip()
            if not re.fullmatch(r"[a-z_ ]+(\(.*\))?", text):
                comment.append(text)
            elif not line.startswith("        "):  # "# ingest", "# results": the settings of that service
                rows.append(f"| **{text}** | | | |")
            continue
        m = re.match(r"(\w+): [^=]+= (.+?)(?:\s+#\s*(.*))?$", stripped)
        if m and not line.startswith("        "):
            name, _default, trailing = m.groups()
            if name != "kafka_extra":
                value = getattr(Settings(), name)
                shown = (
                    "~/.local/share/hark"
                    if name == "data_dir"
                    else repr(value)
                    if isinstance(value, str)
                    else str(value)
                )
                text = " ".join(comment + ([trailing] if trailing else [])).replace("|", "\\|")
                accepts = (
                    "..".join(str(int(v)) if float(v).is_integer() else f"{v:g}" for v in RANGES[name])
                    if name in RANGES
                    else " / ".join(CHOICES[name])
                    if name in CHOICES
                    else ""
                )
                rows.append(f"| `HARK_{name.upper()}` | `{shown}` | {accepts} | {text} |")
        comment = []
    return "| variable | default | accepts | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
