"""asyncio helpers. `run`: a process's main coroutine on uvloop when it is installed (`pip
install 'distributed-job-scheduler[fast]'`), else on the stock asyncio loop; `UVLOOP=0`
forces the stock loop (uvloop's socket writes and callbacks are C code: the node and the
proxy spend much of their time there, see README "Performance"). `Deferred`: one call a
while after the first of any number of requests for it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


def uvloop_wanted() -> bool:
    return (os.environ.get("UVLOOP", "1") not in ("0", "false", "no", "off")
            and importlib.util.find_spec("uvloop") is not None)


def run(main: Coroutine[Any, Any, T]) -> T:
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
