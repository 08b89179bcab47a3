"""asyncio helpers. `run`: a process's main coroutine on the stock asyncio loop, or on uvloop
with `UVLOOP=1` when it is installed (`pip install 'distributed-job-scheduler[fast]'`), with
the collector of reference cycles tuned (`tune_gc`). uvloop is not the default: measured
here it answered request-reply clients ~10 % faster but took pipelined submissions ~25 %
slower (README "Performance"). `Deferred`: one call a while after the first of any number of
requests for it. `ReadDeadline`: a stream read that raises TimeoutError after a while."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
# The cycle collector's thresholds (Python's are 700, 10, 10). A node or a proxy keeps a
# record for every ticket, job and result it holds: millions of objects that never form a
# cycle, which the collector would walk again and again. Collecting young objects every
# 50,000 allocations instead of 700 cut a node's CPU per ticket by a sixth and the proxy's
# by a third, over 320,000 tickets pushed through one node (README "Performance").
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def settle_heap() -> None:
    """After restoring a state from disk: collect once, then exempt everything alive from
    later collections (gc.freeze). A full collection walks every tracked object (a node's
    done tickets are not: cluster_node/tickets.py; a proxy's queued jobs are); restored
    records free themselves by reference counting when they go, they never form cycles."""
    gc.collect()
    gc.freeze()


def uvloop_wanted() -> bool:
    return (os.environ.get("UVLOOP", "0") in ("1", "true", "yes", "on")
            and importlib.util.find_spec("uvloop") is not None)


def run(main: Coroutine[Any, Any, T]) -> T:
    tune_gc()
    if uvloop_wanted():
        import uvloop

        logger.info("loop.uvloop")
        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)


class Deferred:
    """Calls `action` `delay` seconds after the first `request()` since its last call (the
    requests in between ride along)."""

    def __init__(self, delay: float, action: Callable[[], object]) -> None:
        self.delay = delay
        self.action = action
        self._handle: asyncio.TimerHandle | None = None

    def request(self) -> None:
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.action()


class ReadDeadline:
    """Makes a read of `reader` that waits `seconds` raise TimeoutError, as
    `async with asyncio.timeout(seconds): await reader.read(n)` does, for ~0.3 us a read
    instead of ~5 (a timer made and cancelled per read, three to four of them per
    request-reply ticket between a node and the proxy). One timer per stream checks now
    and then whether the read in progress began too long ago, and fails the reader (its
    connection is over) when it did.

        deadline = ReadDeadline(reader)
        deadline.start(seconds); data = await reader.read(n); deadline.stop()
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # loop time the read in progress began
        self._seconds = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self, seconds: float) -> None:
        """A read begins now; it may wait `seconds`."""
        self._since = now = self._loop.time()
        self._seconds = seconds
        deadline = now + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:  # none, or too late for this read
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check)

    def stop(self) -> None:
        """The read ended (with data, at EOF or by an error)."""
        self._since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # no read in progress: the next one starts a timer
        deadline = self._since + self._seconds
        if self._loop.time() >= deadline:
            self.reader.set_exception(TimeoutError(f"nothing read for {self._seconds:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check)
