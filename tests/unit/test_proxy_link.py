"""The node's link to the proxy, over a real socket to a hand-driven proxy: it gathers what it
sends (`proxy_link._send_loop`, Nagle's rule in `NodeState.worth_gathering`): a submission
made while the last one awaits its ACK is held until that ACK comes, then leaves at once;
and a proxy gone silent is left, and connected to again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from cluster_node import proxy_link
from cluster_node.config import NodeConfig
from cluster_node.jobtypes import JobContext, load_job_types
from cluster_node.service import NodeService
from cluster_node.state import NodeState
from common.jobs import JobId, NodeId
from common.kvstore import MemoryKV
from common.messages import Ack, AckOf, Challenge, Hello, Job, Message, Welcome
from common.transport import FramedStream

# Long enough that only the ACK can end a gathering in these tests.
GATHER_SECONDS = 60.0


class HandDrivenProxy:
    """Accepts one node, welcomes it, and queues every frame it sends."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[Message] = asyncio.Queue()
        self.stream: FramedStream | None = None
        self.connections = 0
        self.reconnected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer)
        await stream.send([Challenge("nonce")])
        assert isinstance(await stream.recv(5), Hello)
        await stream.send([Welcome("proxy-test")])
        self.stream = stream
        self.connections += 1
        if self.connections > 1:
            self.reconnected.set()
        while True:
            for msg in await stream.recv_batch(60):
                await self.frames.put(msg)

    async def next_job(self, seconds: float) -> Job:
        """The next JOB frame (INFOs and the like are skipped)."""
        async with asyncio.timeout(seconds):
            while not isinstance(msg := await self.frames.get(), Job):
                pass
            return msg

    async def ack(self, ids: tuple[JobId, ...]) -> None:
        assert self.stream is not None
        await self.stream.send([Ack(AckOf.JOB, ids)])


@contextlib.asynccontextmanager
async def linked() -> AsyncIterator[tuple[NodeService, HandDrivenProxy]]:
    """A node service whose link is connected to a hand-driven proxy."""
    proxy = HandDrivenProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = MemoryKV()
    state = NodeState(NodeId("n1"), "inc", slots=0)  # runs nothing: only the link matters
    store.apply(state.initial_records())
    store.commit()
    service = NodeService(NodeConfig(proxy_port=port), store, state, load_job_types(),
                          JobContext(NodeId("n1"), False, 1.0, 1024, None))
    link = asyncio.create_task(proxy_link.run_proxy_link(service))
    try:
        yield service, proxy
    finally:
        link.cancel()
        server.close()
        await asyncio.gather(link, return_exceptions=True)


def submit(service: NodeService) -> JobId:
    job_id = service.submit("sleep", ("0",))
    service.persist()  # wakes the link, as a client's group commit does
    return job_id


async def test_a_submission_waits_for_the_ack_of_the_last_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_link, "LINK_GATHER_SECONDS", GATHER_SECONDS)
    async with linked() as (service, proxy):
        await held_until_acked(service, proxy)


async def held_until_acked(service: NodeService, proxy: HandDrivenProxy) -> None:
    first = submit(service)
    assert [s.job_id for s in (await proxy.next_job(5)).jobs] == [first]  # idle: at once
    second, third = submit(service), submit(service)
    with pytest.raises(TimeoutError):
        await proxy.next_job(0.3)  # held while `first` awaits its ACK
    await proxy.ack((first,))
    assert [s.job_id for s in (await proxy.next_job(5)).jobs] == [second, third]


async def test_a_submission_after_an_ack_goes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_link, "LINK_GATHER_SECONDS", GATHER_SECONDS)
    async with linked() as (service, proxy):
        for _ in range(3):
            job_id = submit(service)
            assert [s.job_id for s in (await proxy.next_job(5)).jobs] == [job_id]
            await proxy.ack((job_id,))


async def test_a_silent_proxy_is_left_and_connected_to_again() -> None:
    """It welcomes the node, then never says a word (no STATS for the INFOs): after
    `max(5, 6 x INFO_PERIOD)` seconds of silence the node drops the link and reconnects."""
    async with linked() as (_, proxy):
        started = time.monotonic()
        async with asyncio.timeout(20):
            await proxy.reconnected.wait()
        assert time.monotonic() - started >= 5.0  # not before the silence allowance
        assert proxy.connections == 2
