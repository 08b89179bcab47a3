"""`JobQueue`, the proxy's global queue, on its own: order, delays, stale entries."""

from __future__ import annotations

from common.jobs import JobId, JobSpec, NodeId
from reverse_proxy.job_queue import QUEUED, JobQueue
from reverse_proxy.records import DISPATCHED, JobRecord

T0 = 1_800_000_000.0


def queue_with(*jobs: tuple[str, int, float]) -> tuple[JobQueue, dict[JobId, JobRecord]]:
    """(name, priority, not_before) each, queued at the back in this order."""
    records: dict[JobId, JobRecord] = {}
    queue = JobQueue(records)
    queue.release_due(T0)
    for name, priority, not_before in jobs:
        spec = JobSpec(JobId(name), "sleep", ("1",), NodeId("o"), T0, priority=priority)
        rec = JobRecord(spec, queue.back_seq(), QUEUED, not_before=not_before)
        records[spec.job_id] = rec
        queue.push(spec.job_id, rec)
    return queue, records


def drain(queue: JobQueue) -> list[str]:
    out: list[str] = []
    while (popped := queue.pop()) is not None:
        job_id, rec = popped
        queue.discard(rec)
        rec.state = DISPATCHED
        out.append(job_id)
    return out


def test_higher_priority_first_then_fifo_and_a_returned_job_goes_first() -> None:
    queue, records = queue_with(("a", 0, 0), ("b", 5, 0), ("c", 0, 0), ("d", 5, 0))
    first = queue.pop()
    assert first is not None and first[0] == "b"
    queue.discard(first[1])
    records[JobId("b")].state = DISPATCHED
    # b comes back (its node died): ahead of every job of its priority
    records[JobId("b")].seq, records[JobId("b")].state = queue.front_seq(), QUEUED
    queue.push(JobId("b"), records[JobId("b")])
    assert queue.size == 4
    assert drain(queue) == ["b", "d", "a", "c"] and queue.size == 0


def test_a_delayed_job_waits_for_its_time_and_stale_entries_are_skipped() -> None:
    queue, records = queue_with(("later", 9, T0 + 10), ("now", 0, 0), ("gone", 0, 0))
    queue.discard(records[JobId("gone")])  # cancelled while queued
    records[JobId("gone")].state = "done"
    assert queue.size == 2
    assert drain(queue) == ["now"]
    queue.release_due(T0 + 9.9)
    assert queue.pop() is None
    queue.release_due(T0 + 10)
    assert drain(queue) == ["later"] and queue.size == 0


def test_restored_seqs_keep_new_jobs_behind_and_returned_ones_ahead() -> None:
    queue = JobQueue({})
    for seq in (-3, 7, 2):
        queue.adopt_seq(seq)
    assert queue.back_seq() == 8
    assert queue.front_seq() == -4
