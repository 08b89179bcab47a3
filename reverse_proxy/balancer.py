"""The balancing decisions, as pure functions: which node gets each of the next jobs, and
which nodes must give back jobs they have not started.

Load is measured against capacity: a node's load is the number of jobs dispatched to it
and not finished, times its slowness, divided by its slots. Each job goes to the node with
the lowest load after taking it (so an 8-slot node takes four times the jobs of a 2-slot
node); ties go to the node id that sorts first. A node never holds more than
`slots * (1 + prefetch)` jobs, and a slow node no more than `slots`: the rest of the queue
stays at the proxy, where a later decision can still send it to whichever node frees up
first. `prefetch` is PREFETCH (1) per slot, more when jobs are so short that a slot would
finish its next one before a new one could reach it (`prefetch_per_slot`).

Slowness (`weight`) is how many times longer a node's recent jobs take than the cluster's
typical job (a slow-moving mean over every node's jobs). Differences under `SLOW_RATIO`
are the noise of a random job mix and count as 1.

Overdue jobs: a job still running after more than `SLOW_RATIO` typical jobs' time (plus a
grace) is overdue. This is known before the job ends, so a node that slowed down is seen
before its first slow result. Sooner where the proxy knows how long a job should take
(learned per job signature, reverse_proxy.job_times): the node is told, with the job, the
time after which it is overdue (`overdue_after`: EXPECTED_RATIO times the expected time,
and at least EXPECTED_MARGIN more), and reports it the moment that passes. The typical-time rule
still covers the jobs without an expectation (and nodes that do not report). A slot stuck
on an overdue job is not capacity: the node's load counts only its other slots and the
jobs they hold (one heavy job on 8 slots leaves 7 that are fed as before), and a node with
an overdue job gets no prefetch and gives back all its waiting jobs, since its other slots
may be just as slow and not overdue yet.

Rebalancing: when a node's load exceeds the lightest node's by more than one job per slot
and it holds jobs it has not started, it gives back enough of them to close the gap (the
proxy sends REVOKE; the node returns those it has not started; they go back to the front
of the global queue and the next dispatch places them). A node with no slots, or with an
overdue job, gives back every job it surely has not started, as long as another node has
a free-running slot to take them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.jobs import JobId, NodeId

# A node whose jobs take at least this many times as long as the typical node's is slow:
# with jobs of random length a node's recent mean wanders well below 2x the typical one.
SLOW_RATIO = 2.0
# A running job is overdue after SLOW_RATIO typical jobs' time and this share more: the
# typical time wanders by a few % over a random job mix, and a loaded machine stretches a
# job a little. (Ages are measured from the first INFO that shows the job running, so they
# are under-estimated by up to one INFO_PERIOD, never over-estimated.)
OVERDUE_GRACE = 0.1
# A job with an expected run time (the median of its signature's recent runs) is overdue
# past this many times it: tighter than SLOW_RATIO, as it is measured against the job's
# own runs, not a mean over a random mix (sleeps of a given length vary by ~1 %; a command
# whose runs vary by half is flagged now and then, which costs its node its prefetch for
# that long) ...
EXPECTED_RATIO = 1.5
# ... and never before this many seconds more: a sleep of 5 ms that a busy machine
# stretches to 15 ms is not a slow node. Both together flag a node that went 10x slower
# within about half a dispatch period of 100 ms (at its first short jobs).
EXPECTED_MARGIN = 0.02
# About how long a slot that just finished a job waits for the next one when nothing is
# prefetched: its result reaches the proxy, is committed, a job is dispatched, reaches the
# node and is committed there (a few ms here, with both commits) ...
REFILL_SECONDS = 0.005
# ... so with jobs shorter than that a node holds more per slot, up to this many: fewer,
# fuller frames and commits per job (a drain of `sleep 0` jobs costs a quarter less CPU per
# job with 4-8 than with 1) while jobs of 5 ms and more keep PREFETCH, late binding intact.
MAX_PREFETCH = 8


@dataclass(frozen=True, slots=True)
class NodeLoad:
    node_id: NodeId
    slots: int
    outstanding: int  # dispatched to it and not finished
    weight: float = 1.0  # slowness: 1 for a typical node, >= SLOW_RATIO for a slow one
    overdue: int = 0  # of its jobs, those running for longer than a slow node's job takes


def prefetch_per_slot(base: int, typical: float | None) -> int:
    """Jobs per slot a node may hold beyond those it runs: `base` (PREFETCH), or enough to
    cover REFILL_SECONDS of jobs of the typical length, at most MAX_PREFETCH. PREFETCH=0
    asks for none at all: kept."""
    if base == 0 or typical is None or typical <= 0:
        return base
    return max(base, min(MAX_PREFETCH, math.ceil(REFILL_SECONDS / typical)))


def capacity(slots: int, prefetch: int, weight: float = 1.0, overdue: int = 0) -> int:
    """Most jobs a node may hold: its slots plus `prefetch` per slot, no prefetch when slow
    or running an overdue job (its slots free rarely, or may: a prefetched job would wait
    longer there than here)."""
    return slots if weight > 1.0 or overdue > 0 else slots * (1 + prefetch)


def effective(n: NodeLoad) -> tuple[int, int]:
    """A node's slots and held jobs without the slots stuck on overdue jobs and those jobs:
    what its load is measured on."""
    stuck = max(0, min(n.overdue, n.slots, n.outstanding))
    return n.slots - stuck, n.outstanding - stuck


def overdue(first_seen: Mapping[JobId, float], now: float, typical: float | None
            ) -> set[JobId]:
    """The running jobs (with when each was first seen running) that have run for over
    SLOW_RATIO typical jobs' time, plus OVERDUE_GRACE of it, by `now`. Without a typical
    time nothing is overdue: there is no measure of what is normal yet."""
    if typical is None or typical <= 0:
        return set()
    limit = SLOW_RATIO * (1 + OVERDUE_GRACE) * typical
    return {job_id for job_id, seen in first_seen.items() if now - seen > limit}


def overdue_after(expected: float | None) -> float | None:
    """Seconds after its start at which a job expected to run `expected` seconds is overdue
    (None when nothing is expected of it)."""
    if expected is None:
        return None
    return max(EXPECTED_RATIO * expected, expected + EXPECTED_MARGIN)


def slowness(mean_job_seconds: Mapping[NodeId, float], typical: float | None
             ) -> dict[NodeId, float]:
    """Each node's weight from its recent mean job time against the typical job time of
    the whole cluster (nodes without a mean are absent; no typical time: all weigh 1)."""
    weights: dict[NodeId, float] = {}
    for node_id, seconds in mean_job_seconds.items():
        ratio = seconds / typical if typical is not None and typical > 0 else 1.0
        weights[node_id] = ratio if ratio >= SLOW_RATIO else 1.0
    return weights


def assign(queued: int, loads: Iterable[NodeLoad], max_jobs: int,
           prefetch: int) -> list[NodeId]:
    """Targets for the next `min(queued, max_jobs, free capacity)` jobs, in queue order.
    Load is measured on a node's effective slots (those not stuck on overdue jobs)."""
    budget = min(queued, max_jobs)
    # (load after one more job, node, jobs it may still take, held, effective slots, weight)
    heap: list[tuple[float, NodeId, int, int, int, float]] = []
    for n in loads:
        slots, held = effective(n)
        room = capacity(n.slots, prefetch, n.weight, n.overdue) - n.outstanding
        if slots > 0 and room > 0:
            heap.append(((held + 1) * n.weight / slots, n.node_id, room, held, slots,
                         n.weight))
    heapq.heapify(heap)
    targets: list[NodeId] = []
    while heap and len(targets) < budget:
        _, node_id, room, held, slots, weight = heapq.heappop(heap)
        targets.append(node_id)
        if room > 1:
            heapq.heappush(heap, ((held + 2) * weight / slots, node_id, room - 1, held + 1,
                                  slots, weight))
    return targets


