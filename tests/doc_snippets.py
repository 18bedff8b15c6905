"""The code blocks of docs/clients.md, so that the tests run what the page shows, as written."""

from __future__ import annotations

import re
from pathlib import Path

CLIENTS_MD = Path(__file__).resolve().parent.parent / "docs" / "clients.md"


def block(first_line: str) -> str:
    """The fenced block whose first line starts with ``first_line`` (a comment naming the file)."""
    for body in re.findall(r"```[a-z]*\n(.*?)```", CLIENTS_MD.read_text(), re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"docs/clients.md has no block starting {first_line!r}")


def properties(first_line: str, **values: str) -> dict[str, str]:
    """A ``key=value`` block with its ``{placeholders}`` filled in; every placeholder must be given."""
    out = {}
    for line in block(first_line).splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], value)
    return out
