"""Broker logins for a tenant's own Kafka clients: its downstream consumers of the published tier
and its third-party audio producers.

A client ``NAME`` logs in as SCRAM principal ``client.<NAME>`` (no service principal starts so)
and may do exactly what its grants say, by ACLs on literal names: ``consume`` reads the tenant's
published topic, ``produce`` writes the tenant's produce topic. Literal, never prefixed: tenant
``acme`` must not reach ``acme2``'s topics. Its consumer groups are prefixed ``client.<NAME>.``;
a NAME has no dots, so no client's prefix is the start of another client's.

The broker is the record of which clients exist and what each may do: ``list`` reads its SCRAM
users and ACLs, so it shows what the broker enforces (a hand-made ACL, a half-finished create)
and cannot drift from it, and it works on any secured cluster the caller is super user of. The
broker keeps no dates, so the one thing kept beside the stack's credentials is each client's
creation time (``clients.json``, 0600; never a password): it only annotates the list.

Revoking never deletes a SCRAM credential: it overwrites it with a password nobody is told, at an
iteration count (REVOKED_ITERATIONS) no live login has, and deletes every ACL. Kafka 4.1.1
loses every SCRAM credential of the cluster, admin's too, when at start it replays a log in
which a deleted user's name comes first in hash order: ScramDelta.apply, applying that removal to
the empty map it starts from, drops the mechanism's map and puts every later user in the dropped
one. A deletion could keep the stack from starting again (measured: create ``mic`` and ``web``,
delete ``mic``, restart; admin's login fails).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from . import kafka, security, stack, tenants
from .config import Settings

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
USER_PREFIX = "client."
RECORD = "clients.json"
TIMEOUT = 30.0
# the iteration count of a revoked client's credential (its password is discarded): a mark the
# list reads, in the range the broker takes (4096 to 16384) and unlike security.ITERATIONS
REVOKED_ITERATIONS = 4097


class ClientError(RuntimeError):
    """A request the command refuses (bad name or tenant, a name taken, no such client)."""


@dataclass(frozen=True)
class Client:
    """One client as the broker knows it."""

    name: str
    username: str
    tenant: str | None
    grants: list[str]
    consume_topic: str | None
    produce_topic: str | None
    group_prefix: str | None
    login: bool  # it has a live SCRAM login (False: only ACLs are left, e.g. by hand)
    other_acls: int  # ACLs of its principal that no grant of hark's explains (made by hand)
    created_at: str | None


def username(name: str) -> str:
    return USER_PREFIX + name


def group_prefix(name: str) -> str:
    return f"{USER_PREFIX}{name}."


def client_acls(s: Settings, name: str, tenant: str, consume: bool, produce: bool) -> list[AclBinding]:
    """READ and WRITE imply DESCRIBE (the authorizer's IMPLIES_DESCRIBE), and an idempotent
    producer needs no IdempotentWrite on the cluster since Kafka 3.0 (KIP-679): WRITE on a topic
    is enough, so these are all the ACLs a client needs."""
    principal, lit = f"User:{username(name)}", ResourcePatternType.LITERAL

    def allow(kind, resource, pattern, op):
        return AclBinding(kind, resource, pattern, principal, "*", op, AclPermissionType.ALLOW)

    out = [allow(ResourceType.GROUP, group_prefix(name), ResourcePatternType.PREFIXED, AclOperation.READ)]
    if consume:
        out.append(allow(ResourceType.TOPIC, s.published_topic(tenant), lit, AclOperation.READ))
    if produce:
        out.append(allow(ResourceType.TOPIC, s.produce_topic(tenant), lit, AclOperation.WRITE))
    return out


def create(s: Settings, name: str, tenant: str, consume: bool, produce: bool) -> dict:
    """Make the login and return what a stock Kafka client needs to use it (the password is in
    it, and nowhere else)."""
    if not NAME_RE.match(name):
        raise ClientError(f"invalid client name {name!r} (a-z, 0-9, _ and -, starting with a letter or digit, max 48)")
    try:
        tenants.check_tenant(tenant)
    except tenants.AccessDenied as e:
        raise ClientError(e.reason) from None
    if not (consume or produce):
        raise ClientError("a client needs --consume, --produce or both")
    adm = kafka.admin(s)
    if name in _logins(adm) or any(_principal_name(b.principal) == name for b in _all_acls(adm)):
        raise ClientError(f"a client named {name!r} exists; `hark clients revoke {name}` first")
    kafka.ensure_tenant_topics(s, tenant, produce=produce, timeout=TIMEOUT)
    # the ACLs go first: the broker applies its metadata in order, so once the login works its
    # grants are in place, and a create that fails midway leaves no login without them
    for fut in adm.create_acls(client_acls(s, name, tenant, consume, produce), request_timeout=TIMEOUT).values():
        fut.result()
    password = secrets.token_urlsafe(32)
    try:
        _set_password(adm, name, password, security.ITERATIONS)
    except KafkaException:
        _delete_acls(adm, name)
        raise
    _record(s, name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return {
        "bootstrap": s.bootstrap,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": security.MECHANISM,
        "username": username(name),
        "password": password,
        "schema_registry_url": s.schema_registry_url or None,
        "consume_topic": s.published_topic(tenant) if consume else None,
        "produce_topic": s.produce_topic(tenant) if produce else None,
        "group_prefix": group_prefix(name),
    }


def list_clients(s: Settings) -> list[Client]:
    """Every client the broker has a login or an ACL for, by name."""
    adm = kafka.admin(s)
    logins = _logins(adm)
    by_name: dict[str, list[AclBinding]] = {n: [] for n in logins}
    for b in _all_acls(adm):
        n = _principal_name(b.principal)
        if n is not None:
            by_name.setdefault(n, []).append(b)
    created = _records(s)
    return [_describe(s, n, by_name[n], n in logins, created.get(n)) for n in sorted(by_name)]


def revoke(s: Settings, name: str) -> Client:
    """End the login (its password replaced by one nobody knows), then delete every ACL of its
    principal. A connection the client holds stays open until it closes (the broker does not
    re-authenticate it), but with no ACL left it may do nothing on it; the next login fails."""
    found = {c.name: c for c in list_clients(s)}.get(name)
    if found is None:
        raise ClientError(f"no client named {name!r}")
    adm = kafka.admin(s)
    if found.login:  # overwritten, not deleted: see the module's docstring
        _set_password(adm, name, secrets.token_urlsafe(32), REVOKED_ITERATIONS)
    _delete_acls(adm, name)
    _record(s, name, None)
    return found


def _describe(s: Settings, name: str, acls: list[AclBinding], login: bool, created_at: str | None) -> Client:
    published, produce = s.published_topic(""), s.produce_topic("")
    consume_topic = produce_topic = prefix = None
    other = 0
    for b in acls:
        lit = b.resource_pattern_type == ResourcePatternType.LITERAL and b.restype == ResourceType.TOPIC
        if b.permission_type != AclPermissionType.ALLOW:
            other += 1
        elif lit and b.operation == AclOperation.READ and b.name.startswith(published):
            consume_topic = b.name
        elif lit and b.operation == AclOperation.WRITE and b.name.startswith(produce):
            produce_topic = b.name
        elif b.restype == ResourceType.GROUP and b.resource_pattern_type == ResourcePatternType.PREFIXED:
            prefix = b.name
        else:
            other += 1
    owners = sorted({t[len(p) :] for t, p in ((consume_topic, published), (produce_topic, produce)) if t})
    grants = [g for g, t in (("consume", consume_topic), ("produce", produce_topic)) if t]
    tenant = ",".join(owners) or None  # two tenants only where someone granted one by hand
    return Client(name, username(name), tenant, grants, consume_topic, produce_topic, prefix, login, other, created_at)


def as_dict(c: Client) -> dict:
    return asdict(c)


def _set_password(adm, name: str, password: str, iterations: int) -> None:
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, iterations)
    upsert = UserScramCredentialUpsertion(username(name), info, password.encode())
    for fut in adm.alter_user_scram_credentials([upsert], request_timeout=TIMEOUT).values():
        fut.result()


def _logins(adm) -> set[str]:
    """The client names that have a live SCRAM login on the broker (not a revoked one)."""
    try:
        users = adm.describe_user_scram_credentials(request_timeout=TIMEOUT).result()
    except KafkaException as e:
        if e.args[0].code() != KafkaError.RESOURCE_NOT_FOUND:  # no SCRAM user at all
            raise
        users = {}
    return {
        u[len(USER_PREFIX) :]
        for u, desc in users.items()
        if u.startswith(USER_PREFIX) and any(i.iterations != REVOKED_ITERATIONS for i in desc.scram_credential_infos)
    }


def _all_acls(adm) -> list[AclBinding]:
    return list(adm.describe_acls(_acl_filter(None), request_timeout=TIMEOUT).result())


def _acl_filter(principal: str | None) -> AclBindingFilter:
    """Every ACL of ``principal`` (None: of everyone): None matches any name, principal and host
    (the library's documented filter; its type stubs say str)."""
    any_type, any_op, any_perm = ResourceType.ANY, AclOperation.ANY, AclPermissionType.ANY
    return AclBindingFilter(any_type, None, ResourcePatternType.ANY, principal, None, any_op, any_perm)  # type: ignore[arg-type]


def _principal_name(principal: str) -> str | None:
    prefix = "User:" + USER_PREFIX
    return principal[len(prefix) :] if principal.startswith(prefix) else None


def _delete_acls(adm, name: str) -> None:
    for fut in adm.delete_acls([_acl_filter(f"User:{username(name)}")], request_timeout=TIMEOUT).values():
        fut.result()


# ---- the creation times, beside the stack's credentials ------------------------------------------
def record_path(s: Settings) -> Path | None:
    """``clients.json`` in the folder of the stack of this data folder whose broker ``s`` talks to
    (None: a cluster of someone else's, where no date is kept)."""
    stacks = Path(s.data_dir) / "stacks"
    for state_file in sorted(stacks.glob("*/stack.json")) if stacks.exists() else []:
        state = stack.read_state(state_file.parent)
        if state and state.get("bootstrap") == s.bootstrap and state.get("credentials"):
            return Path(state["credentials"]).parent / RECORD
    return None


def _records(s: Settings) -> dict[str, str]:
    path = record_path(s)
    try:
        return json.loads(path.read_text()) if path else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _record(s: Settings, name: str, created_at: str | None) -> None:
    """Set (or, with None, forget) a client's creation time."""
    path = record_path(s)
    if path is None:
        return
    # one writer at a time: two commands at once would each write back what it read, less the other's
    fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        records = _records(s)
        if created_at is None:
            records.pop(name, None)
        else:
            records[name] = created_at
        security.write_private(path, records)
    finally:
        os.close(fd)  # and with it the lock
