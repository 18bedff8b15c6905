"""The supervisor process of an embedded stack (``hark.stack``): starts the broker, the schema
registry and every service, restarts what dies, writes the state file, stops everything on SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import broker, declaration, kafka, registry, security, serde
from .broker import free_port, free_ports
from .config import Settings
from .stack import health, parse_replicas, parse_with, pid_alive

# the key of the registry writer's password in the stack's credentials file (not a Kafka principal)
REGISTRY_WRITER = "schema-registry"


@dataclass
class Child:
    name: str
    replica: int
    cmd: list[str]
    env: dict
    log: Path
    health_port: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    last_start: float = 0.0

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def start(self) -> None:
        self.last_start = time.monotonic()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        logf.close()

    def info(self) -> dict:
        return {
            "name": self.name,
            "replica": self.replica,
            "pid": self.proc.pid if self.proc else None,
            "health_port": self.health_port,
            "log": str(self.log),
            "restarts": self.restarts,
        }


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        directory: Path,
        replicas: dict[str, int],
        parent_pid: int | None = None,
        ephemeral: bool = False,
        external_broker: bool = False,
        extra: tuple[str, ...] = (),
    ):
        self.settings, self.dir, self.replicas = settings, directory, replicas
        # the default services and the opt-in ones asked for, each as it declares itself
        self.extra, self.specs = extra, declaration.selected(extra)
        self.parent_pid, self.ephemeral, self.external_broker = parent_pid, ephemeral, external_broker
        self.node: broker.Node | None = None
        self.credentials: security.Credentials | None = None
        self.children: list[Child] = []
        self.broker: Child | None = None
        self.registry_node: registry.Node | None = None
        self.registry: Child | None = None
        self.timings: dict[str, float] = {}  # seconds from the supervisor's start, kept in every state write
        self.status = "starting"
        self._stopping = False

    def write_state(self, **extra) -> None:
        state = {
            "status": self.status,
            "supervisor_pid": os.getpid(),
            "bootstrap": self.settings.bootstrap,
            "data_dir": str(self.settings.data_dir),
            "archive": self.settings.archive,
            "partitions": self.settings.partitions,
            "broker_log": str(self.node.log_dir) if self.node else None,
            "credentials": str(self.credentials.path) if self.credentials else None,
            "broker": self.broker.info() if self.broker else None,
            "registry": self.registry.info() if self.registry else None,
            "schema_registry_url": self.settings.schema_registry_url or None,
            "services": [c.info() for c in self.children],
            "groups": [s.group for s in self.specs if s.group],  # whose lag `hark status` shows
            **self.timings,
            **extra,
        }
        ingest = next((c for c in self.children if c.name == "ingest"), None)
        if ingest:
            state["ingest_url"] = f"ws://127.0.0.1:{ingest.env['HARK_INGEST_PORT']}/v1/streams"
        captions = next((c for c in self.children if c.name == "captions"), None)
        if captions:
            state["captions_url"] = f"http://127.0.0.1:{captions.env['HARK_CAPTIONS_PORT']}/"
        tmp = self.dir / "stack.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.dir / "stack.json")

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        t0 = time.monotonic()
        self._start_registry()  # first: its JVM is the slower to answer, and needs no broker
        if not self.external_broker:  # else the services use settings.bootstrap's cluster
            self._start_broker()
        kafka.wait_for_broker(self.settings, timeout=90)
        kafka.ensure_topics(self.settings)
        own = [t for s in self.specs for t in s.own_topics(self.settings)]  # a service's own topics
        kafka._create(self.settings, own, lambda t: kafka.topic_config(self.settings, t), 30.0)
        if self.credentials:  # every service logs in as itself, with ACLs for its own topics only
            security.install(self.settings, self.credentials.passwords, self.extra)
        self.timings["broker_start_s"] = round(time.monotonic() - t0, 2)
        self.write_state()
        self._registry_ready(t0)
        self._start_services()
        self.write_state()

    def _start_broker(self) -> None:
        creds = security.Credentials.load(
            self.dir / "credentials.json", security.stack_principals(self.settings, self.extra)
        )
        secrets = {p: creds.passwords[p] for p in (security.ADMIN, security.CONTROLLER)}
        self.node = broker.single_node(self.dir / "kafka", partitions=self.settings.partitions, security=secrets)
        self.node.format()
        self.credentials = creds
        self.settings.bootstrap = self.node.bootstrap
        self.settings.kafka_extra = {**self.settings.kafka_extra, **creds.client(security.ADMIN)}
        self.broker = Child("broker", 0, self.node.command(), dict(os.environ), self.dir / "logs" / "broker.log", 0)
        self.broker.start()
        self.write_state()

    def _start_registry(self) -> None:
        """The stack's own schema registry, unless the operator named one (HARK_SCHEMA_REGISTRY_URL).
        Its writer's password joins the broker's in the 0600 credentials file."""
        if self.settings.schema_registry_url:
            return
        creds = security.Credentials.load(self.dir / "credentials.json", [REGISTRY_WRITER])
        self.registry_node = registry.Node(self.dir / "registry", password=creds.passwords[REGISTRY_WRITER])
        cmd = self.registry_node.command()
        self.registry = Child("registry", 0, cmd, dict(os.environ), self.dir / "logs" / "registry.log", 0)
        self.registry.start()
        self.write_state()

    def _registry_ready(self, t0: float) -> None:
        """Wait for the registry, point the services at it and register hark's schemas as its
        writer: the services only read (look ids up) and carry no credential."""
        writer = self.settings
        if self.registry_node is not None and self.registry is not None:
            self.registry_node.wait_ready(timeout=120, proc=self.registry.proc, log=self.registry.log)
            self.settings.schema_registry_url = self.registry_node.url
            writer = dataclasses.replace(self.settings, schema_registry_url=self.registry_node.writer_url)
        if self.settings.schema_registry_url:
            serde.register_schemas(writer)
            self.timings["registry_start_s"] = round(time.monotonic() - t0, 2)  # answering, schemas registered
            self.write_state()

    def _start_services(self) -> None:
        # results must not wait for a pass nobody runs
        passes = [p for p in self.settings.results_wait_for.split(",") if p.strip()]
        running = {s.pass_name for s in self.specs if s.pass_name and self.replicas.get(s.name, 1) > 0}
        self.settings.results_wait_for = ",".join(p for p in passes if p.strip() in running)
        base_env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        # each side knows the other's port: the captions page's Record button opens ingest's
        # WebSocket, and ingest admits that page's origin (and no other page's)
        # every port of the launch chosen at once, so none is handed out twice (broker.free_ports)
        children = sum(self.replicas.get(s.name, 1) for s in self.specs)
        ports = iter(free_ports(2 + 2 * children))
        base_env["HARK_INGEST_PORT"], base_env["HARK_CAPTIONS_PORT"] = str(next(ports)), str(next(ports))
        logs = self.dir / "logs"
        for spec in self.specs:
            name = spec.name
            for i in range(self.replicas.get(name, 1)):
                hp = next(ports)
                env = {**base_env, "HARK_HEALTH_PORT": str(hp), "HARK_INSTANCE_ID": f"{name}-{i}"}
                if self.credentials:
                    env.update(self.credentials.env(name))
                if name == "ingest" and i > 0:  # the page records through the first
                    env["HARK_INGEST_PORT"] = str(next(ports))
                if name == "captions" and i > 0:  # each its own port; the first is the page's
                    env["HARK_CAPTIONS_PORT"] = str(next(ports))
                child = Child(name, i, [sys.executable, "-m", spec.package], env, logs / f"{name}-{i}.log", hp)
                child.start()
                self.children.append(child)

    def ready(self) -> bool:
        """Every child answers ok, and every consumer group holds all its partitions with each of
        its replicas holding some: a first replica holds all of them until the next one joins, and
        streams placed then would pile onto it (the second's rebalance is seconds later)."""
        assigned: dict[str, list[int]] = {}
        for c in self.children:
            h = health(c.health_port)
            if not h or h.get("status") != "ok":
                return False
            assigned.setdefault(c.name, []).append(h.get("partitions", 0))
        for spec in self.specs:
            if not spec.splits or self.replicas.get(spec.name, 1) == 0:
                continue
            held, partitions = assigned.get(spec.name, [0]), self.settings.partitions
            if sum(held) < partitions or (len(held) <= partitions and min(held) == 0):
                return False
        return True

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            if self.ready():
                self.status = "ready"
                self.write_state()
                return
            time.sleep(0.2)
        raise TimeoutError("services did not become ready; see logs in " + str(self.dir / "logs"))

    def _check_children(self) -> None:
        if self.broker is not None and self.broker.exited() and not self._stopping:
            self._restart(self.broker)  # its log is durable: on the same ports it finds everything again
        if self.registry is not None and self.registry.exited() and not self._stopping:
            self._restart(self.registry)  # its H2 file keeps every id; the same port keeps its URL
        for c in self.children:
            if c.exited() and not self._stopping:
                self._restart(c)

    def _restart(self, child: Child) -> None:
        """Start a dead child again, with exponential backoff (0.5 s doubling, at most 30 s)."""
        if time.monotonic() - child.last_start >= min(30.0, 0.5 * 2 ** min(child.restarts, 6)):
            child.restarts += 1
            if child.health_port:
                # a port picked free at start can be taken since (an outgoing connection's
                # ephemeral port): a new one, so a child that died of it does not die again
                taken = {c.health_port for c in self.children} | {
                    int(c.env[k])
                    for c in self.children
                    for k in ("HARK_INGEST_PORT", "HARK_CAPTIONS_PORT")
                    if k in c.env
                }
                child.health_port = next(p for p in iter(free_port, None) if p not in taken)
                child.env["HARK_HEALTH_PORT"] = str(child.health_port)
            child.start()
            self.write_state()

    def monitor(self) -> None:
        while not self._stopping:
            if self.parent_pid and not pid_alive(self.parent_pid):
                break
            try:
                self._check_children()
            except RuntimeError as e:
                print(f"supervisor: {e}", file=sys.stderr)
                break
            time.sleep(0.5)

    def stop(self, *_args) -> None:
        self._stopping = True

    def shutdown(self) -> None:
        self._stopping = True
        self.status = "stopping"
        self.write_state()
        for c in reversed(self.children):  # results last in, first out; ingest stops taking input last
            if c.proc and c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + 15
        for c in self.children:
            if c.proc:
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
        jvms = [j.proc for j in (self.registry, self.broker) if j and j.proc and j.proc.poll() is None]
        for proc in jvms:  # after the services, which read both to the end
            proc.terminate()  # a controlled shutdown: the log and the database are clean for the next start
        deadline = time.monotonic() + 30
        for proc in jvms:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.ephemeral:
            for node in (self.node, self.registry_node):
                if node is not None:
                    shutil.rmtree(node.directory, ignore_errors=True)
        self.status = "stopped"
        self.write_state()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hark.supervisor")
    p.add_argument("--dir", required=True)
    p.add_argument("--replicas", default="")
    p.add_argument("--parent-pid", type=int)
    p.add_argument(
        "--ephemeral",
        action="store_true",
        help="delete the broker's log and the registry's database when the stack stops",
    )
    p.add_argument("--external-broker", action="store_true", help="use HARK_BOOTSTRAP's cluster, start no broker")
    p.add_argument("--with", dest="extra", default="", help="opt-in services to run too, e.g. activity")
    a = p.parse_args(argv)
    settings = Settings.load()
    sup = Supervisor(
        settings,
        Path(a.dir),
        parse_replicas(a.replicas),
        a.parent_pid,
        a.ephemeral,
        a.external_broker,
        parse_with(a.extra),
    )
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    try:
        sup.start()
        sup.wait_ready()
        sup.monitor()
    except Exception as e:
        sup.status = "failed"
        sup.write_state(error=str(e))
        print(f"supervisor: {e}", file=sys.stderr)
    finally:
        sup.shutdown()


if __name__ == "__main__":
    main()
