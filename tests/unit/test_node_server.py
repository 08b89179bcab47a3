"""Unit tests for the pure helper of `reverse_proxy.node_server`: a dispatch split into
frames of a bounded size keeps each job's `overdue_after` with its job."""

from __future__ import annotations

from common.framing import SOFT_FRAME_BYTES
from common.jobs import JobId, JobSpec, NodeId
from common.messages import Job
from reverse_proxy.node_server import _split


def big(n: int) -> JobSpec:
    return JobSpec(JobId(f"job{n}"), "sh", ("x" * (SOFT_FRAME_BYTES // 3),), NodeId("a"), 1.0)


def limits_of(parts: list[object]) -> dict[JobId, float]:
    """Each job's limit, as the node reads it (a part without any: 0 for all its jobs)."""
    out: dict[JobId, float] = {}
    for part in parts:
        assert isinstance(part, Job)
        assert part.overdue_after == () or len(part.overdue_after) == len(part.jobs)
        limits = part.overdue_after or (0.0,) * len(part.jobs)
        out.update({s.job_id: x for s, x in zip(part.jobs, limits, strict=True)})
    return out


def test_a_split_dispatch_keeps_each_limit_with_its_job() -> None:
    specs = tuple(big(n) for n in range(7))
    limits = (0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.3)
    parts: list[object] = list(_split(Job(specs, limits)))
    assert len(parts) > 1
    assert tuple(s for p in parts if isinstance(p, Job) for s in p.jobs) == specs
    assert limits_of(parts) == {s.job_id: x for s, x in zip(specs, limits, strict=True)}


def test_a_split_dispatch_without_limits_has_none() -> None:
    parts = _split(Job(tuple(big(n) for n in range(4))))
    assert len(parts) > 1 and all(isinstance(p, Job) and p.overdue_after == () for p in parts)
