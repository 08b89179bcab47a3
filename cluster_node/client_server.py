"""asyncio shell of the netcat line protocol: read, split, parse, answer, in order.

Submissions that arrive together (one read) are committed together: one disk transaction
for a whole pipelined batch, and every ticket is written only after that commit.

Every answer is built twice, as a text line and as a JSON object; a connection that sent
`json` gets the objects (one per line), `text` switches back. The client port's limits
(MAX_CLIENTS connections, CLIENT_IDLE_TIMEOUT, replies flushed every WRITE_HIGH_WATER bytes
so a client that never reads stalls only itself) live here; see cluster_node/config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from cluster_node import client_protocol as cp
from cluster_node.client_guard import ClientGuard
from cluster_node.jobtypes import iso
from cluster_node.service import NodeService
from cluster_node.tickets import Ticket
from common.aio import ReadDeadline
from common.errors import InvalidJob, StoreError, UnknownJob
from common.jobs import JobId, Outcome

logger = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
# Replies of one read are written out (and drained) whenever they pass this size, so a
# pipelined batch of `getall`s cannot pile up unbounded output in the node's memory.
WRITE_HIGH_WATER = 256 * 1024
# How long `cancel` waits for the proxy to say what happened before answering anyway.
CANCEL_WAIT_SECONDS = 5.0
# Commands answered once something happened (handle_waiting); a tuple: `isinstance` with a
# union `A | B | C` written in the call builds the union on every line.
WAITING_COMMANDS = (cp.Wait, cp.Status, cp.Cancel)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Reply:
    """Lines to write back, with the tickets among them (withdrawn if the commit fails)."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.lines: list[str] = []
        self.ticket_lines: list[tuple[int, bool]] = []
        self.size = 0

    def add(self, text: str, obj: dict[str, Any]) -> None:
        line = _dump(obj) if self.json_mode else text
        self.size += len(line) + 1
        self.lines.append(line)

    def error(self, reason: str) -> None:
        self.add(cp.render_error(reason), {"error": reason})

    def add_ticket(self, ticket: JobId) -> None:
        self.ticket_lines.append((len(self.lines), self.json_mode))
        line = _dump({"ticket": ticket}) if self.json_mode else cp.render_ticket(ticket)
        self.size += len(line) + 1
        self.lines.append(line)

    def withdraw_tickets(self, reason: str) -> None:
        for index, as_json in self.ticket_lines:
            self.lines[index] = _dump({"error": reason}) if as_json else cp.render_error(reason)


def _outcome_obj(job_id: JobId, outcome: Outcome | None) -> dict[str, Any]:
    if outcome is None:
        return {"ticket": job_id, "state": "pending", "result": None}
    return {"ticket": job_id, "state": outcome.state, "result": outcome.output,
            "node": outcome.node, "attempts": outcome.attempts}


def _result_text(outcome: Outcome | None) -> str:
    if outcome is None:
        return cp.NOT_YET
    return cp.render_result(outcome.output, outcome.ok, outcome.cancelled)


