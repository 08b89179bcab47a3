"""The node's link to the proxy, over a real socket to a hand-driven proxy: it gathers what it
sends (`proxy_link._send_loop`, Nagle's rule in `NodeState.worth_gathering`): a submission
made while the last one awaits its ACK is held until that ACK comes, then leaves at once;
a proxy gone silent is left, and connected to again; one that sends a malformed frame is
told why it is left."""

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
from common.messages import Ack, AckOf, Challenge, Hello, Job, Leaving, Message, Welcome
from common.transport import FramedStream

# Long enough that only the ACK can end a gathering in these tests.
GATHER_SECONDS = 60.0


class HandDrivenProxy:
    """Accepts one node, welcomes it, and queues every frame it sends."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[Message] = asyncio.Queue()
        self.stream: FramedStream | None = None
        self.connections = 0
        self.connected = asyncio.Event()
        self.reconnected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer)
        await stream.send([Challenge("nonce")])
        assert isinstance(await stream.recv(5), Hello)
        await stream.send([Welcome("proxy-test")])
        self.stream = stream
        self.connections += 1
        self.connected.set()
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
    async with linked_task() as (service, proxy, _):
        yield service, proxy


@contextlib.asynccontextmanager
async def linked_task() -> AsyncIterator[tuple[NodeService, HandDrivenProxy, asyncio.Task[None]]]:
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
        yield service, proxy, link
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


async def test_a_proxy_that_sends_a_malformed_frame_is_told_why_it_is_left() -> None:
    async with linked() as (_, proxy):
        async with asyncio.timeout(10):
            await proxy.frames.get()  # the link is up (its first INFO)
            assert proxy.stream is not None
            proxy.stream.writer.write(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # garbage
            while not isinstance(msg := await proxy.frames.get(), Leaving):
                pass
            await proxy.reconnected.wait()  # and it connects again
        assert msg.reason.startswith("protocol error: "), msg


class StopAsItFails(FramedStream):
    """The node's stream in the test below: once `armed` with the node's service and its
    link's task, its next read stops the node as `node.run` does (`stopping`, then a cancel
    of the link's task) and fails (the proxy went away) at once."""

    armed: tuple[NodeService, asyncio.Task[None]] | None = None
    made = 0  # streams the node opened

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        StopAsItFails.made += 1

    async def recv_batch(self, max_silence: float) -> list[Message]:
        if StopAsItFails.armed is not None:
            service, link = StopAsItFails.armed
            service.stopping = True
            link.cancel()
            raise ConnectionError("peer closed the connection")
        return await super().recv_batch(max_silence)


async def test_a_stop_that_comes_as_the_link_fails_still_stops_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11 loses a cancel that reaches a task group's owner while one of the group's
    tasks fails (CPython gh-116720): the link took it for a lost connection and connected
    again, and a node stopped at the moment its proxy went away (`djs cluster`, Ctrl-C) ran
    on until it was killed."""
    monkeypatch.setattr(proxy_link, "FramedStream", StopAsItFails)
    monkeypatch.setattr(StopAsItFails, "armed", None)
    monkeypatch.setattr(StopAsItFails, "made", 0)
    async with linked_task() as (service, proxy, link):
        async with asyncio.timeout(5):
            await proxy.connected.wait()
        StopAsItFails.armed = (service, link)
        await proxy.ack(())  # the node's receive loop reads again, and fails as it is stopped
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await link
        assert StopAsItFails.made == 1  # it did not connect again
