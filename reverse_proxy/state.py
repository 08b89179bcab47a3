"""Pure state of the reverse proxy: the global queue, who runs what, and the results on
their way back to the node each job came from. No I/O and no clock: `now` is an argument.

How it works. A job enters from its origin node (JOB), waits in the global queue, is
dispatched to one node at a time (JOB), and comes back as an outcome (RESULT) that is kept
until the origin node acknowledges storing it; then the proxy forgets the job. Every change
is recorded in `take_changes()`; the shell commits them before sending anything the step
produced, so an ACK always means "stored" (a step that sends nothing, say an origin's ACK
of a result, may have its changes committed a moment later).

Its parts, each in a module of its own: the records and settings (records.py), the global
queue (job_queue.py), the results owed to origins (deliveries.py), how long jobs take
(job_times.py) and the balancing decisions (balancer.py). This class holds the rules that
join them.

What it keeps true:
- a job is in exactly one place: queued, dispatched to one node, or done (awaiting
  delivery); a node's `assigned` set is exactly the jobs dispatched to it;
- the first outcome recorded wins; later ones are counted as duplicates;
- a node silent for `node_timeout` is dead: its unfinished jobs go back to the front of the
  queue. A node that says HELLO again is reconciled against what it says it holds.
- provenance: an outcome is recorded only when it comes from the node the job's current
  attempt was dispatched to, and names that node; a node submits only jobs of its own origin.
  A late outcome for a job the node once held is dropped quietly (ACKed, not recorded);
  anything else, and any frame only a proxy sends, is a violation: not ACKed, counted, and
  after `max_violations` on one connection the node is disconnected.

Dispatch (`dispatch`) runs on every event that can free capacity or add work (a job
arrives, a result comes back, jobs are returned, a node joins) and on the timer (`tick`).
Each round assigns queued jobs by least load (balancer.assign), then asks overloaded nodes
to give back jobs they have not started (balancer.rebalance, one REVOKE in flight per
node); what they return goes to the front of the queue and is placed by the next round.
A node's slowness comes from its results, and before they are in, from its overdue jobs:
each INFO names the jobs running there and the proxy keeps when it first saw each one. A
dispatched job whose signature has run before (job_times.JobTimes, learned from every
node's results) goes with the time after which it is overdue (balancer.overdue_after); the
node says in an INFO, sent at once, which of its jobs are past theirs, and the proxy
judges it by that limit too. Any other job is overdue once it runs for over SLOW_RATIO
times as long as most recent jobs took (balancer.overdue, TypicalTime.usual_longest). An
INFO or tick that finds a new overdue job runs a round at once.
Under the original's policy (`policy="original"`, kept for comparison) only the timer
dispatches, by reported queue length, with no capacity bound and no rebalancing.

Lifecycle (issue 6): the queue (job_queue.JobQueue) is ordered by (priority descending,
seq); a job whose `not_before` (its submission delay, or a retry's backoff) is still ahead
waits there until `release_due(wall)` moves it into line. A failed attempt
of a job with retries left goes back to the queue with backoff, its reason kept in the
record's history; a CANCEL from the origin finishes a queued job as cancelled at once and
asks the node running a dispatched one to stop it.

What it keeps per job and per node, and how that is stored: records.py.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from common.jobs import PROXY_NODE, JobId, JobSpec, NodeId, Outcome
from common.messages import (
    PROTOCOL_VERSION,
    Abandon,
    Ack,
    AckOf,
    Cancel,
    Hello,
    Info,
    Job,
    JobStatus,
    Leaving,
    Message,
    NodeStats,
    Output,
    RequestOfRes,
    ResReq,
    Result,
    Returned,
    Revoke,
    Stats,
    StatusQuery,
    StatusReply,
    Unknown,
)
from common.set_aside import SetAside
from reverse_proxy.balancer import (
    NodeLoad,
    assign,
    assign_by_queue_length,
    overdue,
    overdue_after,
    prefetch_per_slot,
    rebalance,
    slowness,
)
from reverse_proxy.deliveries import Deliveries
from reverse_proxy.job_queue import QUEUED, JobQueue
from reverse_proxy.job_times import JobTimes, TypicalTime, node_mean
from reverse_proxy.records import (
    DISPATCHED,
    DONE,
    ORIGINAL,
    JobRecord,
    NodeEntry,
    Outgoing,
    ProxySettings,
    job_to_wire,
    node_to_wire,
    read_records,
)

# A dead node holding no job is forgotten after this long.
FORGET_NODE_SECONDS = 3600.0
# Nodes a STATS frame lists at most (a node refuses one of more than 10,000).
STATS_NODES = 1000
# Queued jobs a dispatch round passes over, at most, looking for one of a type a node runs
# (the others wait for a node that runs theirs): a round stays short however long the queue.
MAX_PASSED_OVER = 1000
# Re-sent batches are split further by the shell; this bounds one message's item count.
BATCH = 5000
# A retry waits retry_backoff * 2**(n-1) seconds after its n-th failure, at most this long.
MAX_RETRY_BACKOFF = 300.0
# How a lost node shows in a job's history (and how losses are counted).
NODE_LOST = "node lost"
# What was learned of job times (`m:times`) is staged this often at most, when it changed:
# a kill -9 loses what was learned since, a restart keeps the rest.
TIMES_SAVE_SECONDS = 10.0


def _clock(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%H:%M:%S")


class ProxyState:
    def __init__(self, proxy_id: str, settings: ProxySettings) -> None:
        self.proxy_id = proxy_id
        self.settings = settings
        self.jobs: dict[JobId, JobRecord] = {}
        self.nodes: dict[NodeId, NodeEntry] = {}
        self.queue = JobQueue(self.jobs)
        self.deliveries = Deliveries()  # results owed to origins, jobs forgotten lately
        self._changes: dict[str, Any] = {}
        self.duplicates = 0
        self.completed = 0
        self.violations = 0
        self._violation_log: list[tuple[NodeId, str]] = []
        self.typical = TypicalTime()  # a slow mean over every node's jobs
        self.job_times = JobTimes()  # expected run time per job signature
        self._times_changed = False
        self._times_saved_at = float("-inf")  # monotonic
        self.overdue_marks = 0  # running jobs found overdue, by either rule
        self._overdue_log: list[tuple[NodeId, JobId, str, str]] = []
        self._duplicate_log: list[tuple[NodeId, JobId, str]] = []
        self._sent = 0
        self.set_aside = SetAside("proxy")  # damaged records (common/set_aside.py)
        # (event, its fields) of rare happenings the shell logs as warnings: a node declared
        # dead.
        self.notices: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ persistence

    def take_changes(self) -> dict[str, Any]:
        changes, self._changes = self._changes, {}
        return changes

    def initial_records(self) -> dict[str, Any]:
        return {"m:proxy": {"proxy_id": self.proxy_id}}

    def save_times(self) -> None:
        """Stage what was learned of job times, if it changed: by `tick` every
        TIMES_SAVE_SECONDS, and by the shell at a clean shutdown."""
        if self._times_changed:
            self._changes["m:times"] = {
                "typical": self.typical.to_wire(), "signatures": self.job_times.to_wire(),
                "nodes": {n.node_id: n.job_seconds for n in self.nodes.values()
                          if n.job_seconds is not None}}
            self._times_changed = False

    def _adopt_times(self, value: Any) -> None:
        try:
            typical = TypicalTime.from_wire(value["typical"])
            job_times = JobTimes.from_wire(value["signatures"])
            nodes = dict(value["nodes"])
        except (KeyError, TypeError, ValueError):  # not this version's: learned again
            return
        self.typical, self.job_times = typical, job_times
        for node_id, seconds in nodes.items():
            entry = self.nodes.get(node_id)
            if entry is not None:  # else forgotten since, or restored without its record
                entry.job_seconds = seconds

    @classmethod
    def restore(cls, records: Iterable[tuple[str, bytes]], settings: ProxySettings,
                now: float) -> ProxyState | None:
        """Rebuild from the store's records as stored (`KVStore.stored_items`); None when
        it holds none. A record that cannot be read is set aside (`records.read_records`)."""
        found = read_records(records, now)
        if found.proxy_id is None:
            if not found.set_aside.now and not found.jobs and not found.nodes:
                return None
            # A damaged identity (it names nothing else): a new one.
            found.proxy_id = secrets.token_hex(8)
            found.moves["m:proxy"] = {"proxy_id": found.proxy_id}
        state = cls(found.proxy_id, settings)
        state.set_aside = found.set_aside
        state._changes.update(found.moves)
        for entry in found.nodes:
            state.nodes[entry.node_id] = entry
        if found.times is not None:
            state._adopt_times(found.times)
        for job_id, rec in found.jobs:
            state._adopt_restored(job_id, rec)
        state.queue.heapify()
        return state

    def take_overdue(self) -> list[tuple[NodeId, JobId, str, str]]:
        """(node, job, who saw it: "node" or "proxy", by which rule: "expected" or
        "usual") for each job found overdue since the last call, for the shell's log."""
        log, self._overdue_log = self._overdue_log, []
        return log

    def take_duplicates(self) -> list[tuple[NodeId, JobId, str]]:
        """(node, job, the job's state then: "done", "delivered" (and forgotten), or
        "dispatched to <node>") for each second run reported since the last call, for the
        shell's log."""
        log, self._duplicate_log = self._duplicate_log, []
        return log

    def take_violations(self) -> list[tuple[NodeId, str]]:
        """(node, what it did) for each violation since the last call, for the shell's log."""
        log, self._violation_log = self._violation_log, []
        return log

    def _violation(self, entry: NodeEntry, what: str) -> list[Outgoing]:
        """Count it; past the limit, close the connection (it must say HELLO again)."""
        entry.violations += 1
        self.violations += 1
        self._violation_log.append((entry.node_id, what))
        if entry.violations == self.settings.max_violations:
            self._violation_log.append(
                (entry.node_id, f"disconnected after {entry.violations} violations"))
            return [Outgoing(entry.node_id, Leaving(
                f"{entry.violations} protocol violations (the last: {what})"))]
        return []

    def _adopt_restored(self, job_id: JobId, rec: JobRecord) -> None:
        self.jobs[job_id] = rec
        self.queue.adopt_seq(rec.seq)
        if rec.state == QUEUED:
            self.queue.push(job_id, rec, heapify_later=True)
        elif rec.state == DISPATCHED and rec.node is not None:
            entry = self.nodes.get(rec.node)
            if entry is None:  # a node record lost: treat the job as queued again
                self._requeue(job_id, rec)
            else:
                entry.assigned.add(job_id)
        elif rec.state == DONE:
            self.deliveries.owe(rec.spec.origin, job_id)

    def _save(self, job_id: JobId) -> None:
        rec = self.jobs.get(job_id)
        if rec is None:
            self._changes[f"j:{job_id}"] = None
            return
        self._changes[f"j:{job_id}"] = job_to_wire(rec)

    def _save_node(self, entry: NodeEntry) -> None:
        self._changes[f"n:{entry.node_id}"] = node_to_wire(entry)

    # ------------------------------------------------------------------ queue

    @property
    def queued(self) -> int:
        return self.queue.size

    @property
    def wall(self) -> float:
        """The wall clock as last given to release_due()."""
        return self.queue.wall

    def release_due(self, wall: float) -> int:
        """Move the delayed jobs whose time has come into the queue (wall: time.time());
        how many (a dispatch round is then worth running)."""
        return self.queue.release_due(wall)

    def _requeue(self, job_id: JobId, rec: JobRecord) -> None:
        """Back to the front of the queue: it has waited longest of all. Unless the origin
        cancelled it meanwhile, or its nodes were lost too often: then it ends here."""
        losses = _node_losses(rec)
        if rec.cancel or losses >= self.settings.max_node_losses:
            text = ("cancelled, its node was lost before it stopped" if rec.cancel
                    else f"node lost {losses} times")
            outcome = Outcome(job_id, False, text, PROXY_NODE, self.wall, self.wall,
                              cancelled=rec.cancel, history=rec.history)
            self._finish(job_id, rec, outcome)
            self.deliveries.owe(rec.spec.origin, job_id)  # next sync
            return
        rec.seq, rec.state, rec.node = self.queue.front_seq(), QUEUED, None
        self.queue.push(job_id, rec)
        self._save(job_id)

    # ------------------------------------------------------------------ connections

    def on_hello(self, hello: Hello, now: float) -> tuple[str | None, list[Outgoing]]:
        """Admit a node (None, messages to send after WELCOME) or refuse it (reason, [])."""
        if hello.version != PROTOCOL_VERSION:
            return f"protocol version {hello.version} unsupported (need {PROTOCOL_VERSION})", []
        entry = self.nodes.get(hello.node_id)
        if entry is not None and entry.connected:
            return f"node id {hello.node_id!r} is already connected", []
        connected = sum(1 for n in self.nodes.values() if n.connected)
        if connected >= self.settings.max_nodes:
            return f"cluster full: MAX_NUM_NODES={self.settings.max_nodes} nodes connected", []
        if entry is None or entry.incarnation != hello.incarnation:
            if entry is not None:  # same id, empty data dir: what the old one held is gone
                self._requeue_all(entry)
            entry = NodeEntry(hello.node_id, hello.incarnation, hello.slots)
            self.nodes[hello.node_id] = entry
        entry.slots, entry.connected, entry.alive, entry.last_seen = hello.slots, True, True, now
        entry.violations, entry.info_budget, entry.info_at = 0, self.settings.info_burst, now
        entry.revoking, entry.leaving = False, ""
        entry.job_types = frozenset(hello.job_types) if hello.job_types else None
        if hello.info_period * 2 > self.settings.node_timeout:
            self.notices.append(("node.info_period_too_long", (
                f"node={hello.node_id} info_period={hello.info_period:g}s node_timeout="
                f"{self.settings.node_timeout:g}s: one late INFO and it is declared dead "
                "(NODE_TIMEOUT should be several INFO_PERIODs)")))
        self._save_node(entry)
        out = self._reconcile(entry, hello)
        entry.known = {*hello.queued, *hello.running, *hello.finished, *entry.assigned}
        due = self._deliveries(entry.node_id, now)
        if due:
            out.append(Outgoing(entry.node_id, Result(tuple(due))))
        out += self.dispatch()
        return None, out

    def _reconcile(self, entry: NodeEntry, hello: Hello) -> list[Outgoing]:
        held = {*hello.queued, *hello.running, *hello.finished}
        out: list[Outgoing] = []
        resend = [self.jobs[j] for j in entry.assigned if j not in held]
        for start in range(0, len(resend), BATCH):
            out.append(Outgoing(entry.node_id, self._job_frame(resend[start:start + BATCH])))
        revoke: list[JobId] = []
        abandon: list[JobId] = []
        # (sets: a membership test of a HELLO's tuple per id was quadratic: one HELLO of
        # 200,000 ids held the proxy for 201 s)
        queued, running = set(hello.queued), set(hello.running)
        for job_id in (*hello.queued, *hello.running, *hello.finished):
            if job_id in entry.assigned:
                continue
            rec = self.jobs.get(job_id)
            if rec is not None and rec.state == QUEUED:
                # it is there already (or ran there): adopt it, its result is the attempt
                self._dispatch_to(entry, job_id, rec)
            elif job_id in queued:
                revoke.append(job_id)  # done, or given to another node meanwhile
            elif job_id in running and (rec is not None
                                        or self.deliveries.recorded_run(job_id) is not None):
                # Declared dead while it ran this, and the job moved on: running here too,
                # it would run twice at once (two `backup.sh`). Stopped: another node has it,
                # or its result is in. (Unknown here and never delivered: this proxy's store
                # was wiped; the origin submits it again, and this run is left alone.)
                abandon.append(job_id)
        if revoke:
            out.append(Outgoing(entry.node_id, Revoke(tuple(revoke))))
        if abandon:
            out.append(Outgoing(entry.node_id, Abandon(tuple(abandon))))
        stop = tuple(j for j in entry.assigned if self.jobs[j].cancel)
        if stop:  # cancels it may have missed while it was away
            out.append(Outgoing(entry.node_id, Cancel(stop)))
        return out

    def on_disconnect(self, node_id: NodeId, now: float) -> None:
        """The clock starts; the node keeps its jobs if it is back within node_timeout."""
        entry = self.nodes.get(node_id)
        if entry is not None:
            entry.connected = False
            entry.last_seen = max(entry.last_seen, now)

    def _forget_gone_nodes(self, now: float) -> None:
        """A node dead for FORGET_NODE_SECONDS that holds nothing is forgotten (its results,
        if it was an origin, still wait for it): a node removed from the cluster was listed
        as dead for good, and every id that ever said HELLO was kept."""
        for entry in list(self.nodes.values()):
            if (not entry.alive and not entry.connected and not entry.assigned
                    and now - entry.last_seen > FORGET_NODE_SECONDS):
                del self.nodes[entry.node_id]
                self._changes[f"n:{entry.node_id}"] = None
                self.notices.append(("node.forgotten", f"node={entry.node_id} dead_for="
                                     f"{now - entry.last_seen:.0f}s"))

    def excuse_silence(self, now: float) -> None:
        """Every known node gets a full NODE_TIMEOUT from `now`: this process could not hear
        them meanwhile (its store failed and it refused them; it did not run at all)."""
        for entry in self.nodes.values():
            entry.last_seen = max(entry.last_seen, now)

    def _requeue_all(self, entry: NodeEntry) -> None:
        """Its node is lost: each job's history says so, and it runs elsewhere."""
        when = _clock(self.wall)
        for job_id in sorted(entry.assigned, key=lambda j: self.jobs[j].seq, reverse=True):
            rec = self.jobs[job_id]
            rec.history = (*rec.history, f"{entry.node_id} {when}: {NODE_LOST}")
            self._requeue(job_id, rec)
        entry.assigned.clear()

    # ------------------------------------------------------------------ messages

    def on_message(self, node_id: NodeId, msg: Message,  # noqa: C901 - a flat match
                   now: float) -> list[Outgoing]:
        entry = self.nodes[node_id]
        entry.last_seen = now
        match msg:
            case Info():
                return self._on_info(entry, msg, now)
            case Job():
                ack, bad = self._on_submissions(entry, msg.jobs)
                acks = [Outgoing(node_id, ack)] if ack.ids or not msg.jobs else []
                return [*acks, *bad, *self.dispatch()]
            case Result():
                return self._on_outcomes(entry, msg.outcomes, now) + self.dispatch()
            case RequestOfRes():
                return self._on_request(node_id, msg.ids)
            case ResReq():
                out = self._on_outcomes(entry, msg.outcomes, now)
                out += self._on_request(node_id, msg.ids)
                return out + self.dispatch()
            case Ack(of=AckOf.RESULT):
                self._on_delivered(node_id, msg.ids)
            case Returned():
                self._on_returned(entry, msg.ids)
                return self.dispatch()
            case StatusQuery():
                entries = tuple(self.status(j, now) for j in msg.ids)
                return [Outgoing(node_id, StatusReply(entries))]
            case Cancel():
                return self._on_cancel(node_id, msg.ids, now)
            case Output():
                return self._on_output(entry, msg)
            case Ack():
                pass  # ACK of a dispatch: the node's HELLO and RESULTs say what it holds
            case Leaving():
                entry.leaving = msg.reason  # shown until its next HELLO
            case _:
                return self._violation(entry, f"sent {type(msg).__name__}, which a node "
                                              f"never sends after its HELLO")
        return []

    def _on_info(self, entry: NodeEntry, msg: Info, now: float) -> list[Outgoing]:
        if not self._info_allowed(entry, now):
            return self._violation(entry, "INFO flood")
        entry.running, entry.queued = msg.running, msg.queued
        entry.done, entry.failed = msg.done, msg.failed
        entry.first_seen = {j: entry.first_seen.get(j, now) for j in msg.running_ids}
        entry.started_at = {j: t for j, t in zip(msg.running_ids, msg.running_started,
                                                 strict=False) if t}  # none from older nodes
        entry.reported_overdue = set(msg.overdue_ids)
        out = [Outgoing(entry.node_id, self.stats())]
        return out + self.dispatch() if self._mark_overdue(entry, now) else out

    def _mark_overdue(self, entry: NodeEntry, now: float) -> bool:
        """Update the node's overdue jobs: those past their `overdue_after` (as it reports
        them, or as seen here), the others by the usual time; True when one is new (a round
        is worth running)."""
        seen = {j: t for j, t in entry.first_seen.items() if j in entry.assigned}
        limits = {j: limit for j in seen
                  if j in self.jobs and (limit := self._overdue_limit(self.jobs[j]))}
        reported = entry.reported_overdue & seen.keys()
        usual = self.typical.usual_longest() if len(limits) < len(seen) else None
        late = overdue(seen, now, usual, limits) | reported
        new = late - entry.overdue
        entry.overdue = late
        self.overdue_marks += len(new)
        self._overdue_log += [(entry.node_id, j, "node" if j in reported else "proxy",
                               "expected" if j in limits or j in reported else "usual")
                              for j in sorted(new)]
        return bool(new)

    def _overdue_limit(self, rec: JobRecord) -> float:
        """When a running job is overdue: the `overdue_after` it was dispatched with, or if
        it had none (its signature had not run twice by then, or this proxy restarted
        since), what is learned of its signature now; 0 while nothing is."""
        if not rec.overdue_after:
            rec.overdue_after = self._learned_limit(rec.spec)
        return rec.overdue_after

    def _learned_limit(self, spec: JobSpec) -> float:
        """The `overdue_after` of `spec` by what is learned of its signature now (0: none)."""
        return overdue_after(self.job_times.expected(spec)) or 0.0

    def _info_allowed(self, entry: NodeEntry, now: float) -> bool:
        rate, burst = self.settings.info_rate, self.settings.info_burst
        entry.info_budget = min(burst, entry.info_budget + (now - entry.info_at) * rate)
        entry.info_at = now
        if entry.info_budget < 1:
            return False
        entry.info_budget -= 1
        return True

    def _on_submissions(self, entry: NodeEntry, specs: Iterable[JobSpec]
                        ) -> tuple[Ack, list[Outgoing]]:
        ids: list[JobId] = []
        bad: list[Outgoing] = []
        for spec in specs:
            if spec.origin != entry.node_id:
                bad += self._violation(entry, f"submitted job {spec.job_id[:40]!r} for "
                                              f"origin {spec.origin[:40]!r}")
                continue
            ids.append(spec.job_id)
            if spec.job_id in self.jobs:
                continue  # re-sent after a lost ACK: stored already
            rec = JobRecord(spec, self.queue.back_seq(), QUEUED, not_before=spec.not_before)
            self.jobs[spec.job_id] = rec
            self.queue.push(spec.job_id, rec)
            self._save(spec.job_id)
        return Ack(AckOf.JOB, tuple(ids)), bad

    def _on_outcomes(self, entry: NodeEntry, outcomes: Iterable[Outcome],
                     now: float) -> list[Outgoing]:
        ids: list[JobId] = []
        deliveries: dict[NodeId, list[Outcome]] = {}
        bad: list[Outgoing] = []
        for outcome in outcomes:
            verdict = self._provenance(entry, outcome)
            if verdict is not None:
                bad += self._violation(entry, verdict)
                continue
            ids.append(outcome.job_id)
            self._observe_job_time(entry, outcome)
            self._learn_expected(entry, outcome)
            self._record(entry, outcome, now, deliveries)
        out = [Outgoing(entry.node_id, Ack(AckOf.RESULT, tuple(ids)))] if ids else []
        out += [Outgoing(o, Result(tuple(batch))) for o, batch in deliveries.items()]
        return out + bad

    def _record(self, entry: NodeEntry, outcome: Outcome, now: float,
                deliveries: dict[NodeId, list[Outcome]]) -> None:
        """One outcome from `entry` (provenance checked): finish, retry or drop its job."""
        rec = self.jobs.get(outcome.job_id)
        if rec is None:
            # Delivered and forgotten already: a re-send after a lost ACK, or, if it is not
            # the run that was recorded, a second run (at-least-once).
            first = self.deliveries.recorded_run(outcome.job_id)
            if first is not None and first != (outcome.node, outcome.started_at):
                self._count_duplicate(entry, outcome.job_id, "delivered")
            return
        run = (outcome.node, outcome.started_at)
        if rec.state == DONE:
            # Ran twice (at-least-once): the first one stands. Not a copy of the recorded
            # run (which carries its failed attempts: it never equals one), nor of a
            # retried one, sent again when a RES_REQ crossed its RESULT.
            recorded = rec.outcome
            if (recorded is None or run != (recorded.node, recorded.started_at)) and (
                    run not in rec.retried):
                self._count_duplicate(entry, outcome.job_id, "done")
            return
        if rec.state != DISPATCHED or rec.node != entry.node_id:
            # Late: it ran here once, but its current attempt is elsewhere (this node was
            # declared dead): that attempt runs it a second time. Unless it is the re-send
            # of a failed attempt that was retried.
            if run not in rec.retried:
                self._count_duplicate(entry, outcome.job_id, rec.state
                                      + (f" to {rec.node}" if rec.node else ""))
            return
        if self._should_retry(rec, outcome):
            self._retry(outcome.job_id, rec, outcome)
            return
        if rec.history:
            outcome = outcome._replace(history=rec.history)
        self._finish(outcome.job_id, rec, outcome)
        # The origin ran it and stored it itself (only done for jobs without retries).
        if rec.spec.origin == entry.node_id and not rec.spec.retries:
            self._forget(outcome.job_id)
        else:
            self._offer(rec.spec.origin, outcome, now, deliveries)

    def _count_duplicate(self, entry: NodeEntry, job_id: JobId, then: str) -> None:
        entry.duplicates += 1
        self._save_node(entry)
        self.duplicates += 1
        self._duplicate_log.append((entry.node_id, job_id, then))

    def _provenance(self, entry: NodeEntry, outcome: Outcome) -> str | None:
        """None when `entry` may report this outcome, else what is wrong with it."""
        job = outcome.job_id
        if outcome.node != entry.node_id:
            return f"reported a result of job {job[:40]!r} as run by {outcome.node[:40]!r}"
        rec = self.jobs.get(job)
        if rec is None:
            return None  # forgotten: an old re-send, or an unknown id; nothing to change
        if job in entry.known or rec.node == entry.node_id:
            return None
        return f"reported a result of job {job[:40]!r}, which was never dispatched to it"

    def _observe_job_time(self, entry: NodeEntry, outcome: Outcome) -> None:
        if outcome.cancelled:  # cut short: says nothing of how fast the node runs jobs
            return
        seconds = max(0.0, outcome.finished_at - outcome.started_at)
        entry.job_seconds = node_mean(entry.job_seconds, seconds)
        self.typical.observe(seconds)
        self._times_changed = True

    def _learn_expected(self, entry: NodeEntry, outcome: Outcome) -> None:
        """A successful run of a job's current attempt teaches its signature's run time (a
        re-sent or second run would count twice; a failure may end at any time)."""
        rec = self.jobs.get(outcome.job_id)
        if (outcome.ok and not outcome.cancelled and rec is not None
                and rec.state == DISPATCHED and rec.node == entry.node_id):
            self.job_times.observe(rec.spec, outcome.finished_at - outcome.started_at)
            self._times_changed = True

    def _offer(self, origin: NodeId, outcome: Outcome, now: float,
               deliveries: dict[NodeId, list[Outcome]]) -> None:
        origin_entry = self.nodes.get(origin)
        offered = 0.0
        if origin_entry is not None and origin_entry.connected:
            deliveries.setdefault(origin, []).append(outcome)
            offered = now
        self.deliveries.owe(origin, outcome.job_id, offered)

    @staticmethod
    def _should_retry(rec: JobRecord, outcome: Outcome) -> bool:
        failures = len(rec.history) - _node_losses(rec)
        return (not outcome.ok and not outcome.cancelled and not rec.cancel
                and failures < rec.spec.retries)

    def _retry(self, job_id: JobId, rec: JobRecord, outcome: Outcome) -> None:
        """A failed attempt with retries left: keep its reason, queue it again after a
        backoff (it waits in the delayed heap, so it blocks nothing)."""
        if rec.node is not None and rec.node in self.nodes:
            self.nodes[rec.node].assigned.discard(job_id)
        rec.retried = rec.retried | {(outcome.node, outcome.started_at)}
        rec.history = (*rec.history,
                       f"{outcome.node} {_clock(outcome.started_at)}: {outcome.output[:500]}")
        backoff = min(self.settings.retry_backoff * 2 ** (len(rec.history) - 1),
                      MAX_RETRY_BACKOFF)
        rec.not_before = outcome.finished_at + backoff
        rec.seq, rec.state, rec.node = self.queue.back_seq(), QUEUED, None
        self.queue.push(job_id, rec)
        self._save(job_id)

    def _on_cancel(self, node_id: NodeId, ids: Iterable[JobId], now: float) -> list[Outgoing]:
        """The origin cancels: a queued job ends at once; a dispatched one is stopped where
        it runs (its outcome comes back as usual); a finished one is left alone."""
        deliveries: dict[NodeId, list[Outcome]] = {}
        stop: dict[NodeId, list[JobId]] = {}
        for job_id in ids:
            rec = self.jobs.get(job_id)
            if rec is None or rec.spec.origin != node_id:
                continue
            if rec.state == QUEUED:
                outcome = Outcome(job_id, False, "cancelled while queued, it never ran",
                                  PROXY_NODE, self.wall, self.wall, cancelled=True,
                                  history=rec.history)
                self._finish(job_id, rec, outcome)
                self._offer(node_id, outcome, now, deliveries)
            elif rec.state == DISPATCHED and rec.node is not None:
                rec.cancel = True
                self._save(job_id)
                stop.setdefault(rec.node, []).append(job_id)
        out = [Outgoing(n, Cancel(tuple(j))) for n, j in stop.items()]
        return out + [Outgoing(o, Result(tuple(b))) for o, b in deliveries.items()]

    def _on_output(self, entry: NodeEntry, msg: Output) -> list[Outgoing]:
        """Live output goes straight on to the job's origin (not stored: best effort), unless
        that is where it runs (it showed it already). Only the node running it may send it."""
        rec = self.jobs.get(msg.job_id)
        if rec is None or rec.node != entry.node_id or rec.spec.origin == entry.node_id:
            return []
        origin = self.nodes.get(rec.spec.origin)
        return [Outgoing(origin.node_id, msg)] if origin is not None and origin.connected else []

    def _finish(self, job_id: JobId, rec: JobRecord, outcome: Outcome) -> None:
        self.queue.discard(rec)
        if rec.node is not None and rec.node in self.nodes:
            self.nodes[rec.node].assigned.discard(job_id)
            self.nodes[rec.node].known.discard(job_id)
        rec.state, rec.outcome, rec.node = DONE, outcome, outcome.node
        self.completed += 1
        self._save(job_id)

    def _forget(self, job_id: JobId) -> None:
        rec = self.jobs.pop(job_id, None)
        if rec is not None:
            # its run is remembered, to tell a late second run from a re-sent first one
            run = None if rec.outcome is None else (rec.outcome.node, rec.outcome.started_at)
            self.deliveries.forget(rec.spec.origin, job_id, run)
            self._changes[f"j:{job_id}"] = None

    def _on_delivered(self, node_id: NodeId, ids: Iterable[JobId]) -> None:
        for job_id in ids:
            rec = self.jobs.get(job_id)
            if rec is not None and rec.state == DONE and rec.spec.origin == node_id:
                self._forget(job_id)

    def _on_request(self, node_id: NodeId, ids: Iterable[JobId]) -> list[Outgoing]:
        have: list[Outcome] = []
        unknown: list[JobId] = []
        for job_id in ids:
            rec = self.jobs.get(job_id)
            if rec is None:
                unknown.append(job_id)
            elif rec.outcome is not None and rec.spec.origin == node_id:
                have.append(rec.outcome)
        out: list[Outgoing] = []
        if have:
            out.append(Outgoing(node_id, Result(tuple(have))))
        if unknown:
            out.append(Outgoing(node_id, Unknown(tuple(unknown))))
        return out

    def _on_returned(self, entry: NodeEntry, ids: Iterable[JobId]) -> None:
        entry.revoking = False
        for job_id in ids:
            rec = self.jobs.get(job_id)
            if rec is not None and rec.state == DISPATCHED and rec.node == entry.node_id:
                entry.assigned.discard(job_id)
                self._requeue(job_id, rec)

    def _deliveries(self, origin: NodeId, now: float, older_than: float = float("inf")
                    ) -> list[Outcome]:
        """Results owed to `origin` last offered before `older_than`, marked offered now."""
        return self.deliveries.due(origin, now, older_than, lambda j: self.jobs[j].outcome)

    def sync(self, now: float, period: float) -> list[Outgoing]:
        """The periodic RES_REQ to each node, as in the original: results it is owed that
        were offered over a period ago, and the results of the jobs it runs."""
        out: list[Outgoing] = []
        for entry in self.nodes.values():
            if not entry.connected:
                continue
            due = self._deliveries(entry.node_id, now, older_than=now - period)
            if due or entry.assigned:
                out.append(Outgoing(entry.node_id, ResReq(tuple(due), tuple(entry.assigned))))
        return out

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, timer: bool = False) -> list[Outgoing]:
        """One balancing round: hand queued jobs to the least-loaded live nodes, then take
        back not-started jobs from nodes loaded over one job per slot above the lightest."""
        if self.settings.policy == ORIGINAL:
            return self._dispatch_original() if timer else []
        live = [n for n in self.nodes.values() if n.connected and n.alive]
        weights = slowness({n.node_id: n.job_seconds for n in live
                            if n.job_seconds is not None}, self.typical.seconds)
        loads = [NodeLoad(n.node_id, n.slots, len(n.assigned), weights.get(n.node_id, 1.0),
                          len(n.overdue & n.assigned)) for n in live]
        out: list[Outgoing] = []
        prefetch = prefetch_per_slot(self.settings.prefetch, self.typical.trusted())
        if self.queued:
            most = self.settings.max_jobs_dispatch
            passed = PassedOver()
            sent = self._send_to(assign(self.queued, loads, most, prefetch), passed)
            loads = self._loads_now(loads)
            if passed.count:  # of types the nodes chosen do not run: to those that do
                types = passed.types()
                able = [n for n in loads if _runs_any(self.nodes[n.node_id].job_types, types)]
                sent += self._send_to(assign(passed.count, able, most, prefetch), passed,
                                      from_queue=False)
                loads = self._loads_now(loads)
            out += self._handed_out(sent, passed)
        # Within nodes that run the same job types only: a job taken back from one node
        # that the lighter one does not run would go straight back, round after round.
        alike: dict[frozenset[str] | None, list[NodeLoad]] = {}
        for load in loads:
            alike.setdefault(self.nodes[load.node_id].job_types, []).append(load)
        for group in alike.values():
            for node_id, count in rebalance(group, prefetch).items():
                entry = self.nodes[node_id]
                if entry.revoking:
                    continue
                # The jobs it got last are the ones it would start last.
                latest = sorted(entry.assigned, key=lambda j: self.jobs[j].sent)[-count:]
                entry.revoking = True
                out.append(Outgoing(node_id, Revoke(tuple(latest))))
        return out

    def _loads_now(self, loads: list[NodeLoad]) -> list[NodeLoad]:
        """`loads` with what each node holds now (built anew: dataclasses.replace cost
        ~4 us a node, most of a round's time)."""
        return [NodeLoad(n.node_id, n.slots, len(self.nodes[n.node_id].assigned), n.weight,
                         n.overdue) for n in loads]

    def _dispatch_original(self) -> list[Outgoing]:
        """The original's round: to the shortest queue as last reported, no bound."""
        if not self.queued:
            return []
        reported = [(n.node_id, n.queued) for n in self.nodes.values()
                    if n.connected and n.alive and n.slots > 0]
        passed = PassedOver()
        sent = self._send_to(assign_by_queue_length(self.queued, reported,
                                                    self.settings.max_jobs_dispatch), passed)
        return self._handed_out(sent, passed)

    def _handed_out(self, sent: list[tuple[NodeId, JobRecord]], passed: PassedOver
                    ) -> list[Outgoing]:
        """The frames of what a round sent; what it passed over back in line."""
        for job_id, rec in passed.all():
            self.queue.put_back(job_id, rec)
        return [Outgoing(n, self._job_frame(recs)) for n, recs in _batches(sent).items()]

    def _send_to(self, targets: list[NodeId], passed: PassedOver, from_queue: bool = True
                 ) -> list[tuple[NodeId, JobRecord]]:
        """For each target in turn, the next queued job of a type it runs (from those passed
        over first, then, if `from_queue`, from the queue); one it does not run is passed
        over (MAX_PASSED_OVER a round at most), for a node that runs it."""
        sent: list[tuple[NodeId, JobRecord]] = []
        for node_id in targets:
            entry = self.nodes[node_id]
            found = passed.take(entry.job_types)
            if found is None and from_queue:
                found = self._pop_for(entry.job_types, passed)
            if found is None:
                continue
            job_id, rec = found
            self._dispatch_to(entry, job_id, rec)
            sent.append((node_id, rec))
        return sent

    def _pop_for(self, types: frozenset[str] | None, passed: PassedOver
                 ) -> tuple[JobId, JobRecord] | None:
        """The queue's next job of one of `types` (None: any), passing over the others."""
        while passed.count < MAX_PASSED_OVER and (popped := self.queue.pop()) is not None:
            if types is None or popped[1].spec.job_type in types:
                return popped
            passed.add(popped)
        return None

    def _job_frame(self, recs: list[JobRecord]) -> Job:
        """The dispatch of `recs`, with when each is overdue where that can be said (and
        kept: the proxy judges the job by the same limit)."""
        for rec in recs:
            rec.overdue_after = self._learned_limit(rec.spec)
        limits = tuple(rec.overdue_after for rec in recs)
        return Job(tuple(rec.spec for rec in recs), limits if any(limits) else ())

    def _dispatch_to(self, entry: NodeEntry, job_id: JobId, rec: JobRecord) -> None:
        self.queue.discard(rec)
        rec.state, rec.node = DISPATCHED, entry.node_id
        rec.attempts += 1
        self._sent += 1
        rec.sent = self._sent
        entry.assigned.add(job_id)
        entry.known.add(job_id)
        self._save(job_id)

    def tick(self, now: float, dispatch: bool = True) -> list[Outgoing]:
        """Declare silent nodes dead (their jobs go back to the front), note the jobs that
        became overdue since the last INFO, then dispatch if `dispatch` or a node's jobs
        were requeued (the shell ticks more often than DISPATCH_PERIOD: a long period must
        not delay the rest)."""
        out: list[Outgoing] = []
        for entry in self.nodes.values():
            if entry.alive and now - entry.last_seen > self.settings.node_timeout:
                dispatch = True  # its jobs are back in the queue
                self.notices.append(("node.dead", f"node={entry.node_id} silent_for="
                                     f"{now - entry.last_seen:.1f}s requeued="
                                     f"{len(entry.assigned)}"))
                entry.alive = False
                self._requeue_all(entry)
                if entry.connected:  # hung, not gone: make it say HELLO again
                    out.append(Outgoing(entry.node_id, Leaving(
                        f"no INFO for more than NODE_TIMEOUT "
                        f"({self.settings.node_timeout:g} s): its jobs were requeued")))
            if entry.connected:  # (a gone node's jobs are not late: it is)
                self._mark_overdue(entry, now)
        self._forget_gone_nodes(now)
        if now - self._times_saved_at >= TIMES_SAVE_SECONDS:
            self.save_times()
            self._times_saved_at = now
        return out + self.dispatch(timer=True) if dispatch else out

    # ------------------------------------------------------------------ views

    def stats(self) -> Stats:
        """The cluster's numbers, sent with every INFO: at most STATS_NODES nodes, the live
        ones first (10,000 node ids that came once made every STATS frame too long for
        its nodes, which dropped their links twice a second)."""
        entries = sorted(self.nodes.values(), key=lambda e: e.node_id)
        if len(entries) > STATS_NODES:
            entries = sorted(entries, key=lambda e: not (e.connected and e.alive))
            entries = sorted(entries[:STATS_NODES], key=lambda e: e.node_id)
        nodes = tuple(NodeStats(n.node_id, n.connected and n.alive, n.slots, n.running,
                                n.queued, n.done, n.failed, n.duplicates) for n in entries)
        return Stats(self.queued, nodes)

    def status(self, job_id: JobId, now: float) -> JobStatus:
        rec = self.jobs.get(job_id)
        if rec is None:
            return JobStatus(job_id, "unknown", "", 0)
        entry = self.nodes.get(rec.node) if rec.node is not None else None
        if rec.state == DISPATCHED and entry is not None and job_id in entry.first_seen:
            # As the node said, or when an INFO first showed it running (late by < 1 INFO).
            started = (entry.started_at.get(job_id)
                       or self.wall - (now - entry.first_seen[job_id]))
            return JobStatus(job_id, "running", entry.node_id, rec.attempts, started,
                             rec.history)
        return JobStatus(job_id, rec.state, rec.node or "", rec.attempts, 0.0, rec.history)


