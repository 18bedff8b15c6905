"""results service: online and offline transcripts and speaker turns in, Result records out (one
topic, keyed by stream).

A consume-transform-produce loop on confluent-kafka transactions like every other service, not a
faust-streaming app: a changelog table holding each stream's merge state would rewrite that state
on every record (docs/decisions/0003-results-merge.md). The state is rebuilt from the input topics
themselves: commits are held at each open stream's first record on each topic.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Message

from hark import kafka, published, serde
from hark.config import Settings
from hark.keys import KeyMissing, StreamErased
from hark.records import Result
from hark.runtime import ERASED, ConsumerService, InputError, main_for

from .merger import ResultsMerger
from .parts import DiskParts
from .spec import SPEC

log = logging.getLogger("hark.results")


class Results(ConsumerService):
    name = SPEC.name
    group = SPEC.consumer_group

    def __init__(self, settings: Settings):
        super().__init__(settings)
        wait_for = tuple(p.strip() for p in settings.results_wait_for.split(",") if p.strip())
        parts = DiskParts(settings.data_dir / "spill", self._seal, self._unseal)
        self.merger = ResultsMerger(
            settings.max_transcript_words,
            wait_for,
            settings.offline_timeout_s,
            settings.max_stream_seconds,
            parts,
            settings.offline_language_fallback,
        )
        self.partitions_of: dict[str, set[tuple[str, int]]] = {}
        self.publisher = published.Publisher(settings) if published.enabled(settings) else None
        lag_s = min(settings.published_compaction_lag_s, settings.produce_compaction_lag_s)
        self.nudges = published.Nudges(lag_s, lambda: published.end_offsets(settings))
        self._nudge_period_s = max(1.0, min(60.0, lag_s / 10))
        self._nudged_at = 0.0
        self._nudger = kafka.producer(settings) if self.publisher else None

    @property
    def topics(self) -> list[str]:
        return [self.settings.online_topic, self.settings.offline_topic, self.settings.speakers_topic]

    def handle(self, rtype: str, rec: dict, msg: Message) -> None:
        if rtype == "OnlineTranscript":
            merge = self.merger.on_online
        elif rtype == "OfflineTranscript":
            merge = self.merger.on_offline
        elif rtype == "SpeakerTurns":
            merge = self.merger.on_speakers
        else:
            raise InputError("unexpected_record", f"{rtype} does not belong on {msg.topic()}")
        topic, partition, _ = kafka.position(msg)
        sid, tp = rec["stream_id"], (topic, partition)
        if rec.get("end_status") == ERASED:  # a pass's notice that `hark erase` ended the stream
            self.stream_erased(sid, rec.get("tenant"))
            return
        if self.finished_before_checkpoint(f"{sid}@{msg.topic()}"):
            return
        self._publish(merge(rec))
        if self.merger.is_open(sid):
            held = self.partitions_of.setdefault(sid, set())
            if tp not in held:  # the first record of this stream on this topic: rebuild from here
                held.add(tp)
                self.hold(f"{sid}@{msg.topic()}", msg)
        self.metrics.set("open_streams", len(self.merger.streams))

    def _seal(self, sid: str, data: bytes, where: bytes) -> bytes:
        try:
            return b"S" + self.keys.seal(sid, data, where)
        except KeyMissing:  # the stream's input came unsealed (hand-made): so may its parts
            return b"P" + data
        except StreamErased:
            raise serde.Erased(sid) from None

    def _unseal(self, sid: str, body: bytes, where: bytes) -> bytes:
        try:
            return self.keys.open(sid, body[1:], where) if body[:1] == b"S" else body[1:]
        except StreamErased:
            raise serde.Erased(sid) from None

    def _publish(self, results: list[Result]) -> None:
        for result in results:
            # made first: what fails in it fails before the sealed Result is sent (both or neither)
            plain = self.publisher.message(result) if self.publisher and not self.replaying else None
            if self.produce(self.settings.results_topic, result["stream_id"], "Result", result) and plain:
                self._publish_tier(plain)
            if result["kind"] == "STREAM_COMPLETE":
                self._release_stream(result["stream_id"])

    def _publish_tier(self, message: tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]) -> None:
        """The tenant's plain copy of a final or a complete transcript (hark/published.py), or a
        tombstone, in the same transaction as the sealed Results: both or neither."""
        topic, key, value, headers = message
        self.transactions.send(topic, key, value, headers)
        self.metrics.inc("records_out_total", topic="published")

    def _nudge(self) -> None:
        """Roll quiet published partitions so compaction reaches erased streams (published.Nudges)."""
        now = time.monotonic()
        if self._nudger is None or now - self._nudged_at < self._nudge_period_s:
            return
        if (self.settings.online_topic, 0) not in self._assigned:
            return  # one replica nudges (two would nudge each other's nudges for ever)
        self._nudged_at = now
        try:
            due = self.nudges.due()
        except Exception as e:  # the broker busy or away: the next period tries again
            log.warning("cannot read the published partitions' ends: %s", e)
            return
        for topic, partition in due:
            self._nudger.produce(topic, key=b"", value=None, partition=partition)
            self.metrics.inc("published_nudges_total")
        self._nudger.poll(0)

    def _release_stream(self, sid: str) -> None:
        self.keys.forget(sid)
        for topic, _ in self.partitions_of.pop(sid, ()):
            self.release(f"{sid}@{topic}")

    def tick(self) -> None:
        self._nudge()
        if self.sweep_due():
            self._publish(self.merger.expire())
            for sid in [s for s in self.partitions_of if not self.merger.is_open(s)]:
                self._release_stream(sid)  # abandoned by the merger: release its holds
            self.metrics.set("streams_abandoned", self.merger.abandoned)

    def stream_erased(self, stream_id: str, tenant: str | None = None) -> None:
        """Its merge state is dropped unpublished; later records of it no longer open (key gone).
        A tombstone follows whatever plain copy this process wrote of it before it knew (its key
        was still in memory): `hark erase`'s own tombstone may be older than those."""
        st = self.merger.streams.get(stream_id)
        tenant = tenant or (st.tenant if st is not None else None)
        topic = self.settings.published_topic(tenant) if tenant else None
        if self.publisher and topic in self.publisher.topics() and not self.replaying:
            self._publish_tier((topic, stream_id.encode(), None, []))
        self.merger.drop(stream_id)
        self.merger.completed.add(stream_id)
        self._release_stream(stream_id)

    def partitions_revoked(self, partitions: list[tuple[str, int]]) -> None:
        # Streams on revoked partitions are rebuilt by their new owner from the held offsets.
        gone = set(partitions)
        for sid in [s for s, tps in self.partitions_of.items() if tps & gone]:
            self.merger.drop(sid)
            self._release_stream(sid)


def main(argv: list[str] | None = None) -> None:
    main_for(Results, SPEC.name, argv)
