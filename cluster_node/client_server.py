"""asyncio shell of the netcat line protocol: read, split, parse, answer, in order.

Submissions that arrive together (one read) are committed together, with those of every
other client served in the same loop iteration: one disk transaction for a whole pipelined
batch, and every ticket is written only after that commit.

Every answer has a text form and a JSON form; a connection that sent `json` gets the
objects (one per line), `text` switches back. The client port's limits (MAX_CLIENTS
connections, CLIENT_IDLE_TIMEOUT, answers written out every WRITE_HIGH_WATER bytes so a
client that never reads stalls only itself) live here; see cluster_node/config.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from typing import Any

from cluster_node import client_protocol as cp
from cluster_node.client_guard import ClientGuard
from cluster_node.jobtypes import iso
from cluster_node.output_text import one_line
from cluster_node.service import NodeService
from cluster_node.tickets import Ticket
from common.errors import InvalidJob, StoreError, UnknownJob
from common.jobs import JobId, JobSpec, Outcome
from common.log import Throttled
from common.messages import JobStatus

logger = logging.getLogger(__name__)
throttled = Throttled(logger)  # what anyone who reaches the port can cause

# Answers are written out (and drained) whenever they pass this size, so a pipelined batch
# of `getall`s cannot pile up unbounded output in the node's memory.
WRITE_HIGH_WATER = 256 * 1024
# Lines of one client answered in one turn of the loop (~4 ms of pipelined submissions);
# the rest wait for the next turn, after the other clients' lines. One client piping
# without end (`cat jobs.txt | nc`) was answered a whole read at a time, up to ~7,000
# lines: a request-reply client beside it waited 83 ms for each ticket at the median (12
# ms now). The price: 4 pipelined clients -13 % (more, smaller commits and frames; with
# 128 lines a turn, -21 %).
LINES_PER_TURN = 512
# Lines read and not answered yet beyond which reading waits for the client's next turn.
LINES_BACKLOG = 8 * LINES_PER_TURN
# How long `cancel` waits for the proxy to say what happened before answering anyway.
CANCEL_WAIT_SECONDS = 5.0
# A connection over MAX_CLIENTS is counted again this much later, before it is refused.
ADMISSION_RECHECK_SECONDS = 0.05
# Commands answered in a task of their own (they wait for something, or write much); a
# tuple: `isinstance` with a union `A | B | C` written in the call builds it on every line.
WAITING_COMMANDS = (cp.Wait, cp.Status, cp.Cancel, cp.Tail, cp.GetAll)
# Tickets per piece of a `getall` answer: the loop serves the other clients between pieces
# (~5 ms each). Built whole, a node's 1,000,000 tickets kept them waiting 4 s.
GETALL_PIECE = 1000


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
        state = self.service.state
        text = cp.render_unknown(ticket, time.time(), cfg.result_ttl, cfg.max_results,
                                 state.oldest_ticket_time, state.created)
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
            obj["detail"] = f"had already finished ({outcome.state})"
            text = f"Not cancelled: {job_id} {obj['detail']}"
        obj["state"] = "pending" if outcome is None else outcome.state
        reply.add(text, obj)

    def getall_lines(self, ids: Iterable[JobId], reply: Reply) -> int:
        """`getall`'s line for each of these tickets that the node still keeps; how many."""
        tickets = self.service.state.tickets
        count = 0
        for job_id in ids:
            t = tickets.get(job_id)
            if t is None:
                continue  # expired since the answer began
            count += 1
            if t.outcome is None:
                reply.add(f"{job_id} pending {t.spec.describe()}",
                          {"ticket": job_id, "state": "pending", "text": t.spec.describe()})
            else:
                state = t.outcome.state
                reply.add(f"{job_id} {state} {t.outcome.output}",
                          {"ticket": job_id, "state": t.outcome.state, "text": t.outcome.output})
        return count

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
        where = await self._where(job_id, t)
        obj: dict[str, Any] = {"ticket": job_id, "state": where.state,
                               "node": where.node or None, "job": t.spec.describe(),
                               "submitted": iso(t.spec.submitted_at),
                               "attempts": where.attempts}
        obj.update(_options(t.spec))
        if where.started:  # running
            obj["started"] = iso(where.started)
        if where.history and t.outcome is None:  # failed attempts of a job not ended yet
            obj["failed_attempts"] = list(where.history)
        if t.outcome is not None:
            if not t.outcome.never_ran:
                obj["started"] = iso(t.outcome.started_at)
            obj["finished"] = iso(t.outcome.finished_at)
            if t.outcome.history:
                obj["failed_attempts"] = list(t.outcome.history)
            if not t.outcome.ok:
                obj["reason"] = t.outcome.output
        reply.add(_status_text(obj), obj)

    async def _where(self, job_id: JobId, t: Ticket) -> JobStatus:
        """Where the job is and how many attempts it had, as this node and the proxy know
        it; `started` for a running one."""
        state = self.service.state
        if t.outcome is not None:
            return JobStatus(job_id, t.outcome.state, t.outcome.node, t.outcome.attempts)
        if job_id in state.running or job_id in state.held:
            started = state.started_at.get(job_id, 0.0)
            here = "running" if job_id in state.running else "dispatched"
            seen = await self.service.where_is(job_id)  # how many attempts: the proxy knows
            return JobStatus(job_id, here, state.node_id,
                             seen.attempts if seen is not None else 1, started,
                             seen.history if seen is not None else ())
        if not t.forwarded:
            return JobStatus(job_id, "queued", "", 0)  # at this node, on its way to the proxy
        seen = await self.service.where_is(job_id)
        if seen is None:
            return JobStatus(job_id, "queued", "", 0)
        if seen.state in ("dispatched", "running"):
            return seen
        return dataclasses.replace(seen, state="finished" if seen.state == "done" else "queued")

    def _stats(self) -> tuple[str, dict[str, Any]]:
        s = self.service.state
        proxy = "connected" if self.service.proxy_connected else "disconnected"
        obj: dict[str, Any] = {"node": s.node_id, "slots": s.slots, "running": len(s.running),
                               "queued": s.queued, "done": s.done, "failed": s.failed,
                               "duplicates": s.duplicates, "abandoned": s.abandoned,
                               "tickets": len(s.tickets),
                               "pending": s.pending_tickets, "proxy": proxy,
                               # failing: no new job is taken until it takes commits again
                               "store": "ok" if self.service.store_health.healthy
                               else "failing"}
        line = "Stats: " + " ".join(f"{k}={v}" for k, v in obj.items())
        # The cluster as the proxy last said, while it is connected only: 8 s after the
        # proxy went, every node (this one too) was still shown alive.
        if s.cluster is not None and self.service.proxy_connected:
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


