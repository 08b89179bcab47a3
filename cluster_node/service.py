"""NodeService: the synchronous facade the client server and the proxy link call. It joins
the pure NodeState, the store, and the events that wake the executor and the link.

The one rule it keeps: `persist()` commits every change before anything that depends on
it leaves the process (a ticket to a client, an ACK or a result to the proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from cluster_node.config import NodeConfig
from cluster_node.jobtypes import JobContext, JobType
from cluster_node.live_output import LIVE_LINES_PER_BATCH, LiveOutput, cut
from cluster_node.output_text import one_line
from cluster_node.state import NodeState
from cluster_node.tickets import Ticket
from common.aio import Deferred
from common.errors import InvalidJob, StoreError, UnknownJob
from common.jobs import JobId, JobSpec, Outcome, new_job_id
from common.kvstore import LAZY_COMMIT_SECONDS, KVStore
from common.messages import JobStatus, Message, Output, StatusQuery, StatusReply
from common.store_health import StoreHealth

logger = logging.getLogger(__name__)

# How long `status` waits for the proxy to say where a job is.
STATUS_QUERY_TIMEOUT = 1.0
# Batches of output lines a `tail` may have unwritten; more are dropped for that tail.
TAIL_QUEUE_BATCHES = 100
# Tickets forgotten per commit when their results expire (RESULT_TTL, MAX_RESULTS): a
# backlog of them goes in several commits, the loop serving clients in between.
EXPIRE_BATCH = 5_000
# Seconds between sweeps for expired results: a quarter of RESULT_TTL, within these bounds;
# with MAX_RESULTS the upper bound (a second: at 10,000 tickets a second, a sweep finds
# 10,000 over the bound, two batches).
EXPIRE_PERIOD_BOUNDS = (0.5, 60.0)
EXPIRE_PERIOD_WITH_MAX_RESULTS = 1.0
# At a steady MAX_RESULTS every sweep forgets a few: one log line a minute says how many.
EXPIRE_LOG_PERIOD = 60.0
# Least time between two INFOs sent early for overdue jobs: a burst of them goes in one,
# and at most 50 a second come on top of the periodic ones (the proxy allows 200 a second).
URGENT_INFO_GAP = 0.02
# An overdue timer that fires this late found the event loop stalled (a busy machine): the
# job may have ended in the stall, its completion not yet run. Look again once, a moment
# later, rather than report a job that was not late.
STALL_SLACK = 0.005


class NodeService:
    def __init__(self, cfg: NodeConfig, store: KVStore, state: NodeState,
                 job_types: dict[str, JobType], ctx: JobContext) -> None:
        self.cfg = cfg
        self.store = store
        self.state = state
        self.job_types = job_types
        self.ctx = ctx
        self.link_wake = asyncio.Event()
        self.link_acked = asyncio.Event()  # set when frames from the proxy were handled
        self.executor_wake = asyncio.Event()
        self.outbox: deque[Message] = deque()  # replies and INFO for the link's send loop
        self.proxy_connected = False
        self.stopping = False  # set when the node begins to shut down
        self.client_address = ""  # HOST:PORT clients reach; set once the server is bound
        self.runnable: tuple[str, ...] = ()  # the job types its HELLO declares (): any
        self.proxy_id = ""  # of the proxy it last connected to (since this process began)
        self.submitted = 0  # tickets issued by this process (metrics)
        self.expired = 0  # tickets this process forgot (RESULT_TTL, MAX_RESULTS; metrics)
        self._expired_logged = (0, float("-inf"))  # (self.expired, monotonic time) last logged
        self.finished_hooks: list[Callable[[Outcome], None]] = []  # metrics watch outcomes
        self.store_health = StoreHealth("node")
        self._waiters: dict[JobId, list[asyncio.Future[None]]] = {}
        self._status_waiters: dict[JobId, list[asyncio.Future[JobStatus]]] = {}
        self._persist_scheduled = False
        # changes nothing waits on: committed with the next commit, or a moment later
        self.persist_later = Deferred(LAZY_COMMIT_SECONDS, self._persist_now).request
        self.attempts: dict[JobId, asyncio.Task[None]] = {}  # running here, by job
        self.running_on: set[JobId] = set()  # attempts ended, outcomes waiting for the store
        self.kill_on_start: set[JobId] = set()  # stop requests that came before the task
        self.killed: set[JobId] = set()  # attempts cancelled by a stop request (once each)
        self.client_transports: set[asyncio.Transport] = set()  # netcat connections
        self.live: dict[JobId, LiveOutput] = {}  # output of the jobs running here
        self._tails: dict[JobId, list[asyncio.Queue[tuple[str, ...] | None]]] = {}
        # who waits for the next group commit, and the failures so far when they joined
        self._group: list[tuple[Callable[[bool], None], int]] = []
        self._failures = 0  # storage failures so far (each one rolled the state back)
        self._urgent_info: asyncio.TimerHandle | None = None  # an early INFO on its way
        self._urgent_info_at = float("-inf")  # loop time the last one was queued
        self._alarms: dict[JobId, asyncio.TimerHandle] = {}  # overdue timers of running jobs

    @property
    def clients(self) -> int:
        """Netcat connections open now."""
        return len(self.client_transports)

    def close_clients(self) -> None:
        """At shutdown: close every client connection (a listening server's close leaves
        them open, and from Python 3.12 on its wait_closed waits for them)."""
        for transport in list(self.client_transports):
            # A last line, so that a client in the middle of a `wait` or a `tail` is not
            # left with a connection that just ends.
            farewell = getattr(transport.get_protocol(), "farewell", None)
            if farewell is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write(farewell())
            transport.abort()

    # ------------------------------------------------------------------ overdue jobs

    def arm_overdue(self, job_id: JobId, seconds: float, recheck: bool = True) -> None:
        """A job with an `overdue_after` started: report it if it runs `seconds` more."""
        loop = asyncio.get_running_loop()
        at = loop.time() + seconds
        self._alarms[job_id] = loop.call_at(at, self._on_alarm, job_id, at, recheck)

    def disarm_overdue(self, job_id: JobId) -> None:
        alarm = self._alarms.pop(job_id, None)
        if alarm is not None:
            alarm.cancel()

    def _on_alarm(self, job_id: JobId, at: float, recheck: bool) -> None:
        self._alarms.pop(job_id, None)
        attempt = self.attempts.get(job_id)
        if attempt is not None and attempt.done():
            return  # it ended; its outcome is on the way to being recorded
        if recheck and asyncio.get_running_loop().time() - at > STALL_SLACK:
            self.arm_overdue(job_id, STALL_SLACK, recheck=False)
            return
        self.on_overdue(job_id)

    def on_overdue(self, job_id: JobId) -> None:
        """A job ran past its `overdue_after`: tell the proxy now, not at the next INFO."""
        if self.state.mark_overdue(job_id) and self._urgent_info is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._urgent_info_at + URGENT_INFO_GAP - loop.time())
            self._urgent_info = loop.call_later(delay, self._send_urgent_info)

    def _send_urgent_info(self) -> None:
        self._urgent_info = None
        self._urgent_info_at = asyncio.get_running_loop().time()
        if self.proxy_connected:  # else the HELLO on reconnecting says what runs
            self.outbox.append(self.state.info())
            self.link_wake.set()

    # ------------------------------------------------------------------ live output (tail)

    def flush_live(self, only: JobId | None = None, everything: bool = False) -> None:
        """Send a batch of each running job's new output lines towards its origin and the
        proxy (every INFO_PERIOD); `everything` drains one job's last lines when it ends."""
        for job_id in [only] if only is not None else list(self.live):
            live = self.live.get(job_id)
            spec = self.state.held.get(job_id)
            if live is None or spec is None:
                continue
            while lines := live.take():
                msg = Output(job_id, tuple(lines))
                if spec.origin == self.state.node_id:
                    self.on_output(msg)  # this node's own `tail` clients, at once
                # The proxy passes it on to the origin's tails and shows it in its dashboard.
                self.outbox.append(msg)
                self.link_wake.set()
                if not everything:
                    break

    def on_output(self, msg: Output) -> None:
        queues = self._tails.get(msg.job_id, ())
        if not queues:
            return
        # Held to what this node's own LiveOutput promises its clients, whoever ran the job
        # (a runner sent 20 MB of lines, some with line breaks, into a `tail`).
        lines = tuple(cut(one_line(line)) for line in msg.lines[:LIVE_LINES_PER_BATCH])
        for queue in queues:
            if queue.qsize() < TAIL_QUEUE_BATCHES:  # a slow tail skips, never grows
                queue.put_nowait(lines)

    def subscribe_output(self, job_id: JobId) -> asyncio.Queue[tuple[str, ...] | None]:
        queue: asyncio.Queue[tuple[str, ...] | None] = asyncio.Queue()
        self._tails.setdefault(job_id, []).append(queue)
        return queue

    def unsubscribe_output(self, job_id: JobId,
                           queue: asyncio.Queue[tuple[str, ...] | None]) -> None:
        queues = self._tails.get(job_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._tails.pop(job_id, None)

    def stop_killed_jobs(self) -> None:
        """Cancel the running attempts the proxy asked to stop (see NodeState._on_stop)."""
        for job_id in self.state.kill_requests:
            task = self.attempts.get(job_id)
            if task is not None:
                if job_id not in self.killed:  # a second stop request must not look like
                    self.killed.add(job_id)   # a shutdown (a second cancel) to the task
                    task.cancel()
            elif job_id in self.state.running:  # picked but its task has not begun yet
                self.kill_on_start.add(job_id)
        self.state.kill_requests.clear()

    # ------------------------------------------------------------------ durability

    def persist(self) -> None:
        """Commit all pending changes, then wake whoever acts on them.
        On a storage failure: roll back to what is on disk and raise StoreError."""
        changes = self.state.take_changes()
        if changes:
            try:
                self.store.apply(changes)
                self.store.commit()
            except StoreError as exc:
                self._recover(str(exc))
                raise
            self.link_wake.set()  # new submissions or results may be ready to send
            self.executor_wake.set()  # new jobs may be ready to run
        for job_id in self.state.take_resolved():
            for fut in self._waiters.pop(job_id, ()):
                if not fut.done():
                    fut.set_result(None)
            for queue in self._tails.get(job_id, ()):
                queue.put_nowait(None)  # the end: the tail writes the result line

    def persist_soon(self) -> None:
        """Coalesce the commits of many events in one loop iteration into one."""
        if not self._persist_scheduled:
            self._persist_scheduled = True
            asyncio.get_running_loop().call_soon(self._persist_now)

    def _persist_now(self) -> None:
        self._persist_scheduled = False
        try:
            self.persist()
        except StoreError as exc:
            logger.error("store.commit_failed error=%s", exc)

    def when_committed(self, callback: Callable[[bool], None]) -> None:
        """Group commit: `callback(durable)` once the one commit that covers every change
        staged by every client served in this loop iteration has run (it runs after their
        callbacks), rather than one commit per client. `durable` is False if that commit
        failed, or if any failure since this call rolled the state back (changes staged
        here were lost)."""
        if not self._group:
            asyncio.get_running_loop().call_soon(self._commit_group)
        self._group.append((callback, self._failures))

    async def persist_group(self) -> None:
        """`when_committed` for a coroutine; raises StoreError when not durable."""
        member: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # A future per member, not one shared behind asyncio.shield (a member cancelled
        # must not cancel the others'): 5.4 -> 2.8 us per member.

        def settle(durable: bool) -> None:
            if not member.done():  # done: cancelled, its task went away
                member.set_result(durable)

        self.when_committed(settle)
        if not await member:
            raise StoreError("stable storage failed; the state was rolled back")

    def _commit_group(self) -> None:
        group, self._group = self._group, []
        try:
            self.persist()
        except StoreError as exc:
            logger.error("store.commit_failed error=%s", exc)
        for callback, failures in group:
            callback(self._failures == failures)

    def _recover(self, error: str) -> None:
        """Drop the uncommitted writes and rebuild the state from what is on disk, once:
        until the store takes a probe (`StoreHealth`) new jobs are refused, none start,
        outcomes wait, and the link to the proxy is dropped."""
        self._failures += 1
        logger.error("store.failed node=%s action=rollback error=%s", self.state.node_id,
                     error)
        self.store_health.failed(error, self)
        self.link_wake.set()

    def roll_back(self) -> bool:
        """The state as the disk has it; False if the store cannot even be reopened."""
        try:
            self.store = self.store.reopen()
            restored = NodeState.restore(self.store.stored_items(), self.cfg.slots)
        except StoreError as exc:
            logger.error("store.reopen_failed error=%s", exc)
            return False
        if restored is not None:
            restored.cluster = self.state.cluster
            # The attempts still running in their tasks run on in the restored state: held
            # there and not running, or not held (their dispatch was in the failed commit,
            # and the proxy sent them again), they were started a second time beside
            # themselves (seen: an `sh` job twice at once after a full disk).
            held = self.state.held
            restored.keep_running(held[j] for j in (*self.attempts, *self.running_on)
                                  if j in held)
            restored.abandoning.update(self.state.abandoning & restored.running)
            restored.started_at.update((j, t) for j, t in self.state.started_at.items()
                                       if j in restored.running)
            self.state = restored
        return True

    def close(self) -> KVStore:
        """At shutdown: stop probing the store; the store in use now, for the caller to
        close."""
        self.store_health.close()
        return self.store

    def on_store_back(self) -> None:
        self.executor_wake.set()  # the jobs held meanwhile start now

    # ------------------------------------------------------------------ clients

    def submit(self, job_type: str, args: tuple[str, ...], *, priority: int = 0,
               delay: float = 0.0, timeout: float = 0.0, retries: int | None = None) -> JobId:
        """Stage a submission; the caller must `persist()` before showing the ticket."""
        self.store_health.check()
        jt = self.job_types.get(job_type)
        if jt is None:
            known = ", ".join(sorted(self.job_types))
            raise InvalidJob(f"unknown job type {job_type[:40]!r}; known: {known}")
        if self.state.pending_tickets >= self.cfg.max_pending:
            raise InvalidJob(f"this node already holds {self.cfg.max_pending} pending tickets "
                             "(MAX_PENDING); try again later")
        now = time.time()
        spec = JobSpec(new_job_id(), jt.name, jt.validate(args, self.ctx), self.state.node_id,
                       now, priority, now + delay if delay else 0.0, timeout,
                       self.cfg.job_retries if retries is None else retries)
        self.state.submit(spec)
        self.submitted += 1
        return spec.job_id

    async def cancel(self, job_id: JobId, seconds: float) -> tuple[Outcome | None, str]:
        """Cancel a ticket of ours; (its outcome, or None if the proxy has not answered in
        `seconds`, and what happened: finished, local or sent)."""
        self.ticket(job_id)  # raises UnknownJob for a ticket this node never issued
        self.store_health.check()
        happened = self.state.cancel(job_id, time.time())
        self.persist()  # the cancel (or its local outcome) is stored before we answer
        if happened == "sent":
            self.link_wake.set()
            return await self.wait_result(job_id, seconds), happened
        return self.ticket(job_id).outcome, happened

    def expire_results(self) -> int:
        """Forget (and delete from the store) up to EXPIRE_BATCH tickets whose result is
        older than RESULT_TTL or beyond the newest MAX_RESULTS; how many."""
        ttl, keep = self.cfg.result_ttl, self.cfg.max_results
        cutoff = time.time() - ttl if ttl > 0 else float("-inf")
        count = self.state.expire_results(cutoff, EXPIRE_BATCH, keep)
        if count:
            self.persist()
            self.expired += count
            logged, at = self._expired_logged
            if time.monotonic() - at >= EXPIRE_LOG_PERIOD:
                logger.info("tickets.expired count=%d result_ttl=%gs max_results=%d kept=%d",
                            self.expired - logged, ttl, keep, len(self.state.tickets))
                self._expired_logged = (self.expired, time.monotonic())
        return count

    async def expire_loop(self) -> None:
        ttl = self.cfg.result_ttl
        if ttl <= 0 and self.cfg.max_results <= 0:
            return
        low, high = EXPIRE_PERIOD_BOUNDS
        if self.cfg.max_results > 0:
            high = EXPIRE_PERIOD_WITH_MAX_RESULTS
        period = min(high, max(low, ttl / 4)) if ttl > 0 else high
        while True:
            await asyncio.sleep(period)
            await self.store_health.back.wait()
            more = True
            while more:
                try:
                    more = self.expire_results() == EXPIRE_BATCH
                except StoreError as exc:  # rolled back: the tickets are still there
                    logger.error("tickets.expire_failed error=%s", exc)
                    more = False
                await asyncio.sleep(0)  # let clients in between the batches

    def ticket(self, job_id: JobId) -> Ticket:
        ticket = self.state.tickets.get(job_id)
        if ticket is None:
            raise UnknownJob(job_id)
        return ticket

    async def wait_result(self, job_id: JobId, seconds: float) -> Outcome | None:
        ticket = self.ticket(job_id)
        if ticket.outcome is None and seconds > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job_id, []).append(fut)
            try:
                async with asyncio.timeout(seconds):
                    await fut
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(job_id, [])
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    self._waiters.pop(job_id, None)
            ticket = self.ticket(job_id)
        return ticket.outcome

    async def where_is(self, job_id: JobId) -> JobStatus | None:
        """Ask the proxy where a job of ours is; None when it cannot tell in time."""
        if not self.proxy_connected:
            return None
        fut: asyncio.Future[JobStatus] = asyncio.get_running_loop().create_future()
        self._status_waiters.setdefault(job_id, []).append(fut)
        self.outbox.append(StatusQuery((job_id,)))
        self.link_wake.set()
        try:
            async with asyncio.timeout(STATUS_QUERY_TIMEOUT):
                return await fut
        except TimeoutError:
            return None
        finally:
            waiters = self._status_waiters.get(job_id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._status_waiters.pop(job_id, None)

    def on_status_reply(self, reply: StatusReply) -> None:
        for entry in reply.entries:
            for fut in self._status_waiters.pop(entry.job_id, ()):
                if not fut.done():
                    fut.set_result(entry)
