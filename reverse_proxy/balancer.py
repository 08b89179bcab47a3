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

Overdue jobs: a job still running after more than `SLOW_RATIO` times as long as most
recent jobs took (the 95th percentile, at least the typical time; plus a grace) is
overdue. This is known before the job ends, so a node that slowed down is seen before its
first slow result. Sooner where the proxy knows how long a job should take (learned per
job signature, reverse_proxy.job_times): the node is told, with the job, the time after
which it is overdue (`overdue_after`: EXPECTED_RATIO times the expected time, and at least
EXPECTED_MARGIN more), and reports it the moment that passes; the proxy judges it by the
same limit from when it saw it running (for a node that does not report, or lost the limit
in a restart), never by the usual time, which covers only the jobs without an
expectation. A slot stuck on an overdue job is not capacity: the node's load counts only
its other slots and the jobs they hold (one heavy job on 8 slots leaves 7 that are fed as
before), and a node with an overdue job gets no prefetch and gives back all its waiting
jobs, since its other slots may be just as slow and not overdue yet.

Rebalancing: when a node's load exceeds that of the lightest node that may take more jobs
by more than one job per slot, and it holds jobs it has not started, it gives back enough
of them to close the gap, each one only if `assign` would then place it elsewhere (the
proxy sends REVOKE; the node returns those it has not started; they go back to the front
of the global queue and the next dispatch places them). A node holding more than it may
(no slots, an overdue job, slow) gives back what is beyond, as long as another node has a
free-running slot to take them.
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
# A running job nothing is known of is overdue after SLOW_RATIO times a usual job's longest
# time and this share more: that time wanders by a few % over a random job mix, and a
# loaded machine stretches a job a little. (Ages are measured from the first INFO that
# shows the job running, so they are under-estimated by up to one INFO_PERIOD, never
# over-estimated.)
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


def overdue(first_seen: Mapping[JobId, float], now: float, usual: float | None,
            limits: Mapping[JobId, float]) -> set[JobId]:
    """The running jobs (with when each was first seen running) that are late by `now`.
    A job with a limit of its own (its `overdue_after`, from its signature's runs) is late
    past it and only then: that it runs longer than most jobs is normal for it. The others
    are late past SLOW_RATIO times `usual` (how long a usual job may run: as long as most
    recent jobs took) plus OVERDUE_GRACE of it; without it, never: there is no measure of
    what is normal yet."""
    late = {job_id for job_id, limit in limits.items()
            if job_id in first_seen and now - first_seen[job_id] > limit}
    if usual is None or usual <= 0:
        return late
    limit = SLOW_RATIO * (1 + OVERDUE_GRACE) * usual
    return late | {job_id for job_id, seen in first_seen.items()
                   if now - seen > limit and job_id not in limits}


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
    takers = _takers(loads, prefetch)
    targets: list[NodeId] = []
    while takers and len(targets) < budget:
        taker = heapq.heappop(takers)
        targets.append(taker[1])
        _took_one(takers, taker)
    return targets


# A node that may take more jobs, as `assign` picks them: (load after one more job, node,
# jobs it may still take, held, effective slots, weight), in a heap.
Taker = tuple[float, NodeId, int, int, int, float]


def _takers(loads: Iterable[NodeLoad], prefetch: int) -> list[Taker]:
    takers: list[Taker] = []
    for n in loads:
        slots, held = effective(n)
        room = capacity(n.slots, prefetch, n.weight, n.overdue) - n.outstanding
        if slots > 0 and room > 0:
            takers.append(((held + 1) * n.weight / slots, n.node_id, room, held, slots,
                           n.weight))
    heapq.heapify(takers)
    return takers


def _took_one(takers: list[Taker], taker: Taker) -> None:
    """`taker` (popped) got a job: back in the heap one job heavier, if it may take more."""
    _, node_id, room, held, slots, weight = taker
    if room > 1:
        heapq.heappush(takers, ((held + 2) * weight / slots, node_id, room - 1, held + 1,
                                slots, weight))


def rebalance(loads: Iterable[NodeLoad], prefetch: int = 1) -> dict[NodeId, int]:
    """How many not-started jobs each node should give back (`prefetch` as for `assign`).

    A node can have started at most `slots` of its jobs, so `outstanding - slots` of them
    are surely waiting there. It gives back:
    - those beyond what it may hold (`capacity`: it has no slots, runs an overdue job, or
      is slow), as long as another node has a slot not stuck on an overdue job; they wait
      in the global queue for the first free slot anywhere;
    - when its load exceeds that of the lightest node that may take more jobs by over one
      job per slot, enough to close the gap: each to where `assign` would send it next,
      and only while that is not this node again. Measured against a node that may take
      no more (full, or slow), jobs went back and forth for good: given back, dispatched
      to the same node, given back (1,900 hand-offs of one job in 1.5 s).
    Loads are measured on effective slots. Only nodes in `loads` are considered, so a
    node that vanished since its last INFO is neither a source nor a measure."""
    nodes = sorted(loads, key=lambda n: n.node_id)
    working = {n.node_id for n in nodes if effective(n)[0] > 0}
    beyond: dict[NodeId, int] = {}
    for n in nodes:
        over = n.outstanding - capacity(n.slots, prefetch, n.weight, n.overdue)
        waiting = n.outstanding - n.slots
        if ((over > 0 or n.node_id not in working) and waiting > 0
                and working - {n.node_id}):
            beyond[n.node_id] = min(waiting, over) if n.node_id in working else waiting
    takers = _takers(nodes, prefetch)
    if not takers:
        return beyond
    lightest = min(held * weight / slots for _, _, _, held, slots, weight in takers)
    revoke: dict[NodeId, int] = {}
    for n in nodes:
        given = beyond.get(n.node_id, 0)
        kept = n if not given else NodeLoad(n.node_id, n.slots, n.outstanding - given,
                                            n.weight, n.overdue)
        count = given + _to_give_back(kept, lightest + 1, takers)
        if count:
            revoke[n.node_id] = count
    return revoke


def _to_give_back(n: NodeLoad, target: float, takers: list[Taker]) -> int:
    """How many of its waiting jobs `n` gives back to bring its load down to `target` (or
    just below),
    each to the taker `assign` would pick for it (taken from `takers`), and only while
    that is not `n` itself."""
    slots, held = effective(n)
    waiting = n.outstanding - n.slots
    if slots <= 0 or waiting <= 0:
        return 0
    load, step = held * n.weight / slots, n.weight / slots
    count = 0
    while count < waiting and load > target + 1e-9:
        dest = _best_other(takers, n.node_id)
        if dest is None or load <= dest[0] + 1e-9:
            break  # `assign` would give it back to this node
        _took_one(takers, dest)
        load -= step
        count += 1
    return count


def _best_other(takers: list[Taker], node_id: NodeId) -> Taker | None:
    """Pop the taker `assign` would pick next, other than `node_id` (left in the heap)."""
    own = None
    while takers:
        best = heapq.heappop(takers)
        if best[1] != node_id:
            if own is not None:
                heapq.heappush(takers, own)
            return best
        own = best
    if own is not None:
        heapq.heappush(takers, own)
    return None


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
