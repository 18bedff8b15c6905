"""What a consumer commits and what it reads back: positions, holds and resume metadata.

Pure bookkeeping, no Kafka client: ConsumerService (consumer.py) feeds it what it read and what
the group coordinator handed back, and asks it what to commit. Kept apart so that the
exactly-once rules are unit-tested on their own (tests/test_runtime.py):

- **positions**: per partition, the next offset to read; a re-read never moves one back.
- **holds**: per open stream (a key), the earliest record it needs re-read after a crash, and the
  state to resume it from there. A commit never passes a hold, so stream state is rebuilt from
  the log, never lost.
- **metadata**: each committed offset carries, in the same transaction, how far input was
  processed (``processed``: the output of records below it is committed already, so a replay
  produces nothing), which streams were open (``held``) and how each resumes (``streams``).
- **read back** at assignment: records below ``processed`` are replayed silently, a held
  stream resumes from its state, and a stream that was not held completed before the
  checkpoint (its replayed records must not rebuild it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Hold:
    topic: str
    partition: int
    offset: int
    state: dict | None = None  # how the key resumes from ``offset`` (JSON-able), or from its start

    @property
    def tp(self) -> TP:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class Commit:
    """One partition's offset and metadata to commit."""

    topic: str
    partition: int
    offset: int
    metadata: str


class Checkpoints:
    def __init__(self) -> None:
        self.positions: dict[TP, int] = {}  # next offset to read, per partition
        self.assigned: set[TP] = set()
        self.committed: dict[TP, int] = {}  # the group's committed offset, where known
        self._holds: dict[str, Hold] = {}
        # read back from the commits at assignment, per partition (dropped with it at a revoke)
        self._restored: dict[str, tuple[TP, dict]] = {}  # key -> its partition, {"offset", "state"}
        self._replay_until: dict[TP, int] = {}  # outputs below these offsets are committed
        self._was_held: dict[str, TP] = {}  # keys open (held) at the commits read back
        self._sent: dict[TP, tuple[int, str]] = {}  # offset + metadata last committed per partition

    # -- reading --------------------------------------------------------------------------------
    def replays(self, tp: TP, offset: int) -> bool:
        """The record at ``offset`` was processed before the last checkpoint: its output is
        committed, so processing it again must produce nothing."""
        return offset < self._replay_until.get(tp, -1)

    def processed(self, tp: TP, offset: int) -> None:
        self.positions[tp] = max(self.positions.get(tp, 0), offset + 1)  # a re-read never moves it back

    def advance(self, tp: TP, position: int) -> None:
        """The client's own position, which steps over transaction markers after the last record:
        committing it lets a caught-up group show lag 0. Only ever forward, and only for
        partitions with something processed."""
        if tp in self.positions and position > self.positions[tp]:
            self.positions[tp] = position

    # -- holds ----------------------------------------------------------------------------------
    def hold(self, key: str, tp: TP, offset: int, state: dict | None = None) -> None:
        self._holds[key] = Hold(tp[0], tp[1], offset, state)

    def release(self, key: str) -> None:
        self._holds.pop(key, None)

    def holds(self) -> dict[str, Hold]:
        return dict(self._holds)

    def restored(self, key: str) -> dict | None:
        """The checkpointed resume point of ``key`` read back at assignment: {"offset", "state"}."""
        got = self._restored.get(key)
        return got[1] if got else None

    def forget_restored(self, key: str) -> None:
        self._restored.pop(key, None)

    def was_held(self, key: str) -> bool:
        return key in self._was_held

    # -- committing -----------------------------------------------------------------------------
    def commit_positions(self) -> dict[TP, int]:
        """Offsets safe to commit: everything processed, but never past a hold."""
        positions = dict(self.positions)
        for h in self._holds.values():
            if h.tp in positions:
                positions[h.tp] = min(positions[h.tp], h.offset)
        return positions

    def metadata(self, tp: TP) -> str:
        held = sorted(k for k, h in self._holds.items() if h.tp == tp)
        streams = {
            k: {"offset": self._holds[k].offset, "state": self._holds[k].state}
            for k in held
            if self._holds[k].state is not None
        }
        return json.dumps(
            {"processed": self.positions[tp], "held": held, "streams": streams}, sort_keys=True, separators=(",", ":")
        )

    def pending(self) -> list[Commit]:
        """What changed since the last commit: each partition whose offset or metadata moved."""
        out = []
        for tp, offset in sorted(self.commit_positions().items()):
            meta = self.metadata(tp)
            if self._sent.get(tp) != (offset, meta):
                out.append(Commit(tp[0], tp[1], offset, meta))
        return out

    def sent(self, commits: list[Commit]) -> None:
        """``commits`` went into a transaction (a failed one ends the process, so sent counts as done)."""
        for c in commits:
            self._sent[(c.topic, c.partition)] = (c.offset, c.metadata)
            self.committed[(c.topic, c.partition)] = c.offset

    # -- ownership ------------------------------------------------------------------------------
    def assign(self, committed: list[tuple[TP, str | None]]) -> None:
        """Partitions handed to this process, each with its committed metadata (None: none)."""
        for tp, metadata in committed:
            ck = json.loads(metadata) if metadata and metadata.startswith("{") else {}
            if "processed" in ck:
                self._replay_until[tp] = ck["processed"]
            self._restored.update({k: (tp, v) for k, v in ck.get("streams", {}).items()})
            self._was_held.update(dict.fromkeys(ck.get("held", []), tp))
            self.assigned.add(tp)

    def revoke(self, gone: list[TP]) -> None:
        """Partitions another process owns now: their holds and positions go with them."""
        gone_set = set(gone)
        self._holds = {k: h for k, h in self._holds.items() if h.tp not in gone_set}
        self._restored = {k: v for k, v in self._restored.items() if v[0] not in gone_set}
        self._was_held = {k: tp for k, tp in self._was_held.items() if tp not in gone_set}
        for tp in gone:
            self.assigned.discard(tp)
            self.positions.pop(tp, None)
            self.committed.pop(tp, None)
            self._replay_until.pop(tp, None)
            self._sent.pop(tp, None)
