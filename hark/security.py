"""Who may do what on the embedded broker: one SCRAM principal per service, ACLs for exactly the
topics it reads and writes, and nothing for anyone else.

The broker's client listener takes SASL/SCRAM-SHA-512 only; its controller listener takes SASL
PLAIN for the ``controller`` principal only (KRaft controllers cannot use SCRAM, whose
credentials live in the metadata they serve). ``admin`` is the super user of the stack's owner:
the supervisor (it creates topics, principals and ACLs), the ``hark`` CLI and the tests on that
machine. The credentials are generated at a stack's first start into a 0600 file beside its
broker log: the same Unix user that can read them can read the log files themselves, so the
file adds no reader; every other local user and process meets a listener that refuses it.
Clients of the product (WebSocket publishers, people on the captions page) never get broker
credentials: ingest and captions speak to Kafka for them. A tenant's own Kafka consumers and
producers get a login of their own from ``hark clients`` (hark/clients.py), held to that
tenant's two topics.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import declaration
from .config import Settings

MECHANISM = "SCRAM-SHA-512"
ITERATIONS = 8192
ADMIN = "admin"
CONTROLLER = "controller"
# ingest's consumer group on the tenants' produce topics (services/ingest/spec.py declares it)
INGEST_IN_GROUP = "hark-ingest-in"


@dataclass(frozen=True)
class Grant:
    """What one service's principal may do."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # consumer group name prefixes it may join and commit in
    transactional: str | None = None  # transactional id prefix (its group: ids are group-instance)
    watches: tuple[str, ...] = ()  # consumer groups whose members and assignment it may describe
    # topic name prefixes: every tenant's topic of one kind, including tenants not yet seen
    read_prefixes: tuple[str, ...] = ()
    write_prefixes: tuple[str, ...] = ()
    create_prefixes: tuple[str, ...] = ()  # it may create such topics (no service does today)


def grants(s: Settings, extra: tuple[str, ...] = ()) -> dict[str, Grant]:
    """Every service principal of the stack and its grant, from the services' declarations
    (hark/declaration.py): the default services, and the opt-in ones named in ``extra``. The
    topic names come from settings."""
    return {spec.name: grant(s, spec) for spec in declaration.selected(extra)}


def grant(s: Settings, spec: declaration.ServiceSpec) -> Grant:
    """What a service's declaration asks of the broker: read its topics in its groups, write its
    topics in its transactions, and the extras it names (prefixes, watched groups)."""
    return Grant(
        reads=tuple(declaration.topic(s, t) for t in spec.reads),
        writes=tuple(declaration.topic(s, t) for t in spec.writes),
        groups=spec.all_groups,
        transactional=spec.transactional,
        watches=spec.watches,
        read_prefixes=tuple(declaration.topic(s, t) for t in spec.read_prefixes),
        write_prefixes=tuple(declaration.topic(s, t) for t in spec.write_prefixes),
    )


def acl_bindings(s: Settings, extra: tuple[str, ...] = ()) -> list:
    """The ACLs that give each principal its grant, and no more (the authorizer denies the rest)."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    def allow(kind, name, pattern, principal, op):
        return AclBinding(kind, name, pattern, f"User:{principal}", "*", op, AclPermissionType.ALLOW)

    out = []
    lit, pre = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    for principal, g in grants(s, extra).items():
        out += [allow(ResourceType.TOPIC, t, lit, principal, AclOperation.READ) for t in g.reads]
        out += [allow(ResourceType.TOPIC, t, lit, principal, AclOperation.WRITE) for t in g.writes]
        # READ and WRITE imply DESCRIBE (the authorizer's IMPLIES_DESCRIBE), so no ACL says it
        out += [allow(ResourceType.TOPIC, t, pre, principal, AclOperation.READ) for t in g.read_prefixes]
        out += [allow(ResourceType.TOPIC, t, pre, principal, AclOperation.WRITE) for t in g.write_prefixes]
        out += [allow(ResourceType.TOPIC, t, pre, principal, AclOperation.CREATE) for t in g.create_prefixes]
        out += [allow(ResourceType.GROUP, grp, pre, principal, AclOperation.READ) for grp in g.groups]
        out += [allow(ResourceType.GROUP, grp, lit, principal, AclOperation.DESCRIBE) for grp in g.watches]
        if g.transactional:
            out.append(allow(ResourceType.TRANSACTIONAL_ID, g.transactional, pre, principal, AclOperation.WRITE))
    return out


def write_private(path: Path, data: object) -> None:
    """``data`` as JSON in a file only its owner may read, replaced whole (never half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


@dataclass
class Credentials:
    """Principal -> password, in a 0600 JSON file; missing principals are added on load."""

    path: Path
    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, principals: list[str] | None = None) -> Credentials:
        creds = cls(path, json.loads(path.read_text()) if path.exists() else {})
        missing = [p for p in principals or [] if p not in creds.passwords]
        if missing:
            creds.passwords.update({p: secrets.token_urlsafe(32) for p in missing})
            creds.save()
        return creds

    def save(self) -> None:
        write_private(self.path, self.passwords)

    def client(self, principal: str) -> dict[str, str]:
        """librdkafka properties that log in as ``principal`` (Settings.kafka_extra)."""
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": MECHANISM,
            "sasl.username": principal,
            "sasl.password": self.passwords[principal],
        }

    def env(self, principal: str) -> dict[str, str]:
        """The same as HARK_KAFKA_* variables, for a child process."""
        return {"HARK_KAFKA_" + k.upper().replace(".", "_"): v for k, v in self.client(principal).items()}


def stack_principals(s: Settings, extra: tuple[str, ...] = ()) -> list[str]:
    return [ADMIN, CONTROLLER, *grants(s, extra)]


def install(admin_settings: Settings, passwords: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    """Create (or update) every service principal's SCRAM credential and its ACLs, as admin
    (the default services', and those of the opt-in ones named in ``extra``)."""
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    from . import kafka

    adm = kafka.admin(admin_settings)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, ITERATIONS)
    principals = grants(admin_settings, extra)
    upserts: list = [UserScramCredentialUpsertion(p, info, passwords[p].encode()) for p in principals]
    for fut in adm.alter_user_scram_credentials(upserts, request_timeout=30).values():
        fut.result()
    for fut in adm.create_acls(acl_bindings(admin_settings, extra), request_timeout=30).values():
        fut.result()


def main() -> None:
    """``python -m hark.security``: the one-shot setup of a secured cluster of the operator's
    (docker-compose's ``kafka-setup``): topics, each service's principal and its ACLs. Logs in as
    the super user from ``HARK_KAFKA_*``; each service's password from ``HARK_PASSWORD_<SERVICE>``."""
    from . import kafka

    s = Settings.load()
    kafka.wait_for_broker(s, timeout=120)
    kafka.ensure_topics(s)
    install(s, {p: os.environ[f"HARK_PASSWORD_{p.upper()}"] for p in grants(s)})
    print(f"hark: topics, {len(grants(s))} service principals and their ACLs are in place")


if __name__ == "__main__":
    main()
