"""`common.aio`: a Deferred's requests made before it fires ride one call; the collector
is tuned by `run` and told to leave a restored state alone by `settle_heap`."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from common.aio import GC_THRESHOLDS, Deferred, ReadDeadline, run, settle_heap


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


async def test_a_read_that_waits_too_long_raises_timeout() -> None:
    reader = asyncio.StreamReader()
    deadline = ReadDeadline(reader)
    started = time.monotonic()
    deadline.start(0.05)
    with pytest.raises(TimeoutError, match=r"nothing read for 0\.05 s"):
        await reader.read(10)
    assert time.monotonic() - started >= 0.05
    deadline.close()


async def test_reads_that_get_data_in_time_go_on_and_time_between_reads_is_not_counted() -> None:
    reader = asyncio.StreamReader()
    deadline = ReadDeadline(reader)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        deadline.start(0.3)
        loop.call_later(0.02, reader.feed_data, b"x")  # in time, though not in 0.3 s in all
        assert await reader.read(10) == b"x"
        deadline.stop()
        await asyncio.sleep(0.35)  # not reading: the peer is not silent, we are busy
    deadline.start(0.3)
    with pytest.raises(TimeoutError):
        await reader.read(10)
    deadline.close()


async def test_a_shorter_deadline_than_the_last_one_is_kept() -> None:
    reader = asyncio.StreamReader()
    deadline = ReadDeadline(reader)
    deadline.start(30)
    deadline.stop()
    deadline.start(0.05)  # say, a handshake's after a long silence allowance
    with pytest.raises(TimeoutError, match=r"nothing read for 0\.05 s"):
        async with asyncio.timeout(5):  # a TimeoutError without that text
            await reader.read(10)
    deadline.close()
