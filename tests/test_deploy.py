"""Deployment: the compose file against the code, /metrics scraped, local replicas under a kill."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hark import kafka, serde, stack
from hark.config import Settings

from .conftest import ROOT, TOPICS_S, run_hark
from .helpers import complete_record

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INFRA = {"kafka", "kafka-setup", "minio", "minio-init", "registry"}


def broker_properties() -> dict[str, str]:
    """The compose broker's server.properties, as its start script writes them."""
    script = COMPOSE["services"]["kafka"]["command"][0].replace("$$", "$")  # compose unescapes $$
    body = script.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    return dict(line.split("=", 1) for line in body.splitlines())


SETTINGS_ENV = {"HARK_" + f.name.upper() for f in dataclasses.fields(Settings) if f.name != "kafka_extra"}


def hark_services() -> dict[str, dict]:
    return {name: svc for name, svc in COMPOSE["services"].items() if name not in INFRA}


# ---- docker-compose.yml is checked against the code (Docker cannot run here) --------------------
def test_compose_runs_every_service_the_code_has_and_no_other():
    services = hark_services()
    assert set(services) == set(stack.SERVICES)
    for name, svc in services.items():
        assert svc["build"] == "." and svc["command"] == [name]  # `hark service NAME` (the ENTRYPOINT)
    assert 'ENTRYPOINT ["hark", "service"]' in DOCKERFILE
    for package in ("hark", "hark_cli", "services", "schemas"):  # what the services import or read at run time
        assert re.search(rf"^COPY {package} \./{package}$", DOCKERFILE, re.M), package
    assert "hark models install" in DOCKERFILE  # weights assembled and verified at build time


def test_compose_sets_only_variables_the_config_reads():
    for name, svc in hark_services().items():
        env = svc["environment"]
        for key in env:
            assert key in SETTINGS_ENV or key.startswith("HARK_KAFKA_"), f"{name}: {key} is not read by hark"
        settings = Settings.load(environ={k: str(v) for k, v in env.items()})  # types coerce
        assert settings.partitions >= 3, "`--scale X=3` needs at least 3 partitions per topic"


def test_compose_addresses_and_ports_agree():
    advertised = broker_properties()["advertised.listeners"]
    minio_init = " ".join(COMPOSE["services"]["minio-init"]["command"])
    for name, svc in hark_services().items():
        env = svc["environment"]
        assert f"CLIENT://{env['HARK_BOOTSTRAP']}" in advertised.split(","), name
        assert env["HARK_S3_ENDPOINT"] == "minio:9000"  # MinIO's API port (the console is :9001)
        bucket = env["HARK_ARCHIVE_URI"].removeprefix("s3://").split("/")[0]
        assert f"mb --ignore-existing hark/{bucket}" in minio_init, "the archive bucket is created at start"
        assert env["HARK_HEALTH_HOST"] == "0.0.0.0"
        probe = " ".join(svc["healthcheck"]["test"])
        assert f":{env['HARK_HEALTH_PORT']}/healthz" in probe, name
        assert set(svc["depends_on"]) == {"kafka-setup", "minio-init"}
        if stack.SERVICES[name][1] is not None:  # a consumer group member: scalable, no fixed host port
            assert "ports" not in svc and "container_name" not in svc, f"{name} could not be scaled"
    for name, prefix in (("ingest", "HARK_INGEST"), ("captions", "HARK_CAPTIONS")):  # the two with a public port
        svc = COMPOSE["services"][name]
        container_port = svc["ports"][0].split(":")[-1]
        assert (
            container_port == svc["environment"][f"{prefix}_PORT"] and svc["environment"][f"{prefix}_HOST"] == "0.0.0.0"
        )
    index_dir = Path(COMPOSE["services"]["captions"]["environment"]["HARK_INDEX_PATH"]).parent
    assert (
        f"captions-index:{index_dir}" in COMPOSE["services"]["captions"]["volumes"]
    )  # the index outlives the container


