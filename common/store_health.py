"""After a failed commit: stage nothing more until the store takes commits again.

A failed commit rolls the process's state back to what is on disk, which for a big store is
a restore of seconds. Tried again by the next event that staged something, every failure
cost another one: a node holding 200,000 tickets rebuilt itself 9 times in 8 s of full disk
and answered 5 `stats` meanwhile. So after the rollback the process stages nothing (what
would stage waits on `back`, or is refused by `check`) until a probe commit goes through,
tried every `retry` seconds: 1 s, doubled up to 30 s while the store fails again within a
minute of coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from common.errors import StoreError
from common.kvstore import KVStore

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
STEADY_SECONDS = 60.0  # back for this long: the next failure starts from RETRY_SECONDS
# The probes fail silently; while they do, a warning says so this often, with the error.
REMIND_SECONDS = 60.0
# The probe's record, written and then deleted, each in a commit of its own: a disk with
# less room than this is not back yet. Restores ignore the key.
PROBE_KEY = "m:probe"
PROBE_BYTES = 64 * 1024


def probe(store: KVStore) -> None:
    """Raises StoreError unless the store takes the probe's two commits."""
    for value in (b"\0" * PROBE_BYTES, None):
        store.apply({PROBE_KEY: value})
        store.commit()


class StoreOwner(Protocol):
    """The node's or the proxy's shell, as StoreHealth sees it."""

    store: KVStore

    def roll_back(self) -> bool:
        """Reopen the store, drop the uncommitted writes, rebuild the state from the disk;
        False if the store cannot even be reopened."""

    def on_store_back(self) -> None: ...


class StoreHealth:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "node" or "proxy"
        self.healthy = True
        self.back = asyncio.Event()  # set while healthy
        self.back.set()
        self.error = ""
        self.retry = RETRY_SECONDS
        self._back_at = float("-inf")
        self._probe: asyncio.Task[None] | None = None
        self._rolled_back = True  # False: a failure left the state ahead of the disk

    def check(self) -> None:
        """Refuse (StoreError) what would stage a change while the store fails."""
        if not self.healthy:
            raise StoreError(f"stable storage is failing on this {self.kind}: {self.error}")

    def failed(self, error: str, owner: StoreOwner) -> None:
        """A commit failed: roll the owner back, and probe the store every `retry`
        seconds until it takes commits again."""
        self.healthy = False
        self.back.clear()
        self.error = error
        self._rolled_back = owner.roll_back()
        if time.monotonic() - self._back_at < STEADY_SECONDS:
            self.retry = min(RETRY_MAX_SECONDS, 2 * self.retry)
        else:
            self.retry = RETRY_SECONDS
        if self._probe is None or self._probe.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing waits anyway
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_back(
                    owner))

    async def _probe_until_back(self, owner: StoreOwner) -> None:
        started = reminded = time.monotonic()
        while True:
            await asyncio.sleep(self.retry)
            if not self._rolled_back:  # the failure could not reopen the store
                self._rolled_back = owner.roll_back()
                if not self._rolled_back:
                    continue
            try:
                probe(owner.store)
                break
            except StoreError as exc:
                self.error = str(exc)
                if time.monotonic() - reminded >= REMIND_SECONDS:
                    reminded = time.monotonic()
                    logger.warning("store.still_failing %s for=%.0fs retry_every=%.0fs error=%s",
                                   self.kind, reminded - started, self.retry, self.error)
                try:
                    owner.store = owner.store.reopen()  # the probe's own writes, not committed
                except StoreError:
                    self._rolled_back = False
        self.healthy = True
        self._back_at = time.monotonic()
        self.back.set()
        logger.info("store.back %s after=%.1fs", self.kind, self._back_at - started)
        owner.on_store_back()

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
