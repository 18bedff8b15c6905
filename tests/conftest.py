"""Fixtures: real speech with references, and one real embedded stack (Apache Kafka + services) per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hark import serde, stack
from hark.config import Settings
from hark.wer import load_references

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "data" / "speech"
HARK = [sys.executable, "-m", "hark_cli"]


@pytest.fixture(scope="session")
def references() -> dict[str, str]:
    return load_references(SPEECH / "references.tsv")


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    return SPEECH


# results lists the tenants' published topics this often in the test stacks (10 s by default): a
# test that makes a tenant's topic waits this long (+1 s) before its copies are due
TOPICS_S = 2.0


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the session stack: its own data folder, a short idle timeout to test it."""
    data = tmp_path_factory.mktemp("hark-data")
    return {
        "HARK_DATA_DIR": str(data),
        "HARK_IDLE_TIMEOUT_S": "4",
        "HARK_PARTITIONS": "4",
        "HARK_PUBLISHED_TOPICS_S": str(TOPICS_S),
    }


@pytest.fixture(scope="session")
def live_stack(stack_env):
    """A running embedded stack, started the way `hark up` starts it."""
    old = {k: os.environ.get(k) for k in stack_env}
    os.environ.update(stack_env)
    settings = Settings.load()
    state = stack.launch(settings, name="pytest")
    settings = stack.client_settings(settings, state)
    try:
        yield settings, state
    finally:
        stack.stop(stack.stack_dir(settings, "pytest"))
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _schema_ids_of_the_live_stack(request):
    """A test on the session stack reads and writes with its registry's ids, whatever stack an
    earlier test of this process talked to (serde's registry is one per process)."""
    if "live_stack" in request.fixturenames:
        settings, _ = request.getfixturevalue("live_stack")
        serde.configure(settings, eager=False)


def run_hark(*args, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([*HARK, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def pytest_terminal_summary(terminalreporter, config):
    """The order's seed, also under -q: `pytest --randomly-seed=N` runs the same order again."""
    seed = config.getoption("randomly_seed", default=None)
    if seed is not None:
        terminalreporter.write_line(f"random order: --randomly-seed={seed}")
