"""What the proxy keeps about each job and each node, its settings, and how a job and a node
are written to its store. Plain data: ProxyState (state.py) holds the rules.

Records: j:<job> [spec, seq, state, node, attempts, outcome|None, not_before, history,
                  cancel]  (the last three only when one of them is set)
         n:<node> [incarnation, slots]      m:proxy {proxy_id}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import (
    Message,
    outcome_from_wire,
    outcome_to_wire,
    spec_from_wire,
    spec_to_wire,
)
from reverse_proxy.job_queue import QUEUED as QUEUED  # re-exported: every state is here

# A job's states: QUEUED (job_queue), then dispatched to one node, then done (its outcome
# waits for the origin's ACK, then the proxy forgets the job).
DISPATCHED, DONE = "dispatched", "done"
BALANCED, ORIGINAL = "balanced", "original"  # dispatch policies


@dataclass(slots=True)
class JobRecord:
    spec: JobSpec
    seq: int  # position in the global queue; a requeued job gets one below every other
    state: str
    node: NodeId | None = None  # the node it is dispatched to (or ran on, once done)
    attempts: int = 0
    outcome: Outcome | None = None
    # when it was dispatched, in dispatch order; not stored (0 after a restore)
    sent: int = field(default=0, compare=False)
    not_before: float = 0.0  # wall clock: not dispatched before (a delay or a retry backoff)
    # Failed attempts, oldest first. Immutable, like `retried`, and shared while empty: a
    # list and a set in every record were 27 MB of a proxy holding 100,000 queued jobs.
    history: tuple[str, ...] = ()
    cancel: bool = False  # the origin asked to cancel it while it was dispatched
    # (node, start) of the failed attempts retried: a re-send of one is not a second run.
    # Not stored: after a restart such a re-send counts once as a duplicate.
    retried: frozenset[tuple[NodeId, float]] = field(default=frozenset(), compare=False)
    # The `overdue_after` it was last dispatched with, or learned since (0: none yet); not
    # stored (a restored proxy takes it from the learned times, which are).
    overdue_after: float = field(default=0.0, compare=False)


def job_to_wire(rec: JobRecord) -> list[Any]:
    outcome = None if rec.outcome is None else outcome_to_wire(rec.outcome)
    record = [spec_to_wire(rec.spec), rec.seq, rec.state, rec.node, rec.attempts, outcome]
    if rec.not_before or rec.history or rec.cancel:
        record += [rec.not_before, rec.history, rec.cancel]
    return record


def job_from_wire(value: Any, stored_as: JobId | None = None) -> JobRecord:
    spec, seq, job_state, node, attempts, outcome, *more = value
    rec = JobRecord(spec_from_wire(spec, stored_as), seq, job_state, node, attempts,
                    None if outcome is None else outcome_from_wire(outcome, stored_as))
    if more:
        rec.not_before, rec.history, rec.cancel = more[0], tuple(more[1]), more[2]
    return rec


@dataclass(slots=True)
class NodeEntry:
    node_id: NodeId
    incarnation: str
    slots: int
    connected: bool = False
    alive: bool = True
    last_seen: float = 0.0
    assigned: set[JobId] = field(default_factory=set)
    running: int = 0
    queued: int = 0
    done: int = 0
    failed: int = 0
    duplicates: int = 0
    # Jobs dispatched to it or declared in its HELLO since it connected: a result for one of
    # them that is no longer its current attempt is late, not forged.
    known: set[JobId] = field(default_factory=set)
    violations: int = 0  # on this connection
    info_budget: float = 0.0  # token bucket against INFO floods
    info_at: float = 0.0
    job_seconds: float | None = None  # running mean of its jobs' run times
    revoking: bool = False  # a REVOKE is on its way and not answered yet
    # The jobs running there as of its last INFO, each with when an INFO first showed it
    # running (its start, late by < 1 INFO).
    first_seen: dict[JobId, float] = field(default_factory=dict)
    started_at: dict[JobId, float] = field(default_factory=dict)  # of those, as it said
    overdue: set[JobId] = field(default_factory=set)  # as of its last INFO or tick
    reported_overdue: set[JobId] = field(default_factory=set)  # by itself, in its last INFO
    # Why it closed its link, as its LEAVING said ("" if it did not): for the operator,
    # until its next HELLO.
    leaving: str = ""


def node_to_wire(entry: NodeEntry) -> list[Any]:
    return [entry.incarnation, entry.slots]


def node_from_wire(node_id: NodeId, value: Any, now: float) -> NodeEntry:
    incarnation, slots = value
    # Every node gets a full timeout to come back before its jobs move elsewhere.
    return NodeEntry(node_id, incarnation, slots, last_seen=now)


@dataclass(frozen=True, slots=True)
class Outgoing:
    node: NodeId
    msg: Message  # a LEAVING: close that node's connection after it (it must say HELLO again)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    max_nodes: int = 64
    max_jobs_dispatch: int = 1000
    prefetch: int = 1  # jobs per slot a node may hold beyond those it runs
    node_timeout: float = 5.0
    # Protocol violations (forged results, frames only a proxy sends, INFO floods) one
    # connection may commit before it is closed.
    max_violations: int = 10
    # INFO frames a node may send per second on average, and in a burst. Nodes send one per
    # INFO_PERIOD (10 ms at the least), and every INFO costs the proxy a STATS reply.
    info_rate: float = 200.0
    info_burst: float = 400.0
    policy: str = BALANCED  # or ORIGINAL: the original's policy, for comparison only
    retry_backoff: float = 1.0  # seconds before the first retry of a failed attempt
    max_node_losses: int = 5  # a job whose node was lost this often fails ("node lost N times")

