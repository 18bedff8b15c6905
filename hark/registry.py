"""The embedded schema registry: Apicurio Registry (a Quarkus app) serving the Confluent API.

``make setup`` runs ``python -m hark.registry install``: Maven fetches the runnable build (a
tarball of ``quarkus-run.jar`` + ``lib/``), which is checked against the SHA-1 beside it and
unpacked into ``<venv>/apicurio``. It needs Java 21 or newer, which may not be the ``java`` the
broker runs on (17 is enough there): ``find_java`` looks for one.

A ``Node`` is one registry on loopback with its schemas in an H2 file database in its own folder,
so ids survive a restart. Anyone may read (the services and every Confluent client resolve ids
anonymously); only the ``hark`` user, whose password lives in the stack's 0600 credentials file,
may register schemas, change compatibility or delete: Quarkus' embedded users and HTTP basic
auth, with Apicurio's role checks, and no identity server.

This module imports the standard library only: setup runs it before pip has installed anything.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VERSION = "3.3.3"  # docker-compose.yml runs the same image
ARTIFACT = f"io.apicurio:apicurio-registry-app:{VERSION}:tar.gz:all"
JAVA_MAJOR = 21
WRITER = "hark"  # the one user that may change the registry (role sr-admin)
API = "/apis/ccompat/v7"


class RegistryUnavailable(RuntimeError):
    """Java 21+ or the registry's build is missing: one line that says what to do."""


def home() -> Path:
    """Where setup unpacks the build: inside the virtual environment, or HARK_REGISTRY_HOME."""
    return Path(os.environ.get("HARK_REGISTRY_HOME") or Path(sys.prefix) / "apicurio")


def tarball() -> Path:
    repo = Path(os.environ.get("HARK_M2_REPOSITORY") or Path.home() / ".m2" / "repository")
    return repo / "io/apicurio/apicurio-registry-app" / VERSION / f"apicurio-registry-app-{VERSION}-all.tar.gz"


# ---- Java ----------------------------------------------------------------------------------------
def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports (8 for "1.8.0_x"), None when it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _candidates() -> list[str]:
    if os.environ.get("HARK_REGISTRY_JAVA"):  # the operator's choice is the only one looked at
        return [os.environ["HARK_REGISTRY_JAVA"]]
    out = []
    if os.environ.get("JAVA_HOME"):
        out.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if on_path := shutil.which("java"):
        out.append(on_path)
    out += sorted(glob.glob("/usr/lib/jvm/*/bin/java"), reverse=True)  # newest names first
    return list(dict.fromkeys(out))


def find_java(min_major: int = JAVA_MAJOR) -> str:
    """A java binary of ``min_major`` or newer: HARK_REGISTRY_JAVA, else JAVA_HOME, ``java`` on
    PATH, then every /usr/lib/jvm/*/bin/java."""
    seen = []
    for java in _candidates():
        major = java_major(java) if os.access(java, os.X_OK) else None
        if major is not None and major >= min_major:
            return java
        seen.append(f"{java} ({major or 'not runnable'})")
    looked = ", ".join(seen) or "HARK_REGISTRY_JAVA, JAVA_HOME, PATH and /usr/lib/jvm (none found)"
    raise RegistryUnavailable(
        f"the schema registry (Apicurio {VERSION}) needs Java {min_major}+; looked at {looked}: "
        f"install a JDK {min_major}+ (e.g. Temurin {min_major}) or set HARK_REGISTRY_JAVA to its bin/java"
    )


# ---- install -------------------------------------------------------------------------------------
def check_installed() -> Path:
    """The unpacked build's folder, or one line that says to run setup."""
    if not (home() / "quarkus-run.jar").exists():
        raise RegistryUnavailable(
            f"Apicurio Registry {VERSION} is not in {home()}: run `make setup` (python -m hark.registry install)"
        )
    find_java()
    return home()


def fetch() -> Path:
    """The tarball in the local Maven repository, fetched when absent and checked against its .sha1."""
    tar = tarball()
    if not tar.exists():
        # transitive resolution would visit repositories the build never needs (and fail offline)
        cmd = ["mvn", "-q", "-B", "dependency:get", f"-Dartifact={ARTIFACT}", "-Dtransitive=false"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise RegistryUnavailable(
                f"hark fetches the schema registry with Maven (apt-get install maven): {e}"
            ) from None
        if out.returncode != 0 or not tar.exists():
            detail = " ".join((out.stdout + out.stderr).split())[-500:]  # one line
            raise RegistryUnavailable(f"`{' '.join(cmd)}` failed: {detail}")
    want = Path(f"{tar}.sha1").read_text().split()[0].lower()
    with open(tar, "rb") as f:
        got = hashlib.file_digest(f, "sha1").hexdigest()
    if got != want:
        raise RegistryUnavailable(f"{tar} does not match its SHA-1 {want}: delete it and run `make setup` again")
    return tar


def install() -> Path:
    """Unpack the checked tarball into ``home()``; a no-op when that tarball is already there."""
    find_java()  # before 158 MB of download: without Java 21 the build is of no use
    tar = fetch()
    target, stamp = home(), home() / ".sha1"
    digest = Path(f"{tar}.sha1").read_text().split()[0].lower()
    if (target / "quarkus-run.jar").exists() and stamp.exists() and stamp.read_text() == digest:
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tar) as t:
        t.extractall(staging, filter="data")
    (staging / ".sha1").write_text(digest)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


