"""The balancing decisions, as pure functions: which node gets each of the next jobs, and
which nodes must give back jobs they have not started.

Load is measured against capacity: a node's load is the number of jobs dispatched to it
and not finished, times its slowness, divided by its slots. Each job goes to the node with
the lowest load after taking it (so an 8-slot node takes four times the jobs of a 2-slot
node); ties go to the node id that sorts first. A node never holds more than
`slots * (1 + prefetch)` jobs, and a slow node no more than `slots`: the rest of the queue
stays at the proxy, where a later decision can still send it to whichever node frees up
first.

Slowness (`weight`) is how many times longer a node's recent jobs take than the cluster's
typical job (a slow-moving mean over every node's jobs). Differences under `SLOW_RATIO`
are the noise of a random job mix and count as 1.

Rebalancing: when a node's load exceeds the lightest node's by more than one job per slot
and it holds jobs it has not started, it gives back enough of them to close the gap (the
proxy sends REVOKE; the node returns those it has not started; they go back to the front
of the global queue and the next dispatch places them).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.jobs import NodeId

# A node whose jobs take at least this many times as long as the typical node's is slow:
# with jobs of random length a node's recent mean wanders well below 2x the typical one.
SLOW_RATIO = 2.0


@dataclass(frozen=True, slots=True)
class NodeLoad:
    node_id: NodeId
    slots: int
    outstanding: int  # dispatched to it and not finished
    weight: float = 1.0  # slowness: 1 for a typical node, >= SLOW_RATIO for a slow one


def capacity(slots: int, prefetch: int, weight: float = 1.0) -> int:
    """Most jobs a node may hold: its slots plus `prefetch` per slot, no prefetch when slow
    (its slots free rarely, so a prefetched job would wait longer there than here)."""
    return slots if weight > 1.0 else slots * (1 + prefetch)


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
    """Targets for the next `min(queued, max_jobs, free capacity)` jobs, in queue order."""
    budget = min(queued, max_jobs)
    heap: list[tuple[float, NodeId, int, NodeLoad]] = []
    for n in loads:
        if n.slots > 0 and n.outstanding < capacity(n.slots, prefetch, n.weight):
            heap.append(((n.outstanding + 1) * n.weight / n.slots, n.node_id, n.outstanding,
                         n))
    heapq.heapify(heap)
    targets: list[NodeId] = []
    while heap and len(targets) < budget:
        _, node_id, outstanding, n = heapq.heappop(heap)
        targets.append(node_id)
        outstanding += 1
        if outstanding < capacity(n.slots, prefetch, n.weight):
            heapq.heappush(heap, ((outstanding + 1) * n.weight / n.slots, node_id, outstanding,
                                  n))
    return targets


def rebalance(loads: Iterable[NodeLoad]) -> dict[NodeId, int]:
    """How many not-started jobs each overloaded node should give back.

    A node can have started at most `slots` of its jobs, so `outstanding - slots` of them
    are surely waiting there. A node with zero slots can start none: it gives back all of
    them as long as some node has slots. Only nodes in `loads` are considered, so a node
    that vanished since its last INFO is neither a source nor a measure."""
    nodes = sorted(loads, key=lambda n: n.node_id)
    working = [n for n in nodes if n.slots > 0]
    if not working:
        return {}
    lightest = min(n.outstanding * n.weight / n.slots for n in working)
    revoke: dict[NodeId, int] = {}
    for n in nodes:
        waiting = n.outstanding - n.slots
        if waiting <= 0:
            continue
        if n.slots == 0:
            revoke[n.node_id] = waiting
            continue
        excess = n.outstanding * n.weight / n.slots - lightest - 1
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