def test_compose_names_real_images_kafka_in_kraft_mode_and_minio():
    services = COMPOSE["services"]
    kafka, minio = services["kafka"], services["minio"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])
    props = broker_properties()
    assert set(props["process.roles"].split(",")) == {"broker", "controller"}
    assert props["controller.quorum.voters"].startswith(f"{props['node.id']}@kafka:")
    assert not any("zookeeper" in k for k in props) and "zookeeper" not in services
    from hark.broker import KAFKA_VERSION, MAX_MESSAGE_BYTES, MAX_OFFSET_METADATA_BYTES

    assert int(props["message.max.bytes"]) >= MAX_MESSAGE_BYTES
    assert int(props["offset.metadata.max.bytes"]) >= MAX_OFFSET_METADATA_BYTES
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"  # the embedded broker's version
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in (ROOT / "broker" / "pom.xml").read_text()
    assert re.fullmatch(r"minio/minio:RELEASE\.[0-9T\-]+Z", minio["image"])
    assert re.fullmatch(r"minio/mc:RELEASE\.[0-9T\-]+Z", services["minio-init"]["image"])
    for svc in services.values():
        assert "healthcheck" in svc or svc.get("image", "").startswith("minio/mc")


def test_compose_broker_is_secured_like_the_embedded_one_and_has_no_default_secrets():
    from hark import broker, security

    props = broker_properties()
    embedded = broker.single_node(Path("/nonexistent"), security={"admin": "A", "controller": "C"}).properties()
    placeholders = {"A": "${KAFKA_ADMIN_PASSWORD}", "C": "${KAFKA_CONTROLLER_PASSWORD}"}
    for key in (
        "listener.security.protocol.map",
        "inter.broker.listener.name",
        "sasl.mechanism.controller.protocol",
        "listener.name.client.sasl.enabled.mechanisms",
        "authorizer.class.name",
        "super.users",
        "allow.everyone.if.no.acl.found",
        "listener.name.client.scram-sha-512.sasl.jaas.config",
        "listener.name.controller.plain.sasl.jaas.config",
        "unclean.leader.election.enable",
    ):
        want = embedded[key]
        for secret, var in placeholders.items():
            want = want.replace(f'"{secret}"', f'"{var}"')
        assert props[key] == want, key
    assert "--add-scram" in COMPOSE["services"]["kafka"]["command"][0]  # the super user exists at first start
    # each service logs in as itself; kafka-setup creates exactly those principals with the same secrets
    setup = COMPOSE["services"]["kafka-setup"]["environment"]
    assert set(security.grants(Settings())) == set(hark_services())
    for name, svc in hark_services().items():
        env = svc["environment"]
        assert env["HARK_KAFKA_SASL_USERNAME"] == name and env["HARK_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        assert env["HARK_KAFKA_SASL_PASSWORD"].split(":?")[0] == setup[f"HARK_PASSWORD_{name.upper()}"].split(":?")[0]
    # no secret has a default: compose refuses to start without each one (`${VAR:?...}`)
    text = (ROOT / "docker-compose.yml").read_text()
    secrets = re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|_KEY|_USER)\w*)(:[?-])", text)
    assert secrets and all(op == ":?" for _, op in secrets), secrets
    for name in ("ingest", "captions"):  # published on the host's loopback only, with tokens
        assert all(p.startswith("127.0.0.1:") for p in COMPOSE["services"][name]["ports"]), name
        svc = COMPOSE["services"][name]
        folder = svc["environment"]["HARK_TOKENS_FILE"].rsplit("/", 1)[0]
        assert any(v.endswith(f":{folder}:ro") for v in svc["volumes"]), name  # a folder: revocation reloads
    # every service seals with the same master key, which has no default either
    assert COMPOSE["x-hark"]["environment"]["HARK_MASTER_KEY"].startswith("${HARK_MASTER_KEY:?")


