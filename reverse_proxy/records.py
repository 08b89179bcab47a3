"""What the proxy keeps about each job and each node, its settings, and how a job and a node
are written to its store. Plain data: ProxyState (state.py) holds the rules.

Records: j:<job> [spec, seq, state, node, attempts, outcome|None, not_before, history,
                  cancel]  (the last three only when one of them is set)
         n:<node> [incarnation, slots]      m:proxy {proxy_id}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from common.errors import ProtocolError, StoreError
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import decode_record
from common.messages import (
    Message,
    outcome_from_wire,
    outcome_to_wire,
    spec_from_wire,
    spec_to_wire,
)
from common.set_aside import PREFIX as SET_ASIDE
from common.set_aside import SetAside
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
    """A j: record; ValueError or TypeError (or ProtocolError, of its spec and outcome)
    if it is not one this version writes."""
    spec, seq, job_state, node, attempts, outcome, *more = value
    if (type(seq) is not int or job_state not in (QUEUED, DISPATCHED, DONE)
            or (node is not None and type(node) is not str) or type(attempts) is not int
            or (job_state == DISPATCHED and node is None)
            or (job_state == DONE) != (outcome is not None)):
        raise ValueError(f"not a job record: {str(value)[:200]}")
    rec = JobRecord(spec_from_wire(spec, stored_as), seq, job_state,
                    None if node is None else NodeId(node), attempts,
                    None if outcome is None else outcome_from_wire(outcome, stored_as))
    if more:
        not_before, history, cancel = more
        if (type(not_before) not in (int, float) or type(history) is not list
                or not all(type(h) is str for h in history) or type(cancel) is not bool):
            raise ValueError(f"not a job record: {str(value)[:200]}")
        rec.not_before, rec.history, rec.cancel = not_before, tuple(history), cancel
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
    # The job types it runs, as its HELLO said (None: it did not say: any); not stored.
    job_types: frozenset[str] | None = None


def node_to_wire(entry: NodeEntry) -> list[Any]:
    record: list[Any] = [entry.incarnation, entry.slots]
    if entry.duplicates:  # (kept across restarts, as its done and failed, which it reports)
        record.append(entry.duplicates)
    return record


def node_from_wire(node_id: NodeId, value: Any, now: float) -> NodeEntry:
    incarnation, slots, *more = value
    duplicates = more[0] if more else 0
    if (type(incarnation) is not str or type(slots) is not int or type(duplicates) is not int
            or len(more) > 1):
        raise ValueError(f"not a node record: {str(value)[:200]}")
    # Every node gets a full timeout to come back before its jobs move elsewhere.
    return NodeEntry(node_id, incarnation, slots, last_seen=now, duplicates=duplicates)


@dataclass
class StoredProxy:
    """What a proxy's store holds, read (`read_records`) for `ProxyState.restore`."""

    proxy_id: str | None = None
    times: Any = None
    jobs: list[tuple[JobId, JobRecord]] = field(default_factory=list)
    nodes: list[NodeEntry] = field(default_factory=list)
    set_aside: SetAside = field(default_factory=lambda: SetAside("proxy"))
    moves: dict[str, Any] = field(default_factory=dict)  # of damaged records, to commit


def read_records(records: Iterable[tuple[str, bytes]], now: float) -> StoredProxy:
    """Each record decoded and checked as it comes (the raw ones are not all held at once:
    less memory at the peak of a restart). One that cannot be read is set aside
    (common/set_aside.py): the origin of a job submits it again when told it is UNKNOWN, and
    a node's jobs are queued again, as after any loss."""
    found = StoredProxy()
    for key, record in records:
        if key.startswith(SET_ASIDE):
            found.set_aside.found(key)
            continue
        kind, _, name = key.partition(":")
        try:
            value = decode_record(key, record)
            if key == "m:proxy":
                if type(proxy_id := value["proxy_id"]) is not str:
                    raise TypeError("proxy_id is a string")
                found.proxy_id = proxy_id
            elif key == "m:times":
                found.times = value  # checked as it is adopted (or learned again)
            elif kind == "j":
                found.jobs.append((JobId(name), job_from_wire(value, JobId(name))))
            elif kind == "n":
                found.nodes.append(node_from_wire(NodeId(name), value, now))
        except (ProtocolError, StoreError, ValueError, TypeError, KeyError,
                IndexError) as exc:
            found.set_aside.damaged(key, record, exc, found.moves)
    found.set_aside.summarise()
    return found


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

