"""The client port's connection (`client_server.ClientConnection`) over a real socket, on a
node service without a proxy (tickets stay pending): answers come in the order of the
lines however they are split between the callback path and a task (a `wait` or `status` in
the middle of a pipelined batch, answers past WRITE_HIGH_WATER), end of input says goodbye,
nothing is answered after `exit`, an idle client is told why it is closed, a client gone in
the middle of a `wait` is forgotten once the wait is over, and a long `getall` lets the
others in between its pieces."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator

import pytest

from cluster_node import client_protocol as cp
from cluster_node import client_server
from cluster_node.client_server import WRITE_HIGH_WATER, start_client_server
from cluster_node.config import NodeConfig
from cluster_node.jobtypes import JobContext, load_job_types
from cluster_node.service import NodeService
from cluster_node.state import NodeState
from common.jobs import NodeId
from common.kvstore import MemoryKV


@contextlib.asynccontextmanager
async def serving(cfg: NodeConfig | None = None) -> AsyncIterator[tuple[NodeService, int]]:
    store = MemoryKV()
    state = NodeState(NodeId("n1"), "inc", slots=0)
    store.apply(state.initial_records())
    store.commit()
    service = NodeService(cfg or NodeConfig(), store, state, load_job_types(),
                          JobContext(NodeId("n1"), False, 1.0, 1024, None))
    server, port = await start_client_server(service, "127.0.0.1", 0)
    try:
        yield service, port
    finally:
        server.close()
        await server.wait_closed()


async def exchange(port: int, data: bytes) -> list[str]:
    """Send `data`, end the input, read every answer until the node closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    try:
        async with asyncio.timeout(10):
            return (await reader.read()).decode().splitlines()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_answers_keep_the_order_of_the_lines_around_waiting_commands() -> None:
    async with serving() as (service, port):
        line = (await exchange(port, b"fib 5\n"))[0]
        ticket = line.removeprefix("Ticket ID: ")
        answers = await exchange(port, (
            f"fib 6\nwait {ticket} 0.2\nfib 7\nstatus {ticket}\nr{ticket}\n"
            "status nosuch\nstats\nfib 8").encode())  # the last line without its newline
        assert [a.split(":")[0] for a in answers] == [
            "Ticket ID", cp.NOT_YET, "Ticket ID", "Status", cp.NOT_YET,  # no proxy: not run
            "ERR unknown ticket 'nosuch'", "Stats", "Ticket ID", cp.GOODBYE]
        assert answers[3].startswith(f"Status: {ticket} queued")
        assert service.clients == 0


async def test_nothing_is_answered_after_exit() -> None:
    async with serving() as (service, port):
        answers = await exchange(port, b"fib 5\nexit\nfib 6\nfib 7\n")
        assert len(answers) == 2 and answers[0].startswith("Ticket ID: ")
        assert answers[1] == cp.GOODBYE
        assert len(service.state.tickets) == 1


async def test_answers_past_the_high_water_mark_all_arrive_in_order() -> None:
    async with serving() as (_, port):
        per_help = sum(len(line) + 1 for line in cp.HELP_LINES)
        count = 3 * WRITE_HIGH_WATER // per_help  # three times over the mark
        answers = await exchange(port, b"help\nfib 5\n" * count)
        block = [*cp.HELP_LINES, "Ticket ID"]
        assert len(answers) == count * len(block) + 1
        for i in range(count):
            got = answers[i * len(block):(i + 1) * len(block)]
            assert got[:-1] == list(cp.HELP_LINES) and got[-1].startswith("Ticket ID: ")
        assert answers[-1] == cp.GOODBYE


async def test_an_idle_client_is_told_why_it_is_closed() -> None:
    async with serving(NodeConfig(client_idle_timeout=0.3)) as (service, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"fib 5\nhalf a li")
        async with asyncio.timeout(10):
            answers = (await reader.read()).decode().splitlines()
        writer.close()
        assert answers[0].startswith("Ticket ID: ")
        assert answers[1:] == ["ERR idle for 0.3 s (CLIENT_IDLE_TIMEOUT), closing"]
        await asyncio.sleep(0.05)
        assert service.clients == 0