# ---- /metrics ------------------------------------------------------------------------------------
def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, **labels) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_service_exposes_prometheus_metrics(live_stack, speech_dir):
    settings, _ = live_stack
    from services.ingest.core import Ingest

    sid = Ingest(settings).publish_file(speech_dir / "goforward.wav").stream_id
    complete_record(settings, sid, timeout=60)
    services = stack.read_state(stack.stack_dir(settings, "pytest"))["services"]
    groups = [s for s in services if stack.SERVICES[s["name"]][1]]

    def lag_reported(svc) -> bool:  # refreshed every 5 s, one series per owned partition
        m = scrape(svc["health_port"])
        return len(m.get("hark_consumer_lag_records", [])) == value(m.get("hark_partitions_assigned", [])) > 0

    deadline = time.monotonic() + 30
    while not all(lag_reported(s) for s in groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = set()
    for svc in services:
        m = scrape(svc["health_port"])
        seen.add(svc["name"])
        if svc["name"] == "ingest":
            continue
        if svc["name"] == "captions":  # a reader of every results partition, not a group member
            assert value(m["hark_records_indexed"]) > 0 and "hark_events_published" in m
            continue
        topics = stack.SERVICES[svc["name"]][1]
        assert value(m["hark_records_in"]) > 0 and value(m["hark_records_out"]) > 0, svc["name"]
        assert {s.labels["service"] for s in m["hark_records_in"]} == {svc["name"]}
        assert "hark_open_streams" in m
        owned = value(m["hark_partitions_assigned"])
        assert owned == settings.partitions * (3 if svc["name"] == "results" else 1), topics
        lag = m["hark_consumer_lag_records"]  # one series per owned partition
        assert len(lag) == owned and all(s.value >= 0 for s in lag)
        if svc["name"] in ("online_asr", "offline_asr", "diarizer"):
            rtf = value(m["hark_decode_rtf"])
            assert 0 < rtf < 1.5, (svc["name"], rtf)
            assert value(m["hark_audio_seconds"]) > 0
            assert 0 <= value(m["hark_audio_delay_seconds"]) < 60, svc["name"]
    assert seen == set(stack.SERVICES)


# ---- local scale-out and model rollout, on one stack ----------------------------------------------
TENANT_MADE_AT: dict[str, float] = {}  # tenant -> when the scaled stack's `hark clients create` made it


@pytest.fixture(scope="module")
def scaled_stack(tmp_path_factory):
    """Two online_asr and two offline_asr replicas over 8 partitions, an A/B of the offline
    pass (tiny.en decoding half the streams beside base), and the published tier at a 10 s
    compaction lag with tenant `gone`'s login and topics: one stack for the three tests, since a
    stack's start is a minute of the suite."""
    env = {
        "HARK_DATA_DIR": str(tmp_path_factory.mktemp("scaled") / "d"),
        "HARK_PARTITIONS": "8",
        "HARK_IDLE_TIMEOUT_S": "10",
        "HARK_OFFLINE_CANDIDATE_MODEL": "tiny.en",
        "HARK_OFFLINE_CANDIDATE_FRACTION": "0.5",
        "HARK_PUBLISHED_COMPACTION_LAG_S": "10",
        "HARK_PUBLISHED_TOPICS_S": str(TOPICS_S),
    }
    up = run_hark("up", "--replicas", "online_asr=2,offline_asr=2", env_extra=env, timeout=180)
    assert up.returncode == 0, up.stderr
    try:
        state = json.loads(run_hark("status", "--json", env_extra=env).stdout)
        settings = stack.client_settings(Settings.load(environ={**os.environ, **env}), state)
        # the erasure test's tenant, made with the stack: results lists the published topics every
        # TOPICS_S, so it has seen this one by then unless that test runs first
        login = run_hark("clients", "create", "sink", "--tenant", "gone", "--consume", env_extra=env)
        assert login.returncode == 0, login.stderr
        TENANT_MADE_AT["gone"] = time.monotonic()
        yield env, state, settings
    finally:
        run_hark("down", env_extra=env)


@pytest.mark.e2e
def test_replicas_split_partitions_and_no_stream_is_lost_when_one_dies(scaled_stack, speech_dir):
    env, state, settings = scaled_stack
    serde.configure(settings, eager=False)  # this stack's registry, whatever a test before talked to
    for name in ("online_asr", "offline_asr"):
        replicas = [s for s in state["services"] if s["name"] == name]
        owned = [s["partitions_assigned"] for s in replicas]
        assert len(replicas) == 2 and all(n >= 1 for n in owned) and sum(owned) == 8, (name, owned)

    # Streams published in real time through one ingest; one online_asr replica dies mid-stream.
    import threading

    from services.ingest.core import Ingest

    files = ["austen_passage.flac"] + ["goforward.wav", "forever_input_2_16k.wav"] * 2
    ids = [f"replica-{i}-{time.time_ns()}" for i in range(len(files))]
    errors: list[BaseException] = []
    ingest, placed = Ingest(settings), {}

    def publish(f, sid):
        try:
            ingest.publish_file(
                speech_dir / f,
                stream_id=sid,
                realtime=True,
                on_start=lambda pub: placed.update({sid: pub.partition}),
            )
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(f, sid)) for f, sid in zip(files, ids)]
    for t in threads:
        t.start()
    # ingest places them by the online group's assignment: 3 and 2 on the two replicas, however
    # the assignor split the 8 partitions (in turn over partitions alone: 4 and 1 from half the
    # starts when each replica holds a contiguous half)
    deadline = time.monotonic() + 30
    while len(placed) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    owners = kafka.group_assignment(kafka.admin(settings), kafka.ONLINE_GROUP, settings.audio_topic, 10)
    assert sorted(sum(placed.get(sid) in m for sid in ids) for m in owners) == [2, 3], (owners, placed)
    victim = next(s for s in state["services"] if s["name"] == "online_asr")
    deadline = time.monotonic() + 30  # killed mid-stream: once it decodes streams of its own
    while value(scrape(victim["health_port"]).get("hark_open_streams", [])) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert not errors, errors
    for f, sid in zip(files, ids):
        rec = complete_record(settings, sid, timeout=120)
        assert rec["status"] == "COMPLETE" and rec["final_source"] == "offline", (f, rec["status"])
        assert rec["online_text"] and rec["text"], f
        if f == "goforward.wav":
            assert "forward" in rec["text"].lower(), rec["text"]
    assert "Dashwood" in complete_record(settings, ids[0])["text"]

    # Every stream ended: each group's holds are released, so its lag drains to 0 (the
    # committed offsets catch up with the ends of the partitions it read).
    deadline, lag = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        lag = json.loads(run_hark("status", "--json", env_extra=env).stdout)["lag"]
        if all(lag[g].get("partitions") and lag[g]["lag"] == 0 for g in stack.GROUPS):
            break
        time.sleep(1)
    assert all(lag[g]["partitions"] and lag[g]["lag"] == 0 for g in stack.GROUPS), lag
    audio = [r for r in lag["hark-online-asr"]["partitions"] if r["topic"] == settings.audio_topic]
    assert audio and all(r["end"] > 0 and r["committed"] == r["end"] for r in audio), audio
    text = run_hark("status", env_extra=env).stdout
    assert "group hark-online-asr: lag 0 records" in text, text