# ---- one registry --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One registry on loopback, its database and configuration in ``directory``. ``password``:
    the writer's (anonymous clients read only); None: anyone may write."""

    directory: Path
    port: int = 0
    password: str | None = None
    heap_mb: int = 256

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def writer_url(self) -> str:
        """``url`` with the writer's credentials in it, as Confluent's client takes them."""
        if self.password is None:
            return self.url
        return f"http://{WRITER}:{urllib.parse.quote(self.password, safe='')}@127.0.0.1:{self.port}{API}"

    def properties(self) -> dict[str, str]:
        d = self.directory
        props = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": str(self.port),
            # health and metrics answer on a port of their own; port 0: any free one, on loopback
            "quarkus.management.host": "127.0.0.1",
            "quarkus.management.port": "0",
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "h2",
            "apicurio.datasource.url": f"jdbc:h2:file:{d / 'db' / 'registry'}",
            # a handful of schemas and one writer: Apicurio's default pool of 20 is idle memory
            "apicurio.datasource.jdbc.initial-size": "2",
            "apicurio.datasource.jdbc.min-size": "2",
            "apicurio.datasource.jdbc.max-size": "20",
            "apicurio.storage.snapshot.location": str(d / "tmp"),
            "apicurio.import.work-dir": str(d / "tmp"),
            # startup and problems only: no banner, no line per request
            "quarkus.banner.enabled": "false",
            "quarkus.http.access-log.enabled": "false",
            'quarkus.log.category."io.apicurio".level': "WARN",
            # warnings about Apicurio's own packaged configuration, which no setting here can fix
            'quarkus.log.category."io.quarkus.config".level': "ERROR",
            'quarkus.log.category."io.quarkus.runtime.configuration".level': "ERROR",
        }
        if self.password is not None:
            props.update(
                {
                    # Apicurio reads this to put basic auth in its chain (Quarkus warns it is
                    # build-time; the chain is built at run time and logs "basic")
                    "quarkus.http.auth.basic": "true",
                    "quarkus.security.users.embedded.enabled": "true",
                    "quarkus.security.users.embedded.plain-text": "true",
                    f"quarkus.security.users.embedded.users.{WRITER}": self.password,
                    f"quarkus.security.users.embedded.roles.{WRITER}": "sr-admin",
                    "apicurio.auth.role-based-authorization": "true",
                    "apicurio.auth.anonymous-read-access.enabled": "true",
                }
            )
        return props

    def write_config(self) -> Path:
        """The properties file (0600: it holds the writer's password) in a 0700 folder."""
        for sub in (self.directory, self.directory / "db", self.directory / "tmp"):
            sub.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / "registry.properties"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in self.properties().items())
        return path

    def command(self) -> list[str]:
        config = self.write_config()
        # Vert.x makes its file cache 0766 whatever the umask, but keeps a folder it finds
        cache = self.directory / "tmp" / "vertx-cache"
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        cache.chmod(0o700)
        return [
            find_java(),
            f"-Xmx{self.heap_mb}m",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={self.directory / 'tmp'}",  # Vert.x's file cache stays in the stack
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            f"-Dquarkus.config.locations={config}",  # the password stays out of `ps`
            "-jar",
            str(check_installed() / "quarkus-run.jar"),
        ]

    def spawn(self, log: Path) -> subprocess.Popen:
        """Start it outside a supervisor (tests, benchmarks), its output appended to ``log``."""
        with open(log, "ab") as f:
            return subprocess.Popen(self.command(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 90.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> float:
        """Seconds until the Confluent API answers; raises when ``proc`` exits or time runs out."""
        t0 = time.monotonic()
        where = f"; its log: {log}" if log else ""
        while time.monotonic() - t0 < timeout:
            if answers(self.url):
                return time.monotonic() - t0
            if proc is not None and proc.poll() is not None:
                raise RegistryUnavailable(f"the schema registry exited ({proc.returncode}){where}")
            time.sleep(0.1)
        raise TimeoutError(f"the schema registry did not answer on {self.url} in {timeout:.0f} s{where}")


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the Confluent API at ``url`` lists its subjects (anonymously)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/subjects", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def register() -> int:
    """Register hark's schemas in HARK_SCHEMA_REGISTRY_URL's registry (docker-compose's one-shot
    setup; the URL carries the writer's credentials: http://hark:PASSWORD@host:port/apis/ccompat/v7)."""
    from . import serde
    from .config import Settings

    settings = Settings.load()
    if not settings.schema_registry_url:
        print("hark: HARK_SCHEMA_REGISTRY_URL is not set: no registry to register hark's schemas in", file=sys.stderr)
        return 1
    print(f"hark: {len(serde.register_schemas(settings))} schemas registered")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["register"]:
        return register()
    if args != ["install"]:
        print("usage: python -m hark.registry install|register", file=sys.stderr)
        return 2
    try:
        target = install()
        print(f"hark: schema registry Apicurio {VERSION} in {target}, on {find_java()}")
    except RegistryUnavailable as e:
        print(f"hark: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