async def test_a_client_gone_during_a_wait_is_forgotten_when_the_wait_ends() -> None:
    """Reading is paused while a command waits, and a client's FIN may be a half-close
    (`nc -N` waits for the answers): the wait runs its course, then the node finds the
    client gone and forgets it."""
    async with serving() as (service, port):
        line = (await exchange(port, b"fib 5\n"))[0]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"wait {line.removeprefix('Ticket ID: ')} 0.3\n".encode())
        await writer.drain()
        await asyncio.sleep(0.1)
        assert service.clients == 1 and service._waiters  # it waits for the result
        writer.close()
        await writer.wait_closed()
        for _ in range(500):  # the wait ends, its answer finds the client gone
            if not (service.clients or service._waiters):
                break
            await asyncio.sleep(0.01)
        assert service.clients == 0 and not service._waiters


async def test_getall_is_written_in_pieces_with_the_others_served_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A `cancel` sent while a `getall` is being written is answered before the `getall`
    ends: the cancelled ticket, near its end, is listed cancelled. (Built whole, the
    answer of a node holding a million tickets kept everyone else waiting 4 s.)"""
    monkeypatch.setattr(client_server, "GETALL_PIECE", 10)
    async with serving() as (service, port):
        answers = await exchange(port, b"fib 5\n" * 500)
        tickets = [a.removeprefix("Ticket ID: ") for a in answers[:-1]]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"stats\ngetall\nstats\n")
        writer.write_eof()
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"Stats: ")
            first = (await reader.readline()).decode()
            assert first == f"{tickets[0]} pending fib 5\n"
            cancelled = await exchange(port, f"cancel {tickets[-1]}\n".encode())
            assert cancelled[0].startswith(f"Cancelled: {tickets[-1]}")
            rest = (await reader.read()).decode().splitlines()
        writer.close()
        assert [line.split()[0] for line in [first, *rest[:499]]] == tickets
        assert rest[498] == f"{tickets[-1]} cancelled cancelled while queued at n1, it never ran"
        assert rest[499] == "END 500" and rest[500].startswith("Stats: ")
        assert rest[501] == cp.GOODBYE and len(rest) == 502
        assert service.clients == 0


async def test_a_client_piping_many_lines_lets_the_others_in_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One client's 5,000 lines, read at once, were all answered before another client's
    one line: a request-reply client beside `cat jobs.txt | nc` waited ~100 ms a ticket."""
    monkeypatch.setattr(client_server, "LINES_PER_TURN", 100)
    async with serving() as (service, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"fib 5\n" * 5000)
        writer.write_eof()
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"Ticket ID: ")
            other_reader, other_writer = await asyncio.open_connection("127.0.0.1", port)
            other_writer.write(b"stats\n")
            assert (await other_reader.readline()).startswith(b"Stats: ")
            issued = len(service.state.tickets)
            rest = (await reader.read()).decode().splitlines()
        other_writer.close()
        writer.close()
        assert issued <= 2500, issued  # some turns of the piping client, not all 5,000
        assert len(rest) == 4999 + 1 and rest[-1] == cp.GOODBYE
        assert len({line for line in rest[:-1] if line.startswith("Ticket ID: ")}) == 4999


async def test_a_connection_lost_before_its_task_began_leaves_no_coroutine_unawaited(
) -> None:
    """A waiting command's task cancelled by the connection's loss before its first step
    (a failed write had already scheduled the loss): the node logged a raw `RuntimeWarning:
    coroutine ... was never awaited`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with serving() as (service, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if service.client_transports:
                    break
                await asyncio.sleep(0.01)
            (transport,) = service.client_transports
            conn = transport.get_protocol()
            assert isinstance(conn, client_server.ClientConnection)
            transport.abort()  # its loss is called soon, before the task below begins
            conn.lines.append(b"wait " + b"a" * 24 + b" 5")  # a task of its own
            conn._pump()
            await asyncio.sleep(0.05)
            assert conn.task is None
            writer.close()
            del conn, transport
            gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def test_connections_already_gone_do_not_count_against_max_clients() -> None:
    """Accepted in one batch with others whose peers had already closed (their end not read
    yet), a connection was refused as over MAX_CLIENTS: a storm of connect-and-close from 8
    sockets had the node refuse half of 166,000 connections, honest ones too."""
    import socket
    import struct

    async with serving(NodeConfig(max_clients=3)) as (service, port):
        gone = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        honest = socket.create_connection(("127.0.0.1", port))
        for sock in gone:  # reset at once: accepted with the honest one, ended unread
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        honest.sendall(b"stats\n")
        honest.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=honest)
        try:
            async with asyncio.timeout(5):
                line = (await reader.readline()).decode()
            assert line.startswith("Stats: "), line
            assert service.clients == 1
        finally:
            writer.close()
