"""Pure state of one cluster node: its tickets, the jobs the proxy gave it, and the results
it owes. No I/O: methods take messages and return replies, and every change to what must
survive a crash is recorded in `take_changes()`, which the shell commits before it sends
any reply or tells any client (the invariant that makes `kill -9` lose nothing).

Records (one store, keys by prefix):
    m:identity   {node_id, incarnation}     m:counters  [done, failed, duplicates, abandoned]
    t:<ticket>   [spec, forwarded, outcome|None]   issued here (RESULT_TTL, MAX_RESULTS)
    a:<n>        [ticket, ...]                    the proxy stored these (one ACK of ours)
    q:<job>      spec                             dispatched here, not finished
    f:<job>      outcome                          ran here, proxy has not acked it
    c:<ticket>   1                                a cancel of ours the proxy must still see
    x:<key>      a record a restore could not read, set aside (common/set_aside.py)
The proxy's ACK of submissions is an a: record of their ids, not a rewrite of each
ticket's record (spec and all: a sixth of a node's CPU per pipelined ticket); a
pending ticket listed in a live a: record is forwarded. The record goes when the last of its
tickets has its result (whose t: record then says forwarded itself); a ticket the proxy
lost (UNKNOWN) is taken out of its record, which is rewritten.
Running is not recorded: a job running at a crash is simply run again (at-least-once). A
dispatched job may even start before its q: record is committed: the proxy re-sends, on
HELLO, whatever it dispatched that a node does not hold.
Nor is the `overdue_after` the proxy sends with a job (an estimate; without it the proxy
judges the job by its own rule): the shell arms a timer with it when the job starts, and
`mark_overdue` then puts the job in the next INFO's `overdue_ids` until it ends.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cluster_node.tickets import Ticket, TicketBook, ticket_record
from common.errors import ProtocolError, StoreError
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import decode_record
from common.messages import (
    PROTOCOL_VERSION,
    Abandon,
    Ack,
    AckOf,
    Cancel,
    Hello,
    Info,
    Job,
    Message,
    RequestOfRes,
    ResReq,
    Result,
    Returned,
    Revoke,
    Stats,
    Unknown,
    outcome_from_wire,
    outcome_to_wire,
    spec_from_wire,
    spec_to_wire,
)
from common.set_aside import PREFIX as SET_ASIDE
from common.set_aside import SetAside

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ForwardMark:
    """An a: record: tickets one ACK said the proxy stored, `pending` of them still
    without a result (ids of done ones stay listed: a restore skips them)."""

    ids: list[JobId]
    pending: int


class NodeState:
    def __init__(self, node_id: NodeId, incarnation: str, slots: int,
                 created: float | None = None) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        # When its data directory began (wall clock): no ticket of it is older. None in a
        # store written before 2026-11-25.
        self.created = created
        self.slots = slots
        self.tickets = TicketBook()  # done ones as stored bytes: see cluster_node/tickets.py
        self.held: dict[JobId, JobSpec] = {}  # dispatched here and not finished
        self.running: set[JobId] = set()
        self.started_at: dict[JobId, float] = {}  # of running jobs, once their attempt began
        self.overdue_after: dict[JobId, float] = {}  # held jobs the proxy gave a limit
        self.overdue: set[JobId] = set()  # running past it
        self.finished: dict[JobId, Outcome] = {}  # results the proxy has not acked
        self.done = self.failed = self.duplicates = 0
        self.abandoned = 0  # runs stopped here because another node's run counts (ABANDON)
        self.cluster: Stats | None = None
        self._queue: deque[JobId] = deque()  # held and not started, FIFO; may hold stale ids
        self._unforwarded: dict[JobId, None] = {}  # ordered set
        self._to_send: dict[JobId, None] = {}  # those of them not sent on this connection
        self._awaiting: dict[JobId, None] = {}  # forwarded, no outcome yet
        self._inflight_jobs: set[JobId] = set()  # sent on this connection, not yet acked
        self._inflight_results: set[JobId] = set()
        self._marks: dict[int, ForwardMark] = {}  # live a: records by number
        self._next_mark = 1
        self._changes: dict[str, Any] = {}
        self._resolved: list[JobId] = []
        self.cancelling: dict[JobId, None] = {}  # our cancels the proxy must see (ordered)
        self._cancels_sent: set[JobId] = set()  # on this connection
        self.kill_requests: list[JobId] = []  # running jobs the shell must stop
        self.abandoning: set[JobId] = set()  # of those, the ones to forget (see `abandon`)
        self.set_aside = SetAside("node")  # damaged records (common/set_aside.py)
        # Tickets whose record could not be read (its bytes), whose result the proxy may
        # still have: pending, asked for with the awaited ones, until it answers.
        self._repairable: dict[JobId, bytes] = {}
        self.repaired = 0  # of those, read again from the proxy's copy since the start
        self.rebuilt = ""  # why the identity was rebuilt by the restore, if it was

    # ------------------------------------------------------------------ persistence

    def take_changes(self) -> dict[str, Any]:
        changes, self._changes = self._changes, {}
        return changes

    def take_resolved(self) -> list[JobId]:
        """Tickets of this node that got their result since the last call."""
        resolved, self._resolved = self._resolved, []
        return resolved

    def initial_records(self) -> dict[str, Any]:
        identity: dict[str, Any] = {"node_id": self.node_id, "incarnation": self.incarnation}
        if self.created is not None:
            identity["created"] = self.created
        return {"m:identity": identity}

    @classmethod
    def restore(cls, records: Iterable[tuple[str, bytes]], slots: int,
                rebuild: tuple[NodeId, str] | None = None) -> NodeState | None:
        """Rebuild from the store's records as stored (`KVStore.stored_items`); None when
        the store is empty. Records are taken as they come (the identity, written first, is
        normally first): holding them all before rebuilding doubled the memory a restart of
        a big node peaked at.

        An identity that cannot be read (or is missing from a store that holds records)
        stops the restore with StoreError, unless `rebuild` gives a node id and a new
        incarnation: the node is then the origin its tickets name (the given id if they
        name none) in a new incarnation, and the proxy runs again what the old one held
        that its HELLO does not declare (`_rebuilt`)."""
        state: NodeState | None = None
        before_identity: list[tuple[str, bytes]] = []
        for key, record in records:
            if state is not None:
                state._restore_one(key, record)
            elif key == "m:identity":
                state = cls._identified(record, slots, rebuild)
                for early_key, early_record in before_identity:
                    state._restore_one(early_key, early_record)
                before_identity.clear()
            else:
                before_identity.append((key, record))
        if state is None and before_identity:
            state = cls._identified(None, slots, rebuild)
            for early_key, early_record in before_identity:
                state._restore_one(early_key, early_record)
        if state is None:
            return None
        if state.rebuilt:
            state._rebuilt()
        state.set_aside.summarise()
        state._settle_marks()
        state._to_send = dict(state._unforwarded)
        # `list` and `expire_results` want the order of submission: the store's, unless it
        # was written before rewritten records kept their place (a result moved its ticket
        # to the end) or a clock was set back.
        state.tickets.sort_by_submission()
        return state

    @classmethod
    def _identified(cls, record: bytes | None, slots: int,
                    rebuild: tuple[NodeId, str] | None) -> NodeState:
        try:
            if record is None:
                raise StoreError("the store holds records but no m:identity")
            return cls.from_identity(record, slots)
        except StoreError as exc:
            if rebuild is None:
                raise
            state = cls(*rebuild, slots)
            state.rebuilt = str(exc)
            if record is not None:
                state.set_aside.damaged("m:identity", record, exc, state._changes,
                                        keep_key=True)
            return state

    def _rebuilt(self) -> None:
        """The identity of a restore without one: the origin its tickets name."""
        for job_id in self.tickets:
            if job_id in self._repairable:
                continue
            origin = self.tickets[job_id].spec.origin
            if origin != "?":  # (one whose record could not be read names none)
                self.node_id = origin
                break
        for job_id in self._repairable:
            self.tickets.add_unknown(job_id, self.node_id)
        self._changes.update(self.initial_records())
        logger.warning("store.identity_rebuilt node=%s incarnation=%s why=%s: a new "
                       "incarnation; the proxy runs again the jobs the old one held that "
                       "this one does not", self.node_id, self.incarnation, self.rebuilt)

    @classmethod
    def from_identity(cls, record: bytes, slots: int) -> NodeState:
        try:
            value = decode_record("m:identity", record)
            node_id, incarnation = value["node_id"], value["incarnation"]
            if type(node_id) is not str or type(incarnation) is not str:
                raise TypeError("node_id and incarnation are strings")
        except (StoreError, TypeError, KeyError) as exc:
            raise StoreError(f"cannot read the store's record m:identity: {exc}: the node "
                             "cannot tell which node it was") from exc
        created = value.get("created")
        return cls(NodeId(node_id), incarnation, slots,
                   created if isinstance(created, float) else None)

    def _restore_one(self, key: str, record: bytes) -> None:
        """One record. One this node could not have written is set aside (a ticket is
        pending until the proxy says whether it has its result); what the others held comes
        back from the proxy as a crash's losses do (a damaged identity: see `restore`)."""
        if key.startswith(SET_ASIDE):
            self.set_aside.found(key)
            return
        try:
            self._restore_record(key, record)
        except (ProtocolError, StoreError, ValueError, TypeError, KeyError,
                IndexError) as exc:
            is_ticket = key.startswith("t:")
            self.set_aside.damaged(key, record, exc, self._changes, keep_key=is_ticket)
            if is_ticket:  # pending until the proxy says whether it has its result
                job_id = JobId(key[2:])
                self.tickets.add_unknown(job_id, self.node_id)
                self._repairable[job_id] = record

    def _restore_record(self, key: str, record: bytes) -> None:
        kind, _, raw_id = key.partition(":")
        job_id = JobId(raw_id)
        value = decode_record(key, record)
        if kind == "t":
            spec, forwarded, outcome = value
            if outcome is not None:  # done: kept as stored, checked when it is read
                self.tickets.add_stored(job_id, record, value)
                return
            self.tickets[job_id] = Ticket(spec_from_wire(spec, job_id), forwarded, None)
            (self._awaiting if forwarded else self._unforwarded)[job_id] = None
        elif kind == "q":
            self.held[job_id] = spec_from_wire(value, job_id)
            self._queue.append(job_id)
        elif kind == "f":
            self.finished[job_id] = outcome_from_wire(value, job_id)
        elif kind == "c":
            self.cancelling[job_id] = None
        elif kind == "a":
            if type(value) is not list or not all(type(i) is str for i in value):
                raise ValueError("a forward mark lists ticket ids")
            self._marks[int(raw_id)] = ForwardMark(list(value), 0)
        elif key == "m:counters":  # three of them in a store written before `abandoned`
            counters = (*value, 0)[:4]
            if not all(type(n) is int for n in counters):
                raise ValueError("counters are whole numbers")
            self.done, self.failed, self.duplicates, self.abandoned = counters

    def _save_ticket(self, job_id: JobId, t: Ticket) -> None:
        self._changes[f"t:{job_id}"] = ticket_record(t)

    def _settle_marks(self) -> None:
        """After a restore: the tickets of each a: record still pending are forwarded; a
        record none of whose tickets is pending any more is deleted."""
        self._next_mark = max(self._marks, default=0) + 1
        for number, mark in list(self._marks.items()):
            for job_id in mark.ids:
                if job_id in self._unforwarded:  # pending, and its t: record says no more
                    del self._unforwarded[job_id]
                    self._awaiting[job_id] = None
                    ticket = self.tickets[job_id]
                    ticket.forwarded, ticket.mark = True, number
                    mark.pending += 1
            if not mark.pending:
                del self._marks[number]
                self._changes[f"a:{number}"] = None

    def _unmark(self, ticket: Ticket, job_id: JobId, forget: bool = False) -> None:
        """The ticket's a: record need not list it any more: it has its result (and its
        t: record says forwarded), or `forget`: the proxy lost it, take it out."""
        number, ticket.mark = ticket.mark, 0
        mark = self._marks.get(number)
        if mark is None:
            return
        mark.pending -= 1
        if not mark.pending:
            del self._marks[number]
            self._changes[f"a:{number}"] = None
        elif forget:
            mark.ids = [j for j in mark.ids if j != job_id]
            self._changes[f"a:{number}"] = mark.ids

    def _save_counters(self) -> None:
        self._changes["m:counters"] = [self.done, self.failed, self.duplicates, self.abandoned]

    # ------------------------------------------------------------------ clients

    def submit(self, spec: JobSpec) -> None:
        job_id = spec.job_id
        self.tickets[job_id] = ticket = Ticket(spec, False, None)
        self._unforwarded[job_id] = None
        self._to_send[job_id] = None
        self._save_ticket(job_id, ticket)

    def newest_tickets(self, state: str, limit: int) -> list[tuple[JobId, Ticket]]:
        """Up to `limit` tickets in `state` (all, pending, done, failed, cancelled), newest
        first. Tickets are kept in issue order, so this walks from the end."""
        out: list[tuple[JobId, Ticket]] = []
        for job_id in reversed(self.tickets):
            if state == "all" or self.tickets.state_of(job_id) == state:
                out.append((job_id, self.tickets[job_id]))
                if len(out) >= limit:
                    break
        return out

    def expire_results(self, cutoff: float, limit: int, keep: int = 0,
                       scan: int = 100_000) -> int:
        """Forget up to `limit` tickets whose job finished before `cutoff` (wall clock,
        RESULT_TTL), and the oldest with a result beyond `keep` of them (MAX_RESULTS; 0: no
        bound); a ticket without its result stays, whatever its age. Tickets are in
        submission order and no job finishes before it was submitted, so the walk stops at
        the first ticket submitted after `cutoff` once under `keep`, or after `scan`
        tickets (old ones still pending are walked past on every sweep: the cap keeps a
        sweep short)."""
        excess = len(self.tickets) - self.pending_tickets - keep if keep else 0
        expired: list[JobId] = []
        times = self.tickets.times
        for seen, job_id in enumerate(self.tickets):
            if len(expired) >= limit or seen >= scan:
                break
            submitted_at, finished_at = times(job_id)
            if submitted_at >= cutoff and excess <= 0:
                break
            if finished_at is not None and (excess > 0 or finished_at < cutoff):
                expired.append(job_id)
                excess -= 1
        for job_id in expired:
            del self.tickets[job_id]
            self._changes[f"t:{job_id}"] = None
        return len(expired)

    @property
    def oldest_ticket_time(self) -> float | None:
        """When the oldest ticket this node still keeps was issued (None: it keeps none)."""
        first = next(iter(self.tickets), None)
        return None if first is None else self.tickets.submitted_at(first)

    @property
    def pending_tickets(self) -> int:
        return len(self._unforwarded) + len(self._awaiting) + len(self._repairable)

    # ------------------------------------------------------------------ executor

    def next_job(self) -> JobSpec | None:
        """The oldest held job not started yet, now marked running."""
        while self._queue:
            job_id = self._queue.popleft()
            spec = self.held.get(job_id)
            if spec is not None and job_id not in self.running:
                self.running.add(job_id)
                return spec
        return None

    def _let_go(self, job_id: JobId) -> JobSpec | None:
        """The job is no longer held here (it ended, or it was abandoned): its spec."""
        spec = self.held.pop(job_id, None)
        self.running.discard(job_id)
        self.started_at.pop(job_id, None)
        self.abandoning.discard(job_id)  # ended before its stop came: its outcome stands
        self.overdue_after.pop(job_id, None)
        self.overdue.discard(job_id)
        self._changes[f"q:{job_id}"] = None
        return spec

    def finish(self, outcome: Outcome) -> None:
        job_id = outcome.job_id
        spec = self._let_go(job_id)
        self.finished[job_id] = outcome
        self._changes[f"f:{job_id}"] = outcome_to_wire(outcome)
        if outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self._save_counters()
        if spec is not None and spec.origin == self.node_id and not spec.retries:
            self._record_outcome(outcome)  # our own ticket: no need to wait for the proxy
        # (with retries the proxy decides whether this attempt is the last one)

    def began(self, job_id: JobId, when: float) -> None:
        """A running job's attempt began at `when` (wall clock): INFO and `status` say it."""
        if job_id in self.running:
            self.started_at[job_id] = when

    def mark_overdue(self, job_id: JobId) -> bool:
        """A running job passed its `overdue_after`: True when that is news for the proxy."""
        if job_id not in self.running or job_id in self.overdue:
            return False
        self.overdue.add(job_id)
        return True

    def cancel(self, job_id: JobId, now: float) -> str:
        """The origin's cancel of its own ticket: 'finished' (a no-op), 'local' (never left
        this node: cancelled here and now) or 'sent' (the proxy must act; the outcome will
        say what happened)."""
        ticket = self.tickets[job_id]
        if ticket.outcome is not None:
            return "finished"
        if not ticket.forwarded and job_id not in self._inflight_jobs:
            self._record_outcome(Outcome(job_id, False, "cancelled while queued at "
                                         f"{self.node_id}, it never ran", self.node_id, now,
                                         now, cancelled=True))
            return "local"
        self.cancelling[job_id] = None
        self._changes[f"c:{job_id}"] = 1
        return "sent"

    def take_cancels(self) -> Cancel | None:
        ids = tuple(j for j in self.cancelling if j not in self._cancels_sent)
        self._cancels_sent.update(ids)
        return Cancel(ids) if ids else None

    def _on_stop(self, ids: Iterable[JobId], now: float) -> None:
        """The proxy asks to stop these: an unstarted one ends here as cancelled; a running
        one is killed by the shell (`kill_requests`), which then records it cancelled."""
        for job_id in ids:
            if job_id in self.running:
                self.kill_requests.append(job_id)
            elif job_id in self.held:
                self.finish(Outcome(job_id, False, f"cancelled before it started on "
                                    f"{self.node_id}", self.node_id, now, now, cancelled=True))

    def _on_abandon(self, ids: Iterable[JobId]) -> None:
        """This node was declared dead while it ran these, and the proxy has moved on
        (another node runs them, or their result is in): stop them, record nothing. A job
        not running any more is left to what it did (its result, already on its way, counts
        as a second run)."""
        for job_id in ids:
            if job_id in self.running:
                self.kill_requests.append(job_id)
                self.abandoning.add(job_id)

    def keep_running(self, specs: Iterable[JobSpec]) -> None:
        """After a rollback to the disk (a failed commit): the jobs whose attempts run on
        here. They are held and running, not to be started a second time beside themselves;
        one whose dispatch was in the failed commit is held again, its record staged anew
        (else the proxy, not seeing it in HELLO, would send it again)."""
        for spec in specs:
            if spec.job_id in self.finished:
                continue
            if spec.job_id not in self.held:
                self.held[spec.job_id] = spec
                self._changes[f"q:{spec.job_id}"] = spec_to_wire(spec)
            self.running.add(spec.job_id)

    def abandon(self, job_id: JobId) -> None:
        """The shell stopped an abandoned job: drop it without an outcome, even when this node
        is its origin (the run the proxy recorded gives the ticket its result)."""
        self._let_go(job_id)
        self.abandoned += 1
        self._save_counters()

    @property
    def queued(self) -> int:
        return len(self.held) - len(self.running)

    # ------------------------------------------------------------------ proxy link

    def on_connect(self) -> Hello:
        """A new connection: nothing is in flight any more; tell the proxy what we hold."""
        self._inflight_jobs.clear()
        self._to_send = dict(self._unforwarded)
        self._inflight_results.clear()
        self._cancels_sent.clear()
        waiting = tuple(j for j in self.held if j not in self.running)
        return Hello(self.node_id, self.incarnation, self.slots, PROTOCOL_VERSION,
                     queued=waiting, running=tuple(self.running),
                     finished=tuple(self.finished))

    def info(self) -> Info:
        running = tuple(self.running)
        return Info(queued=self.queued, running=len(running), slots=self.slots,
                    done=self.done, failed=self.failed, running_ids=running,
                    overdue_ids=tuple(self.overdue),
                    running_started=tuple(self.started_at.get(j, 0.0) for j in running))

    def worth_gathering(self) -> bool:
        """Nagle's rule for the link: hold what is ready to send while something of its kind
        (submissions, results) sent on this connection awaits the proxy's ACK; the ACK
        usually comes within a round trip, and what gathered meanwhile leaves in one frame.
        A kind with nothing in flight goes at once: idle, a submission never waits, nor
        does the next submission of a client that just read a result (whose RESULT may be
        on its way to the proxy still)."""
        jobs, results = self._inflight_jobs, self._inflight_results
        if not (jobs or results):
            return False
        new_jobs = bool(self._to_send)
        new_results = len(self.finished) > len(results)  # likewise
        return not (new_jobs and not jobs) and not (new_results and not results)

    def take_submissions(self, limit: int) -> list[JobSpec]:
        """Tickets the proxy has not stored yet and that are not on their way."""
        ids = list(itertools.islice(self._to_send, limit))
        for job_id in ids:
            del self._to_send[job_id]
        self._inflight_jobs.update(ids)
        tickets = self.tickets
        return [tickets[job_id].spec for job_id in ids]

    def take_results(self, limit: int) -> list[Outcome]:
        out: list[Outcome] = []
        for job_id, outcome in self.finished.items():
            if job_id not in self._inflight_results:
                out.append(outcome)
                if len(out) >= limit:
                    break
        self._inflight_results.update(o.job_id for o in out)
        return out

    def awaited(self, limit: int) -> list[JobId]:
        """Forwarded tickets still without a result: what REQUEST_OF_RES asks for."""
        out: list[JobId] = []
        for job_id in itertools.chain(self._awaiting, self._repairable):
            out.append(job_id)
            if len(out) >= limit:
                break
        return out

    def on_message(self, msg: Message, now: float = 0.0) -> list[Message]:  # noqa: C901
        """Apply a frame from the proxy; return the replies (send only after committing).
        `now` (wall clock) stamps what a CANCEL ends."""
        match msg:
            case Cancel():
                self._on_stop(msg.ids, now)
            case Ack(of=AckOf.JOB):
                self._on_submissions_stored(msg.ids)
            case Ack(of=AckOf.RESULT):
                self._on_results_stored(msg.ids)
            case Job():
                return [self._on_dispatch(msg.jobs, msg.overdue_after)]
            case Result():
                return [self._on_results(msg.outcomes)]
            case RequestOfRes():
                return self._on_request(msg.ids)
            case ResReq():
                return [self._on_results(msg.outcomes), *self._on_request(msg.ids)]
            case Revoke():
                return [self._on_revoke(msg.ids)]
            case Abandon():
                self._on_abandon(msg.ids)
            case Unknown():
                self._on_unknown(msg.ids)
            case Stats():
                self.cluster = msg
        return []

    def _on_submissions_stored(self, ids: Iterable[JobId]) -> None:
        number = self._next_mark
        marked: list[JobId] = []
        for job_id in ids:
            self._inflight_jobs.discard(job_id)
            if job_id not in self._unforwarded:
                continue  # done (where it went matters no more), unknown, or marked already
            ticket = self.tickets[job_id]
            ticket.forwarded, ticket.mark = True, number
            del self._unforwarded[job_id]
            self._to_send.pop(job_id, None)  # the proxy has it from an earlier connection
            self._awaiting[job_id] = None
            marked.append(job_id)
        if marked:
            self._next_mark += 1
            self._marks[number] = ForwardMark(marked, len(marked))
            self._changes[f"a:{number}"] = marked

    def _on_results_stored(self, ids: Iterable[JobId]) -> None:
        for job_id in ids:
            self._inflight_results.discard(job_id)
            if self.finished.pop(job_id, None) is not None:
                self._changes[f"f:{job_id}"] = None

    def _on_dispatch(self, specs: Iterable[JobSpec], limits: Iterable[float] = ()) -> Ack:
        ids: list[JobId] = []
        for spec, limit in zip(specs, itertools.chain(limits, itertools.repeat(0.0)),
                               strict=False):
            ids.append(spec.job_id)
            if limit and spec.job_id not in self.finished:
                self.overdue_after[spec.job_id] = limit  # a re-send may bring a newer one
            if spec.job_id in self.held or spec.job_id in self.finished:
                continue  # a re-send after a reconnect: we have it already
            self.held[spec.job_id] = spec
            self._queue.append(spec.job_id)
            self._changes[f"q:{spec.job_id}"] = spec_to_wire(spec)
        return Ack(AckOf.JOB, tuple(ids))

    def _on_results(self, outcomes: Iterable[Outcome]) -> Ack:
        ids: list[JobId] = []
        for outcome in outcomes:
            ids.append(outcome.job_id)
            self._record_outcome(outcome)
        return Ack(AckOf.RESULT, tuple(ids))

    def _record_outcome(self, outcome: Outcome) -> None:
        """The first result recorded for a ticket wins; a different later one is a duplicate."""
        ticket = self.tickets.get(outcome.job_id)
        if ticket is None:
            return  # not ours (or from before an empty data dir): nothing to keep
        if self._repairable.pop(outcome.job_id, None) is not None:
            # The proxy's copy: the ticket reads as its result again (its job's name and
            # arguments stay unknown; submitted no later than it started).
            ticket.spec = ticket.spec._replace(submitted_at=outcome.started_at)
            self.repaired += 1
            logger.info("store.record_repaired ticket=%s from=proxy", outcome.job_id)
        if ticket.outcome is not None:
            if ticket.outcome != outcome:
                self.duplicates += 1
                self._save_counters()
            return
        ticket.outcome = outcome
        if ticket.mark:
            self._unmark(ticket, outcome.job_id)
        self._awaiting.pop(outcome.job_id, None)
        self._unforwarded.pop(outcome.job_id, None)
        self._to_send.pop(outcome.job_id, None)
        if outcome.job_id in self.cancelling:
            del self.cancelling[outcome.job_id]
            self._changes[f"c:{outcome.job_id}"] = None
        self._changes[f"t:{outcome.job_id}"] = self.tickets.settle(outcome.job_id)
        self._resolved.append(outcome.job_id)

    def _on_request(self, ids: Iterable[JobId]) -> list[Message]:
        """Results the proxy asks for. Frames arrive in order, so a job it believes is here
        and that is neither held nor finished was lost (say, a revoke raced a dispatch):
        returning it lets the proxy queue it again."""
        have: list[Outcome] = []
        missing: list[JobId] = []
        for job_id in ids:
            if job_id in self.finished:
                have.append(self.finished[job_id])
            elif job_id not in self.held:
                missing.append(job_id)
        out: list[Message] = [Result(tuple(have))] if have else []
        return [*out, Returned(tuple(missing))] if missing else out

    def _on_revoke(self, ids: Iterable[JobId]) -> Returned:
        """Give back the jobs not started yet; a running one stays (the executor runs in
        this same thread, so nothing can start between this check and the removal)."""
        returned: list[JobId] = []
        for job_id in ids:
            if job_id in self.held and job_id not in self.running:
                del self.held[job_id]
                self.overdue_after.pop(job_id, None)
                self._changes[f"q:{job_id}"] = None
                returned.append(job_id)
        return Returned(tuple(returned))

    def _on_unknown(self, ids: Iterable[JobId]) -> None:
        """The proxy lost these (its data directory was wiped): submit them again. (One
        whose record here could not be read stays as it reads: nothing can repair it.)"""
        for job_id in ids:
            record = self._repairable.pop(job_id, None)
            if record is not None:  # read as it is, now that nothing can repair it
                self.tickets.add_unreadable(job_id, record)
                self._resolved.append(job_id)
                continue
            ticket = self.tickets.get(job_id)
            if ticket is None or ticket.outcome is not None:
                continue
            ticket.forwarded = False
            if ticket.mark:
                self._unmark(ticket, job_id, forget=True)
            self._awaiting.pop(job_id, None)
            self._unforwarded[job_id] = None
            if job_id not in self._inflight_jobs:
                self._to_send[job_id] = None
            self._save_ticket(job_id, ticket)
