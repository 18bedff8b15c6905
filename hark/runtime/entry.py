"""Start-up of a service process: settings from flags and HARK_* variables, logging, the broker."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Protocol

from .. import kafka, serde
from ..config import ConfigError, Settings
from .observe import setup_logging


class Runnable(Protocol):
    def run(self) -> None: ...


def service_settings(name: str, argv: list[str] | None = None, listen: str | None = None) -> Settings:
    """Start-up of ``python -m services.<name>``: flags override HARK_* variables, logging is set
    up, the broker is waited for and the topics exist. ``listen`` names the settings prefix of a
    service that serves its own port (``ingest``: --host/--port set ingest_host/ingest_port)."""

    os.umask(0o077)  # the archive, index, keys and logs it writes are the owner's alone
    p = argparse.ArgumentParser(prog=f"python -m services.{name}")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port (env HARK_BOOTSTRAP)")
    p.add_argument("--health-port", type=int, help="port for /healthz and /metrics (0 = any)")
    p.add_argument("--data-dir", help="data folder (archive default), env HARK_DATA_DIR")
    if listen:
        p.add_argument("--host")
        p.add_argument("--port", type=int)
    a = p.parse_args(argv)
    extra = {f"{listen}_host": a.host, f"{listen}_port": a.port} if listen else {}
    try:
        settings = Settings.load(bootstrap=a.bootstrap, health_port=a.health_port, data_dir=a.data_dir, **extra)
    except ConfigError as e:
        raise SystemExit(f"{name}: {e}") from None
    setup_logging(name, settings.log_level)
    kafka.wait_for_broker(settings, timeout=60)
    kafka.ensure_topics(settings)
    serde.configure(settings)  # the registry's ids from here on (the stack registered them)
    return settings


def main_for(build: Callable[[Settings], Runnable], name: str, argv: list[str] | None = None) -> None:
    """Entry point of a consumer service: ``build`` makes it from the settings, then it runs."""
    build(service_settings(name, argv)).run()
