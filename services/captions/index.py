"""The transcript index: one SQLite file (FTS5) built from the results topic; no Kafka here.

What is indexed, per stream:
- every FINAL's 1-best (online per utterance, offline per window) with its words and times;
- every alternative: the online n-best of each utterance, the offline n-best (ALTERNATIVES) of
  each window, and online 1-best text that an offline window has superseded (it is then the
  other decoder's hypothesis for that range);
- the STREAM_COMPLETE record (the merged transcript that exports are made from).

Idempotent and crash-safe: each row has a natural key (stream, pass, index, rank) and the
consumed offsets are stored in the same SQLite transaction as the rows they produced, so a
replayed or re-read record changes nothing and a crash loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path

from hark.wer import normalise

log = logging.getLogger("hark.captions")

SCHEMA = """
PRAGMA journal_mode=WAL;
-- deleted rows are overwritten with zeros, not left in free pages (erasure)
PRAGMA secure_delete=ON;
CREATE TABLE IF NOT EXISTS offsets (topic TEXT, partition INTEGER, next_offset INTEGER,
                                    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS streams (stream_id TEXT PRIMARY KEY, tenant TEXT, status TEXT, final_source TEXT,
                                    first_seen_ms INTEGER, updated_ms INTEGER, end_ms INTEGER, complete TEXT);
CREATE TABLE IF NOT EXISTS hyps (id INTEGER PRIMARY KEY, key TEXT UNIQUE, stream_id TEXT, tenant TEXT,
                                 pass TEXT, source TEXT, start_ms INTEGER, end_ms INTEGER, rank INTEGER,
                                 score REAL, text TEXT, words TEXT, norm TEXT);
CREATE INDEX IF NOT EXISTS hyps_stream ON hyps (stream_id, pass, start_ms);
-- erased streams: records of theirs read later (the topic is compacted only eventually) are ignored
CREATE TABLE IF NOT EXISTS erased (stream_id TEXT PRIMARY KEY, erased_ms INTEGER) WITHOUT ROWID;
-- FTS over the WER normalisation of the text (lower case, no punctuation, digits and "Mr." spelt
-- out), which queries go through too: "Mr. Dashwood" finds "mister dashwood" and vice versa.
CREATE VIRTUAL TABLE IF NOT EXISTS hyps_fts USING fts5(norm, content='hyps', content_rowid='id',
                                                       tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS hyps_ai AFTER INSERT ON hyps BEGIN
  INSERT INTO hyps_fts (rowid, norm) VALUES (new.id, new.norm); END;
CREATE TRIGGER IF NOT EXISTS hyps_ad AFTER DELETE ON hyps BEGIN
  INSERT INTO hyps_fts (hyps_fts, rowid, norm) VALUES ('delete', old.id, old.norm); END;
"""


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # every tenant's transcripts: the owner's alone; SQLite gives its WAL and shared-memory files
    # the database file's permissions
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


class TranscriptIndex:
    def __init__(self, path: Path, db: sqlite3.Connection | None = None):
        self.path = path
        self.db = db or connect(path)

    @classmethod
    def reader(cls, path: Path) -> TranscriptIndex:
        """A read-only connection for one request: it runs no schema statements, which need the
        write lock (a page's parallel requests each opening the index that way while the follower
        wrote gave "disk I/O error"). Before the follower has created the file: a writer's."""
        if not path.exists():
            return cls(path)
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        db.row_factory = sqlite3.Row
        return cls(path, db)

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------------
    def offsets(self, topic: str) -> dict[int, int]:
        rows = self.db.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,))
        return {r["partition"]: r["next_offset"] for r in rows}

    def apply(self, batch: list[tuple[dict | str, str, int, int]]) -> None:
        """Index a batch of (Result record, topic, partition, offset) in one transaction; a record
        that is a stream id alone is a tombstone: that stream is erased."""
        erased = False
        with self.db:
            for rec, topic, partition, offset in batch:
                if isinstance(rec, str):
                    self._erase(rec)
                    erased = True
                elif not self.db.execute("SELECT 1 FROM erased WHERE stream_id = ?", (rec["stream_id"],)).fetchone():
                    self._apply(rec)
                self.db.execute(
                    "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition) "
                    "DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                    (topic, partition, offset + 1),
                )
        if erased:
            self._scrub()

    def _apply(self, r: dict) -> None:
        kind, sid, now = str(r["kind"]), r["stream_id"], int(time.time() * 1000)
        self.db.execute(
            "INSERT INTO streams (stream_id, tenant, status, first_seen_ms, updated_ms, end_ms) "
            "VALUES (?, ?, 'LIVE', ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET "
            "updated_ms = excluded.updated_ms, end_ms = max(end_ms, excluded.end_ms)",
            (sid, r["tenant"], now, now, r["end_ms"]),
        )
        if kind == "FINAL" and r["source"] == "provisional":
            pass  # a draft of an offline window's text: shown live, replaced, never searched or exported
        elif kind == "FINAL":
            best = r["text"].strip()
            # online text of a range an offline window already covers is an alternative from the start
            # (the records of a stream can interleave either way: the result must not depend on it)
            superseded = (
                r["source"] == "online"
                and self.db.execute(
                    "SELECT 1 FROM hyps WHERE stream_id = ? AND pass = 'offline' AND rank = 0 AND start_ms < ? "
                    "AND end_ms > ? LIMIT 1",
                    (sid, r["end_ms"], r["start_ms"]),
                ).fetchone()
                is not None
            )
            self._hyp(
                r, r["source"], r["utterance_id"], 0, "alternative" if superseded else "1best", best, r["words"], None
            )
            for rank, alt in enumerate(r["nbest"], start=1):
                if alt["text"].strip() and alt["text"].strip() != best:
                    self._hyp(r, r["source"], r["utterance_id"], rank, "alternative", alt["text"], [], alt["score"])
            if r["source"] == "offline":  # the online 1-best of this range is now the other hypothesis
                self.db.execute(
                    "UPDATE hyps SET source = 'alternative' WHERE stream_id = ? AND pass = 'online' "
                    "AND source = '1best' AND start_ms < ? AND end_ms > ?",
                    (sid, r["end_ms"], r["start_ms"]),
                )
        elif kind == "ALTERNATIVES":
            best = self.db.execute(
                "SELECT text FROM hyps WHERE key = ?", (_key(sid, "offline", r["utterance_id"], 0),)
            ).fetchone()
            for rank, alt in enumerate(r["nbest"], start=1):
                if alt["text"].strip() and (best is None or alt["text"].strip() != best["text"]):
                    self._hyp(r, "offline", r["utterance_id"], rank, "alternative", alt["text"], [], alt["score"])
        elif kind == "STREAM_COMPLETE":
            self.db.execute(
                "UPDATE streams SET status = ?, final_source = ?, complete = ? WHERE stream_id = ?",
                (r["status"] or "COMPLETE", r["final_source"], json.dumps(r, default=_bytes), sid),
            )

    def erase(self, stream_id: str) -> int:
        """Forget a stream: its rows, its search entries, its final transcript. Returns rows removed."""
        with self.db:
            n = self._erase(stream_id)
        self._scrub()
        return n

    def _scrub(self) -> None:
        """Leave no copy of erased text in the file: FTS5 keeps deleted entries in its segments
        until they merge ('optimize' merges them all), and the WAL keeps old page images until a
        checkpoint (TRUNCATE empties it). Costs a rewrite of the search index per erasure batch."""
        with self.db:
            self.db.execute("INSERT INTO hyps_fts (hyps_fts) VALUES ('optimize')")
        for _ in range(50):  # a reader's open snapshot holds the WAL back: retry once it is done
            if self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                return
            time.sleep(0.1)
        log.warning("the index's WAL could not be emptied after an erasure; the next erasure retries")

    def _erase(self, stream_id: str) -> int:
        n = self.db.execute("DELETE FROM hyps WHERE stream_id = ?", (stream_id,)).rowcount  # trigger: FTS rows
        n += self.db.execute("DELETE FROM streams WHERE stream_id = ?", (stream_id,)).rowcount
        self.db.execute("INSERT OR IGNORE INTO erased VALUES (?, ?)", (stream_id, int(time.time() * 1000)))
        return n

    def _hyp(self, r, pass_, index, rank, source, text, words, score) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO hyps (key, stream_id, tenant, pass, source, start_ms, end_ms, rank, "
            "score, text, words, norm) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _key(r["stream_id"], pass_, index, rank),
                r["stream_id"],
                r["tenant"],
                pass_,
                source,
                r["start_ms"],
                r["end_ms"],
                rank,
                score,
                text.strip(),
                json.dumps(words),
                " ".join(normalise(text)),
            ),
        )

    # -- reading --------------------------------------------------------------------------------
    def search(
        self, query: str, stream_id: str | None = None, limit: int = 20, tenant: str | None = None
    ) -> list[dict]:
        """Hits for a word or phrase, best first: 1-best before alternatives, then FTS5 rank.

        Within one decoder's n-best list for a range, only the best-ranked match is a hit."""
        terms = normalise(query)
        if not terms:
            return []
        phrase = '"' + " ".join(terms).replace('"', '""') + '"'
        sql = (
            "SELECT h.*, bm25(hyps_fts) AS relevance FROM hyps_fts JOIN hyps h ON h.id = hyps_fts.rowid "
            "WHERE hyps_fts MATCH ?"
            + (" AND h.stream_id = ?" if stream_id else "")
            + (" AND h.tenant = ?" if tenant is not None else "")
            + " ORDER BY h.source = 'alternative', relevance, h.stream_id, h.start_ms LIMIT ?"
        )
        args = [phrase] + ([stream_id] if stream_id else []) + ([tenant] if tenant is not None else []) + [limit * 8]
        hits, seen = [], set()
        for row in self.db.execute(sql, args):
            # n-best lists differ by a word or two: one hit per hypothesis range, its best-ranked
            group = (row["stream_id"], row["pass"], row["start_ms"], row["end_ms"], row["source"])
            if row["source"] == "alternative" and group in seen:
                continue
            seen.add(group)
            hits.append(_hit(row, terms))
            if len(hits) == limit:
                break
        # the speaker of a finished stream's hit comes from its final turns (the full pass), as in
        # its transcript and exports; the words indexed live may carry the live labels
        finals: dict[str, list] = {}
        for h in hits:
            if h["stream_id"] not in finals:
                st = self.stream(h["stream_id"])
                finals[h["stream_id"]] = ((st or {}).get("complete") or {}).get("turns") or []
            if finals[h["stream_id"]]:
                h["speaker"] = turn_speaker(finals[h["stream_id"]], int(h["start"] * 1000), int(h["end"] * 1000))
        return hits

    def streams(self, limit: int = 200, tenant: str | None = None) -> list[dict]:
        rows = self.db.execute(
            "SELECT stream_id, tenant, status, final_source, first_seen_ms, updated_ms, end_ms "
            "FROM streams"
            + (" WHERE tenant = ?" if tenant is not None else "")
            + " ORDER BY first_seen_ms DESC LIMIT ?",
            ((tenant,) if tenant is not None else ()) + (limit,),
        )
        return [dict(r) for r in rows]

    def stream(self, stream_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["complete"] = json.loads(row["complete"]) if row["complete"] else None
        return out

    def captions(self, stream_id: str) -> list[dict]:
        """The 1-best captions indexed so far, in time order: the page's history for a stream."""
        rows = self.db.execute(
            "SELECT pass, start_ms, end_ms, text, words, key FROM hyps WHERE stream_id = ? AND rank = 0 "
            # online before the passes that replace it, when they start together: the page trims
            # online text by the later pass's range as it arrives
            "ORDER BY start_ms, CASE pass WHEN 'online' THEN 0 WHEN 'provisional' THEN 1 ELSE 2 END",
            (stream_id,),
        )
        return [
            {
                "kind": "FINAL",
                "source": r["pass"],
                "utterance_id": int(r["key"].rsplit("/", 2)[1]),
                "start_ms": r["start_ms"],
                "end_ms": r["end_ms"],
                "text": r["text"],
                "speaker": majority_speaker(json.loads(r["words"])),
                **({"words": word_times(json.loads(r["words"]))} if r["pass"] == "online" else {}),
            }
            for r in rows
        ]


def _key(stream_id: str, pass_: str, index: int, rank: int) -> str:
    return f"{stream_id}/{pass_}/{index}/{rank}"


def _bytes(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def word_times(words: list[dict]) -> list[list]:
    """[word, start_ms, end_ms] per word: what the page needs to keep an online final's words that
    a later pass's range does not cover."""
    return [[w["word"], w["start_ms"], w["end_ms"]] for w in words]


def majority_speaker(words: list[dict]) -> str | None:
    speakers = [w.get("speaker") for w in words if w.get("speaker")]
    return max(set(speakers), key=speakers.count) if speakers else None


def turn_speaker(turns: list[dict], start_ms: int, end_ms: int) -> str | None:
    """The speaker whose turns overlap [start_ms, end_ms] most (the nearest turn for an instant)."""
    best, most = None, -1
    for t in turns:
        overlap = min(end_ms, t["end_ms"]) - max(start_ms, t["start_ms"])
        if overlap > most:
            best, most = t["speaker"], overlap
    return best


def marked(text: str, terms: list[str]) -> list[list]:
    """``text`` in pieces, [piece, matched?]: the words whose normalised forms spell ``terms``
    ("Mr." is "mister", "42" is "forty two") are the matched piece, for the page's <mark>."""
    tokens = text.split()
    flat = [(i, t) for i, tok in enumerate(tokens) for t in normalise(tok)]
    norm = [t for _, t in flat]
    for k in range(len(norm) - len(terms) + 1):
        if norm[k : k + len(terms)] == terms:
            a, b = flat[k][0], flat[k + len(terms) - 1][0] + 1
            pieces: list[tuple[str, bool]] = [
                (" ".join(tokens[:a]) + " ", False),
                (" ".join(tokens[a:b]), True),
                (" " + " ".join(tokens[b:]), False),
            ]
            return [[p, m] for p, m in pieces if p.strip()]
    return [[text, False]]


def _hit(row: sqlite3.Row, terms: list[str]) -> dict:
    """A hit narrowed to the matched words' times where the hypothesis has word times."""
    start, end, speaker = row["start_ms"], row["end_ms"], None
    words = json.loads(row["words"] or "[]")
    tokens = [(normalise(w["word"]) or [""])[0] for w in words]
    for i in range(len(tokens) - len(terms) + 1):
        if tokens[i : i + len(terms)] == terms:
            matched = words[i : i + len(terms)]
            start, end, speaker = matched[0]["start_ms"], matched[-1]["end_ms"], majority_speaker(matched)
            break
    return {
        "stream_id": row["stream_id"],
        "start": start / 1000,
        "end": end / 1000,
        "speaker": speaker,
        "text": row["text"],
        "marked": marked(row["text"], terms),
        "source": row["source"],
        "pass": row["pass"],
    }
