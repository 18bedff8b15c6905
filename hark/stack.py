"""The embedded stack: an Apache Kafka broker + filesystem archive + every service as its own process.

``hark up`` starts a detached supervisor (``python -m hark.supervisor``) that owns the broker and
the service processes, restarts a service that dies, and stops everything on SIGTERM (or when
the process that asked for it, e.g. ``hark run``, is gone). Its state file
``<data_dir>/stacks/<name>/stack.json`` is what ``hark status`` and ``hark down`` read.

The broker is a single KRaft node (``hark.broker``) whose log lives in
``<data_dir>/stacks/<name>/kafka``: it outlives ``hark down``, so the next ``hark up`` finds its
topics, records and committed offsets again. ``hark run``'s own stack is ephemeral: its log is
deleted when the stack stops.

Beside the broker runs a schema registry (``hark.registry``, Apicurio) with its H2 database in
``<data_dir>/stacks/<name>/registry``, durable the same way; the services get its URL as
HARK_SCHEMA_REGISTRY_URL. An operator's registry (HARK_SCHEMA_REGISTRY_URL set) replaces it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import broker, declaration, kafka, registry, security, serde
from .config import Settings
from .params import parse_count

# the services a stack runs by default, from their declarations (hark/declaration.py), in start
# order: name -> (module with main(argv), the topic whose partitions its replicas split); the
# opt-in ones (`hark up --with NAME`) are in declaration.specs() only
SERVICES = {s.name: (s.main, s.splits) for s in declaration.defaults()}


# replicas of one service at most: a consumer group splits at most 1024 partitions (HARK_PARTITIONS)
MAX_REPLICAS = 1024

# the consumer groups whose lag `hark status` shows (a stack with opt-in services keeps its own in its state)
GROUPS = [s.group for s in declaration.defaults() if s.group]


def stack_dir(settings: Settings, name: str = "default") -> Path:
    return settings.data_dir / "stacks" / name


def read_state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "stack.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def health(port: int, timeout: float = 1.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except Exception:
            return {"status": "unhealthy"}
    except Exception:
        return None


def parse_replicas(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    specs = declaration.by_name()
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = part.partition("=")
        try:
            if name not in specs:
                raise ValueError(f"no service {name!r}")
            out[name] = parse_count(n, name, 1, specs[name].min_replicas, MAX_REPLICAS)
        except ValueError as e:
            optional = ", ".join(f"{s}=0" for s, d in specs.items() if d.default and d.min_replicas == 0)
            raise SystemExit(
                f"bad --replicas entry {part!r}: {e} (e.g. online_asr=2, {optional}; services: {', '.join(specs)})"
            ) from None
    return out


def parse_with(names: str) -> tuple[str, ...]:
    """``hark up --with a,b``: opt-in services to run beside the default ones."""
    out = tuple(filter(None, (n.strip() for n in names.split(","))))
    try:
        declaration.selected(out)
    except ValueError as e:
        raise SystemExit(f"bad --with {names!r}: {e}") from None
    return out


# ---- client side: what `hark up/down/status/run` call ------------------------------------------
def private_data_dir(settings: Settings) -> Path:
    """The data folder, made 0700 (an existing one too: files an older version left readable stay
    out of others' reach), and this process's umask 077, which every process of the stack
    inherits: stream ids name files, logs quote them, and the archive holds everyone's audio. The
    process that starts a stack writes there too (keys, the erasure audit, exports), so it is set
    here and not only in the supervisor."""
    os.umask(0o077)
    d = Path(settings.data_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        d.chmod(0o700)
    except PermissionError as e:
        raise RuntimeError(f"the data folder {d} must belong to this user (it is kept 0700): {e}") from None
    return d


def launch(
    settings: Settings,
    name: str = "default",
    replicas: str = "",
    parent_pid: int | None = None,
    ephemeral: bool = False,
    external_broker: bool = False,
    timeout: float = 180.0,
    extra: str = "",
) -> dict:
    """Start a supervisor in the background and wait until its stack is ready. ``external_broker``:
    the services use ``settings.bootstrap`` (a cluster of the caller's) instead of their own broker.
    ``extra``: opt-in services to run too, comma-separated (``hark up --with``)."""
    parse_with(extra)  # one clear line now, not a supervisor log to read
    if not external_broker:
        broker.check_installed()  # one clear line now, not a supervisor log to read
    if not settings.schema_registry_url:
        registry.check_installed()
    private_data_dir(settings)
    d = stack_dir(settings, name)
    state = read_state(d)
    if state and state.get("status") in ("starting", "ready") and pid_alive(state["supervisor_pid"]):
        raise RuntimeError(
            f"a stack named {name!r} is already running (pid {state['supervisor_pid']}); `hark down` first"
        )
    d.mkdir(parents=True, exist_ok=True)
    (d / "stack.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hark.supervisor", "--dir", str(d), "--replicas", replicas]
    if parent_pid:
        cmd += ["--parent-pid", str(parent_pid)]
    if ephemeral:
        cmd.append("--ephemeral")
    if external_broker:
        cmd.append("--external-broker")
    if extra:
        cmd += ["--with", extra]
    env = {**os.environ, **settings.to_env()}
    with open(d / "supervisor.log", "ab") as logf:
        proc = subprocess.Popen(
            cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(d)
        if state and state["status"] == "ready":
            return state
        if proc.poll() is not None or (state and state["status"] in ("failed", "stopped")):
            detail = (state or {}).get("error") or (d / "supervisor.log").read_text()[-2000:]
            raise RuntimeError(f"the embedded stack failed to start: {detail}")
        time.sleep(0.1)
    stop(d)
    raise TimeoutError(f"the embedded stack was not ready in {timeout:.0f} s; logs in {d / 'logs'}")


def stop(directory: Path, timeout: float = 30.0) -> bool:
    state = read_state(directory)
    if not state or not pid_alive(state["supervisor_pid"]):
        return False
    os.kill(state["supervisor_pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(state["supervisor_pid"]):
        time.sleep(0.1)
    if pid_alive(state["supervisor_pid"]):
        os.kill(state["supervisor_pid"], signal.SIGKILL)
    return True


def status(directory: Path) -> dict | None:
    state = read_state(directory)
    if state is None:
        return None
    state["supervisor_alive"] = pid_alive(state["supervisor_pid"])
    jvms = [state[k] for k in ("broker", "registry") if state.get(k)]
    for svc in state.get("services", []) + jvms:
        svc["alive"] = bool(svc.get("pid")) and pid_alive(svc["pid"])
        if svc["name"] == "registry":  # it answers on its API, anonymously
            up = svc["alive"] and bool(state.get("schema_registry_url"))
            svc["health"] = "ok" if up and registry.answers(state["schema_registry_url"]) else "down"
        elif svc.get("health_port"):
            h = health(svc["health_port"]) if svc["alive"] else None
            svc["health"] = h.get("status") if h else "down"
            svc["partitions_assigned"] = h.get("partitions") if h else None
        else:
            svc["health"] = "ok" if svc["alive"] else "down"
    if state["supervisor_alive"] and state.get("status") == "ready":
        try:
            settings = client_settings(Settings.load(), state)
            state["topics"] = kafka.topic_partitions(settings)
            state["lag"] = kafka.group_lag(settings, state.get("groups") or GROUPS)
        except Exception as e:
            state["topics_error"] = str(e)
    return state


def client_settings(settings: Settings, state: dict) -> Settings:
    """``settings`` pointed at a running stack's broker and schema registry, logged in to the
    broker as the stack's owner (the credentials file beside its broker log, readable by that
    user only); the registry is read anonymously."""
    settings.bootstrap = state["bootstrap"]
    settings.schema_registry_url = state.get("schema_registry_url") or settings.schema_registry_url
    if state.get("credentials"):
        creds = security.Credentials.load(Path(state["credentials"]))
        settings.kafka_extra = {**settings.kafka_extra, **creds.client(security.ADMIN)}
    serde.configure(settings, eager=False)  # its records carry the registry's ids
    return settings


def owner_of(settings: Settings, bootstrap: str) -> Settings:
    """``settings`` for ``bootstrap``: logged in as owner when it is a stack of this data folder
    (``hark ... --bootstrap`` against a local ``hark up``), else as HARK_KAFKA_* says; with that
    stack's schema registry either way (not a credential: anyone reads it)."""
    settings.bootstrap = bootstrap
    stacks = Path(settings.data_dir) / "stacks"
    for state_file in sorted(stacks.glob("*/stack.json")) if stacks.exists() else []:
        state = read_state(state_file.parent)
        if state and state.get("bootstrap") == bootstrap:
            if "sasl.username" not in settings.kafka_extra:
                return client_settings(settings, state)
            settings.schema_registry_url = settings.schema_registry_url or state.get("schema_registry_url") or ""
    return settings
