"""Run a process's main coroutine on uvloop when it is installed (`pip install
'distributed-job-scheduler[fast]'`), else on the stock asyncio loop. `UVLOOP=0` forces the
stock loop. uvloop's socket writes and callbacks are C code: the node and the proxy spend
much of their time there (see README "Performance")."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Coroutine
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
