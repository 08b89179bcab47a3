"""`common.aio`: a Deferred's requests made before it fires ride one call; the collector
is tuned by `run` and told to leave a restored state alone by `settle_heap`."""

from __future__ import annotations

import asyncio
import gc

from common.aio import GC_THRESHOLDS, Deferred, run, settle_heap


def test_requests_before_the_call_ride_along_and_later_ones_call_again() -> None:
    calls: list[str] = []

    async def scenario() -> None:
        later = Deferred(0.1, lambda: calls.append("called"))
        for _ in range(5):
            later.request()
        await asyncio.sleep(0)
        later.request()
        assert calls == []  # not at once: after its delay
        await asyncio.sleep(0.3)
        assert calls == ["called"]  # once for the six requests
        later.request()  # after the call: a new one
        await asyncio.sleep(0.3)
        assert calls == ["called", "called"]

    asyncio.run(scenario())


def test_settle_heap_exempts_what_is_alive_from_later_collections() -> None:
    kept = [[n] for n in range(1000)]  # lists: objects the collector tracks
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()


def test_run_tunes_the_collector() -> None:
    before = gc.get_threshold()
    try:
        assert run(asyncio.sleep(0, result="done")) == "done"
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)
