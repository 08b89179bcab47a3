"""A store for tests of what the shells do when commits fail."""

from __future__ import annotations

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
