"""Software no one here wrote, reading a tenant's published topic: a PostgreSQL cluster in a temp
folder, a standalone Kafka Connect worker running Debezium's JDBC sink with Apicurio's
AvroConverter, and a Java consumer built from Apache Kafka's client and Apicurio's deserializer
(clients/java).

Every helper takes what a customer of hark holds (a bootstrap address, its SCRAM login, its group
prefix, the registry's URL, its topic) and nothing of hark's, so the same code runs against a test
broker with hand-made records and against a real stack with a login from ``hark clients create``.
Each start function returns a handle with ``stop()`` and is a context manager. The readers only
read the registry, anonymously.

The jars come from the Makefile's ``$(VENV)/.connect`` stamp (connect/pom.xml, clients/java):
``<venv>/connect/{worker,plugins/*,client}``; HARK_CONNECT_HOME points elsewhere.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hark import broker

from . import doc_snippets

SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"
CONNECTOR = "hark-transcripts"  # the name docs/clients.md gives it

# log4j2's properties format: its YAML needs jackson-dataformat-yaml, which the worker lacks
LOG4J2 = """\
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
logger.hibernate.name = org.hibernate
logger.hibernate.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.common.name = org.apache.kafka.common
logger.common.level = WARN
"""


class Unavailable(RuntimeError):
    """A piece this module needs is not installed: one line that says what to do."""


def connect_home() -> Path:
    return Path(os.environ.get("HARK_CONNECT_HOME") or Path(sys.prefix) / "connect")


def check_installed() -> Path:
    home = connect_home()
    needed = [home / "worker", home / "plugins" / "debezium-jdbc", home / "plugins" / "apicurio-converter"]
    needed.append(home / "client" / "hark-published-consumer-1.jar")
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise Unavailable(f"{', '.join(missing)} missing: run `make .venv/.connect` (connect/pom.xml, clients/java)")
    return home


def rss_mb(pid: int) -> float:
    """Resident memory of one process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _write_private(path: Path, text: str) -> Path:
    """Passwords live in these files: readable by their owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _properties(values: dict[str, str]) -> str:
    # a Java properties file reads "\" as an escape: double it (class names hold "$", not "\")
    return "".join(f"{k}={v.replace(chr(92), chr(92) * 2)}\n" for k, v in values.items())


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def registry_base(url: str) -> str:
    """http://host:port of a registry URL given as any of its APIs (ccompat/v7, registry/v2, ...)."""
    return re.sub(r"/apis/.*$", "", url.rstrip("/"))


@dataclass
class Login:
    """What a tenant's client is given: its SCRAM-SHA-512 user, password and group prefix."""

    username: str
    password: str
    group_prefix: str

    @classmethod
    def from_client(cls, created: dict) -> Login:
        """From what ``hark clients create`` prints (hark.clients.create)."""
        return cls(created["username"], created["password"], created["group_prefix"])

    def java(self) -> dict[str, str]:
        """Java client properties (Kafka's own names) that log in as this client."""
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.jaas.config": f'{SCRAM} required username="{self.username}" password="{self.password}";',
        }

    def librdkafka(self) -> dict[str, str]:
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": self.username,
            "sasl.password": self.password,
        }


# ---- PostgreSQL ---------------------------------------------------------------------------------


def pg_bin() -> Path:
    """Debian's PostgreSQL binaries (the newest major installed), or HARK_PG_BIN."""
    if env := os.environ.get("HARK_PG_BIN"):
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    raise Unavailable("PostgreSQL is not installed: apt-get install postgresql (or set HARK_PG_BIN)")


