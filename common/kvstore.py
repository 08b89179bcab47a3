"""Stable storage: one sqlite table of msgpack records, written in batches.

Both the node and the proxy keep everything in one `SqliteDict` table, keys namespaced by
a prefix, so that one `commit()` makes a whole batch of changes durable atomically (two
tables would be two connections, and two transactions). Values are msgpack, never pickle.

Durability: sqlitedict runs sqlite with `synchronous=OFF`, so a committed write has reached
the operating system: it survives `kill -9` of the process, not a power cut. `fsync=True`
switches sqlite to `synchronous=FULL`, which adds an fsync to every commit.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import queue
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack
from sqlitedict import SqliteDict

from common.datadir import unwritable_hint
from common.errors import StoreError
from common.packer import pack

logger = logging.getLogger(__name__)
# sqlitedict logs each failed statement as a dozen ERROR lines of its worker thread's
# stack; the StoreError raised here says the same in one line.
logging.getLogger("sqlitedict").setLevel(logging.CRITICAL)

TABLE = "records"
WAL_SIZE_LIMIT = 8 << 20  # bytes
# Changes that nothing waits on (what a peer acknowledged: a forwarded ticket, a delivered
# result) ride the next commit someone needs, or are committed this many seconds later:
# lost to a crash, they cost a re-send the peer recognises, never a ticket.
LAZY_COMMIT_SECONDS = 0.05
# A batch's changes: key -> new record, or None to delete the key.
Changes = Mapping[str, Any]


class Encoded(bytes):
    """A value already in msgpack, written as it is (one who keeps the bytes too encodes
    once)."""


def _encode(value: Any) -> bytes:
    return value if type(value) is Encoded else pack(value)


@functools.cache
def _rows_per_statement() -> int:
    """Rows in one statement: 500 (two parameters a row), fewer if this sqlite takes fewer
    parameters. (One statement of 10,000 rows took 25 % longer than twenty of 500.)"""
    probe = sqlite3.connect(":memory:")
    try:
        return max(1, min(500, probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 2))
    finally:
        probe.close()


def _decode(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


# What `djs salvage` writes for a record its page lost: not msgpack (0xc1 is never used).
SALVAGE_LOST = Encoded(b"\xc1 djs salvage: this record's page could not be read")


def decode_record(key: str, blob: bytes, where: object = "the store") -> Any:
    """A stored value (`KVStore.stored_items`) decoded; StoreError if it is not msgpack."""
    try:
        return _decode(blob)
    except (ValueError, msgpack.UnpackException) as exc:
        why = ("its page could not be read (djs salvage)" if blob == SALVAGE_LOST
               else str(exc) or type(exc).__name__)
        raise StoreError(f"cannot read {where}: record {key}: {why}") from exc


# Upper bounds of the commit-time histogram, in seconds.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1.0, 5.0)


@dataclass
class CommitStats:
    """What a store's commits cost, for /metrics (a slow or failing disk shows here first).
    A store hands it on to the store `reopen()` returns."""

    commits: int = 0
    records: int = 0  # written or deleted
    seconds: float = 0.0
    failures: int = 0
    # Commits per COMMIT_BUCKETS bound (not cumulative); the last one past all of them.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(COMMIT_BUCKETS) + 1))

    def observe(self, seconds: float, records: int) -> None:
        self.commits += 1
        self.records += records
        self.seconds += seconds
        self.buckets[bisect.bisect_left(COMMIT_BUCKETS, seconds)] += 1


class KVStore(Protocol):
    stats: CommitStats

    def apply(self, changes: Changes) -> None: ...
    def commit(self) -> None: ...
    def items(self) -> Iterator[tuple[str, Any]]: ...
    def stored_items(self) -> Iterator[tuple[str, bytes]]: ...
    def close(self) -> None: ...
    def reopen(self) -> KVStore: ...


class SqliteKV:
    """`KVStore` over sqlitedict, in `<data_dir>/<name>.sqlite`."""

    def __init__(self, data_dir: Path, name: str, fsync: bool = False,
                 stats: CommitStats | None = None) -> None:
        self.path = data_dir / f"{name}.sqlite"
        self._fsync = fsync
        self.stats = CommitStats() if stats is None else stats
        self._staged: dict[str, Any] = {}
        # Whether the last commit deleted keys, as NULL rows (tombstones) that the next
        # commit removes; also when not known (just opened, or a commit failed).
        self._tombstones = True
        self.rows_per_statement = _rows_per_statement()
        # Where sqlitedict's thread says a statement ran (it keeps only a weak reference).
        self._statement_done: queue.SimpleQueue[object] = queue.SimpleQueue()
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Owner-only from the first byte: sqlite gives the -wal and -shm files the mode of
            # the database file, so create that one before sqlite does (with the umask's 0644).
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            if not os.access(data_dir, os.W_OK):
                # (sqlite needs it for its -wal and -shm files; left to fail there, it failed
                # in sqlitedict's thread, which printed a traceback cut off by the exit)
                raise OSError("cannot create files there")
            if data_dir.stat().st_mode & 0o077:
                logger.warning("store.dir_not_private path=%s mode=%o: other users may read "
                               "it (chmod 700)", data_dir, data_dir.stat().st_mode & 0o777)
            self._db = SqliteDict(str(self.path), tablename=TABLE, encode=_encode,
                                  decode=_decode, journal_mode="WAL", outer_stack=False)
            if fsync:
                self._db.conn.execute("PRAGMA synchronous=FULL")
            # Nothing of a batch reaches the disk before its COMMIT, so a full disk fails the
            # COMMIT, which sqlite undoes whole. With sqlite's defaults a big batch spills
            # pages mid-statement; when that statement fails on a full disk, sqlite undoes it
            # alone, and the next statements and the COMMIT (small) went through: a batch
            # was committed in part (seen: the REPLACE of 4,000 rows gone, the DELETE after
            # it committed). A batch's pages stay in memory instead, a few MB at most.
            self._db.conn.execute("PRAGMA cache_spill=OFF")
            self._db.conn.execute("PRAGMA temp_store=MEMORY")
            # The WAL grows to hold a whole batch (a burst of 100,000 tickets: ~20 MB) and
            # kept that size for good; it is cut back when it restarts after a checkpoint,
            # to twice its usual high-water mark (the 1,000 pages of an autocheckpoint), so
            # the usual cycle never truncates it.
            self._db.conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # Finds the tombstones without a scan of the table (it holds only them).
            self._db.conn.execute(f'CREATE INDEX IF NOT EXISTS "{TABLE}_tombstones" ON '
                                  f'"{TABLE}" (key) WHERE value IS NULL')
            self._db.commit()
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}{unwritable_hint(data_dir)}"
                             ) from exc
        os.chmod(self.path, 0o600)

    def apply(self, changes: Changes) -> None:
        """Stage changes for the next commit (a later change of a key wins)."""
        self._staged.update(changes)

    def commit(self) -> None:
        """Make the staged changes durable, all of them or none.

        A batch is one `INSERT` statement, which sqlite applies whole or not at all, with
        a deleted key written as a NULL value (a tombstone, invisible to `items()`); a batch
        of deletes only is one `DELETE`. (Writes and deletes were two statements: when the
        writes failed, an I/O error or no memory, sqlite undid them alone and the COMMIT
        kept the deletes.) The tombstones of a commit are removed by the next one, with a
        statement that changes nothing `items()` shows, so its failure alone is harmless.
        A batch of more rows than a statement takes learns whether all its statements ran
        before its COMMIT.

        sqlitedict hands every statement to its connection's thread through a queue; one
        statement per record (its `__setitem__`, its `executemany`) made those hand-offs a
        third of a node's CPU at high submission rates. A rewritten key keeps its row (an
        upsert, not a `REPLACE`, which gives it a new one), so `items()` gives the records in
        the order of their first write: a node's tickets in the order it issued them, which
        its restore would otherwise sort (0.7 s for a million)."""
        if not self._staged:
            return
        started = time.perf_counter()
        staged, self._staged = self._staged, {}
        deletes = [k for k, v in staged.items() if v is None]
        tombstones = bool(deletes)
        step = self.rows_per_statement
        try:
            conn = self._db.conn
            if self._tombstones:
                conn.execute(f'DELETE FROM "{TABLE}" WHERE value IS NULL')
            if len(deletes) == len(staged):  # deletes only: one kind of statement
                tombstones = False
                for i in range(0, len(deletes), step):
                    keys = deletes[i:i + step]
                    conn.execute(f'DELETE FROM "{TABLE}" WHERE key IN '
                                 f'({",".join("?" * len(keys))})', keys)
            else:
                rows = [(k, None if v is None else _encode(v)) for k, v in staged.items()]
                for i in range(0, len(rows), step):
                    chunk = rows[i:i + step]
                    conn.execute(f'INSERT INTO "{TABLE}" (key, value) VALUES '
                                 + ",".join(["(?, ?)"] * len(chunk))
                                 + " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                 [x for row in chunk for x in row])
            if len(staged) > step:
                # A failed statement is undone alone, and the COMMIT would keep the others:
                # learn of any failure first (one more round trip to the store's thread).
                self._wait_for(conn, "SELECT 1 WHERE 0")
            # Not sqlitedict's commit(): when the COMMIT itself fails (a full disk), its
            # worker thread dies and commit() waits forever (sqlitedict issue #108). As a
            # statement with a response queue, a failure is kept by the worker and raised by
            # check_raise_error.
            self._wait_for(conn, "COMMIT")
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            self._tombstones = True
            self.stats.failures += 1
            raise StoreError(f"commit to {self.path} failed: {exc}") from exc
        self._tombstones = tombstones
        self.stats.observe(time.perf_counter() - started, len(staged))

    def _wait_for(self, conn: Any, statement: str) -> None:
        """Run a statement that returns no rows after those queued before it; raise the
        error of any of them. The queue is reused (`select_one` builds a `queue.Queue` per
        call: 8 % of a commit)."""
        conn.execute(statement, res=self._statement_done)
        self._statement_done.get()  # the worker's end marker: the statement ran
        conn.check_raise_error()

    def items(self) -> Iterator[tuple[str, Any]]:
        """What is committed, in the order of first writes, without the tombstones."""
        for key, blob in self.stored_items():
            yield key, decode_record(key, blob, self.path)

    def stored_items(self) -> Iterator[tuple[str, bytes]]:
        """`items()` as stored: each value still msgpack (`decode_record` reads it). A
        connection of its own, which sees only what is committed (the writer's would also
        show the statements of a commit that failed)."""
        try:
            reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                yield from reader.execute(f'SELECT key, value FROM "{TABLE}" '
                                          'WHERE value IS NOT NULL ORDER BY rowid')
            finally:
                reader.close()
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            hint = (f" (its file is damaged: `djs salvage --data-dir {self.path.parent}` "
                    "keeps what can still be read)" if "malformed" in str(exc) else "")
            raise StoreError(f"cannot read {self.path}: {exc}{hint}") from exc

    def close(self) -> None:
        """Close without committing: what was not committed is rolled back."""
        try:
            self._db.close()  # sqlite rolls back what was not committed
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            logger.warning("store.close_failed path=%s error=%s", self.path, exc)
            self._db.close(force=True)

    def reopen(self) -> SqliteKV:
        """After a failure: drop the connection (and its uncommitted writes), start afresh."""
        self.close()
        return SqliteKV(self.path.parent, self.path.stem, self._fsync, self.stats)


class MemoryKV:
    """The same contract in memory, for tests of the cores. Uncommitted writes are
    invisible to `items()` and lost on `reopen()`, as they are on disk."""

    def __init__(self) -> None:
        self.committed: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}
        self.stats = CommitStats()

    def apply(self, changes: Changes) -> None:
        self._pending.update(changes)

    def commit(self) -> None:
        for key, value in self._pending.items():
            if value is None:
                self.committed.pop(key, None)
            else:
                self.committed[key] = _decode(_encode(value))  # as a disk round trip would
        self.stats.observe(0.0, len(self._pending))
        self._pending.clear()

    def items(self) -> Iterator[tuple[str, Any]]:
        yield from list(self.committed.items())

    def stored_items(self) -> Iterator[tuple[str, bytes]]:
        yield from [(key, _encode(value)) for key, value in self.committed.items()]

    def close(self) -> None:
        self._pending.clear()

    def reopen(self) -> MemoryKV:
        self._pending.clear()
        return self
