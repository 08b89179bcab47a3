"""asyncio shell of the netcat line protocol: read, split, parse, answer, in order.

Submissions that arrive together (one read) are committed together: one disk transaction
for a whole pipelined batch, and every ticket is written only after that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cluster_node import client_protocol as cp
from cluster_node.jobtypes import iso
from cluster_node.service import NodeService
from cluster_node.state import Ticket
from common.errors import InvalidJob, StoreError, UnknownJob
from common.jobs import JobId

logger = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
# Stop reading from a client whose replies pile up unread beyond this (it never reads).
WRITE_HIGH_WATER = 1024 * 1024


class Reply:
    """Lines to write back, with the tickets among them (withdrawn if the commit fails)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ticket_lines: list[int] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def add_ticket(self, ticket: JobId) -> None:
        self.ticket_lines.append(len(self.lines))
        self.lines.append(cp.render_ticket(ticket))


class ClientSession:
    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.job_type_names = frozenset(service.job_types)

    def handle_now(self, cmd: cp.Command, reply: Reply) -> bool:
        """Answer a command that needs no waiting; False when the client said exit."""
        match cmd:
            case cp.Submit():
                try:
                    reply.add_ticket(self.service.submit(cmd.job_type, cmd.args))
                except (InvalidJob, StoreError) as exc:
                    reply.add(cp.render_error(f"job refused, no ticket issued: {exc}"))
            case cp.GetResult():
                reply.add(self._result_line(cmd.ticket))
            case cp.GetAll():
                self._getall(reply)
            case cp.ShowStats():
                reply.add(self._stats_line())
            case cp.Help():
                reply.lines.extend(cp.HELP_LINES)
            case cp.Quit():
                reply.add(cp.GOODBYE)
                return False
            case cp.Invalid():
                reply.add(cp.render_error(cmd.reason))
            case cp.Empty():
                pass
        return True

    async def handle_waiting(self, cmd: cp.Wait | cp.Status) -> str:
        try:
            if isinstance(cmd, cp.Wait):
                outcome = await self.service.wait_result(cmd.ticket, cmd.seconds)
                if outcome is None:
                    return cp.NOT_YET
                return cp.render_result(outcome.output, outcome.ok)
            return await self._status_line(cmd.ticket)
        except UnknownJob:
            return cp.render_unknown(cmd.ticket)

    def _result_line(self, job_id: JobId) -> str:
        try:
            outcome = self.service.ticket(job_id).outcome
        except UnknownJob:
            return cp.render_unknown(job_id)
        return cp.NOT_YET if outcome is None else cp.render_result(outcome.output, outcome.ok)

    def _getall(self, reply: Reply) -> None:
        tickets = self.service.state.tickets
        for job_id, t in tickets.items():
            if t.outcome is None:
                reply.add(f"{job_id} pending {t.spec.describe()}")
            else:
                state = "done" if t.outcome.ok else "failed"
                reply.add(f"{job_id} {state} {t.outcome.output}")
        reply.add(f"END {len(tickets)}")

    async def _status_line(self, job_id: JobId) -> str:
        t = self.service.ticket(job_id)
        state, where = await self._where(job_id, t)
        head = f"Status: {job_id} {state}"
        if where:
            head += f" node={where}"
        head += f" job={t.spec.describe()!r} submitted={iso(t.spec.submitted_at)}"
        if t.outcome is not None:
            head += f" started={iso(t.outcome.started_at)} finished={iso(t.outcome.finished_at)}"
        return head

    async def _where(self, job_id: JobId, t: Ticket) -> tuple[str, str]:
        state = self.service.state
        if t.outcome is not None:
            return ("done" if t.outcome.ok else "failed"), t.outcome.node
        if job_id in state.running:
            return "running", state.node_id
        if job_id in state.held:
            return "dispatched", state.node_id
        if not t.forwarded:
            return "queued", ""  # at this node, on its way to the proxy
        seen = await self.service.where_is(job_id)
        if seen is None:
            return "queued", ""
        if seen.state == "dispatched":
            return "dispatched", seen.node
        return ("finished" if seen.state == "done" else "queued"), seen.node

    def _stats_line(self) -> str:
        s = self.service.state
        line = (f"Stats: node={s.node_id} slots={s.slots} running={len(s.running)} "
                f"queued={s.queued} done={s.done} failed={s.failed} duplicates={s.duplicates} "
                f"tickets={len(s.tickets)} pending={s.pending_tickets} "
                f"proxy={'connected' if self.service.proxy_connected else 'disconnected'}")
        if s.cluster is not None:
            nodes = "; ".join(
                f"{n.node_id} {'alive' if n.alive else 'dead'} slots={n.slots} "
                f"running={n.running} queued={n.queued} done={n.done} failed={n.failed} "
                f"duplicates={n.duplicates}" for n in s.cluster.nodes)
            line += f" | cluster queue={s.cluster.queue_length} nodes=[{nodes}]"
        return line


async def serve_client(service: NodeService, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    session = ClientSession(service)
    splitter = cp.LineSplitter()
    peer = writer.get_extra_info("peername")
    try:
        while True:
            data = await reader.read(READ_BYTES)
            items = splitter.feed(data) if data else splitter.finish()
            keep_open = await _answer(session, items, writer)
            if not keep_open:
                break
            if not data:  # end of input is an `exit` once every line is answered
                writer.write(f"{cp.GOODBYE}\n".encode())
                await writer.drain()
                break
    except (ConnectionError, OSError) as exc:
        logger.debug("client.dropped peer=%s error=%s", peer, exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _answer(session: ClientSession, items: list[bytes | cp.LineTooLong],
                  writer: asyncio.StreamWriter) -> bool:
    reply = Reply()
    for item in items:
        if isinstance(item, cp.LineTooLong):
            reply.add(cp.render_error(f"line longer than {item.limit} bytes, ignored"))
            continue
        cmd = cp.parse_command(item, session.job_type_names)
        if isinstance(cmd, cp.Wait | cp.Status):
            await _flush(session.service, reply, writer)
            reply = Reply()
            reply.add(await session.handle_waiting(cmd))
        elif not session.handle_now(cmd, reply):
            await _flush(session.service, reply, writer)
            return False
    await _flush(session.service, reply, writer)
    return True


async def _flush(service: NodeService, reply: Reply, writer: asyncio.StreamWriter) -> None:
    if not reply.lines:
        return
    try:
        await service.persist_group()  # one commit for every client of this loop iteration
    except StoreError as exc:
        logger.error("client.tickets_withdrawn count=%d error=%s", len(reply.ticket_lines), exc)
        for index in reply.ticket_lines:
            reply.lines[index] = cp.render_error(
                f"storage failure, job not accepted, no ticket issued: {exc}")
    writer.write(("\n".join(reply.lines) + "\n").encode())
    await writer.drain()


async def start_client_server(service: NodeService, host: str,
                              port: int) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(
        lambda r, w: serve_client(service, r, w), host, port, limit=READ_BYTES)
    bound = server.sockets[0].getsockname()[1]
    return server, int(bound)
