"""The captions server's reader of the results topic: indexes every record and fans live events
out to the pages following each stream."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

from confluent_kafka import KafkaError

from hark import kafka, serde
from hark.config import Settings
from hark.keys import Keyring
from hark.runtime import DeadLetters, Metrics, key_of

from .index import TranscriptIndex, majority_speaker, word_times

log = logging.getLogger("hark.captions")

MAX_LIVE_PARTIALS = 1000  # streams whose current partial is kept for pages that open mid-utterance
SUBSCRIBER_QUEUE = 1000  # events a slow page may lag behind before it is dropped


MAX_SEARCH_HITS = 200


def caption_event(r: dict) -> dict:
    """What a page needs of a Result record."""
    return {
        "kind": str(r["kind"]),
        "source": r["source"],
        "utterance_id": r["utterance_id"],
        "start_ms": r["start_ms"],
        "end_ms": r["end_ms"],
        "text": r["text"],
        "speaker": majority_speaker(r.get("words") or []),
        "status": r.get("status"),
        "final_source": r.get("final_source"),
        "language": r.get("language"),
        "language_probability": r.get("language_probability"),
        "emitted_at_ms": r["emitted_at_ms"],
        **({"turns": r["turns"]} if str(r["kind"]) == "SPEAKERS" else {}),
        # every caption's word times: text replaced by a later pass keeps its words outside that range
        **({"words": word_times(r.get("words") or [])} if str(r["kind"]) in ("PARTIAL", "FINAL") else {}),
    }


class Hub:
    """Fans events out from the follower thread to the asyncio queues of connected pages."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Queue]] = {}
        self._lock = threading.Lock()

    def subscribe(self, sid: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subs.setdefault(sid, set()).add(q)
        return q

    def unsubscribe(self, sid: str, q: asyncio.Queue) -> None:
        with self._lock:
            subs = self._subs.get(sid)
            if subs:
                subs.discard(q)
                if not subs:
                    del self._subs[sid]

    def publish(self, sid: str, event: dict) -> None:
        with self._lock:
            queues = list(self._subs.get(sid, ()))
        if queues and self.loop is not None:
            self.loop.call_soon_threadsafe(self._deliver, queues, event)

    @staticmethod
    def _deliver(queues, event) -> None:
        for q in queues:
            if q.full():  # a page that stopped reading: end its stream rather than buffer without bound
                while not q.empty():  # (EventSource reconnects and gets the history again)
                    q.get_nowait()
                q.put_nowait(None)
                continue
            q.put_nowait(event)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subs.values())


class ResultsFollower(threading.Thread):
    def __init__(self, settings: Settings, hub: Hub, metrics: Metrics):
        super().__init__(name="results-follower", daemon=True)
        self.settings, self.hub, self.metrics = settings, hub, metrics
        self.partials: OrderedDict[str, dict] = OrderedDict()
        self.last_loop = time.monotonic()
        self.partitions = 0
        self.stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        index = TranscriptIndex(self.settings.index_file)
        topic = self.settings.results_topic
        producer = kafka.producer(self.settings, **{"client.id": "hark-captions"})
        keys = Keyring.for_settings(self.settings)
        deadletters = DeadLetters(producer, self.settings, "captions", self.metrics, keys=keys)
        try:
            consumer = kafka.tail_consumer(self.settings, topic, offsets=index.offsets(topic))
            self.partitions = len(consumer.assignment())
            while not self.stopping.is_set():
                self.last_loop = time.monotonic()
                batch = []
                for m in kafka.consume_ready(consumer, 500, 0.05):
                    if m.error():
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", m.error())
                        continue
                    if m.value() is None:  # a tombstone (`hark erase`): forget the stream, tell its pages
                        if m.key():
                            sid = m.key().decode("utf-8", "replace")
                            batch.append((sid, m.topic(), m.partition(), m.offset()))
                            self.partials.pop(sid, None)
                            keys.forget(sid)
                            self.hub.publish(sid, {"kind": "ERASED", "stream_id": sid})
                            self.metrics.inc("streams_erased_total")
                        continue
                    try:
                        rtype, rec = serde.decode_message(m, keys)
                    except serde.Erased:  # its key is gone: nothing readable to index
                        self.metrics.inc("records_of_erased_streams_total")
                        continue
                    except serde.SerdeError as e:  # kept with its reason; every other record goes on
                        deadletters.send("malformed_record", str(e), msg=m, stream_id=key_of(m))
                        continue
                    if rtype != "Result":
                        continue
                    self._live(rec)
                    batch.append((rec, m.topic(), m.partition(), m.offset()))
                if batch:
                    index.apply(batch)
                    self.metrics.inc("records_indexed_total", len(batch))
                producer.poll(0)
            consumer.close()
            producer.flush(10)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("follower stopped")
        finally:
            index.close()

    def _live(self, rec: dict) -> None:
        sid, kind = rec["stream_id"], str(rec["kind"])
        event = caption_event(rec)
        if kind == "PARTIAL" and rec["source"] == "online":  # a draft's tentative words are only shown live
            self.partials[sid] = event
            self.partials.move_to_end(sid)
            while len(self.partials) > MAX_LIVE_PARTIALS:
                self.partials.popitem(last=False)
        elif kind in ("FINAL", "STREAM_COMPLETE") and (kind == "STREAM_COMPLETE" or rec["source"] == "online"):
            self.partials.pop(sid, None)
        if kind != "ALTERNATIVES":
            self.hub.publish(sid, event)
            self.metrics.inc("events_published_total")

    def healthy(self) -> tuple[bool, dict]:
        stalled = time.monotonic() - self.last_loop
        ok = self.is_alive() and self.error is None and stalled < 15
        return ok, {
            "loop_stalled_s": round(stalled, 2),
            "partitions": self.partitions,
            "subscribers": self.hub.subscribers,
            **({"error": self.error} if self.error else {}),
        }
