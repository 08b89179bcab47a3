"""Unit tests of `reverse_proxy.node_server`: a dispatch split into frames of a bounded
size keeps each job's `overdue_after` with its job; a stopping proxy serves no new
connection."""

from __future__ import annotations

import asyncio

from common.framing import SOFT_FRAME_BYTES
from common.jobs import JobId, JobSpec, NodeId
from common.kvstore import MemoryKV
from common.messages import Job
from reverse_proxy.config import ProxyConfig
from reverse_proxy.node_server import ProxyServer, _split
from reverse_proxy.records import ProxySettings
from reverse_proxy.state import ProxyState


def big(n: int) -> JobSpec:
    return JobSpec(JobId(f"job{n}"), "sh", ("x" * (SOFT_FRAME_BYTES // 3),), NodeId("a"), 1.0)


def limits_of(parts: list[object]) -> dict[JobId, float]:
    """Each job's limit, as the node reads it (a part without any: 0 for all its jobs)."""
    out: dict[JobId, float] = {}
    for part in parts:
        assert isinstance(part, Job)
        assert part.overdue_after == () or len(part.overdue_after) == len(part.jobs)
        limits = part.overdue_after or (0.0,) * len(part.jobs)
        out.update({s.job_id: x for s, x in zip(part.jobs, limits, strict=True)})
    return out


def test_a_split_dispatch_keeps_each_limit_with_its_job() -> None:
    specs = tuple(big(n) for n in range(7))
    limits = (0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.3)
    parts: list[object] = list(_split(Job(specs, limits)))
    assert len(parts) > 1
    assert tuple(s for p in parts if isinstance(p, Job) for s in p.jobs) == specs
    assert limits_of(parts) == {s.job_id: x for s, x in zip(specs, limits, strict=True)}


def test_a_split_dispatch_without_limits_has_none() -> None:
    parts = _split(Job(tuple(big(n) for n in range(4))))
    assert len(parts) > 1 and all(isinstance(p, Job) and p.overdue_after == () for p in parts)


async def test_a_stopping_proxy_serves_no_connection_accepted_meanwhile() -> None:
    """A node told `stopping` reconnected at once and was welcomed by the proxy going away,
    then dropped without a word (seen: `proxy.link_lost` with no reason, a flaky e2e)."""
    proxy = ProxyServer(ProxyConfig(), MemoryKV(), ProxyState("p", ProxySettings()))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read(1)  # a live proxy opens with its CHALLENGE
        writer.close()
        await proxy.close_connections()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed at once, no CHALLENGE
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
