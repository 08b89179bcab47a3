"""`common.aio.Deferred`: the requests made before it fires ride one call."""

from __future__ import annotations

import asyncio

from common.aio import Deferred


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
