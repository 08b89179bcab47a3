"""Stable storage: one sqlite table of msgpack records, written in batches.

Both the node and the proxy keep everything in one sqlite table (sqlitedict's layout: key
TEXT PRIMARY KEY, value BLOB), keys namespaced by a prefix, so that one `commit()` makes a
whole batch of changes durable atomically. Values are msgpack, never pickle.

Durability: sqlite runs with `synchronous=OFF`, so a committed write has reached
the operating system: it survives `kill -9` of the process, not a power cut. `fsync=True`
switches sqlite to `synchronous=FULL`, which adds an fsync to every commit.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import msgpack

from common.errors import StoreError

logger = logging.getLogger(__name__)

TABLE = "records"
# A batch's changes: key -> new record, or None to delete the key.
Changes = Mapping[str, Any]


def _encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _decode(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


class KVStore(Protocol):
    def apply(self, changes: Changes) -> None: ...
    def commit(self) -> None: ...
    def items(self) -> Iterator[tuple[str, Any]]: ...
    def close(self) -> None: ...


class SqliteKV:
    """`KVStore` over one sqlite table in `<data_dir>/<name>.sqlite` (WAL).

    The stdlib `sqlite3` driver, called on the caller's thread. sqlitedict (used before, and
    whose table layout this keeps, so old data directories open unchanged) sends every
    statement through a queue to a thread of its own: two thread hops per record and a
    blocking round trip per commit, which profiling showed as a third of a node's CPU at
    high submission rates. Here a batch is one `executemany` and one commit, no thread.
    """

    def __init__(self, data_dir: Path, name: str, fsync: bool = False) -> None:
        self.path = data_dir / f"{name}.sqlite"
        self._fsync = fsync
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
            self._conn.execute(f'CREATE TABLE IF NOT EXISTS "{TABLE}" '
                               "(key TEXT PRIMARY KEY, value BLOB)")
            self._conn.commit()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        os.chmod(self.path, 0o600)

    def apply(self, changes: Changes) -> None:
        """Stage a batch in the open transaction. `REPLACE` gives a rewritten key a new
        rowid, so `items()` order is the order of last writes (as with sqlitedict)."""
        try:
            self._conn.executemany(
                f'REPLACE INTO "{TABLE}" (key, value) VALUES (?, ?)',
                [(k, _encode(v)) for k, v in changes.items() if v is not None])
            self._conn.executemany(f'DELETE FROM "{TABLE}" WHERE key = ?',
                                   [(k,) for k, v in changes.items() if v is None])
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"write to {self.path} failed: {exc}") from exc

    def commit(self) -> None:
        try:
            self._conn.commit()
        except (OSError, sqlite3.Error) as exc:
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
            self._conn.rollback()
        except (OSError, sqlite3.Error) as exc:
            logger.warning("store.close_failed path=%s error=%s", self.path, exc)
        finally:
            self._conn.close()

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
