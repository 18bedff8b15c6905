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

from .config import Settings
from .kafka import ONLINE_GROUP

MECHANISM = "SCRAM-SHA-512"
ITERATIONS = 8192
ADMIN = "admin"
CONTROLLER = "controller"
# ingest's consumer group on the tenants' produce topics
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


def grants(s: Settings) -> dict[str, Grant]:
    """Every service principal of the stack and its grant (the topic names come from settings)."""
    dead = s.deadletter_topic
    # every tenant's topics of a kind share the prefix a tenant name completes (Settings.*_topic)
    published, produce = s.published_topic(""), s.produce_topic("")
    return {
        # ingest also writes results: the tombstones of its retention sweep, which go to the
        # stream's tenant's published and produce topics too (hark/erasure.py); it places new
        # streams by online_asr's assignment, so it may describe that group (not join or read
        # it); it reads what tenants' own producers publish, in its own group
        "ingest": Grant(
            writes=(s.audio_topic, s.results_topic, dead),
            groups=(INGEST_IN_GROUP,),
            watches=(ONLINE_GROUP,),
            read_prefixes=(produce,),
            write_prefixes=(published, produce),
        ),
        "online_asr": Grant(
            (s.audio_topic,), (s.online_topic, s.results_topic, dead), (ONLINE_GROUP,), ONLINE_GROUP + "-"
        ),
        "offline_asr": Grant((s.audio_topic,), (s.offline_topic, dead), ("hark-offline-asr",), "hark-offline-asr-"),
        "diarizer": Grant((s.audio_topic,), (s.speakers_topic, dead), ("hark-diarizer",), "hark-diarizer-"),
        "results": Grant(
            (s.online_topic, s.offline_topic, s.speakers_topic),
            (s.results_topic, dead),
            ("hark-results",),
            "hark-results-",
            # each tenant's published tier (made by `hark clients create`), and the empty-keyed
            # nudge that lets compaction reach a quiet partition of a tenant's published or
            # produce topic (hark/published.py: Nudges)
            write_prefixes=(published, produce),
        ),
        # captions reads every results partition itself (assigned, no group commits)
        "captions": Grant((s.results_topic,), (dead,), ("hark-tail-",)),
    }


def acl_bindings(s: Settings) -> list:
    """The ACLs that give each principal its grant, and no more (the authorizer denies the rest)."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    def allow(kind, name, pattern, principal, op):
        return AclBinding(kind, name, pattern, f"User:{principal}", "*", op, AclPermissionType.ALLOW)

    out = []
    lit, pre = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    for principal, g in grants(s).items():
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


def stack_principals(s: Settings) -> list[str]:
    return [ADMIN, CONTROLLER, *grants(s)]


def install(admin_settings: Settings, passwords: dict[str, str]) -> None:
    """Create (or update) every service principal's SCRAM credential and its ACLs, as admin."""
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    from . import kafka

    adm = kafka.admin(admin_settings)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, ITERATIONS)
    upserts: list = [UserScramCredentialUpsertion(p, info, passwords[p].encode()) for p in grants(admin_settings)]
    for fut in adm.alter_user_scram_credentials(upserts, request_timeout=30).values():
        fut.result()
    for fut in adm.create_acls(acl_bindings(admin_settings), request_timeout=30).values():
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