class ClientSession:
    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.job_type_names = frozenset(service.job_types)
        self.guard = ClientGuard(service.cfg.client_token, service.cfg.allow_list)
        self.json_mode = False

    def submit(self, cmd: cp.Submit, reply: Reply) -> None:
        try:
            reply.add_ticket(self.service.submit(
                cmd.job_type, cmd.args, priority=cmd.priority, delay=cmd.delay,
                timeout=cmd.timeout, retries=cmd.retries))
        except InvalidJob as exc:
            reply.error(f"job refused, no ticket issued: {exc}")
        except StoreError as exc:
            reply.error(f"storage failure, job not accepted, no ticket issued: {exc}")

    def handle_now(self, cmd: cp.Command, reply: Reply) -> bool:  # noqa: C901
        """Answer a command that needs no waiting; False when the client said exit."""
        match cmd:
            case cp.Submit():
                self.submit(cmd, reply)
            case cp.GetResult():
                self._result(cmd.ticket, reply)
            case cp.GetAll():
                self._getall(reply)
            case cp.List():
                self._list(cmd, reply)
            case cp.ShowStats():
                text, obj = self._stats()
                reply.add(text, obj)
            case cp.Help():
                if reply.json_mode:
                    reply.add("", {"help": list(cp.HELP_LINES[:-1])})
                else:
                    reply.lines.extend(cp.HELP_LINES)
            case cp.SetMode():
                self.json_mode = reply.json_mode = cmd.json
                mode = "json" if cmd.json else "text"
                reply.add(f"OK {mode} mode", {"mode": mode})
            case cp.Quit():
                reply.add(cp.GOODBYE, {"bye": cp.GOODBYE})
                return False
            case cp.Invalid():
                reply.error(cmd.reason)
            case cp.Empty():
                pass
        return True

    async def handle_waiting(self, cmd: cp.Wait | cp.Status | cp.Cancel, reply: Reply) -> None:
        try:
            if isinstance(cmd, cp.Wait):
                outcome = await self.service.wait_result(cmd.ticket, cmd.seconds)
                reply.add(_result_text(outcome), _outcome_obj(cmd.ticket, outcome))
            elif isinstance(cmd, cp.Cancel):
                await self._cancel(cmd.ticket, reply)
            else:
                await self._status(cmd.ticket, reply)
        except UnknownJob:
            self._unknown(cmd.ticket, reply)

    def _unknown(self, ticket: str, reply: Reply) -> None:
        cfg = self.service.cfg
        text = cp.render_unknown(ticket, time.time(), cfg.result_ttl, cfg.max_results,
                                 self.service.state.oldest_ticket_time)
        reply.add(text, {"error": text.removeprefix("ERR "), "ticket": ticket[:64]})

    def _result(self, job_id: JobId, reply: Reply) -> None:
        try:
            outcome = self.service.ticket(job_id).outcome
        except UnknownJob:
            self._unknown(job_id, reply)
            return
        reply.add(_result_text(outcome), _outcome_obj(job_id, outcome))

    async def _cancel(self, job_id: JobId, reply: Reply) -> None:
        outcome, happened = await self.service.cancel(job_id, CANCEL_WAIT_SECONDS)
        obj: dict[str, Any] = {"ticket": job_id, "cancel": happened}
        if outcome is None:
            text = (f"Cancel requested: {job_id} (not confirmed yet, the proxy has not "
                    f"answered; 'status {job_id}' will show it)")
        elif outcome.cancelled and happened != "finished":
            text = f"Cancelled: {job_id} {outcome.output}"
            obj["detail"] = outcome.output
        else:
            happened = obj["cancel"] = "finished"
            text = f"Not cancelled: {job_id} had already finished ({outcome.state})"
        obj["state"] = "pending" if outcome is None else outcome.state
        reply.add(text, obj)

    def _getall(self, reply: Reply) -> None:
        tickets = self.service.state.tickets
        for job_id, t in tickets.items():
            if t.outcome is None:
                reply.add(f"{job_id} pending {t.spec.describe()}",
                          {"ticket": job_id, "state": "pending", "text": t.spec.describe()})
            else:
                state = t.outcome.state
                reply.add(f"{job_id} {state} {t.outcome.output}",
                          {"ticket": job_id, "state": t.outcome.state, "text": t.outcome.output})
        reply.add(f"END {len(tickets)}", {"end": len(tickets)})

    def _list(self, cmd: cp.List, reply: Reply) -> None:
        rows = self.service.state.newest_tickets(cmd.state, cmd.limit)
        for job_id, t in rows:
            state = "pending" if t.outcome is None else t.outcome.state
            submitted = iso(t.spec.submitted_at)
            reply.add(f"{job_id} {state} {submitted} {t.spec.describe()}",
                      {"ticket": job_id, "state": state, "submitted": submitted,
                       "job": t.spec.describe()})
        reply.add(f"END {len(rows)}", {"end": len(rows)})

    async def _status(self, job_id: JobId, reply: Reply) -> None:
        t = self.service.ticket(job_id)
        state, where, attempts = await self._where(job_id, t)
        obj: dict[str, Any] = {"ticket": job_id, "state": state, "node": where or None,
                               "job": t.spec.describe(), "submitted": iso(t.spec.submitted_at),
                               "attempts": attempts}
        spec = t.spec
        if spec.priority:
            obj["priority"] = spec.priority
        if spec.not_before:
            obj["not_before"] = iso(spec.not_before)
        if spec.timeout:
            obj["timeout"] = spec.timeout
        if spec.retries:
            obj["retries"] = spec.retries
        if t.outcome is not None:
            obj["started"] = iso(t.outcome.started_at)
            obj["finished"] = iso(t.outcome.finished_at)
            if t.outcome.history:
                obj["failed_attempts"] = list(t.outcome.history)
            if not t.outcome.ok:
                obj["reason"] = t.outcome.output
        reply.add(_status_text(obj), obj)

    async def _where(self, job_id: JobId, t: Ticket) -> tuple[str, str, int]:
        state = self.service.state
        if t.outcome is not None:
            return t.outcome.state, t.outcome.node, t.outcome.attempts
        if job_id in state.running:
            return "running", state.node_id, 0
        if job_id in state.held:
            return "dispatched", state.node_id, 0
        if not t.forwarded:
            return "queued", "", 0  # at this node, on its way to the proxy
        seen = await self.service.where_is(job_id)
        if seen is None:
            return "queued", "", 0
        if seen.state in ("dispatched", "running"):
            return seen.state, seen.node, seen.attempts
        return ("finished" if seen.state == "done" else "queued"), seen.node, seen.attempts

    def _stats(self) -> tuple[str, dict[str, Any]]:
        s = self.service.state
        proxy = "connected" if self.service.proxy_connected else "disconnected"
        obj: dict[str, Any] = {"node": s.node_id, "slots": s.slots, "running": len(s.running),
                               "queued": s.queued, "done": s.done, "failed": s.failed,
                               "duplicates": s.duplicates, "tickets": len(s.tickets),
                               "pending": s.pending_tickets, "proxy": proxy}
        line = "Stats: " + " ".join(f"{k}={v}" for k, v in obj.items())
        if s.cluster is not None:
            nodes = [{"node": n.node_id, "alive": n.alive, "slots": n.slots,
                      "running": n.running, "queued": n.queued, "done": n.done,
                      "failed": n.failed, "duplicates": n.duplicates} for n in s.cluster.nodes]
            obj["cluster"] = {"queue": s.cluster.queue_length, "nodes": nodes}
            text = "; ".join(
                f"{n['node']} {'alive' if n['alive'] else 'dead'} "
                + " ".join(f"{k}={n[k]}" for k in ("slots", "running", "queued", "done",
                                                   "failed", "duplicates")) for n in nodes)
            line += f" | cluster queue={s.cluster.queue_length} nodes=[{text}]"
        return line, {"stats": obj}