def _as_owner() -> tuple[list[str], int | None, int | None]:
    """initdb and postgres refuse to run as root: as root they run as the ``postgres`` user
    (setpriv execs in place, so the server's pid is the one this module signals); otherwise as
    whoever runs the tests."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("running as root and there is no `postgres` user to run PostgreSQL as") from None
    wrap = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
    return wrap, pw.pw_uid, pw.pw_gid


@dataclass
class Postgres:
    directory: Path
    port: int
    user: str
    password: str
    proc: subprocess.Popen
    start_s: float  # initdb + first answer
    initdb_s: float
    database: str = "postgres"

    @property
    def jdbc_url(self) -> str:
        return f"jdbc:postgresql://127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str) -> list[list[str]]:
        """Rows of ``sql`` through psql (tab-separated, unaligned)."""
        out = subprocess.run(
            [str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", self.database]
            + ["-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr.strip()}")
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # a fast shutdown: clients cut, no checkpoint wait
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(timeout: float = 60.0) -> Postgres:
    """A throwaway PostgreSQL cluster: initdb in a fresh temp folder, TCP on a loopback port of its
    own (no Unix socket), password login (SCRAM) for the superuser ``hark``. The folder is made in
    the system temp dir, not pytest's: pytest's tree is private to the user running the tests,
    and as root the server runs as ``postgres``, which must reach its data folder."""
    wrap, uid, gid = _as_owner()
    directory = Path(tempfile.mkdtemp(prefix="hark-pg-"))
    data = directory / "data"
    password = secrets.token_urlsafe(24)
    pwfile = _write_private(directory / "pwfile", password + "\n")
    if uid is not None and gid is not None:
        for p in (directory, pwfile):
            os.chown(p, uid, gid)
    port = broker.free_port()
    log = directory / "postgres.log"
    bindir = pg_bin()
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [*wrap, str(bindir / "initdb"), "-D", str(data), "-U", "hark", f"--pwfile={pwfile}"]
            + ["-A", "scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr[-2000:] or out.stdout[-2000:]}")
        initdb_s = time.monotonic() - t0
        conf = {
            "port": str(port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            # a test's database: losing it in a crash costs nothing
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "20",
        }
        with open(data / "postgresql.conf", "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in conf.items()))
        proc = subprocess.Popen(
            [*wrap, str(bindir / "postgres"), "-D", str(data)],
            cwd=directory,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    pg = Postgres(directory, port, "hark", password, proc, 0.0, initdb_s)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = _log_tail(log)
            pg.stop()
            raise RuntimeError(f"postgres exited with {proc.returncode}: {tail}")
        try:
            pg.query("SELECT 1")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                tail = _log_tail(log)
                pg.stop()
                raise TimeoutError(f"postgres did not answer in {timeout:.0f} s: {tail}") from None
            time.sleep(0.1)
    pg.start_s = time.monotonic() - t0
    return pg


# ---- Kafka Connect: Debezium's JDBC sink ------------------------------------------------------


@dataclass
class ConnectWorker:
    directory: Path
    rest: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    start_s: float  # process start until the sink's task runs
    table: str
    group: str
    config: dict[str, str] = field(default_factory=dict)  # the connector's, password included

    @property
    def log(self) -> Path:
        return self.directory / "connect.log"

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.rest}/connectors/{CONNECTOR}/status", timeout=10) as r:
            return json.loads(r.read())

    def check(self) -> None:
        """AssertionError with the task's trace where the connector or its task failed."""
        st = self.status()
        for part in [st["connector"], *st.get("tasks", [])]:
            if part.get("state") == "FAILED":
                raise AssertionError(f"the JDBC sink failed: {part.get('trace', '')[-4000:]}")

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> ConnectWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def jdbc_sink_config(topic: str, group: str, registry_url: str, pg: Postgres, table: str) -> dict[str, str]:
    """The connector exactly as docs/clients.md shows it (why each line is there is said there):
    COMPLETE transcripts become rows keyed by stream id, tombstones delete them."""
    config = doc_snippets.properties(
        "# connector.properties",
        topic=topic,
        group_prefix=group.removesuffix("connect-jdbc"),
        registry=registry_base(registry_url),
        jdbc_url=pg.jdbc_url,
        db_user=pg.user,
        db_password=pg.password,
        table=table,
    )
    assert config["name"] == CONNECTOR
    return {**config, "consumer.override.group.id": group}


