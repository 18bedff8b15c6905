"""Settings and the broker a command talks to."""

from __future__ import annotations

import os

from hark import serde, stack
from hark.config import Settings


def add_bootstrap(sp) -> None:
    sp.add_argument("--bootstrap", help="Kafka bootstrap host:port (default: the running stack)")


def settings_of(a) -> Settings:
    return Settings.load(data_dir=getattr(a, "data_dir", None), partitions=getattr(a, "partitions", None))


def connect(a, settings: Settings) -> Settings:
    """--bootstrap, else HARK_BOOTSTRAP, else the running default stack."""
    if getattr(a, "bootstrap", None) or os.environ.get("HARK_BOOTSTRAP"):
        settings = stack.owner_of(settings, getattr(a, "bootstrap", None) or settings.bootstrap)
        serde.configure(settings, eager=False)  # an operator's registry (HARK_SCHEMA_REGISTRY_URL)
        return settings
    state = stack.status(stack.stack_dir(settings))
    if not state or not state.get("supervisor_alive") or state.get("status") != "ready":
        raise SystemExit("hark: no stack is running; start one with `hark up` or pass --bootstrap HOST:PORT")
    return stack.client_settings(settings, state)