# ---- model rollout: A/B in the offline pass, and `hark compare` ----------------------------------
@pytest.mark.e2e
def test_ab_candidate_model_and_compare_on_archived_streams(scaled_stack, speech_dir, tmp_path):
    from services.offline_asr.service import routed_to_candidate

    from .helpers import collect

    env, _state, settings = scaled_stack
    serde.configure(settings, eager=False)  # this stack's registry, whatever a test before talked to
    from services.ingest.core import Ingest

    files = [
        "sense_and_sensibility_01_austen_64kb-0880.wav",
        "goforward.wav",
        "sense_and_sensibility_01_austen_64kb-0890.wav",
        "forever_input_2_16k.wav",
    ]
    ids = [f"ab-{i}" for i in range(len(files))]  # ab-2 and ab-3 hash into the candidate's half
    routed = {sid: routed_to_candidate(sid, 0.5) for sid in ids}
    assert sorted(routed.values()) == [False, False, True, True]
    ingest = Ingest(settings)
    for f, sid in zip(files, ids):
        ingest.publish_file(speech_dir / f, stream_id=sid)
    finals = {sid: complete_record(settings, sid, timeout=120) for sid in ids}
    for rec in finals.values():  # results serve the primary model only
        assert rec["final_source"] == "offline" and rec["model_name"] == "whisper-base"

    def both_ended(recs):
        ends = {(r["stream_id"], r["variant"]) for t, r in recs if r["kind"] == "STREAM_END"}
        return all((sid, "candidate" if routed[sid] else "primary") in ends for sid in ids)

    offline = [r for t, r in collect(settings, settings.offline_topic, both_ended, 60)]
    for sid in ids:
        segments = [r for r in offline if r["stream_id"] == sid and r["kind"] == "SEGMENT"]
        by_variant = {v: [r for r in segments if r["variant"] == v] for v in ("primary", "candidate")}
        assert {r["model_name"] for r in by_variant["primary"]} == {"whisper-base"}
        if routed[sid]:  # same windows, same indices, the candidate's model and version
            assert {r["model_name"] for r in by_variant["candidate"]} == {"whisper-tiny.en"}
            assert [(r["segment_index"], r["start_ms"], r["end_ms"]) for r in by_variant["candidate"]] == [
                (r["segment_index"], r["start_ms"], r["end_ms"]) for r in by_variant["primary"]
            ]
        else:
            assert by_variant["candidate"] == []
    assert all(serde.registry().by_name("OfflineTranscript").version == r["schema_version"] for r in offline)

    # compare reads the archive only, and decodes in its own process
    out = tmp_path / "compare.json"
    cmp = run_hark(
        "compare",
        "--replay",
        *ids,
        "--models",
        "base,tiny.en",
        "--refs",
        str(speech_dir / "references.tsv"),
        "--json",
        str(out),
        env_extra=env,
    )
    assert cmp.returncode == 0, cmp.stderr
    table = cmp.stdout.splitlines()
    assert table[0].split()[:2] == ["model", "streams"] and len(table) == 4
    assert table[2].startswith("whisper-base") and table[3].startswith("whisper-tiny.en")
    report = json.loads(out.read_text())
    base, tiny = report["versions"]
    assert base["streams"] == tiny["streams"] == 4 and base["scored_streams"] == 4
    assert base["ref_words"] == tiny["ref_words"] > 20
    assert base["wer"] <= 0.1 and tiny["wer"] <= 0.2 and 0.7 <= tiny["agreement"] <= 1.0
    for row in report["streams"]:  # the texts compare scores are those the offline pass served
        assert row["versions"][0]["text"] == finals[row["stream_id"]]["text"]
    bad = run_hark("compare", "--replay", "no-such-stream", env_extra=env)
    assert bad.returncode == 1 and "no archived stream 'no-such-stream'" in bad.stderr


