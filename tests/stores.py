"""Stores for tests: one whose commits fail, and damage to a store's file."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path

from common.errors import StoreError
from common.kvstore import MemoryKV


class FailingKV(MemoryKV):
    """Commits fail while `broken` is set, as on a full disk; `reopens` counts rollbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.reopens = 0

    def commit(self) -> None:
        if self.broken:
            raise StoreError("disk full")
        super().commit()

    def reopen(self) -> FailingKV:
        self._pending.clear()
        self.reopens += 1
        return self


PAGE = 4096  # sqlite's default page size, the stores' own


def damage_page_holding(path: Path, key: str) -> int:
    """Overwrite the table page that holds `key`'s record with bytes that are no page (a
    bad sector): its rows cannot be read, the rest of the file is sound. The store's WAL
    is folded into the file first, so that no newer copy of the page hides the damage.
    The page's number."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    # In a table page the key's text is followed by its value, msgpack (a list: 0x9N); in
    # the key index's pages, by its row id.
    found = [m.start() for m in re.finditer(re.escape(key.encode()), data)
             if data[m.end()] & 0xF0 == 0x90]
    assert len(found) == 1, (key, found)
    page = found[0] // PAGE
    data[page * PAGE:(page + 1) * PAGE] = b"\x55" * PAGE
    path.write_bytes(bytes(data))
    return page
