"""Stable storage: one sqlite table of msgpack records, written in batches.

Both the node and the proxy keep everything in one `SqliteDict` table, keys namespaced by
a prefix, so that one `commit()` makes a whole batch of changes durable atomically (two
tables would be two connections, and two transactions). Values are msgpack, never pickle.

Durability: sqlitedict runs sqlite with `synchronous=OFF`, so a committed write has reached
the operating system: it survives `kill -9` of the process, not a power cut. `fsync=True`
switches sqlite to `synchronous=FULL`, which adds an fsync to every commit.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
from collections.abc import Iterator, Mapping
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
# Rows in one REPLACE or DELETE statement: 2 parameters a row, well under sqlite's limit of
# 32,766 parameters a statement.
ROWS_PER_STATEMENT = 500
# Changes that nothing waits on (what a peer acknowledged: a forwarded ticket, a delivered
# result) ride the next commit someone needs, or are committed this many seconds later:
# lost to a crash, they cost a re-send the peer recognises, never a ticket.
LAZY_COMMIT_SECONDS = 0.05
# A batch's changes: key -> new record, or None to delete the key.
Changes = Mapping[str, Any]


def _encode(value: Any) -> bytes:
    return pack(value)


def _decode(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


class KVStore(Protocol):
    def apply(self, changes: Changes) -> None: ...
    def commit(self) -> None: ...
    def items(self) -> Iterator[tuple[str, Any]]: ...
    def close(self) -> None: ...


class SqliteKV:
    """`KVStore` over sqlitedict, in `<data_dir>/<name>.sqlite`."""

    def __init__(self, data_dir: Path, name: str, fsync: bool = False) -> None:
        self.path = data_dir / f"{name}.sqlite"
        self._fsync = fsync
        self._dirty = False  # writes since the last commit
        # Where sqlitedict's thread says a COMMIT ran (it keeps only a weak reference).
        self._commit_done: queue.SimpleQueue[object] = queue.SimpleQueue()
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Owner-only from the first byte: sqlite gives the -wal and -shm files the mode of
            # the database file, so create that one before sqlite does (with the umask's 0644).
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
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
            self._db.commit()
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}{unwritable_hint(data_dir)}"
                             ) from exc
        os.chmod(self.path, 0o600)

    def apply(self, changes: Changes) -> None:
        """Stage a batch in the open transaction, ROWS_PER_STATEMENT rows per statement.
        sqlitedict hands every statement to its connection's thread through a queue; one
        statement per record (its `__setitem__`, its `executemany`) made those hand-offs a
        third of a node's CPU at high submission rates. `REPLACE` gives a rewritten key a
        new rowid, so `items()` order is the order of last writes."""
        if not changes:
            return
        self._dirty = True
        writes = [(k, _encode(v)) for k, v in changes.items() if v is not None]
        deletes = [k for k, v in changes.items() if v is None]
        try:
            for i in range(0, len(writes), ROWS_PER_STATEMENT):
                rows = writes[i:i + ROWS_PER_STATEMENT]
                self._db.conn.execute(
                    f'REPLACE INTO "{TABLE}" (key, value) VALUES '
                    + ",".join(["(?, ?)"] * len(rows)), [x for row in rows for x in row])
            # sqlitedict's `del` first asks whether the key exists (a blocking round trip);
            # deleting a key that is absent is harmless, so skip the question.
            for i in range(0, len(deletes), ROWS_PER_STATEMENT):
                keys = deletes[i:i + ROWS_PER_STATEMENT]
                self._db.conn.execute(f'DELETE FROM "{TABLE}" WHERE key IN '
                                      f'({",".join("?" * len(keys))})', keys)
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            raise StoreError(f"write to {self.path} failed: {exc}") from exc

    def commit(self) -> None:
        if not self._dirty:
            return
        try:
            # Not sqlitedict's commit(): when the COMMIT itself fails (a full disk), its
            # worker thread dies and commit() waits forever (sqlitedict issue #108). As a
            # statement with a response queue, a failure is kept by the worker and raised by
            # check_raise_error; one round trip to the worker thread, not two. The queue is
            # reused (`select_one` builds a `queue.Queue` per call: 8 % of a commit).
            conn = self._db.conn
            conn.execute("COMMIT", res=self._commit_done)
            self._commit_done.get()  # the worker's end marker: the COMMIT ran
            conn.check_raise_error()
            self._dirty = False
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            raise StoreError(f"commit to {self.path} failed: {exc}") from exc

    def items(self) -> Iterator[tuple[str, Any]]:
        """What is committed, in insertion order. A connection of its own: the writer's
        connection would also show writes that `apply()` staged and no commit made durable."""
        try:
            reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                rows = reader.execute(f'SELECT key, value FROM "{TABLE}" ORDER BY rowid')
                for key, blob in rows:
                    yield key, _decode(blob)
            finally:
                reader.close()
        except (OSError, RuntimeError, sqlite3.Error, ValueError, msgpack.UnpackException) as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc

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
        return SqliteKV(self.path.parent, self.path.stem, self._fsync)


class MemoryKV:
    """The same contract in memory, for tests of the cores. Uncommitted writes are
    invisible to `items()` and lost on `reopen()`, as they are on disk."""

    def __init__(self) -> None:
        self.committed: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}
        self.commits = 0

    def apply(self, changes: Changes) -> None:
        self._pending.update(changes)

    def commit(self) -> None:
        for key, value in self._pending.items():
            if value is None:
                self.committed.pop(key, None)
            else:
                self.committed[key] = _decode(_encode(value))  # as a disk round trip would
        self._pending.clear()
        self.commits += 1

    def items(self) -> Iterator[tuple[str, Any]]:
        yield from list(self.committed.items())

    def close(self) -> None:
        self._pending.clear()

    def reopen(self) -> MemoryKV:
        self._pending.clear()
        return self
