"""Damaged records: what a restore cannot read costs what it held, not the process's start.

A record a restore cannot read (not msgpack, or not of a shape this version writes: a bit
flipped on disk, a store written by a newer version, a bug) used to stop the node or the
proxy with that error: every ticket of the node unreachable for one record's sake. Now it
is set aside: copied to `x:<its key>`, where no restore reads it again (it stays for whoever
wants to look: `sqlite3 node.sqlite "select value from records where key = 'x:…'"`), its
own key deleted (a node's ticket keeps its key), and logged. What the record held comes
back the way a crash's losses do: the proxy re-sends a job a node does not hold, a node
submits again a job the proxy does not know (UNKNOWN), and a node asks the proxy for the
result of a ticket it cannot read (pending meanwhile; failed, saying why, if the proxy has
none).

A damaged identity is replaced: a node's by the origin its tickets name, in a new
incarnation (the proxy runs again what the old one held that the new one does not declare),
the proxy's by a new id (it names nothing else).
"""

from __future__ import annotations

import logging
from typing import Any

from common.kvstore import Encoded

logger = logging.getLogger(__name__)

PREFIX = "x:"
LOGGED = 20  # records logged one by one in a restore; the rest in one summary line


class SetAside:
    """The damaged records of one store: those set aside before (its `x:` records) and those
    a restore sets aside now."""

    def __init__(self, store: str) -> None:
        self.store = store  # for the log: "node" or "proxy"
        self.keys: set[str] = set()  # the original keys
        self.now = 0  # set aside by this restore

    def __len__(self) -> int:
        return len(self.keys)

    def found(self, key: str) -> None:
        """An `x:` record: set aside by an earlier restore."""
        self.keys.add(key.removeprefix(PREFIX))

    def damaged(self, key: str, record: bytes, error: object, changes: dict[str, Any],
                keep_key: bool = False) -> None:
        """Stage the move of `key`'s record to `x:<key>` in `changes` (the restored state's,
        committed with its first commit)."""
        self.keys.add(key)
        self.now += 1
        if self.now <= LOGGED:
            logger.error("store.record_damaged store=%s key=%s error=%s kept_as=%s%s",
                         self.store, key, error, PREFIX, key)
        changes[PREFIX + key] = Encoded(record)
        if not keep_key:
            changes[key] = None

    def summarise(self) -> None:
        if self.now > LOGGED:
            logger.error("store.records_damaged store=%s count=%d (the first %d logged "
                         "above, all kept under %s keys)", self.store, self.now, LOGGED,
                         PREFIX)
