"""results service: online transcripts in, Result records out (one topic, keyed by stream).

Written with confluent-kafka rather than faust-streaming: this state must survive restarts,
and on the embedded Tansu broker Faust's table recovery stops at a wrong end offset and its
transactions fail (README, "Why not Faust"). The state is instead rebuilt from the input
topic itself: commits are held at each open stream's first record.
"""
from __future__ import annotations

from confluent_kafka import Message

from hark.config import Settings
from hark.runtime import ConsumerService, InputError, main_for

from .merger import ResultsMerger


class Results(ConsumerService):
    name = "results"
    group = "hark-results"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.merger = ResultsMerger(settings.max_transcript_words)
        self.partition_of: dict[str, int] = {}

    @property
    def topics(self) -> list[str]:
        return [self.settings.online_topic]

    def handle(self, rtype: str, rec: dict, msg: Message) -> None:
        if rtype != "OnlineTranscript":
            raise InputError("unexpected_record", f"{rtype} does not belong on {msg.topic()}")
        sid = rec["stream_id"]
        if not self.merger.is_open(sid):
            self.hold(sid, msg)
            self.partition_of[sid] = msg.partition()
        for result in self.merger.on_online(rec):
            self.produce(self.settings.results_topic, sid, "Result", result)
        if not self.merger.is_open(sid):
            self.release(sid)
            self.partition_of.pop(sid, None)
        self.metrics.set("open_streams", len(self.merger.streams))

    def partitions_revoked(self, partitions):
        # Streams on revoked partitions are rebuilt by their new owner from the held offsets.
        gone = {p for _, p in partitions}
        for sid in [s for s, p in self.partition_of.items() if p in gone]:
            self.merger.streams.pop(sid, None)
            del self.partition_of[sid]


def main(argv: list[str] | None = None) -> None:
    main_for(Results, argv)