# ---- erasure from the published tier, on the same stack ----------------------------------------------
@pytest.mark.e2e
def test_an_erased_streams_plain_records_leave_the_brokers_disk(scaled_stack, speech_dir):
    """At a 10 s compaction lag (the scaled stack's): after `hark erase`, the tombstone and the
    results service's nudge of the then quiet partition let Kafka's cleaner remove the stream's
    published records from the segment files, as Kafka's own DumpLogSegments reads them."""
    from .helpers import segments_holding
    from .test_published import read_published

    env, state, settings = scaled_stack
    serde.configure(settings, eager=False)  # this stack's registry, whatever a test before talked to
    sid, log_root = f"gone-{time.time_ns()}", Path(state["data_dir"]) / "stacks" / "default" / "kafka"
    topic = settings.published_topic("gone")  # made with the stack (scaled_stack)
    # results sees the tenant's new topic: TOPICS_S after it was made
    time.sleep(max(0.0, TENANT_MADE_AT["gone"] + TOPICS_S + 1 - time.monotonic()))
    pub = run_hark(
        "publish", str(speech_dir / "goforward.wav"), "--stream-id", sid, "--tenant", "gone",
        "--bootstrap", state["bootstrap"], env_extra=env,
    )  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    # the stream's records on its tenant's topic, read until its COMPLETE record (after the finals)
    records = read_published(settings, topic, sid, lambda out: any(v and v["kind"] == "COMPLETE" for v, _ in out))
    assert any(v and v["kind"] == "COMPLETE" for v, _ in records), "nothing of the stream reached its tenant's topic"
    assert segments_holding(log_root, topic, sid) > 0  # the key is in every record's dump line
    assert segments_holding(log_root, topic, "forward") > 0
    erased = run_hark("erase", sid, "--bootstrap", state["bootstrap"], env_extra=env)
    assert erased.returncode == 0, erased.stderr
    t0 = time.monotonic()
    while segments_holding(log_root, topic, "forward") > 0:
        assert time.monotonic() - t0 < 150, "the erased stream's text is still in the segment files"
        time.sleep(2)
