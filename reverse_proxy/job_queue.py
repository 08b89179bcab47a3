"""The proxy's global queue: which queued job goes next. Pure: the wall clock is passed in.

Jobs are ordered by (priority descending, seq): a new job gets the next seq at the back, a
job that comes back (its node died, or gave it back) a seq below every other, so it goes
first within its priority. A job whose `not_before` (a submission delay, or a retry's
backoff) is still ahead waits in a second heap keyed by that time; `release_due(wall)`
moves it into the queue.

Entries are never removed from the heaps out of order: a job that leaves the queue any
other way (cancelled, finished, requeued with a new seq) leaves a stale entry, skipped when
it comes up because the record no longer matches it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.jobs import JobId

if TYPE_CHECKING:
    from reverse_proxy.records import JobRecord

QUEUED = "queued"


class JobQueue:
    def __init__(self, jobs: Mapping[JobId, JobRecord]) -> None:
        self._jobs = jobs  # the records, to tell current heap entries from stale ones
        self._heap: list[tuple[int, int, JobId]] = []  # (-priority, seq, job)
        self._delayed: list[tuple[float, JobId]] = []  # (not_before, job) not yet due
        self.wall = 0.0  # the wall clock as last given to release_due()
        self.size = 0  # queued jobs, due or delayed
        self._next_seq = 0
        self._front_seq = 0

    def back_seq(self) -> int:
        """A seq behind every job queued so far."""
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq

    def front_seq(self) -> int:
        """A seq ahead of every job queued so far."""
        self._front_seq -= 1
        return self._front_seq

    def adopt_seq(self, seq: int) -> None:
        """A restored record's seq: new ones go behind it, returned ones before it."""
        self._next_seq = max(self._next_seq, seq + 1)
        self._front_seq = min(self._front_seq, seq)

    def push(self, job_id: JobId, rec: JobRecord, heapify_later: bool = False) -> None:
        """Into the queue by (priority, seq), or into the delayed heap until not_before.
        `heapify_later` (while restoring): append only; call `heapify()` once at the end."""
        if rec.not_before > self.wall:
            entry: tuple[Any, ...] = (rec.not_before, job_id)
            heap: list[Any] = self._delayed
        else:
            entry, heap = (-rec.spec.priority, rec.seq, job_id), self._heap
        if heapify_later:
            heap.append(entry)
        else:
            heapq.heappush(heap, entry)
        self.size += 1

    def heapify(self) -> None:
        heapq.heapify(self._heap)
        heapq.heapify(self._delayed)

    def release_due(self, wall: float) -> int:
        """Move the delayed jobs whose time has come into the queue (wall: time.time());
        how many."""
        self.wall = wall
        released = 0
        while self._delayed and self._delayed[0][0] <= wall:
            not_before, job_id = heapq.heappop(self._delayed)
            rec = self._jobs.get(job_id)
            if rec is not None and rec.state == QUEUED and rec.not_before == not_before:
                heapq.heappush(self._heap, (-rec.spec.priority, rec.seq, job_id))
                released += 1
        return released

    def pop(self) -> tuple[JobId, JobRecord] | None:
        """The next due job, still queued (the caller changes its state and `size`)."""
        while self._heap:
            _, seq, job_id = heapq.heappop(self._heap)
            rec = self._jobs.get(job_id)
            if rec is not None and rec.state == QUEUED and rec.seq == seq:
                return job_id, rec
        return None

    def put_back(self, job_id: JobId, rec: JobRecord) -> None:
        """A job `pop` gave that the round did not dispatch: in line again, in its place."""
        heapq.heappush(self._heap, (-rec.spec.priority, rec.seq, job_id))

    def discard(self, rec: JobRecord) -> None:
        """A job leaves the queue (or was never in it): count it out if it was queued; its
        heap entry becomes stale."""
        if rec.state == QUEUED:
            self.size -= 1