def _node_losses(rec: JobRecord) -> int:
    """Of a job's failed attempts (its history), those that were a lost node."""
    return sum(1 for h in rec.history if h.endswith(f": {NODE_LOST}"))


class PassedOver:
    """The queued jobs one dispatch round popped and could not give the node at hand (not
    of a type it runs), by type, each in queue order: the next node may take them."""

    def __init__(self) -> None:
        self._by_type: dict[str, deque[tuple[JobId, JobRecord]]] = {}
        self.count = 0

    def add(self, popped: tuple[JobId, JobRecord]) -> None:
        self._by_type.setdefault(popped[1].spec.job_type, deque()).append(popped)
        self.count += 1

    def take(self, types: frozenset[str] | None) -> tuple[JobId, JobRecord] | None:
        """The first in queue order of those of `types` (None: any)."""
        heads = [q for t, q in self._by_type.items() if q and (types is None or t in types)]
        if not heads:
            return None
        first = min(heads, key=lambda q: (-q[0][1].spec.priority, q[0][1].seq))
        self.count -= 1
        return first.popleft()

    def types(self) -> set[str]:
        return {t for t, q in self._by_type.items() if q}

    def all(self) -> Iterator[tuple[JobId, JobRecord]]:
        for queue in self._by_type.values():
            yield from queue


def _runs_any(runs: frozenset[str] | None, types: set[str]) -> bool:
    return runs is None or not runs.isdisjoint(types)


def _batches(sent: list[tuple[NodeId, JobRecord]]) -> dict[NodeId, list[JobRecord]]:
    batches: dict[NodeId, list[JobRecord]] = {}
    for node_id, rec in sent:
        batches.setdefault(node_id, []).append(rec)
    return batches
