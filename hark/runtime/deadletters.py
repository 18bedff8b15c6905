"""Refused input: the reason it is refused, and the dead-letter record that keeps it."""

from __future__ import annotations

import logging

from confluent_kafka import Message

from .. import serde
from ..config import Settings
from ..keys import KeyMissing, Keyring, StreamErased
from ..pcm import BYTES_PER_SAMPLE, BYTES_PER_SECOND, SAMPLE_RATE
from ..records import DeadLetter, now_ms
from .observe import Metrics, kv

log = logging.getLogger("hark")

DEADLETTER_PAYLOAD_CAP = 1024 * 1024


class DeadLetters:
    """``send_record(topic, key, value)`` produces (a transactional service passes its own, so the
    dead letter commits with the offset of the record it replaces); default the producer's."""

    def __init__(
        self,
        producer,
        settings: Settings,
        service: str,
        metrics: Metrics,
        send_record=None,
        keys: Keyring | None = None,
    ):
        self.producer, self.topic, self.service, self.metrics = producer, settings.deadletter_topic, service, metrics
        self.keys = keys
        self.send_record = send_record or (lambda topic, key, value: producer.produce(topic, key=key, value=value))

    def send(
        self,
        error_type: str,
        reason: str,
        *,
        msg: Message | None = None,
        stream_id: str | None = None,
        tenant: str | None = None,
        payload: bytes | None = None,
        payload_size: int | None = None,
    ) -> None:
        if msg is not None and payload is None:
            payload = msg.value()
        size = payload_size if payload_size is not None else (len(payload) if payload else 0)
        key = msg.key() if msg is not None else (stream_id.encode() if stream_id else None)
        record = DeadLetter(
            service=self.service,
            error_type=error_type,
            reason=reason[:2000],
            stream_id=stream_id,
            tenant=tenant,
            source_topic=msg.topic() if msg is not None else None,
            source_partition=msg.partition() if msg is not None else None,
            source_offset=msg.offset() if msg is not None else None,
            key=key,
            payload=payload[:DEADLETTER_PAYLOAD_CAP] if payload else None,
            payload_size=size,
            failed_at_ms=now_ms(),
        )
        sid = stream_id or (key.decode("utf-8", "replace") if key else None)
        try:  # sealed with the stream's key like the stream's other records: erasing it covers these too
            value = serde.encode("DeadLetter", record, keys=self.keys, stream_id=sid)
        except StreamErased:
            self.metrics.inc("deadletters_of_erased_streams_total")
            return
        except KeyMissing:  # no stream, or one ingest never accepted: nothing to seal with
            value = serde.encode("DeadLetter", record)
        self.send_record(self.topic, key, value)
        self.metrics.inc("deadletters_total")
        log.warning("dead-lettered: %s", reason, extra=kv(error_type=error_type, stream_id=stream_id))


class InputError(ValueError):
    """A record that is well-formed Avro but cannot be processed (bad PCM, wrong rate...)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


MAX_CHUNK_BYTES = BYTES_PER_SECOND * 10  # 10 s; a chunk is 200 ms by default, anything this big is an error


def check_chunk(rec: dict) -> bytes:
    """The PCM of an AudioChunk record, or InputError saying what is wrong with it."""
    pcm = rec["pcm"]
    if rec["sample_rate"] != SAMPLE_RATE:
        raise InputError("bad_sample_rate", f"chunk sample rate {rec['sample_rate']} (expected {SAMPLE_RATE})")
    if len(pcm) % BYTES_PER_SAMPLE:
        raise InputError("bad_pcm", f"chunk has an odd byte count ({len(pcm)}) for 16-bit PCM")
    if len(pcm) > MAX_CHUNK_BYTES:
        raise InputError("chunk_too_large", f"chunk of {len(pcm)} bytes exceeds {MAX_CHUNK_BYTES}")
    return pcm