def rebalance(loads: Iterable[NodeLoad]) -> dict[NodeId, int]:
    """How many not-started jobs each overloaded node should give back.

    A node can have started at most `slots` of its jobs, so `outstanding - slots` of them
    are surely waiting there. A node with zero slots can start none, and one running an
    overdue job may start them late: it gives back all of them as long as another node has
    a slot not stuck on an overdue job. Loads are measured on effective slots. Only nodes
    in `loads` are considered, so a node that vanished since its last INFO is neither a
    source nor a measure."""
    nodes = sorted(loads, key=lambda n: n.node_id)
    working = {n.node_id: held * n.weight / slots for n in nodes
               for slots, held in [effective(n)] if slots > 0}
    if not working:
        return {}
    lightest = min(working.values())
    revoke: dict[NodeId, int] = {}
    for n in nodes:
        waiting = n.outstanding - n.slots
        if waiting <= 0:
            continue
        if n.node_id not in working or n.overdue > 0:
            if working.keys() - {n.node_id}:
                revoke[n.node_id] = waiting
            continue
        excess = working[n.node_id] - lightest - 1
        if excess > 1e-9:
            revoke[n.node_id] = min(waiting, math.ceil(excess * n.slots / n.weight - 1e-9))
    return revoke


def assign_by_queue_length(queued: int, reported: Iterable[tuple[NodeId, int]],
                           max_jobs: int) -> list[NodeId]:
    """The original's policy, kept for comparison in benchmarks: each job to the node with
    the shortest queue as last reported in INFO (plus what this round already sent it),
    with no capacity bound."""
    heap = [(length, node_id) for node_id, length in reported]
    heapq.heapify(heap)
    targets: list[NodeId] = []
    while heap and len(targets) < min(queued, max_jobs):
        length, node_id = heapq.heappop(heap)
        targets.append(node_id)
        heapq.heappush(heap, (length + 1, node_id))
    return targets