def _options(spec: JobSpec) -> dict[str, Any]:
    """The options a job was submitted with, for `status` (those set)."""
    obj: dict[str, Any] = {}
    if spec.priority:
        obj["priority"] = spec.priority
    if spec.not_before:
        obj["not_before"] = iso(spec.not_before)
    if spec.timeout:
        obj["timeout"] = spec.timeout
    if spec.retries:
        obj["retries"] = spec.retries
    return obj


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
        head += " failed_attempts=[" + one_line("; ".join(obj["failed_attempts"])) + "]"
    return head


class ClientConnection(asyncio.Protocol):
    """One netcat client. Its lines are answered in order, in the callback that reads them
    (no task per read), and the answers are written from the callback of the group commit
    that makes them true (no task wake-up either): against asyncio streams, request-reply
    clients got 16 % more tickets a second (node CPU per ticket 230 -> 189 us), pipelined
    ones 8 % more (11.9 -> 11.1 us). A command that waits (`wait`, `status`, `cancel`,
    `tail`), answers past WRITE_HIGH_WATER, or a client that does not read them, hand the
    connection to a task until that is over, reading paused meanwhile (what the client
    sends then waits in the kernel's buffers)."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.session = ClientSession(service)
        self.splitter = cp.LineSplitter(service.cfg.max_line_bytes)
        self.lines: deque[bytes | cp.LineTooLong] = deque()  # read, not answered yet
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.task: asyncio.Task[None] | None = None  # the connection handed to a coroutine
        self.turn_over = False  # lines left for the loop's next turn
        self.ended = False  # the client sent all it will: answer, say goodbye, close
        self.closing = False  # no more answers: the connection is closed or closes next
        self.write_paused = False  # the transport's buffer is full: the client is not reading
        self.drained: asyncio.Future[None] | None = None
        self.last_input = self.loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.admitted = True  # False while it waits for room under MAX_CLIENTS (`_admit`)

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if self.service.clients >= self.service.cfg.max_clients:
            # The count may hold connections whose peers are gone, their end not read yet:
            # accepted in one batch, a connect-and-close storm of 8 sockets had the node
            # refuse half of 166,000 connections, honest ones too. Asked again once the loop
            # has read what waits (this one's lines wait meanwhile).
            self.admitted = False
            self.loop.call_later(ADMISSION_RECHECK_SECONDS, self._admit)
            return
        self._admit()

    def farewell(self) -> bytes:
        """What the node says to this client as it stops."""
        reply = Reply(self.session.json_mode)
        reply.error("the node is stopping; ask again once it is back (tickets are kept)")
        return reply.lines[0].encode() + b"\n"

    def _admit(self) -> None:
        assert self.transport is not None
        if self.closing:  # gone while it waited
            return
        cfg = self.service.cfg
        if self.service.clients >= cfg.max_clients:
            throttled.warning("client.refused peer=%s reason=max_clients", self.peer)
            self.transport.write(cp.render_error(
                f"too many connections (MAX_CLIENTS={cfg.max_clients}), try again later"
            ).encode() + b"\n")
            self.closing = True
            self.transport.close()
            return
        self.service.client_transports.add(self.transport)
        self.idle_timer = self.loop.call_later(cfg.client_idle_timeout, self._check_idle)
        if not self.admitted:
            self.admitted = True
            if (self.lines or self.ended) and self.task is None and not self.turn_over:
                self._pump()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_input = self.loop.time()
        self.lines.extend(self.splitter.feed(data))
        if not self.admitted:
            return  # answered once admitted
        if self.turn_over:
            if len(self.lines) > LINES_BACKLOG and self.transport is not None:
                self.transport.pause_reading()  # until its next turn
        elif self.task is None:
            self._pump()

    def eof_received(self) -> bool:
        """End of input is an `exit` once every line is answered."""
        if not self.closing:
            self.ended = True
            self.lines.extend(self.splitter.finish())
            if self.task is None and not self.turn_over and self.admitted:
                self._pump()
        return True  # keep the transport: the answers are still to be written

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.debug("client.dropped peer=%s error=%r", self.peer, exc)
        self.closing = True
        if self.transport is not None:
            self.service.client_transports.discard(self.transport)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.task is not None:
            self.task.cancel()

    # ------------------------------------------------------------------ answering

    def _pump(self) -> None:
        """Answer the lines read, in order, until one needs a task."""
        if self.write_paused:  # answers the client does not read: wait until it does
            self._hand_over(self._drain())
            return
        reply = Reply(self.session.json_mode)
        lines = self.lines
        turn = LINES_PER_TURN
        while lines:
            if not turn:
                self._send(reply)
                self._next_turn()
                return
            turn -= 1
            then = self._answer(lines.popleft(), reply)
            if then is True:
                continue
            if then is False:
                self._send(reply, close=True)
            else:
                self._hand_over(then)
            return
        if self.ended:
            reply.add(cp.GOODBYE, {"bye": cp.GOODBYE})
            self._send(reply, close=True)
            return
        self._send(reply)

    def _next_turn(self) -> None:
        """The other clients first: go on in the loop's next turn. Reading goes on
        meanwhile (no pause and resume per turn), unless the lines left pile up."""
        self.turn_over = True
        self.loop.call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self.turn_over = False
        if self.closing or self.transport is None:
            return
        if len(self.lines) <= LINES_BACKLOG:  # no task can have begun since the turn
            self.transport.resume_reading()  # if the backlog paused it
        self._pump()

    def _answer(self, item: bytes | cp.LineTooLong,
                reply: Reply) -> bool | Coroutine[Any, Any, None]:
        """Answer one line into `reply`. Then: True, go on; False, the connection ends after
        `reply`; or the coroutine that writes `reply` and goes on in a task."""
        session = self.session
        if isinstance(item, cp.LineTooLong):
            reply.error(f"line longer than {item.limit} bytes (MAX_LINE_BYTES), ignored")
            return True
        verdict = session.guard.screen(item)
        if verdict is not None:
            reply.add(verdict.line, verdict.obj)
            return verdict.keep_open
        cmd = cp.parse_command(item, session.job_type_names)
        if type(cmd) is cp.Submit:  # most lines: no need to ask what else it could be
            session.submit(cmd, reply)
        elif isinstance(cmd, WAITING_COMMANDS):
            return self._answer_waiting(reply, cmd)
        elif not session.handle_now(cmd, reply):
            return False
        if reply.size >= WRITE_HIGH_WATER:
            return self._write_then_drain(reply)
        return True

    def _send(self, reply: Reply, close: bool = False) -> None:
        """Write `reply` once the group commit that covers it ran; then close if asked."""
        if close:
            self.closing = True
        if reply.lines or close:
            self.service.when_committed(lambda durable: self._write(reply, durable, close))

    def _write(self, reply: Reply, durable: bool, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not durable:
            logger.error("client.tickets_withdrawn count=%d", len(reply.ticket_lines))
            reply.withdraw_tickets("storage failure, job not accepted, no ticket issued: "
                                   "stable storage failed; the state was rolled back")
        if reply.lines:
            transport.write(("\n".join(reply.lines) + "\n").encode())
        if close:
            transport.close()

    async def _written(self, reply: Reply) -> None:
        """`_send` for a coroutine: returns once `reply` is written."""
        if reply.lines:
            try:
                await self.service.persist_group()
                durable = True
            except StoreError:
                durable = False
            self._write(reply, durable)

    def _hand_over(self, work: Coroutine[Any, Any, None]) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        task = self.task = self.loop.create_task(self._serve_in_task(work))
        task.add_done_callback(lambda _: self._task_done(task, work))

    def _task_done(self, task: asyncio.Task[None], work: Coroutine[Any, Any, None]) -> None:
        """Cancelled before its first step (the connection was lost meanwhile), the task
        never awaited `work` nor cleared itself: Python warned that `work` was never
        awaited (a raw RuntimeWarning in a node's log). Closing an awaited one does
        nothing."""
        work.close()
        if self.task is task:
            self.task = None

    async def _serve_in_task(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except (ConnectionError, OSError, TimeoutError) as exc:
            logger.debug("client.dropped peer=%s error=%r", self.peer, exc)
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            self.task = None
        if self.closing or self.transport is None:
            return
        self.last_input = self.loop.time()  # the idle clock starts again with reading
        self.transport.resume_reading()
        self._pump()

    async def _drain(self) -> None:
        """Wait until the client read enough of its answers; one that reads none for
        CLIENT_IDLE_TIMEOUT is dropped (TimeoutError)."""
        if not self.write_paused:
            return
        self.drained = self.loop.create_future()
        async with asyncio.timeout(self.service.cfg.client_idle_timeout):
            await self.drained

    async def _write_then_drain(self, reply: Reply) -> None:
        await self._written(reply)
        await self._drain()

    async def _answer_waiting(self, reply: Reply,
                              cmd: cp.Wait | cp.Status | cp.Cancel | cp.Tail | cp.GetAll) -> None:
        await self._written(reply)  # the answers to the lines before it go first
        if isinstance(cmd, cp.Tail):
            await self._tail(cmd.ticket)
        elif isinstance(cmd, cp.GetAll):
            await self._getall()
        else:
            reply = Reply(self.session.json_mode)
            await self.session.handle_waiting(cmd, reply)
            await self._written(reply)
        await self._drain()

    async def _getall(self) -> None:
        """`getall`: every ticket the node keeps, in order, then `END <count>`, written in
        pieces, each once the client has read enough of the one before (a client that
        reads none is dropped after CLIENT_IDLE_TIMEOUT, as for any answer)."""
        ids = list(self.service.state.tickets)  # tickets come and go meanwhile
        count = 0
        for start in range(0, len(ids), GETALL_PIECE):
            reply = Reply(self.session.json_mode)
            count += self.session.getall_lines(ids[start:start + GETALL_PIECE], reply)
            await self._written(reply)  # after the commit of what it shows: another turn
            await self._drain()
        reply = Reply(self.session.json_mode)
        reply.add(f"END {count}", {"end": count})
        await self._written(reply)

    async def _tail(self, job_id: JobId) -> None:
        """`tail`: a running sh job's output lines as they arrive (`Output: <line>`), then
        its result line; for other jobs just the result (waiting up to MAX_WAIT_SECONDS)."""
        service, session = self.service, self.session
        try:
            ticket = service.ticket(job_id)
        except UnknownJob:
            reply = Reply(session.json_mode)
            session._unknown(job_id, reply)
            await self._written(reply)
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
                    await self._written(reply)
                    await self._drain()
        except TimeoutError:
            pass
        finally:
            service.unsubscribe_output(job_id, queue)
        outcome = service.ticket(job_id).outcome
        reply = Reply(session.json_mode)
        reply.add(_result_text(outcome), _outcome_obj(job_id, outcome))
        await self._written(reply)

    def _check_idle(self) -> None:
        """CLIENT_IDLE_TIMEOUT: one timer per connection, not one per read. While a task
        has the connection (a `wait`, a `tail`) nothing is read: the clock waits too."""
        timeout = self.service.cfg.client_idle_timeout
        now = self.loop.time()
        due = now + timeout if self.task is not None else self.last_input + timeout
        if now < due:
            self.idle_timer = self.loop.call_at(due, self._check_idle)
            return
        self.idle_timer = None
        if not self.closing:
            reply = Reply(self.session.json_mode)
            reply.error(f"idle for {timeout:g} s (CLIENT_IDLE_TIMEOUT), closing")
            self._send(reply, close=True)


async def start_client_server(service: NodeService, host: str,
                              port: int) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(
        lambda: ClientConnection(service), host, port, backlog=service.cfg.max_clients)
    bound = server.sockets[0].getsockname()[1]
    return server, int(bound)
