"""Tenants' own broker logins (`hark clients`), held by the live broker's ACLs to their tenant's
topics, used by stock confluent_kafka clients with nothing but the JSON `create` printed."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from hark import clients, kafka, security

from .conftest import run_hark

pytestmark = pytest.mark.e2e

TENANT_A, TENANT_B = "clients-a", "clients-b"


def _hark(state: dict, *args: str):
    return run_hark("clients", *args, "--bootstrap", state["bootstrap"], timeout=60)


def _login(printed: dict) -> dict:
    """librdkafka properties from what `hark clients create` printed, and nothing else."""
    return {
        "bootstrap.servers": printed["bootstrap"],
        "security.protocol": printed["security_protocol"],
        "sasl.mechanism": printed["sasl_mechanism"],
        "sasl.username": printed["username"],
        "sasl.password": printed["password"],
    }


def _read(conf: dict, topic: str, group: str, timeout: float = 10.0):
    """The first record's value of ``topic`` read in ``group``, or the error code the broker's
    refusal shows as (None: nothing either way before ``timeout``)."""
    c = Consumer({**conf, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is not None:
                err = msg.error()
                return err.code() if err else msg.value()
        return None
    finally:
        c.close()


def _write(conf: dict, topic: str, timeout: float = 10.0):
    """An idempotent write of one record: None when acknowledged, else the error code."""
    outcome: list = []
    p = Producer({**conf, "enable.idempotence": True, "acks": "all", "message.timeout.ms": int(timeout * 1000)})
    p.produce(topic, b"probe", key=b"probe", on_delivery=lambda err, _m: outcome.append(err))
    p.flush(timeout + 2)
    assert outcome, f"no delivery report for {topic}"
    return outcome[0].code() if outcome[0] else None


def _owner(settings) -> dict:
    return {"bootstrap.servers": settings.bootstrap, **settings.kafka_extra}


def _login_error(conf: dict, timeout: float = 3.0):
    """The error a fresh login meets (None: it got in)."""
    seen: list[KafkaError] = []
    p = Producer({**conf, "error_cb": seen.append})
    try:
        p.list_topics(timeout=timeout)
        return None
    except KafkaException:
        p.poll(0.5)  # error_cb is served by poll
        return seen[0].code() if seen else "no error reported"


@pytest.fixture(scope="module")
def made(live_stack):
    """ca: consume + produce for tenant A; cb: consume for tenant B (whose produce topic the
    stack's owner creates, so a refusal to write it is the ACLs', not a missing topic); cr: like
    ca, for the revocation test to revoke, whatever order the tests run in. Each tenant's
    published topic holds one record to read."""
    settings, state = live_stack
    asked = {
        "ca": (TENANT_A, "--consume", "--produce"),
        "cb": (TENANT_B, "--consume"),
        "cr": (TENANT_A, "--consume", "--produce"),
    }
    with ThreadPoolExecutor(len(asked)) as pool:
        runs = {n: pool.submit(_hark, state, "create", n, "--tenant", *args) for n, args in asked.items()}
    out = {}
    for name, run in runs.items():
        r = run.result()
        assert r.returncode == 0, r.stderr
        out[name] = json.loads(r.stdout)
    kafka.ensure_tenant_topics(settings, TENANT_B)
    for tenant in (TENANT_A, TENANT_B):  # the stack's owner publishes one record to each tenant
        assert _write(_owner(settings), settings.published_topic(tenant)) is None
    return out


def test_a_client_reads_and_writes_its_tenants_topics_and_nothing_else(live_stack, made):
    settings, _ = live_stack
    a, b = made["ca"], made["cb"]
    assert a["username"] == "client.ca" and a["group_prefix"] == "client.ca."
    assert (a["consume_topic"], a["produce_topic"]) == (
        settings.published_topic(TENANT_A),
        settings.produce_topic(TENANT_A),
    )
    assert (b["consume_topic"], b["produce_topic"]) == (settings.published_topic(TENANT_B), None)
    assert (a["security_protocol"], a["sasl_mechanism"]) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert a["schema_registry_url"] == (settings.schema_registry_url or None)
    login = _login(a)
    denied = KafkaError.TOPIC_AUTHORIZATION_FAILED
    # every probe waits on the broker, not on a core: all at once
    with ThreadPoolExecutor(12) as pool:
        probes = {
            "own write": pool.submit(_write, login, a["produce_topic"]),
            "own read": pool.submit(_read, login, a["consume_topic"], "client.ca.readers"),
            "B's published": pool.submit(_read, login, b["consume_topic"], "client.ca.x", 5),
            "B's produce": pool.submit(_write, login, settings.produce_topic(TENANT_B), 5),
            "own published (write)": pool.submit(_write, login, a["consume_topic"], 5),
            "results": pool.submit(_read, login, settings.results_topic, "client.ca.x", 5),
            "audio": pool.submit(_read, login, settings.audio_topic, "client.ca.x", 5),
            "audio (write)": pool.submit(_write, login, settings.audio_topic, 5),
            "group outside": pool.submit(_read, login, a["consume_topic"], "client.cab.x", 5),
            "group bare": pool.submit(_read, login, a["consume_topic"], "readers", 5),
            "B reads A": pool.submit(_read, _login(b), a["consume_topic"], "client.cb.x", 5),
        }
    got = {k: f.result() for k, f in probes.items()}
    assert got.pop("own write") is None and got.pop("own read") == b"probe"
    assert got.pop("group outside") == got.pop("group bare") == KafkaError.GROUP_AUTHORIZATION_FAILED
    assert got == dict.fromkeys(got, denied), got


def test_clients_are_listed_without_passwords_refused_when_wrong_and_revoked(live_stack, made):
    settings, state = live_stack
    r = _hark(state, "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {c["name"]: c for c in json.loads(r.stdout)}
    assert listed["ca"]["tenant"] == listed["cr"]["tenant"] == TENANT_A and listed["cb"]["tenant"] == TENANT_B
    assert listed["ca"]["grants"] == ["consume", "produce"] and listed["cb"]["grants"] == ["consume"]
    assert listed["cb"]["group_prefix"] == "client.cb." and listed["cb"]["produce_topic"] is None
    assert all(listed[n]["login"] and listed[n]["created_at"] and not listed[n]["other_acls"] for n in made)
    assert "password" not in r.stdout and not any(m["password"] in r.stdout for m in made.values())
    record = Path(state["credentials"]).parent / clients.RECORD
    assert oct(record.stat().st_mode & 0o777) == "0o600" and made["ca"]["password"] not in record.read_text()

    # refused: a taken name, a bad name or tenant, no grant; none leaves a login behind
    refused = [
        ("ca", "--tenant", TENANT_A, "--consume"),
        ("Bad.Name", "--tenant", TENANT_A, "--consume"),
        ("cc", "--tenant", "../etc", "--consume"),
        ("cc", "--tenant", TENANT_A),
    ]
    with ThreadPoolExecutor(len(refused)) as pool:
        runs = [pool.submit(_hark, state, "create", *args) for args in refused]
    for args, run in zip(refused, runs):
        r = run.result()
        assert r.returncode != 0 and r.stderr.startswith("hark: ") and not r.stdout, (args, r.stdout)

    # revoked: cr's next login fails and no ACL of it is left; ca, of the same tenant, keeps its own
    assert _login_error(_login(made["cr"])) is None
    r = _hark(state, "revoke", "cr")
    assert r.returncode == 0, r.stderr
    assert _login_error(_login(made["cr"])) == KafkaError._AUTHENTICATION
    adm = kafka.admin(settings)
    assert adm.describe_acls(clients._acl_filter("User:client.cr"), request_timeout=10).result() == []
    names = {c.name for c in clients.list_clients(settings)}  # other tests' logins may be there too
    assert {"ca", "cb"} <= names and "cr" not in names
    # its credential is overwritten, never deleted (a deletion can cost every login at the
    # broker's next start: hark/clients.py), and the name is free again
    [info] = adm.describe_user_scram_credentials(["client.cr"])["client.cr"].result().scram_credential_infos
    assert info.iterations == clients.REVOKED_ITERATIONS
    again = clients.create(settings, "cr", TENANT_B, consume=True, produce=False)
    assert _read(_login(again), again["consume_topic"], "client.cr.g") == b"probe"
    clients.revoke(settings, "cr")
    assert _login_error(_login(made["ca"])) is None
    assert _write(_login(made["ca"]), made["ca"]["produce_topic"]) is None
    assert _hark(state, "revoke", "cr").returncode != 0  # nothing left to revoke


def test_services_reach_every_tenants_topics_of_their_kind(live_stack):
    """results writes any tenant's published topic but creates none (`hark clients create` does);
    ingest reads any tenant's produce topic in its group, and writes (its retention sweep's
    tombstones) but never reads their published topics; neither reaches past its prefixes."""
    settings, state = live_stack
    creds = security.Credentials.load(Path(state["credentials"]))
    results, ingest = _owner(settings) | creds.client("results"), _owner(settings) | creds.client("ingest")
    new = NewTopic(settings.published_topic("clients-new"), num_partitions=1, replication_factor=1)
    as_results = AdminClient(results)  # held: a dropped client fails its futures
    with pytest.raises(kafka.KafkaException, match="AUTHORIZATION"):
        as_results.create_topics([new], request_timeout=10)[new.topic].result()
    kafka.ensure_tenant_topics(settings, "clients-new")
    assert _write(results, new.topic) is None
    assert _write(_owner(settings), settings.produce_topic("clients-new")) is None
    group = security.INGEST_IN_GROUP + ".probe"  # within ingest's prefix, beside the service's own group
    assert _read(ingest, settings.produce_topic("clients-new"), group) == b"probe"
    assert _read(ingest, new.topic, group, 5) == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert _write(ingest, new.topic) is None and _write(ingest, settings.produce_topic("clients-new")) is None
    assert _write(ingest, settings.topic("elsewhere"), 5) == KafkaError.TOPIC_AUTHORIZATION_FAILED
