"""`djs salvage`: keep what can still be read of a store whose file is damaged.

A store whose sqlite pages are damaged (a disk's bad sector, a file cut short, a bit flipped
in a page's structure) stops its process: reading it fails with sqlite's "database disk
image is malformed", and the node's tickets are all out of reach for the sake of a few
pages. Like `redis-check-aof --fix`, this keeps what can be read, and writes it, in its
order, to a new store that takes the old one's place; the damaged files are kept beside it
(`<name>.sqlite.damaged-<UTC time>`, with their -wal). sqlite's own `.recover` is not used:
the sqlite3 program is not in the image, and the one tried here (3.40) gave up on this
table ("SQL logic error").

The records are read by ranges of row ids; a range that fails is halved until the row ids
it cannot read are single ones. A damaged page may also lose rows without an error (a row
id garbled out of its range): the table's key index, read apart, names every key, and a key
the table did not give is written back with a value no version reads (`SALVAGE_LOST`). The restore
then sets it aside with the records read but garbled (common/set_aside.py), and what they
held comes back as after a crash: the proxy re-sends, a node submits again, and a node's
ticket is pending until the proxy says whether it has its result. A record that neither the
table nor its index shows is gone: a client asking for such a ticket hears it is unknown.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import datadir
from common.errors import StoreError
from common.kvstore import SALVAGE_LOST, TABLE, Encoded, SqliteKV

# The table's rows are read this many row ids at a time while they read cleanly.
CHUNK = 10_000
# Row ids tried one by one, at most, before giving up on the rest of a range: a damaged page
# near the root of the table's tree hides every row under it, and row ids are sparse.
MAX_SINGLE_TRIES = 200_000
# When the table cannot say its highest row id: read on until this many chunks in a row
# were empty (row ids grow by one a new record; expired ones leave gaps).
QUIET_CHUNKS = 10_000
INDEX = f"sqlite_autoindex_{TABLE}_1"  # of its primary key (sqlitedict's table)
INDEX_PIECE = 1_000


@dataclass
class Salvage:
    """What `salvage` did."""

    store: Path
    kept: int = 0  # records read and written
    lost_keys: list[str] = field(default_factory=list)  # written as SALVAGE_LOST
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)  # row ids unread
    index_whole: bool = True  # False: some keys of the index could not be read either
    gave_up_at: int | None = None  # a row id past which nothing more was tried
    damaged_copy: Path | None = None

    @property
    def lost_rows(self) -> int:
        """Row ids that could not be read (some may have held no row)."""
        return sum(hi - lo + 1 for lo, hi in self.lost_ranges)

    def lost(self, rowid: int) -> None:
        if self.lost_ranges and self.lost_ranges[-1][1] == rowid - 1:
            self.lost_ranges[-1] = (self.lost_ranges[-1][0], rowid)
        else:
            self.lost_ranges.append((rowid, rowid))


def store_in(data_dir: Path) -> tuple[str, Path]:
    """The process kind ("node" or "proxy") and store file of a data directory."""
    found = [(kind, data_dir / f"{kind}.sqlite") for kind in ("node", "proxy")
             if (data_dir / f"{kind}.sqlite").exists()]
    if len(found) != 1:
        what = "no" if not found else "both a node's and a proxy's"
        raise StoreError(f"{data_dir} holds {what} store (node.sqlite or proxy.sqlite)")
    return found[0]


@contextlib.contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute(f'SELECT 1 FROM "{TABLE}" LIMIT 0')  # its schema, at least, is read
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path} at all: {exc}") from exc
    with contextlib.closing(db):
        yield db


def table_rows(db: sqlite3.Connection, report: Salvage
               ) -> Iterator[tuple[str, bytes | None]]:
    """Every row of the table that can be read, in row id order, deletes the next commit
    would have made (NULL values) included; the row ids that cannot are noted in
    `report`."""
    try:
        highest: int | None = db.execute(f'SELECT max(rowid) FROM "{TABLE}"').fetchone()[0] or 0
    except sqlite3.DatabaseError:
        highest = None  # read on until QUIET_CHUNKS clean, empty chunks in a row
    quiet = tries = 0
    next_lo = 1
    split: list[tuple[int, int]] = []  # ranges that failed, halved; lowest on top

    def more_chunks() -> bool:
        return next_lo <= highest if highest is not None else quiet < QUIET_CHUNKS

    while split or more_chunks():
        if split:
            lo, hi = split.pop()
        else:
            lo, hi = next_lo, next_lo + CHUNK - 1
            next_lo = hi + 1
        try:
            rows = db.execute(f'SELECT key, value FROM "{TABLE}" WHERE rowid BETWEEN ? AND ? '
                              'ORDER BY rowid', (lo, hi)).fetchall()
        except sqlite3.DatabaseError:
            quiet = 0
            if lo < hi:
                mid = (lo + hi) // 2
                split += [(mid + 1, hi), (lo, mid)]
                continue
            report.lost(lo)
            tries += 1
            if tries >= MAX_SINGLE_TRIES:
                report.gave_up_at = lo
                return
            continue
        quiet = 0 if rows else quiet + 1
        for key, value in rows:
            if isinstance(key, str) and (value is None or isinstance(value, bytes)):
                yield key, value


def indexed_keys(db: sqlite3.Connection, report: Salvage) -> set[str]:
    """The keys the table's primary key index holds: read from its first key on, and, if
    that stops at a damaged page, from its last key back."""
    keys: set[str] = set()
    for descending in (False, True):
        last: str | None = None
        try:
            while True:
                where = "" if last is None else f"WHERE key {'<' if descending else '>'} ?"
                piece = [key for (key,) in db.execute(
                    f'SELECT key FROM "{TABLE}" INDEXED BY "{INDEX}" {where} ORDER BY key '
                    f'{"DESC" if descending else ""} LIMIT {INDEX_PIECE}',
                    () if last is None else (last,))]
                met = descending and bool(piece) and piece[-1] in keys  # the first pass's
                keys.update(k for k in piece if isinstance(k, str))
                if not piece or met:
                    return keys
                last = piece[-1]
        except sqlite3.DatabaseError:
            report.index_whole = False
    return keys


def salvage(data_dir: Path) -> Salvage:
    """Rewrite the store of `data_dir` with what can be read of it; the damaged files are
    kept beside it. The directory is claimed for the length of it (not while its process
    runs). StoreError if nothing could be read, the old files then left as they were."""
    kind, path = store_in(data_dir)
    report = Salvage(path)
    with datadir.claimed(data_dir, kind):
        work = data_dir / ".salvage"
        _clear(work)  # of a salvage cut short before
        try:
            with reading(path) as db:
                _write(db, SqliteKV(work, kind), report)
            if (work / f"{path.name}-wal").exists():  # closing folds the WAL into the file
                raise StoreError(f"the salvaged store in {work} kept its WAL: the old "
                                 "store is left as it was")
            if not report.kept:
                raise StoreError(f"nothing could be read of {path}: left as it was")
            _swap(path, work / path.name, report)
        finally:
            _clear(work)
    return report


def _write(db: sqlite3.Connection, fresh: SqliteKV, report: Salvage) -> None:
    """What the table gives, in its order, then what only its index names (SALVAGE_LOST)."""
    seen: set[str] = set()
    try:
        batch: dict[str, Encoded] = {}
        for key, value in table_rows(db, report):
            seen.add(key)
            if value is not None:
                batch[key] = Encoded(value)
            if len(batch) >= CHUNK:
                fresh.apply(batch)
                fresh.commit()
                report.kept += len(batch)
                batch = {}
        fresh.apply(batch)
        fresh.commit()
        report.kept += len(batch)
        report.lost_keys = sorted(indexed_keys(db, report) - seen)
        fresh.apply(dict.fromkeys(report.lost_keys, SALVAGE_LOST))
        fresh.commit()
    finally:
        fresh.close()


def _swap(path: Path, salvaged: Path, report: Salvage) -> None:
    """The damaged files renamed aside, the salvaged store in their place. The file goes
    last: cut short here, the old file keeps its WAL (its last commits), and no WAL of it is
    ever left for the new file to be read with."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report.damaged_copy = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("-shm", "-wal", ""):
        old = path.with_name(path.name + suffix)
        if old.exists():
            old.rename(report.damaged_copy.with_name(report.damaged_copy.name + suffix))
    salvaged.rename(path)


def _clear(work: Path) -> None:
    if work.exists():
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
