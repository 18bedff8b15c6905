"""Settings shared by every service and the CLI.

One flat dataclass, filled from defaults, then ``HARK_*`` environment variables, then
explicit overrides (CLI flags). The same variables configure a service under
docker-compose, so every field here has an env name: ``HARK_<FIELD>`` upper-cased. Extra
librdkafka properties (SASL/TLS in production) pass through as ``HARK_KAFKA_<PROPERTY>``, dots
written as underscores: ``HARK_KAFKA_SECURITY_PROTOCOL=SASL_SSL``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .config_limits import CHOICES, RANGES
from .languages import WHISPER

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its variable and what it accepts."""


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "hark"


def setting(default: _T, doc: str, *, section: str = "") -> _T:
    """A field of Settings: its default, what it means (``doc``) and, on the first field of a
    group, the group's heading (``section``); docs/configuration.md's table is made of these."""
    return field(default=default, metadata={"doc": doc, "section": section})


@dataclass
class Settings:
    """Every setting, each with its meaning in its field's metadata (``setting``): the reference
    in docs/configuration.md is generated from them (``python -m hark.config_table``)."""

    # laid out by hand: the formatter would spread each setting over two lines more
    # fmt: off
    bootstrap: str = setting("127.0.0.1:9092",
        "Kafka bootstrap servers (host:port,...); `hark up` and `hark run` set their own broker's")
    data_dir: Path = field(default_factory=default_data_dir, metadata={
        "doc": "the archive, indexes, audit log and embedded stacks (their broker logs) live here",
        "shown": "~/.local/share/hark"})
    archive_uri: str = setting("", "file:///abs/path (default: <data_dir>/archive) or s3://bucket/prefix (MinIO/S3)")
    s3_endpoint: str = setting("", "S3/MinIO endpoint (host:port), credentials, TLS and region for an s3:// archive")
    s3_access_key: str = setting("", "the s3:// archive's access key")
    s3_secret_key: str = setting("", "the s3:// archive's secret key")
    s3_secure: bool = setting(False, "TLS to the S3 endpoint")
    s3_region: str = setting("us-east-1", "the s3:// archive's region")
    key_store_uri: str = setting("",
        "where each stream's data key lives, wrapped (hark/keys.py): file:///abs/path (default <data_dir>/keys) or "
        "s3://bucket/prefix, a bucket apart from the archive's")
    master_key: str = setting("",
        "the key that wraps the data keys: base64 of 32 random bytes; empty: <data_dir>/master.key, created 0600 at "
        "first use (every process of one installation must share it)")

    topic_prefix: str = setting("hark.", "every topic's name starts with this")
    partitions: int = setting(8, "partitions of each topic: the most replicas a service can spread over")
    replication_factor: int = setting(1,
        "replicas of each topic; above 1 also min.insync.replicas 2 (producers use acks=all)")
    topic_retention_hours: float = setting(168.0,
        "retention.ms of every topic (audio and transcripts expire with it); the results topic is also compacted, so "
        "an erased stream's tombstone removes its results (hark/erasure.py)")
    audio_retention_mb: float = setting(2048.0,
        "retention.bytes of each audio partition (the bulk of the log); 0: by time only")

    schema_registry_url: str = setting("",
        "the schema registry's Confluent-compatible API (http://host:port/apis/ccompat/v7); empty: schema ids are "
        "fingerprints of each schema, known to hark only (the embedded stack starts its own registry and sets this)")
    published_compaction_lag_s: float = setting(600.0,
        "the published tier (plain Avro per tenant, hark/published.py): max.compaction.lag.ms of each tenant's topic, "
        "so an erased stream's records are compacted away within about this")
    published_topics_s: float = setting(10.0,
        "how often the results service lists the tenants' published topics: a tenant's new topic (`hark clients "
        "create`) gets its copies within about this")
    produce_compaction_lag_s: float = setting(3600.0,
        "each tenant's produce topic (<prefix>audio-in.<tenant>, plain audio from its own producers): records younger "
        "than this are never compacted (ingest must read them within it), older ones are, so an erased stream's plain "
        "audio goes about this long after its tombstone")

    tokens_file: str = setting("",
        "access: a file of \"<sha256 of token> <tenant>\" lines (`hark token create`); empty: open access")
    archive_retention_days: float = setting(0.0,
        "archive retention: archived streams (audio, source, lattices) older than this are deleted by ingest's hourly "
        "sweep and `hark retention`; 0 keeps them forever")

    chunk_ms: int = setting(200,
        "Audio per chunk record: a partial waits half a chunk on average for its audio to be captured.",
        section="ingest")
    audio_linger_ms: int = setting(5,
        "How long ingest's producer waits to batch audio chunks (librdkafka linger.ms): every ms here is a ms of "
        "caption latency.")
    output_linger_ms: int = setting(5, "The same for the services' outputs (transcripts, results).")
    audio_placement: str = setting("balanced",
        "balanced: a new stream goes to the online_asr replica, then the partition, with the fewest streams open on "
        "this ingest (services/ingest/placement.py); hash: the stream id's hash")
    max_upload_bytes: int = setting(256 * 1024 * 1024, "an encoded file larger than this is refused")
    max_stream_seconds: float = setting(4 * 3600.0, "a stream is cut (too_long) past this")
    max_ws_message_bytes: int = setting(1024 * 1024, "a larger WebSocket message closes the connection (1009)")
    ingest_host: str = setting("127.0.0.1", "the WebSocket endpoint (port 0: any free port)")
    ingest_port: int = setting(0, "the WebSocket endpoint's port")
    ingest_allowed_origins: str = setting("",
        "web page origins that may publish besides the captions page's own (comma list, e.g. https://app.example); "
        "clients that are not browsers send no Origin and are not affected")
    archive_segment_seconds: float = setting(30.0, "archived PCM is written in segments this long")
    ingest_buffer_bytes: int = setting(4 << 20,
        "the most source audio a live connection holds before archiving it, whatever its rate and channels (30 s at "
        "768 kHz x 24 channels would be 1.1 GB); larger segments are cut at this size")
    ingest_max_streams: int = setting(32,
        "admission (services/ingest/admission.py), per ingest replica, 0 for no limit: streams open at once (match it "
        "to the decoders: max_streams x online_asr replicas / ingest replicas), streams open per tenant, and audio "
        "seconds a tenant may publish in any hour")
    tenant_max_streams: int = setting(0, "streams open at once per tenant; 0: no limit")
    tenant_audio_seconds_per_hour: float = setting(16 * 3600.0,
        "16 h of audio an hour: 16 real-time streams all hour, or a few long uploads; 0: no quota")
    ingest_max_connections: int = setting(128,
        "WebSocket connections open at once on this replica, of anyone (refused before the token is read)")
    tenant_max_connections: int = setting(16, "WebSocket connections open at once per tenant; 0: no limit")
    live_pace_factor: float = setting(2.0,
        "a live stream publishes at most this many times faster than real time, once past its burst")
    live_burst_seconds: float = setting(10.0,
        "how far ahead of the wall clock a live stream's audio may run before it is refused (too_fast)")
    max_upload_seconds: float = setting(4 * 3600.0, "decoded audio per upload (a small file can decode to hours)")
    upload_idle_timeout_s: float = setting(60.0, "an upload that sends nothing this long is refused (idle)")
    ingest_upload_workers: int = setting(2, "threads that decode and publish uploads, apart from live streams'")
    ingest_upload_nice: int = setting(10, "their CPU priority (Linux nice), below live streams'")

    partial_interval_ms: int = setting(100,
        "at most one partial per this much audio (and per chunk)", section="online_asr")
    idle_timeout_s: float = setting(30.0, "a stream without audio this long is closed as IDLE_TIMEOUT")
    max_streams: int = setting(32, "open streams per online_asr/diarizer replica; beyond: dead-lettered (capacity)")
    prewarm_decoders: int = setting(4,
        "Building a decoder takes ~0.3 s holding the GIL (every stream stalls): build these at start.")
    nbest: int = setting(5, "online n-best list length per final")
    keep_lattices: bool = setting(True, "archive each utterance's word lattice")
    online_max_hmm_per_frame: int = setting(3000, "pocketsphinx search cap: cost vs WER (recognizer.py)")

    offline_model: str = setting("base", "base | tiny.en | path to a CTranslate2 Whisper folder", section="offline_asr")
    offline_device: str = setting("auto", "auto: cuda when a GPU is visible, else cpu")
    offline_compute_type: str = setting("auto", "auto: float16 on cuda, int8 on cpu")
    offline_cpu_threads: int = setting(0, "0: all cores")
    offline_beam_size: int = setting(5, "Whisper beam width")
    offline_nbest: int = setting(5, "0: no n-best pass")
    offline_language_fallback: str = setting("en",
        "the language a stream of language=auto is decoded in while detection is unsure; such a stream is \"und\"")
    offline_prompt_chars: int = setting(0,
        "Characters of the stream's previous offline text given to Whisper as its prompt. 0 (off): on the real-speech "
        "set it changed nothing, on repetitive speech it set off repetition loops (2x decode time, 2x WER), "
        "docs/decisions/stack-choices.md.")
    offline_min_window_s: float = setting(10.0,
        "decode once this much audio is pending and a pause is reached; shorter brings accurate text sooner at a cost "
        "in WER (bench.windows)")
    offline_max_window_s: float = setting(30.0, "never a longer window (Whisper's field)")
    offline_provisional_s: float = setting(1.0,
        "draft the audio of a window still growing once this much is undrafted (and as much, at most 1 s, came since "
        "the last try), as provisional text its own replaces; 0: off")
    offline_draft_agree: bool = setting(True,
        "a draft cut inside speech keeps the words it and the draft before it agree on (LocalAgreement-2) and shows "
        "the rest as tentative (provisional PARTIAL); off: it keeps the words ending 0.5 s before the cut")
    offline_draft_context_s: float = setting(30.0,
        "a draft decodes from this much before the words it has not kept yet (within their window), keeping only "
        "those: Whisper hears them in context, at the cost of a longer decode; 0: from the cut")
    offline_draft_model: str = setting("",
        "the Whisper model of the drafts (e.g. tiny.en); empty: offline_model's")
    offline_draft_batch: int = setting(4,
        "drafts of this many streams are decoded in one batched Whisper call (bench.draft_batch)")
    offline_draft_max_streams: int = setting(4,
        "draft only while a replica has at most this many open streams: 4 real-time streams fill 2 cores with every "
        "pass; docs/architecture.md#drafts-whisper-text-before-a-window-ends")
    offline_draft_nice: int = setting(19,
        "drafts run on a thread and model of their own at this niceness, below the windows and the online pass; "
        "docs/architecture.md#drafts-whisper-text-before-a-window-ends")
    offline_encode_pad_s: float = setting(2.0,
        "Padding the encoder sees after an unprompted window (30: Whisper's full input); bench.encoder_pad")
    offline_nice: int = setting(10,
        "The online pass is latency-critical, the offline one is not: lower its CPU priority.")
    offline_candidate_model: str = setting("",
        "A/B rollout: this share of streams (chosen by a stable hash of the stream id, so every replica and every "
        "replay agrees) is also decoded by a candidate model. Its records carry variant \"candidate\" and their model "
        "version; results serve the primary model's text. e.g. tiny.en; empty: no candidate")
    offline_candidate_fraction: float = setting(0.0, "share of streams also decoded by the candidate")

    diarizer_block_s: float = setting(6.0,
        "incremental turns run this far (plus compute) behind the audio",
        section="diarizer (defaults tuned on data/conversations and the pyannote sample: docs/architecture.md)")
    diarizer_context_s: float = setting(4.0, "audio before each block given to the segmentation model")
    diarizer_link_threshold: float = setting(0.65, "cosine similarity to join an existing speaker")
    diarizer_cluster_threshold: float = setting(0.4, "cosine distance, sub-segments within a block")
    diarizer_merge_threshold: float = setting(0.8, "full pass: merge speakers more similar than this")
    diarizer_min_speaker_s: float = setting(2.0,
        "full pass: less speech than this (or 10%) is not a speaker of its own")
    diarizer_threads: int = setting(1, "torch threads: on 2 cores the decoders need the rest")
    diarizer_nice: int = setting(19,
        "the online pass and the windows go first; at 10 the diarizer took the online pass's CPU and 5 full streams "
        "failed make load (partial p95 1.3-3.0 s, against 0.7-0.8 s at 19: measurements)")
    voice_match_threshold: float = setting(0.77,
        "a speaker is named when this similar to an enrolled voice (bench.voices)")
    voice_live_min_s: float = setting(4.0, "live turns carry a name once the speaker has this much speech")
    voiceprint_retention_days: float = setting(365.0, "enrolled voices older than this are erased (0: kept)")

    max_transcript_words: int = setting(20000, "per pass kept for STREAM_COMPLETE (then truncated)", section="results")
    results_wait_for: str = setting("online,offline,diarizer", "passes that must end before STREAM_COMPLETE")
    offline_timeout_s: float = setting(600.0, "after the online end, give up waiting for offline")

    captions_host: str = setting("127.0.0.1",
        "where the captions page, its search and export API listen (port 0: any free port)",
        section="captions page, search and exports (services/captions)")
    captions_port: int = setting(0, "the captions page's port")
    captions_allowed_hosts: str = setting("",
        "host names the page answers to beyond loopback (comma list; what a proxy in front uses)")
    index_path: str = setting("", "SQLite file; default <data_dir>/index/transcripts.sqlite")
    captions_ingest_url: str = setting("",
        "ingest's WebSocket as a browser reaches it, for the page's Record button (ws:// or wss://); empty: the "
        "page's own host name at ingest_port (wss:// when the page came over https)")

    commit_interval_s: float = setting(0.1,
        "Consume-transform-produce services commit their input offsets and their output in one Kafka transaction this "
        "often while there is work; read_committed readers see output only then.", section="every service")
    transaction_timeout_s: float = setting(60.0,
        "A transaction left open by a crashed process blocks read_committed readers of its output partitions until "
        "the broker aborts it after this long (a restarted replica aborts it at once).")
    session_timeout_s: float = setting(45.0,
        "A member that stops heartbeating loses its partitions after this long. Long enough to ride out a broker "
        "restart (~16 s measured) without a rebalance; a replica restarted with the same instance_id takes its "
        "partitions back at once (static membership), whatever this says.")
    instance_id: str = setting("",
        "Identity of this replica, stable across its restarts: its transactional id is \"<group>-<instance_id>\" (a "
        "restart aborts what its predecessor left open at once) and its static group membership (a restart rejoins "
        "without a rebalance). The embedded stack sets \"<service>-<n>\"; \"@hostname\" takes the host name (one "
        "replica per container). Empty: the host name and process id, safe for any number of replicas on a host, but "
        "a crashed replica's open transaction then blocks read_committed readers until transaction_timeout_s.")
    health_host: str = setting("127.0.0.1", "/healthz and /metrics (port 0: any free port)")
    health_port: int = setting(0, "the port of /healthz and /metrics")
    log_level: str = setting("INFO", "JSON log lines on stderr")
    # fmt: on

    kafka_extra: dict[str, str] = field(default_factory=dict)

    # ---- derived -------------------------------------------------------------------
    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def audio_topic(self) -> str:
        return self.topic("audio")

    @property
    def online_topic(self) -> str:
        return self.topic("transcripts.online")

    @property
    def offline_topic(self) -> str:
        return self.topic("transcripts.offline")

    @property
    def speakers_topic(self) -> str:
        return self.topic("speakers")

    @property
    def results_topic(self) -> str:
        return self.topic("results")

    @property
    def deadletter_topic(self) -> str:
        return self.topic("deadletter")

    def published_topic(self, tenant: str) -> str:
        """A tenant's published tier: plain Confluent-framed Avro its own client logins read."""
        return self.topic(f"published.{tenant}")

    def produce_topic(self, tenant: str) -> str:
        """Where a tenant's own producers publish audio (ingest reads it and applies its doors)."""
        return self.topic(f"audio-in.{tenant}")

    @property
    def all_topics(self) -> list[str]:
        return [
            self.audio_topic,
            self.online_topic,
            self.offline_topic,
            self.speakers_topic,
            self.results_topic,
            self.deadletter_topic,
        ]

    @property
    def index_file(self) -> Path:
        return Path(self.index_path) if self.index_path else self.data_dir / "index" / "transcripts.sqlite"

    @property
    def archive(self) -> str:
        return self.archive_uri or (self.data_dir / "archive").resolve().as_uri()

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def load(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if environ is None else environ
        s = cls()
        for f in dataclasses.fields(cls):
            if f.name == "kafka_extra":
                continue
            raw = env.get("HARK_" + f.name.upper())
            if raw is not None and raw != "":
                try:
                    setattr(s, f.name, _coerce(f, raw, getattr(s, f.name)))
                except ValueError:
                    kind = type(getattr(s, f.name)).__name__
                    raise ConfigError(f"HARK_{f.name.upper()}={raw!r} is not a valid {kind}") from None
        s.kafka_extra = {
            k[len("HARK_KAFKA_") :].lower().replace("_", "."): v for k, v in env.items() if k.startswith("HARK_KAFKA_")
        }
        for k, v in overrides.items():
            if v is None:
                continue
            if not hasattr(s, k):
                raise TypeError(f"unknown setting {k!r}")
            setattr(s, k, Path(v) if k == "data_dir" else v)
        s.validate()
        return s

    def validate(self) -> None:
        """ConfigError for the first setting outside what it accepts."""
        for name, (lo, hi) in RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(f"HARK_{name.upper()}={value} is outside {lo:g}..{hi:g}")
        for name, options in CHOICES.items():
            if getattr(self, name) not in options:
                raise ConfigError(f"HARK_{name.upper()}={getattr(self, name)!r} is not one of {', '.join(options)}")
        if self.offline_language_fallback not in WHISPER:
            raise ConfigError(
                f"HARK_OFFLINE_LANGUAGE_FALLBACK={self.offline_language_fallback!r} is not a Whisper language code"
            )
        from .declaration import passes  # the services' declarations name the passes

        waits = [p.strip() for p in self.results_wait_for.split(",") if p.strip()]
        if not waits or not set(waits) <= set(passes()):
            raise ConfigError(f"HARK_RESULTS_WAIT_FOR={self.results_wait_for!r}: a comma list of {', '.join(passes())}")
        if self.offline_min_window_s > self.offline_max_window_s:
            raise ConfigError("HARK_OFFLINE_MIN_WINDOW_S is above HARK_OFFLINE_MAX_WINDOW_S")

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "kafka_extra":
                out.update({"HARK_KAFKA_" + k.upper().replace(".", "_"): val for k, val in v.items()})
            else:
                out["HARK_" + f.name.upper()] = str(v).lower() if isinstance(v, bool) else str(v)
        return out


def _coerce(f: dataclasses.Field, raw: str, current):
    if isinstance(current, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, Path):
        return Path(raw)
    return raw
