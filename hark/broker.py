"""The embedded Apache Kafka broker: a KRaft node (broker and controller in one JVM) on loopback.

``make setup`` copies the pinned Kafka jars (``broker/pom.xml``) into ``<venv>/kafka/libs`` with
Maven, which checks their checksums. This module formats a node's log directory once and
builds the ``java ... kafka.Kafka server.properties`` command; ``hark.stack`` runs it under its
supervisor, and the tests start one node or a three-node cluster with the same code.

A node's ports are chosen at its first start and kept in ``node.json`` beside its log, so a
restarted node (the supervisor restarts a dead broker) comes back where its clients and the
other voters of its quorum look for it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

KAFKA_VERSION = "4.1.1"  # broker/pom.xml pins the same; docker-compose.yml runs the same image
ROOT = Path(__file__).resolve().parent.parent

# The largest record hark writes (a 30 s PCM window, a Result with a long transcript) and the
# largest offset metadata it commits (the resume states of a partition's open streams, runtime.py).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_OFFSET_METADATA_BYTES = 1024 * 1024

LOG4J2 = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


class BrokerUnavailable(RuntimeError):
    """Java or the Kafka jars are missing: one line that says what to do."""


def libs_dir() -> Path:
    """Where ``make setup`` puts the jars: inside the virtual environment, or HARK_KAFKA_LIBS."""
    return Path(os.environ.get("HARK_KAFKA_LIBS") or Path(sys.prefix) / "kafka" / "libs")


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerUnavailable(
            "the embedded Kafka broker needs Java 17 or newer: install a JDK "
            "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    return java


def class_archive() -> Path:
    """The JVM's class-data archive of the Kafka classes (``make setup`` writes it; CDS). It lives
    beside the jars, so a new jar set (setup removes the folder) never meets a stale archive."""
    return libs_dir() / "kafka-classes.jsa"


def check_installed() -> Path:
    libs = libs_dir()
    if not any(libs.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        raise BrokerUnavailable(
            f"the Kafka {KAFKA_VERSION} jars are not in {libs}: run `make setup` "
            "(mvn -f broker/pom.xml dependency:copy-dependencies)"
        )
    java_binary()
    return libs


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. The sockets stay bound until all are chosen: one at a
    time, the OS handed the same port out twice (a broker's client and controller listeners on
    one port, refused by Kafka's format)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class Node:
    """One KRaft node of a cluster (``voters`` lists every controller as id@host:port)."""

    directory: Path
    node_id: int
    port: int
    controller_port: int
    voters: str
    cluster_id: str
    partitions: int = 8
    replication_factor: int = 1
    heap_mb: int = 512
    extra: dict | None = None  # more server.properties (tests)
    # {"admin": password, "controller": password}: SASL on both listeners, ACLs enforced
    # (hark/security.py); None: PLAINTEXT, everything allowed (a test cluster's choice)
    security: dict[str, str] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    def properties(self) -> dict[str, str]:
        rf = self.replication_factor
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            # topics are created by hark with explicit configs (kafka.ensure_topics)
            "auto.create.topics.enable": "false",
            "num.partitions": str(self.partitions),
            "default.replication.factor": str(rf),
            "min.insync.replicas": str(min(2, rf)),
            "offsets.topic.replication.factor": str(rf),
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": str(min(2, rf)),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.num.partitions": "8",
            # a single-developer broker: a group forms as soon as its first member asks
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(MAX_MESSAGE_BYTES + 65536),
            "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES + 65536),
            "offset.metadata.max.bytes": str(MAX_OFFSET_METADATA_BYTES),
            # unclean leader election would lose acknowledged records after a leader's death
            "unclean.leader.election.enable": "false",
        }
        if self.security:
            props.update(self._security_properties(self.security))
        props.update(self.extra or {})
        return props

    def _security_properties(self, secrets: dict[str, str]) -> dict[str, str]:
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        ctl = secrets["controller"]
        return {
            "listeners": f"CLIENT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"CLIENT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name": "CLIENT",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.client.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.client.scram-sha-512.sasl.jaas.config": (
                f'{scram} required username="admin" password="{secrets["admin"]}";'
            ),
            # KRaft controllers cannot check SCRAM (its credentials are in the metadata they
            # serve): PLAIN, with the one user every node of the quorum logs in as
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                f'{plain} required username="controller" password="{ctl}" user_controller="{ctl}";'
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:admin;User:controller",
            "allow.everyone.if.no.acl.found": "false",
        }

    def write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # the log holds every tenant's audio and transcripts
        path = self.directory / "server.properties"
        _write_private(path, "".join(f"{k}={v}\n" for k, v in self.properties().items()))
        (self.directory / "log4j2.yaml").write_text(LOG4J2)
        _write_private(
            self.directory / "node.json",
            json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=1),
        )
        return path

    def java(self, main: str, *args: str) -> list[str]:
        libs = check_installed()
        return [
            java_binary(),
            # the classes parsed once at setup, mapped by every start (bench.broker). The JIT stays
            # tiered: C1 alone halved a fresh broker's CPU but doubled a long-lived one's (24% of a
            # core against 11-17% at 6 soak streams), and the stack lives for hours.
            *([f"-XX:SharedArchiveFile={archive}"] if (archive := class_archive()).exists() else []),
            # the whole heap committed and touched at start, as Kafka's own scripts size it (-Xms =
            # -Xmx): a long-lived broker's RSS is then its ceiling from the first minute, not a slow
            # climb toward it that looks like a leak (493 -> 704 MB over make soak's hour)
            f"-Xms{self.heap_mb}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+AlwaysPreTouch",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.directory / 'log4j2.yaml'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def format(self) -> None:
        """Write the node's config and, on first use of its log directory, format it."""
        config = self.write_config()
        if (self.log_dir / "meta.properties").exists():
            return
        # "--cluster-id=ID": a base64 id may begin with "-", which would read as an option
        out = subprocess.run(
            self.java(
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={self.cluster_id}",
                f"--config={config}",
                "--ignore-formatted",
                # the super user exists before the broker first starts: it creates everyone else
                *(
                    ["--add-scram", f"SCRAM-SHA-512=[name=admin,password={self.security['admin']}]"]
                    if self.security
                    else []
                ),
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"formatting the Kafka log in {self.log_dir} failed: {out.stderr[-2000:] or out.stdout}")

    def command(self) -> list[str]:
        return self.java("kafka.Kafka", str(self.directory / "server.properties"))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def load_node(directory: Path) -> Node | None:
    try:
        raw = json.loads((directory / "node.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    raw["directory"] = Path(raw["directory"])
    return Node(**raw)


def single_node(
    directory: Path,
    partitions: int = 8,
    heap_mb: int = 512,
    extra: dict | None = None,
    security: dict[str, str] | None = None,
) -> Node:
    """The embedded broker of ``directory``: the one formatted there before (same cluster, same ports
    where they are still free), or a new one. A log formatted without the security asked for now
    (one from before hark secured its broker) is moved aside, not opened to everyone."""
    node = load_node(directory)
    if node is not None and (node.log_dir / "meta.properties").exists() and node.security != security:
        aside = directory.with_name(f"{directory.name}.before-security-{int(time.time())}")
        directory.rename(aside)
        print(
            f"hark: the broker log in {directory} was made without broker security; moved to {aside}", file=sys.stderr
        )
        node = None
    if node is not None and (node.log_dir / "meta.properties").exists():
        if not (port_free(node.port) and port_free(node.controller_port)):
            node.port, node.controller_port = free_ports(2)  # static voters: a new port is fine
            node.voters = f"{node.node_id}@127.0.0.1:{node.controller_port}"
        node.partitions, node.heap_mb, node.extra = partitions, heap_mb, extra
        return node
    port, cport = free_ports(2)
    return Node(
        directory, 1, port, cport, f"1@127.0.0.1:{cport}", new_cluster_id(), partitions, 1, heap_mb, extra, security
    )


def cluster(
    directory: Path,
    size: int = 3,
    partitions: int = 8,
    heap_mb: int = 384,
    extra: dict | None = None,
    security: dict[str, str] | None = None,
) -> list[Node]:
    """``size`` nodes, each broker and controller, replication factor min(3, size)."""
    flat = free_ports(2 * size)
    ports = list(zip(flat[::2], flat[1::2]))
    voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
    cid = new_cluster_id()
    return [
        Node(directory / f"node{i + 1}", i + 1, p, c, voters, cid, partitions, min(3, size), heap_mb, extra, security)
        for i, (p, c) in enumerate(ports)
    ]


def write_class_archive(timeout: float = 120.0) -> Path:
    """Start a throwaway node until it serves, and let its JVM write the classes it loaded to
    ``class_archive()`` as it exits (``-XX:ArchiveClassesAtExit``, Java 13+)."""
    import tempfile

    target = class_archive()
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        secrets = {"admin": uuid.uuid4().hex, "controller": uuid.uuid4().hex}  # as the embedded node runs
        node = single_node(Path(tmp) / "node", partitions=1, security=secrets)
        node.format()
        cmd = node.command()
        cmd.insert(1, f"-XX:ArchiveClassesAtExit={target}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "Kafka Server started" in line or time.monotonic() > deadline:
                    break
        finally:
            proc.terminate()  # a normal exit: the JVM writes the archive on the way out
            proc.communicate(timeout=60)
    if not target.exists():
        raise BrokerUnavailable(f"the JVM wrote no class archive to {target}; the broker starts without one")
    return target


if __name__ == "__main__":  # make setup: python -m hark.broker archive
    if sys.argv[1:] != ["archive"]:
        sys.exit("usage: python -m hark.broker archive")
    print(f"hark: Kafka class archive {write_class_archive()}")
