"""A consume-transform-produce loop's output, committed with its input offsets in Kafka transactions.

A commit takes the broker tens of milliseconds (~36 ms median on the embedded broker,
``python -m bench.broker``); done on the loop's own thread every 0.1 s it kept the decoder idle a
third of the time, and 8 online streams fell seconds behind on two cores. So ``commit`` hands the
open transaction to a committer thread and returns at once: the loop goes on decoding, records it
sends meanwhile wait in memory, and they open the next transaction once the commit is done.
Everything a commit covers was sent before it started, so each transaction still holds exactly
the output of the offsets it commits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

from confluent_kafka import KafkaException

log = logging.getLogger("hark")

# librdkafka's send_offsets_to_transaction ignores its timeout and can wait forever once the
# group coordinator it cached went away (librdkafka issues 5456 and 5511; seen here after every
# broker restart): a commit that does not finish in time ends the process, and its restart
# resumes from the last commit. A commit takes ~40 ms. One that lost its broker connection midway,
# or began soon after a loss, is wedged once the brokers have answered again for RECONNECTED_S
# without it finishing (the producer reports a lost connection every second until it is back):
# the embedded broker restarts in ~5 s, and waiting out the whole deadline kept every service of
# the stack stalled for 30 s after it (tests/test_chaos.py's broker scenarios).
COMMIT_DEADLINE_S = 30.0
Headers = list[tuple[str, bytes]] | None
RECONNECTED_S = 8.0


def _wedged(transactional_id: str, waited_s: float) -> None:
    log.error(
        "a transaction commit did not finish in %.0f s: exiting to restart from the last commit",
        waited_s,
        extra={"fields": {"transactional_id": transactional_id}},
    )
    logging.shutdown()
    os._exit(70)


class Transactions:
    """``send`` adds a record to the open transaction (or, while a commit is in flight, to the
    records waiting for the next one); ``commit`` starts committing what was sent with the given
    offsets; ``wait`` returns once no commit is in flight. A failed commit raises RuntimeError
    from the next call: the caller's state is then ahead of the log and it must restart."""

    MAX_WAITING = 10_000  # records sent during one commit; beyond, send waits for the commit

    def __init__(self, producer, transactional_id: str):
        self.producer, self.transactional_id = producer, transactional_id
        self._open = False
        self._inflight: concurrent.futures.Future | None = None
        self._started = 0.0  # when the commit in flight began (monotonic)
        self._waiting: list[tuple[str, bytes | None, bytes | None, Headers]] = []
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="commit")

    def init(self) -> None:
        self.producer.init_transactions(60)  # aborts what a predecessor with this id left open

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers = None) -> None:
        if self._inflight is not None:
            if not self._inflight.done() and len(self._waiting) < self.MAX_WAITING:
                self._waiting.append((topic, key, value, headers))
                return
            self.wait()
        self._produce(topic, key, value, headers)

    def commit(self, offsets: list, group_metadata) -> bool:
        """Start committing everything sent so far with ``offsets`` (TopicPartitions with metadata).
        False when there is nothing to commit."""
        self.wait()
        if not offsets and not self._open:
            return False
        if not self._open:
            self.producer.begin_transaction()
            self._open = True
        self._started = time.monotonic()
        self._inflight = self._committer.submit(self._commit, offsets, group_metadata)
        return True

    def _wedged_now(self) -> bool:
        """Past the deadline; or the brokers were lost during the commit or shortly before it (its
        coordinator may be a stale one), and it has not finished RECONNECTED_S after both its start
        and the last loss."""
        now, lost = time.monotonic(), getattr(self.producer, "broker_lost_at", None)
        if now - self._started > COMMIT_DEADLINE_S:
            return True
        if lost is None or lost < self._started - COMMIT_DEADLINE_S:
            return False
        return now - max(lost, self._started) > RECONNECTED_S

    def wait(self) -> None:
        if self._inflight is None:
            return
        future, self._inflight = self._inflight, None
        try:
            while True:
                try:
                    future.result(timeout=0.5)
                    break
                except concurrent.futures.TimeoutError:
                    self.producer.poll(0)  # serves the error callback that reports lost connections
                    if self._wedged_now():
                        _wedged(self.transactional_id, time.monotonic() - self._started)
        except KafkaException as e:
            raise RuntimeError(f"transaction failed, restarting from the last commit: {e}") from e
        self._open = False
        waiting, self._waiting = self._waiting, []
        for topic, key, value, headers in waiting:
            self._produce(topic, key, value, headers)

    def close(self) -> None:
        self._committer.shutdown(wait=False)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers = None) -> None:
        if not self._open:
            self.producer.begin_transaction()
            self._open = True
        if headers:
            self.producer.produce(topic, key=key, value=value, headers=headers)
        else:
            self.producer.produce(topic, key=key, value=value)

    def _commit(self, offsets: list, group_metadata) -> None:
        if offsets:
            self.producer.send_offsets_to_transaction(offsets, group_metadata, 30)
        self.producer.commit_transaction(60)