def start_jdbc_sink(
    directory: Path,
    bootstrap: str,
    login: Login,
    registry_url: str,
    topic: str,
    pg: Postgres,
    table: str = "transcripts",
    group: str | None = None,
    heap_mb: int = 256,
    timeout: float = 120.0,
) -> ConnectWorker:
    """A standalone Connect worker that logs in as the tenant's client and runs the JDBC sink from
    ``topic`` into ``pg``'s ``table``; returns once the sink's task runs."""
    home = check_installed()
    directory.mkdir(parents=True, exist_ok=True)
    group = group or f"{login.group_prefix}connect-jdbc"
    port = broker.free_port()
    worker = {
        "bootstrap.servers": bootstrap,
        # the worker's own admin client (it asks the cluster's id) and the sink's consumer both
        # log in as the tenant's client; a sink worker produces nothing
        **login.java(),
        **{f"consumer.{k}": v for k, v in login.java().items()},
        "listeners": f"http://127.0.0.1:{port}",
        "plugin.path": str(home / "plugins"),
        # plugins found by their ServiceLoader manifests (the Makefile adds the one Apicurio's
        # converter lacks), not by scanning every class: seconds off each start
        "plugin.discovery": "service_load",
        "offset.storage.file.filename": str(directory / "offsets"),
        "offset.flush.interval.ms": "1000",
        # the sink's group id is the connector's choice (consumer.override.group.id)
        "connector.client.config.override.policy": "All",
        "key.converter": "org.apache.kafka.connect.storage.StringConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
    }
    connector = jdbc_sink_config(topic, group, registry_url, pg, table)
    _write_private(directory / "worker.properties", _properties(worker))
    _write_private(directory / "connector.properties", _properties(connector))
    (directory / "log4j2.properties").write_text(LOG4J2)
    log = directory / "connect.log"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            broker.java_binary(),
            f"-Xmx{heap_mb}m",
            "-XX:+UseSerialGC",  # one small heap, one connector: no GC threads per core
            "-XX:TieredStopAtLevel=1",  # a test's short life: C1 alone starts sooner
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={directory / 'log4j2.properties'}",
            "-cp",
            f"{home / 'worker'}/*",
            "org.apache.kafka.connect.cli.ConnectStandalone",
            str(directory / "worker.properties"),
            str(directory / "connector.properties"),
        ],
        cwd=directory,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    w = ConnectWorker(directory, f"http://127.0.0.1:{port}", proc, 0.0, table, group, connector)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Connect worker exited with {proc.returncode}: {_log_tail(log)}")
            try:
                st = w.status()
                w.check()
                if [t["state"] for t in st.get("tasks", [])] == ["RUNNING"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the JDBC sink's task did not run in {timeout:.0f} s: {_log_tail(log)}")
            time.sleep(0.25)
    except BaseException:
        w.stop()
        raise
    w.start_s = time.monotonic() - t0
    return w


@contextmanager
def postgres_sink(
    directory: Path, bootstrap: str, login: Login, registry_url: str, topic: str, table: str = "transcripts"
) -> Iterator[tuple[Postgres, ConnectWorker]]:
    """A fresh PostgreSQL and a Connect worker sinking ``topic`` into its ``table``; both stopped
    (and the cluster's folder removed) on the way out. ``registry_url`` may name any of the
    registry's APIs (the Confluent one, as hark's settings hold it, is fine)."""
    with start_postgres() as pg, start_jdbc_sink(directory, bootstrap, login, registry_url, topic, pg, table) as w:
        yield pg, w


def wait_rows(pg: Postgres, sql: str, until, timeout: float = 60.0, worker: ConnectWorker | None = None) -> list:
    """``sql``'s rows once ``until(rows)`` holds (the table may not exist yet: no rows)."""
    deadline = time.monotonic() + timeout
    rows: list = []
    while True:
        if worker is not None:
            worker.check()
        try:
            rows = pg.query(sql)
        except RuntimeError as e:
            if "does not exist" not in str(e):
                raise
            rows = []
        if until(rows):
            return rows
        if time.monotonic() > deadline:
            tail = _log_tail(worker.log) if worker else ""
            raise AssertionError(f"timed out on {sql!r}: last rows {rows}\n{tail}")
        time.sleep(0.25)


# ---- the Java consumer (clients/java) ---------------------------------------------------------


def java_consume(
    bootstrap: str,
    login: Login,
    registry_url: str,
    topic: str,
    max_records: int,
    timeout: float = 60.0,
    group: str | None = None,
    directory: Path | None = None,
) -> list[dict]:
    """Run clients/java's PublishedConsumer until it has printed ``max_records`` records; its JSON
    lines. Its properties (the password among them) go through a 0600 file, not argv."""
    home = check_installed()
    props = doc_snippets.properties(  # as docs/clients.md shows it
        "# consumer.properties",
        bootstrap=bootstrap,
        username=login.username,
        password=login.password,
        group_prefix=login.group_prefix,
        registry=registry_base(registry_url),
    )
    # a group of its own each run by default (the program commits what it printed)
    props["group.id"] = group or f"{props['group.id']}-{secrets.token_hex(4)}"
    out = _run_client(
        home, "PublishedConsumer", props, [topic, str(max_records), str(int(timeout))], timeout + 60, directory
    )
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0:
        raise AssertionError(
            f"the Java consumer exited {out.returncode} with {len(lines)} records: {out.stderr[-3000:]}"
        )
    return lines


def java_produce(
    bootstrap: str,
    login: Login,
    registry_url: str,
    topic: str,
    wav: Path,
    stream_id: str,
    timeout: float = 120.0,
    directory: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run clients/java's AudioProducer: ``wav`` published as stream ``stream_id`` on ``topic``.
    Its properties, as docs/clients.md shows them, go through a 0600 file, not argv. The finished
    process: the caller checks returncode (non-zero, with the error on stderr, if a send failed)."""
    home = check_installed()
    props = doc_snippets.properties(
        "# producer.properties",
        bootstrap=bootstrap,
        username=login.username,
        password=login.password,
        registry=registry_base(registry_url),
    )
    return _run_client(home, "AudioProducer", props, [topic, str(wav), stream_id], timeout, directory)


def _run_client(
    home: Path, main: str, props: dict[str, str], args: list[str], timeout: float, directory: Path | None
) -> subprocess.CompletedProcess:
    """One of clients/java's programs, its properties (the password among them) in a 0600 file."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        config = _write_private(Path(tmp) / "client.properties", _properties(props))
        client = home / "client"
        cp = f"{client / 'hark-published-consumer-1.jar'}:{client / 'lib'}/*"
        return subprocess.run(
            [broker.java_binary(), "-XX:TieredStopAtLevel=1", "-cp", cp, f"dev.hark.client.{main}", str(config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
