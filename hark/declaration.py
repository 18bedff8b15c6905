"""What each service is, declared once beside its code: a ``ServiceSpec``.

A service's package holds a light ``spec.py`` (no models, no Kafka client) with ``SPEC =
ServiceSpec(...)``, and one line of ``pyproject.toml`` registers it::

    [project.entry-points."hark.services"]
    activity = "services.activity.spec:SPEC"

Everything that used to list the services by hand derives from these: the embedded stack's
processes and consumer groups (hark/stack.py, hark/supervisor.py), each service's principal and
its ACLs (hark/security.py), the passes the results merger waits for and HARK_RESULTS_WAIT_FOR's
choices. The library finds the specs through the ``hark.services`` entry points (the standard
plugin mechanism, as pytest's and flake8's), so it never imports a service's code: a string
module path in hark/ would be the same import, hidden.

Topics are named by reference: a ``Settings`` attribute (``"audio_topic"``: it follows
HARK_TOPIC_PREFIX; a method such as ``"published_topic"`` means every tenant's topic of that
kind, the prefix a tenant name completes), or any other word for a topic of the service's own,
``<HARK_TOPIC_PREFIX><word>``, which the stack creates beside hark's (``own_topics``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

ENTRY_POINTS = "hark.services"


class Settings(Protocol):
    """hark.config.Settings as seen here (hark.config asks this module for the passes: an import
    of it would be a cycle)."""

    def topic(self, name: str) -> str: ...


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # the service's name: its principal, its log files, `hark service NAME`, its compose service
    main: str  # the module whose main(argv) runs it (the supervisor runs its package: python -m)
    group: str | None = None  # its consumer group; None: it reads without one (or reads nothing)
    reads: tuple[str, ...] = ()  # topic references (see the module's doc) it consumes
    writes: tuple[str, ...] = ()  # ... and produces to
    produces: tuple[str, ...] = ()  # the record types (schemas/hark.<Type>.avsc) it writes
    transactional: str | None = None  # its transactional id prefix (ids are <prefix><instance>)
    pass_name: str | None = None  # its output is a pass the results merger waits for (HARK_RESULTS_WAIT_FOR)
    splits: str | None = None  # the topic whose partitions its replicas split (its group's assignment)
    min_replicas: int = 1  # 0: the stack runs without it (`hark up --replicas NAME=0`)
    default: bool = True  # False: opt-in, run only when asked (`hark up --with NAME`), not in compose
    # where it starts among the services, lower first (they stop in the reverse order; a tie goes
    # by name): ingest 0, the audio topic's consumers 10-30, results 40, captions 50
    start: int = 35
    # what else its principal may do, beside reading ``reads`` in ``group`` and writing ``writes``
    groups: tuple[str, ...] = ()  # further consumer group name prefixes it joins
    watches: tuple[str, ...] = ()  # consumer groups whose members and assignment it may describe
    read_prefixes: tuple[str, ...] = ()  # topic references read by prefix (every tenant's)
    write_prefixes: tuple[str, ...] = ()
    # the HARK_* settings a deployment (docker-compose.yml) must set for it, beside the shared ones
    deploy_env: tuple[str, ...] = ()

    @property
    def package(self) -> str:
        """What ``python -m`` runs: the package of ``main`` (its ``__main__`` calls main)."""
        return self.main.rsplit(".", 1)[0]

    @property
    def consumer_group(self) -> str:
        """Its consumer group, for a service that runs in one (the runtime's ``group``)."""
        if not self.group:
            raise ValueError(f"{self.name} declares no consumer group")
        return self.group

    @property
    def all_groups(self) -> tuple[str, ...]:
        return ((self.group,) if self.group else ()) + self.groups

    def own_topics(self, s: Settings) -> list[str]:
        """The topics of its own (references that are no Settings attribute), by name."""
        return [topic(s, ref) for ref in self.reads + self.writes if not hasattr(s, ref)]


def topic(s: Settings, ref: str) -> str:
    """A topic reference's name under ``s``: a Settings attribute, or a word under the prefix."""
    value = getattr(s, ref, None)
    if value is None:
        return s.topic(ref)
    return value("") if callable(value) else str(value)


@functools.cache
def specs() -> tuple[ServiceSpec, ...]:
    """Every registered service, in start order (entry points come in no order of their own)."""
    found: dict[str, ServiceSpec] = {}
    for ep in entry_points(group=ENTRY_POINTS):
        spec = ep.load()
        if not isinstance(spec, ServiceSpec) or spec.name != ep.name:
            raise RuntimeError(f"entry point {ep.name} = {ep.value} is not the ServiceSpec of a service {ep.name!r}")
        found.setdefault(spec.name, spec)  # a second copy of the distribution (a stale egg-info) adds nothing
    if not found:
        raise RuntimeError(
            f"no hark services are registered (entry points {ENTRY_POINTS!r}): install hark (pip install --no-deps -e .)"
        )
    return tuple(sorted(found.values(), key=lambda s: (s.start, s.name)))


def by_name() -> dict[str, ServiceSpec]:
    return {s.name: s for s in specs()}


def defaults() -> tuple[ServiceSpec, ...]:
    """The services a stack runs unless told otherwise (and docker-compose.yml deploys)."""
    return tuple(s for s in specs() if s.default)


def selected(extra: list[str] | tuple[str, ...] = ()) -> tuple[ServiceSpec, ...]:
    """The default services and the opt-in ones named in ``extra``, in registration order."""
    known = by_name()
    unknown = [n for n in extra if n not in known]
    if unknown:
        raise ValueError(f"no service {', '.join(map(repr, unknown))} (services: {', '.join(known)})")
    return tuple(s for s in specs() if s.default or s.name in extra)


def passes() -> tuple[str, ...]:
    """The passes a stream's results wait for, by name (the results merger's and HARK_RESULTS_WAIT_FOR's)."""
    return tuple(s.pass_name for s in specs() if s.pass_name)
