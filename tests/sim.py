"""An in-memory cluster for conversation tests: one `ProxyState`, several `NodeState`s, a
fake clock and a deterministic message pump. No sockets, no asyncio, no sleeps.

It keeps the shells' rules (cluster_node/service.py, proxy_link.py, executor.py and
reverse_proxy/node_server.py):
- after every step, a process's `take_changes()` is applied to its own `MemoryKV` and
  committed before anything the step produced leaves the process, and only then are the
  tickets it resolved shown to clients (`SimNode.resolutions`);
- a link is two FIFO queues of messages, each one encoded and decoded as on the wire;
  dropping a link (a disconnect or a crash on either side) loses what is in flight both ways,
  and both ends notice at once;
- a node, whenever it wakes, sends its outbox, then `take_submissions` and `take_results`;
  while connected it queues INFO every `info_period` and REQUEST_OF_RES every
  `request_period`; on connecting it commits, says `on_connect()`'s HELLO, and starts with an
  empty outbox;
- the proxy routes what its state returns: commit, then deliver; `Outgoing(node, Leaving)`
  closes that node's link. It runs `tick` every `dispatch_period` and `sync` every
  `sync_period`;
- executing a job is `next_job()` and, later, `finish()` with an output that depends only
  on the spec and the node (so two runs on different nodes differ, as real outcomes do).

Killing a process drops its uncommitted changes, its links and what was in flight; a node
that is down runs nothing until it is started again, rebuilt from its store with `restore`
(`crash_node` is both at once; the proxy is always restarted at once). Wiping starts a
process afresh on an empty store (a node gets a new incarnation). Time is integer
milliseconds and the sim's own iterations are ordered, so a run repeats exactly for a given
PYTHONHASHSEED (the states iterate sets of ids, whose order depends on it).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

from cluster_node.jobtypes import BUILTIN_TYPES, JobContext, fibonacci
from cluster_node.proxy_link import REQUEST_BATCH, SEND_BATCH
from cluster_node.state import NodeState
from cluster_node.tickets import Ticket
from common.framing import HEADER, decode_body, encode_frame
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import MemoryKV
from common.messages import Hello, Job, Leaving, Message, RequestOfRes, Result
from reverse_proxy.records import Outgoing, ProxySettings
from reverse_proxy.state import ProxyState

PROXY_ID = "proxy-sim"
# The wall clock the sim starts at (seconds); any value works, a realistic one reads better.
START_SECONDS = 1_700_000_000
# Rounds of `pump()` before it gives up: far more than any test needs, so hitting it means
# the two sides keep talking without end.
MAX_PUMP_ROUNDS = 10_000

_JOB_TYPES = {t.name: t for t in BUILTIN_TYPES}


class SimStuck(AssertionError):
    """The cluster did not reach the state a test waited for."""


def wire(msg: Message) -> Message:
    """`msg` as the peer decodes it: through a real frame."""
    return decode_body(encode_frame(msg)[HEADER.size:])


def run_job(spec: JobSpec, node: NodeId) -> tuple[bool, str]:
    """A deterministic execution: fib computes, sleep reports, anything else fails the way
    `cluster_node.executor.run_job` reports an exception."""
    if spec.job_type == "fib":
        return True, str(fibonacci(int(spec.args[0])))
    if spec.job_type == "sleep":
        return True, f"slept {spec.args[0]} ms on {node}"
    if spec.job_type == "sh":
        return False, f"InvalidJob: sh jobs are disabled on {node}"
    return False, f"LookupError: job type {spec.job_type!r} is not installed on this node"


@dataclass(slots=True)
class Link:
    to_proxy: deque[Message] = field(default_factory=deque)
    to_node: deque[Message] = field(default_factory=deque)


class SimNode:
    """One node process: its state and store, plus what outlives a crash of it (what its
    clients were told)."""

    def __init__(self, node_id: NodeId, slots: int) -> None:
        self.node_id = node_id
        self.slots = slots
        self.incarnations = 0
        self.kv = MemoryKV()
        self.state = self._fresh_state()
        self.link: Link | None = None
        self.outbox: list[Message] = []
        self.executing: list[tuple[JobSpec, float]] = []  # started, not finished
        self.next_info = 0
        self.next_request = 0
        self.up = True
        self.crashes = 0
        # Each result a client of this node saw for a ticket, in order (after its commit).
        self.resolutions: dict[JobId, list[Outcome]] = {}

    def _fresh_state(self) -> NodeState:
        self.incarnations += 1
        state = NodeState(self.node_id, f"{self.node_id}-inc{self.incarnations}", self.slots)
        self.kv.apply(state.initial_records())
        self.kv.commit()
        return state

    def wipe(self) -> None:
        """A start on an empty data directory: a new incarnation that knows nothing."""
        self.kv = MemoryKV()
        self.state = self._fresh_state()
        self.resolutions.clear()  # those tickets are gone with the old directory
        self.up = True

    def stop(self) -> None:
        """`kill -9`: the process is gone (its store stays)."""
        self.up = False
        self.executing.clear()
        self.outbox.clear()
        self.crashes += 1

    def start(self) -> None:
        """A start on the same store: replay it, drop what was never committed."""
        self.kv = self.kv.reopen()
        restored = NodeState.restore(self.kv.stored_items(), self.slots)
        if restored is None:
            raise SimStuck(f"node {self.node_id}: store has no identity")
        self.state = restored
        self.up = True


class Cluster:
    """One proxy and the named nodes (name -> slots), all in one thread, driven by a test."""

    def __init__(self, slots: Mapping[str, int], settings: ProxySettings | None = None, *,
                 info_period: float = 0.5, request_period: float = 1.0,
                 dispatch_period: float = 0.1, sync_period: float = 1.0,
                 connect: bool = True) -> None:
        self.settings = settings if settings is not None else ProxySettings()
        self.ms = START_SECONDS * 1000
        self.info_ms = _ms(info_period)
        self.request_ms = _ms(request_period)
        self.dispatch_ms = _ms(dispatch_period)
        self.sync_ms = _ms(sync_period)
        self.proxy_kv = MemoryKV()
        self.proxy = ProxyState(PROXY_ID, self.settings)
        self.proxy_kv.apply(self.proxy.initial_records())
        self.proxy_kv.commit()
        self.proxy_crashes = 0
        self.next_tick = self.ms + self.dispatch_ms
        self.next_sync = self.ms + self.sync_ms
        self.nodes = {NodeId(name): SimNode(NodeId(name), n) for name, n in sorted(slots.items())}
        self.origins: dict[JobId, NodeId] = {}  # every ticket ever issued
        self._issued_in: dict[JobId, int] = {}  # the origin's incarnation number then
        self.runs: Counter[JobId] = Counter()  # executions finished, over the whole run
        self._tickets = 0
        if connect:
            for name in self.nodes:
                self.connect(name)

    # ------------------------------------------------------------------ clock and views

    @property
    def now(self) -> float:
        return self.ms / 1000

    def node(self, name: str) -> SimNode:
        return self.nodes[NodeId(name)]

    def ticket(self, job_id: JobId) -> Ticket:
        return self.nodes[self.origins[job_id]].state.tickets[job_id]

    def outcome(self, job_id: JobId) -> Outcome | None:
        return self.ticket(job_id).outcome

    def live_tickets(self) -> list[JobId]:
        """Tickets issued by the current incarnation of their origin (a wiped node lost the
        others, with its data directory)."""
        return [j for j, origin in self.origins.items()
                if self._issued_in[j] == self.nodes[origin].incarnations]

    def in_flight(self) -> int:
        return sum(len(n.link.to_proxy) + len(n.link.to_node)
                   for n in self.nodes.values() if n.link is not None)

    def is_done(self) -> bool:
        """Every link up, nothing in flight or running, every ticket answered, nothing owed."""
        return (all(n.up and n.link is not None for n in self.nodes.values())
                and self.in_flight() == 0
                and not self.proxy.jobs
                and all(not n.executing and not n.state.held and not n.state.finished
                        and n.state.pending_tickets == 0 for n in self.nodes.values()))

    def describe(self) -> str:
        lines = [f"t={self.now:.3f} proxy: jobs={len(self.proxy.jobs)} "
                 f"queued={self.proxy.queued}"]
        for job_id, rec in sorted(self.proxy.jobs.items()):
            lines.append(f"  {job_id}: {rec.state} node={rec.node} attempts={rec.attempts}")
        for n in self.nodes.values():
            s = n.state
            lines.append(f"{n.node_id}: {'up' if n.up else 'DOWN'} "
                         f"link={'up' if n.link else 'down'} "
                         f"held={sorted(s.held)} running={sorted(s.running)} "
                         f"finished={sorted(s.finished)} pending={s.pending_tickets} "
                         f"awaited={s.awaited(100)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ clients

    def submit(self, node: str, job_type: str = "fib", *args: str) -> JobId:
        """A client's submission at `node`; returns the ticket once it is committed."""
        n = self.node(node)
        if not n.up:
            raise SimStuck(f"submit at {node}, which is down")
        jt = _JOB_TYPES[job_type]
        ctx = JobContext(n.node_id, allow_shell=False, sh_timeout=60.0, sh_output_limit=65536,
                         cpu_pool=None)
        self._tickets += 1
        job_id = JobId(f"{node}-t{self._tickets:05d}")
        spec = JobSpec(job_id, jt.name, jt.validate(args or ("20",), ctx), n.node_id, self.now)
        n.state.submit(spec)
        self.origins[job_id] = n.node_id
        self._issued_in[job_id] = n.incarnations
        self._wake_node(n)
        return job_id

    # ------------------------------------------------------------------ node side

    def _persist_node(self, n: SimNode) -> None:
        changes = n.state.take_changes()
        if changes:
            n.kv.apply(changes)
            n.kv.commit()
        for job_id in n.state.take_resolved():
            outcome = n.state.tickets[job_id].outcome
            assert outcome is not None
            n.resolutions.setdefault(job_id, []).append(outcome)

    def _wake_node(self, n: SimNode) -> None:
        """The node's send loop: commit, then send the outbox and whatever is unacked."""
        self._persist_node(n)
        if n.link is None:
            return
        out = list(n.outbox)
        n.outbox.clear()
        specs = n.state.take_submissions(SEND_BATCH)
        if specs:
            out.append(Job(tuple(specs)))
        outcomes = n.state.take_results(SEND_BATCH)
        if outcomes:
            out.append(Result(tuple(outcomes)))
        n.link.to_proxy.extend(wire(m) for m in out)

    def start_jobs(self, node: str) -> int:
        """The executor's wake: start held jobs up to the node's slots."""
        n = self.node(node)
        started = 0
        while n.up and len(n.state.running) < n.state.slots:
            spec = n.state.next_job()
            if spec is None:
                break
            n.executing.append((spec, self.now))
            started += 1
        return started

    def finish_jobs(self, node: str, *, commit: bool = True) -> list[Outcome]:
        """Every started job of `node` ends now. With `commit=False` the outcomes stay
        uncommitted (a crash right after loses them), as between `finish` and `persist`."""
        n = self.node(node)
        done: list[Outcome] = []
        for spec, started in n.executing:
            ok, output = run_job(spec, n.node_id)
            outcome = Outcome(spec.job_id, ok, output, n.node_id, started, self.now)
            n.state.finish(outcome)
            self.runs[spec.job_id] += 1
            done.append(outcome)
        n.executing.clear()
        if commit:
            self._wake_node(n)
        return done

    def _stop_abandoned(self, n: SimNode) -> None:
        """The executor's part of an ABANDON: the job's run stops, nothing is recorded.
        (Other stop requests, the user's cancels, are left in `kill_requests` here.)"""
        for job_id in [j for j in n.state.kill_requests if j in n.state.abandoning]:
            n.state.kill_requests.remove(job_id)
            n.executing = [(spec, at) for spec, at in n.executing if spec.job_id != job_id]
            n.state.abandon(job_id)

    def execute(self, node: str) -> int:
        """Start what fits and finish it at once; the number of jobs run."""
        self.start_jobs(node)
        return len(self.finish_jobs(node))

    # ------------------------------------------------------------------ proxy side

    def _persist_proxy(self) -> None:
        changes = self.proxy.take_changes()
        if changes:
            self.proxy_kv.apply(changes)
            self.proxy_kv.commit()

    def _route(self, outgoing: Iterable[Outgoing]) -> None:
        """Commit first, then send: an ACK or a dispatch always describes stored state."""
        out = list(outgoing)
        self._persist_proxy()
        for item in out:
            n = self.nodes.get(item.node)
            if n is None or n.link is None:
                continue
            if isinstance(item.msg, Leaving):
                self._drop_link(n)
            else:
                n.link.to_node.append(wire(item.msg))

    # ------------------------------------------------------------------ links

    def connect(self, node: str) -> str | None:
        """The node dials, says HELLO and, if welcomed, starts serving the link.
        Returns the refusal reason, or None (also when it is connected already)."""
        n = self.node(node)
        if n.link is not None or not n.up:
            return None
        self._persist_node(n)  # HELLO must describe what is on disk
        hello = wire(n.state.on_connect())
        assert isinstance(hello, Hello)
        reason, out = self.proxy.on_hello(hello, self.now)
        if reason is not None:
            return reason
        n.link = Link()
        n.outbox.clear()
        n.next_info = self.ms + self.info_ms
        n.next_request = self.ms + self.request_ms
        self._route(out)  # after WELCOME, which the sim does not model as a message
        self._wake_node(n)
        return None

    def _drop_link(self, n: SimNode) -> None:
        n.link = None
        n.outbox.clear()
        self.proxy.on_disconnect(n.node_id, self.now)

    def disconnect(self, node: str) -> None:
        """The TCP connection breaks: both ends notice, what was in flight is lost."""
        n = self.node(node)
        if n.link is not None:
            self._drop_link(n)

    def heal(self) -> None:
        """Every node that is down starts, and every node that is not connected dials."""
        for name in self.nodes:
            self.start_node(name)
            self.connect(name)

    # ------------------------------------------------------------------ crashes

    def kill_node(self, node: str) -> None:
        """`kill -9` of the node; it stays down (no link, no execution) until started."""
        n = self.node(node)
        self.disconnect(node)
        n.stop()

    def start_node(self, node: str) -> None:
        """Start a node that is down on its store; it is not connected yet."""
        n = self.node(node)
        if not n.up:
            n.start()

    def crash_node(self, node: str) -> None:
        """`kill -9` of the node and a restart on its store; it stays disconnected."""
        self.kill_node(node)
        self.start_node(node)

    def wipe_node(self, node: str) -> None:
        """The node restarts on an empty data directory (a new incarnation)."""
        self.kill_node(node)
        self.node(node).wipe()

    def crash_proxy(self) -> None:
        """`kill -9` of the proxy and a restart on its store: every link drops."""
        for n in self.nodes.values():
            n.link = None
            n.outbox.clear()
        self.proxy_kv = self.proxy_kv.reopen()
        restored = ProxyState.restore(self.proxy_kv.stored_items(), self.settings, self.now)
        if restored is None:
            raise SimStuck("proxy store has no identity")
        self.proxy = restored
        self.proxy_crashes += 1

    def damage_proxy(self, pick: int) -> str | None:
        """One of the proxy's job or node records turns to something no version writes
        (the `pick`th, modulo their number); then `kill -9` and a restart on the store."""
        key = _damage(self.proxy_kv, ("j:", "n:"), pick)
        self.crash_proxy()
        return key

    def damage_node(self, node: str, pick: int) -> str | None:
        """Likewise one of a node's records other than its identity and its tickets (a
        ticket's record is all there is of it: a done one is lost with it)."""
        n = self.node(node)
        key = _damage(n.kv, ("q:", "f:", "a:", "c:", "m:counters"), pick)
        self.crash_node(node)
        return key

    def wipe_proxy(self) -> None:
        """The proxy restarts on an empty data directory: it knows no job and no node."""
        self.crash_proxy()
        self.proxy_kv = MemoryKV()
        self.proxy = ProxyState(f"{PROXY_ID}-{self.proxy_crashes}", self.settings)
        self.proxy_kv.apply(self.proxy.initial_records())
        self.proxy_kv.commit()

    # ------------------------------------------------------------------ delivery

    def deliver_to_proxy(self, node: str, limit: int | None = None) -> int:
        """The proxy reads up to `limit` messages from `node` (all by default) as one batch."""
        n = self.node(node)
        if n.link is None:
            return 0
        link, count = n.link, 0
        out: list[Outgoing] = []
        while link.to_proxy and (limit is None or count < limit):
            out += self.proxy.on_message(n.node_id, link.to_proxy.popleft(), self.now)
            count += 1
        if count:
            self._route(out)
        return count

    def deliver_to_node(self, node: str, limit: int | None = None) -> int:
        """`node` reads up to `limit` messages from the proxy (all by default) as one batch."""
        n = self.node(node)
        if n.link is None:
            return 0
        link, count = n.link, 0
        while link.to_node and (limit is None or count < limit):
            n.outbox.extend(n.state.on_message(link.to_node.popleft()))
            count += 1
        self._stop_abandoned(n)
        if count:
            self._wake_node(n)  # commit before the ACKs in the outbox leave
        return count

    def pump(self, *, execute: bool = True) -> int:
        """Deliver everything in flight, and (with `execute`) run every runnable job, until
        nothing moves; the number of messages and jobs handled."""
        total = 0
        for _ in range(MAX_PUMP_ROUNDS):
            moved = 0
            for name in self.nodes:
                moved += self.deliver_to_proxy(name)
                moved += self.deliver_to_node(name)
                if execute:
                    moved += self.execute(name)
            if not moved:
                return total
            total += moved
        raise SimStuck(f"no quiescence after {MAX_PUMP_ROUNDS} rounds\n{self.describe()}")

    # ------------------------------------------------------------------ time

    def _timers(self) -> list[tuple[int, int, Callable[[], None]]]:
        timers: list[tuple[int, int, Callable[[], None]]] = [
            (self.next_tick, 0, self._fire_tick), (self.next_sync, 1, self._fire_sync)]
        for rank, n in enumerate(self.nodes.values()):
            if n.link is not None:
                timers.append((n.next_info, 2 + 2 * rank, partial(self._fire_info, n)))
                timers.append((n.next_request, 3 + 2 * rank, partial(self._fire_request, n)))
        return timers

    def _fire_tick(self) -> None:
        self.next_tick += self.dispatch_ms
        self._route(self.proxy.tick(self.now))

    def _fire_sync(self) -> None:
        self.next_sync += self.sync_ms
        self._route(self.proxy.sync(self.now, self.sync_ms / 1000))

    def _fire_info(self, n: SimNode) -> None:
        n.next_info += self.info_ms
        n.outbox.append(n.state.info())
        self._wake_node(n)

    def _fire_request(self, n: SimNode) -> None:
        n.next_request += self.request_ms
        wanted = n.state.awaited(REQUEST_BATCH)
        if wanted:
            n.outbox.append(RequestOfRes(tuple(wanted)))
        self._wake_node(n)

    def advance(self, seconds: float, *, pump: bool = True, execute: bool = True) -> None:
        """Let `seconds` pass, firing every timer on the way; with `pump`, everything in
        flight is delivered after each timer, as on a fast network (and with `execute`,
        runnable jobs run too)."""
        target = self.ms + _ms(seconds)
        while True:
            due, _, fire = min(self._timers(), key=lambda t: (t[0], t[1]))
            if due > target:
                break
            self.ms = max(self.ms, due)
            fire()
            if pump:
                self.pump(execute=execute)
        self.ms = target

    def settle(self, max_seconds: float = 60.0, step: float = 0.5) -> None:
        """Reconnect every node and let time pass until `is_done()`; `SimStuck` if not."""
        deadline = self.ms + _ms(max_seconds)
        while True:
            self.heal()
            self.pump()
            if self.is_done():
                return
            if self.ms >= deadline:
                raise SimStuck(f"not settled after {max_seconds} s\n{self.describe()}")
            self.advance(step)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _damage(kv: MemoryKV, prefixes: tuple[str, ...], pick: int) -> str | None:
    keys = [k for k in kv.committed if k.startswith(prefixes)]
    if not keys:
        return None
    key = keys[pick % len(keys)]
    kv.committed[key] = "damaged"
    return key
