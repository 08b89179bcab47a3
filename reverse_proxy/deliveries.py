"""Results on their way back to the node each job came from, and the memory of jobs
delivered and forgotten. Pure: times are arguments.

A done job's outcome is owed to its origin until the origin acknowledges storing it. It is
offered at once when the origin is connected, and the periodic sync (RES_REQ) offers again
what was last offered over a period ago (or never, while the origin was away). Once it is
delivered the proxy forgets the job, but remembers for a while which run it recorded, so
that a second run reported later (at-least-once) is told from a re-send of the first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from common.jobs import JobId, NodeId, Outcome

# Forgotten jobs whose recorded run is remembered, so that a second run reported after the
# origin got the first is still counted as a duplicate (about 100 bytes each; not stored).
FORGOTTEN_MEMORY = 50_000
# A job's recorded run: the node it ran on and when it started.
Run = tuple[NodeId, float]


class Deliveries:
    def __init__(self, memory: int = FORGOTTEN_MEMORY) -> None:
        self.memory = memory
        # origin -> done jobs it has not acknowledged, with when they were last offered
        # (0: never, or not since the proxy started)
        self._owed: dict[NodeId, dict[JobId, float]] = {}
        self._forgotten: OrderedDict[JobId, Run] = OrderedDict()  # oldest first

    def owe(self, origin: NodeId, job_id: JobId, offered: float = 0.0) -> None:
        """`origin` is owed this job's outcome, last offered at `offered`."""
        self._owed.setdefault(origin, {})[job_id] = offered

    def due(self, origin: NodeId, now: float, older_than: float,
            outcome_of: Callable[[JobId], Outcome | None]) -> list[Outcome]:
        """The outcomes owed to `origin` last offered before `older_than`, marked offered
        `now`."""
        owed = self._owed.get(origin, {})
        due: list[Outcome] = []
        for job_id, offered in owed.items():
            outcome = outcome_of(job_id)
            if offered < older_than and outcome is not None:
                due.append(outcome)
                owed[job_id] = now
        return due

    def forget(self, origin: NodeId, job_id: JobId, run: Run | None) -> None:
        """The job is gone (delivered, or never owed): owe nothing, remember its run."""
        self._owed.get(origin, {}).pop(job_id, None)
        if run is not None:
            self._forgotten[job_id] = run
            while len(self._forgotten) > self.memory:
                self._forgotten.popitem(last=False)

    def recorded_run(self, job_id: JobId) -> Run | None:
        """The run recorded for a job forgotten lately, if it is still remembered."""
        return self._forgotten.get(job_id)