def _status_text(obj: dict[str, Any]) -> str:
    head = f"Status: {obj['ticket']} {obj['state']}"
    if obj["node"]:
        head += f" node={obj['node']}"
    head += f" job={obj['job']!r} submitted={obj['submitted']}"
    for key in ("priority", "not_before", "timeout", "retries", "started", "finished"):
        if key in obj:
            head += f" {key}={obj[key]}"
    if obj["attempts"]:
        head += f" attempts={obj['attempts']}"
    if "reason" in obj:
        head += f" reason={obj['reason'][:200]!r}"
    if "failed_attempts" in obj:
        head += " failed_attempts=[" + "; ".join(obj["failed_attempts"]) + "]"
    return head


async def serve_client(service: NodeService, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    cfg = service.cfg
    if service.clients >= cfg.max_clients:
        logger.warning("client.refused peer=%s reason=max_clients", peer)
        with contextlib.suppress(OSError, ConnectionError):
            writer.write(cp.render_error(f"too many connections (MAX_CLIENTS={cfg.max_clients})"
                                         ", try again later").encode() + b"\n")
        writer.close()
        return
    service.clients += 1
    session = ClientSession(service)
    splitter = cp.LineSplitter(cfg.max_line_bytes)
    idle = ReadDeadline(reader)
    try:
        while True:
            idle.start(cfg.client_idle_timeout)
            try:
                data = await reader.read(READ_BYTES)
            except TimeoutError:
                reason = f"idle for {cfg.client_idle_timeout:g} s (CLIENT_IDLE_TIMEOUT), closing"
                reply = Reply(session.json_mode)
                reply.error(reason)
                await _flush(service, reply, writer)
                break
            finally:
                idle.stop()
            items = splitter.feed(data) if data else splitter.finish()
            keep_open = await _answer(session, items, writer)
            if not keep_open:
                break
            if not data:  # end of input is an `exit` once every line is answered
                reply = Reply(session.json_mode)
                reply.add(cp.GOODBYE, {"bye": cp.GOODBYE})
                await _flush(service, reply, writer)
                break
    except (ConnectionError, OSError, TimeoutError) as exc:
        logger.debug("client.dropped peer=%s error=%r", peer, exc)
    finally:
        idle.close()
        service.clients -= 1
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _answer(session: ClientSession, items: list[bytes | cp.LineTooLong],
                  writer: asyncio.StreamWriter) -> bool:
    reply = Reply(session.json_mode)
    for item in items:
        if isinstance(item, cp.LineTooLong):
            reply.error(f"line longer than {item.limit} bytes (MAX_LINE_BYTES), ignored")
            continue
        verdict = session.guard.screen(item)
        if verdict is not None:
            reply.add(verdict.line, verdict.obj)
            if not verdict.keep_open:
                await _flush(session.service, reply, writer)
                return False
            continue
        cmd = cp.parse_command(item, session.job_type_names)
        if type(cmd) is cp.Submit:  # most lines: no need to ask what else it could be
            session.submit(cmd, reply)
        elif isinstance(cmd, cp.Tail):
            await _flush(session.service, reply, writer)
            reply = Reply(session.json_mode)
            await _tail(session, cmd.ticket, writer)
        elif isinstance(cmd, WAITING_COMMANDS):
            await _flush(session.service, reply, writer)
            reply = Reply(session.json_mode)
            await session.handle_waiting(cmd, reply)
        elif not session.handle_now(cmd, reply):
            await _flush(session.service, reply, writer)
            return False
        if reply.size >= WRITE_HIGH_WATER:
            await _flush(session.service, reply, writer)
            reply = Reply(session.json_mode)
    await _flush(session.service, reply, writer)
    return True


async def _tail(session: ClientSession, job_id: JobId, writer: asyncio.StreamWriter) -> None:
    """`tail`: a running sh job's output lines as they arrive (`Output: <line>`), then its
    result line; for other jobs just the result (waiting up to MAX_WAIT_SECONDS)."""
    service = session.service
    try:
        ticket = service.ticket(job_id)
    except UnknownJob:
        reply = Reply(session.json_mode)
        session._unknown(job_id, reply)
        await _flush(service, reply, writer)
        return
    queue = service.subscribe_output(job_id)
    try:
        async with asyncio.timeout(cp.MAX_WAIT_SECONDS):
            while ticket.outcome is None:
                lines = await queue.get()
                if lines is None:
                    break
                reply = Reply(session.json_mode)
                for line in lines:
                    reply.add(f"Output: {line}", {"ticket": job_id, "output": line})
                await _flush(service, reply, writer)
    except TimeoutError:
        pass
    finally:
        service.unsubscribe_output(job_id, queue)
    outcome = service.ticket(job_id).outcome
    reply = Reply(session.json_mode)
    reply.add(_result_text(outcome), _outcome_obj(job_id, outcome))
    await _flush(service, reply, writer)


async def _flush(service: NodeService, reply: Reply, writer: asyncio.StreamWriter) -> None:
    if not reply.lines:
        return
    try:
        await service.persist_group()  # one commit for every client of this loop iteration
    except StoreError as exc:
        logger.error("client.tickets_withdrawn count=%d error=%s", len(reply.ticket_lines), exc)
        reply.withdraw_tickets(f"storage failure, job not accepted, no ticket issued: {exc}")
    writer.write(("\n".join(reply.lines) + "\n").encode())
    if writer.transport.get_write_buffer_size() == 0:
        return  # the socket took it all (the usual case): nothing to wait for
    # A client that does not read its replies is given CLIENT_IDLE_TIMEOUT, then dropped.
    async with asyncio.timeout(service.cfg.client_idle_timeout):
        await writer.drain()


async def start_client_server(service: NodeService, host: str,
                              port: int) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(
        lambda r, w: serve_client(service, r, w), host, port, limit=READ_BYTES,
        backlog=service.cfg.max_clients)
    bound = server.sockets[0].getsockname()[1]
    return server, int(bound)
