"""The balancing decision, as a pure function: which node gets each of the next jobs.

Load is measured against capacity: a node's load is the number of jobs dispatched to it
and not finished, divided by its slots. Each job goes to the node with the lowest load
after taking it (so an 8-slot node takes four times the jobs of a 2-slot node); ties go to
the node id that sorts first. A node never holds more than `slots * (1 + prefetch)` jobs:
the rest of the queue stays at the proxy, where a later decision can still send it to
whichever node frees up first.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from common.jobs import NodeId


@dataclass(frozen=True, slots=True)
class NodeLoad:
    node_id: NodeId
    slots: int
    outstanding: int  # dispatched to it and not finished


def capacity(slots: int, prefetch: int) -> int:
    return slots * (1 + prefetch)


def assign(queued: int, loads: Iterable[NodeLoad], max_jobs: int,
           prefetch: int) -> list[NodeId]:
    """Targets for the next `min(queued, max_jobs, free capacity)` jobs, in queue order."""
    budget = min(queued, max_jobs)
    heap: list[tuple[float, NodeId, int, int]] = []
    for n in loads:
        if n.slots > 0 and n.outstanding < capacity(n.slots, prefetch):
            heap.append(((n.outstanding + 1) / n.slots, n.node_id, n.outstanding, n.slots))
    heapq.heapify(heap)
    targets: list[NodeId] = []
    while heap and len(targets) < budget:
        _, node_id, outstanding, slots = heapq.heappop(heap)
        targets.append(node_id)
        outstanding += 1
        if outstanding < capacity(slots, prefetch):
            heapq.heappush(heap, ((outstanding + 1) / slots, node_id, outstanding, slots))
    return targets


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
