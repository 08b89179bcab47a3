"""A bounded, in-memory history of recent jobs for the dashboard. Pure: times are arguments.

The proxy forgets a job once its result reached the origin node; the dashboard still wants
to show it. `JobHistory` keeps the last `capacity` jobs it heard of (submission, each
dispatch, the first outcome), newest last, and drops the oldest beyond that. It is fed by
the proxy shell's hooks (`reverse_proxy.observer`) and never written to disk: after a
proxy restart it starts empty, and jobs it sees again are re-created from their specs.

`Throughput` keeps one sample per period of (time, completed count, queue length) for the
dashboard's chart.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from common.jobs import PROXY_NODE, JobId, JobSpec, NodeId, Outcome

QUEUED, DISPATCHED = "queued", "dispatched"
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
JOB_STATES = (QUEUED, DISPATCHED, *FINISHED)
# Enough for a screenful of recent work and a search by ticket; about 1 KiB each.
HISTORY_CAPACITY = 5000
# Live output kept per job for its detail view (`sh` jobs; lines are cut by the node).
OUTPUT_LINES = 200
# One sample a second: five minutes of chart.
THROUGHPUT_SAMPLES = 300
# How an attempt ended that gave no result: its node gave it back unstarted (REVOKE), or the
# proxy took it back from a node declared dead.
GIVEN_BACK_ATTEMPT = "given back before it started"
NODE_LOST_ATTEMPT = "no result: its node was lost"


@dataclass(slots=True)
class Attempt:
    node: NodeId
    dispatched_at: float  # wall clock, seconds since the epoch
    # When it ended there, and how: its outcome (a failed attempt that was retried, the last
    # one when the job finishes), given back unstarted, or its node lost.
    finished_at: float | None = None
    result: str | None = None


@dataclass(slots=True)
class JobEntry:
    ticket: JobId
    job_type: str
    args: tuple[str, ...]
    origin: NodeId
    submitted_at: float
    state: str = QUEUED
    node: NodeId | None = None
    attempts: list[Attempt] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))

    def to_json(self, with_output: bool = False) -> dict[str, object]:
        """The job; `with_output` adds its last live output lines (the detail view)."""
        body: dict[str, object] = {
            "ticket": self.ticket, "type": self.job_type, "args": list(self.args),
            "origin": self.origin, "state": self.state, "node": self.node,
            "submitted_at": self.submitted_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "result": self.result,
            "attempts": [{"node": a.node, "dispatched_at": a.dispatched_at,
                          "finished_at": a.finished_at, "result": a.result}
                         for a in self.attempts],
        }
        if with_output:
            body["output"] = list(self.output)
        return body


class JobHistory:
    def __init__(self, capacity: int = HISTORY_CAPACITY) -> None:
        self.capacity = capacity
        self._jobs: OrderedDict[JobId, JobEntry] = OrderedDict()
        self.version = 0  # bumped on every change, so pushers can skip idle rounds

    def __len__(self) -> int:
        return len(self._jobs)

    def _entry(self, spec: JobSpec) -> JobEntry:
        entry = self._jobs.get(spec.job_id)
        if entry is None:
            entry = JobEntry(spec.job_id, spec.job_type, spec.args, spec.origin,
                             spec.submitted_at)
            self._jobs[spec.job_id] = entry
            while len(self._jobs) > self.capacity:
                self._jobs.popitem(last=False)
        self.version += 1
        return entry

    def on_submitted(self, spec: JobSpec) -> None:
        self._entry(spec)

    def on_dispatched(self, spec: JobSpec, node: NodeId, now: float) -> None:
        entry = self._entry(spec)
        if entry.state in FINISHED:
            return
        last = entry.attempts[-1] if entry.attempts else None
        if last is not None and last.node == node and entry.state == DISPATCHED:
            return  # the same hand-off re-sent after a reconnect
        # Still open, neither a result nor a give-back ended it: the proxy took the job back
        # from a node declared dead (or that came back with an empty data directory).
        _end_open_attempt(entry, now, NODE_LOST_ATTEMPT)
        entry.state, entry.node, entry.started_at = DISPATCHED, node, None
        entry.attempts.append(Attempt(node, now))

    def on_running(self, job_id: JobId, node: NodeId, started: float) -> None:
        """The node running the job's attempt says when it started (its INFO)."""
        entry = self._jobs.get(job_id)
        if (entry is not None and entry.state == DISPATCHED and entry.node == node
                and entry.started_at != started):
            entry.started_at = started
            self.version += 1

    def on_requeued(self, job_id: JobId, node: NodeId, now: float) -> None:
        """`node` gave the job back before it started it (a REVOKE)."""
        entry = self._jobs.get(job_id)
        if entry is not None and entry.state == DISPATCHED and entry.node == node:
            _end_open_attempt(entry, now, GIVEN_BACK_ATTEMPT)
            entry.state, entry.node, entry.started_at = QUEUED, None, None
            self.version += 1

    def on_outcome(self, outcome: Outcome) -> None:
        """The job's final outcome (after its retries; the proxy's own when it ended it
        there: cancelled while queued, its node lost too often)."""
        entry = self._jobs.get(outcome.job_id)
        if entry is None or entry.state in FINISHED:
            return  # the first outcome stands; an unseen job has no spec to show
        entry.state = outcome.state  # done, failed or cancelled, as JOB_STATES names them
        # ended by the proxy: no node; never ran (cancelled first): no start
        entry.node = None if outcome.node == PROXY_NODE else outcome.node
        entry.result = outcome.output
        entry.started_at = None if outcome.never_ran else outcome.started_at
        entry.finished_at = outcome.finished_at
        self._attempt_ended(entry, outcome)
        self.version += 1

    def on_attempt_failed(self, outcome: Outcome) -> None:
        """An attempt failed and the job was queued again for another (its retries)."""
        entry = self._jobs.get(outcome.job_id)
        if entry is None or entry.state in FINISHED:
            return
        entry.state, entry.node, entry.started_at = QUEUED, None, None
        self._attempt_ended(entry, outcome)
        self.version += 1

    @staticmethod
    def _attempt_ended(entry: JobEntry, outcome: Outcome) -> None:
        last = entry.attempts[-1] if entry.attempts else None
        if last is not None and last.node == outcome.node:
            _end_open_attempt(entry, outcome.finished_at, outcome.output)
        elif outcome.node == PROXY_NODE:  # it ended the job there: cancelled, or lost too often
            _end_open_attempt(entry, outcome.finished_at, NODE_LOST_ATTEMPT)

    def on_output(self, job_id: JobId, node: NodeId, lines: tuple[str, ...]) -> None:
        """Live output of a running job, from the node it runs on (others are ignored)."""
        entry = self._jobs.get(job_id)
        if entry is not None and entry.state == DISPATCHED and entry.node == node:
            entry.output.extend(lines)
            self.version += 1

    def get(self, ticket: str) -> JobEntry | None:
        return self._jobs.get(JobId(ticket))

    def recent(self, state: str | None = None, search: str = "",
               limit: int = 100) -> list[JobEntry]:
        """Newest first; `state` filters, `search` matches a part of the ticket."""
        out: list[JobEntry] = []
        for entry in reversed(self._jobs.values()):
            if _matches(entry, state, search):
                out.append(entry)
                if len(out) >= limit:
                    break
        return out

    def matching(self, state: str | None = None, search: str = "") -> int:
        """How many jobs `recent` would give without a limit."""
        return sum(1 for entry in self._jobs.values() if _matches(entry, state, search))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        for entry in self._jobs.values():
            counts[entry.state] += 1
        return counts


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # wall clock
    completed: int  # outcomes recorded so far
    queue: int  # global queue length
    rate: float  # outcomes per second since the previous sample


class Throughput:
    def __init__(self, size: int = THROUGHPUT_SAMPLES) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)

    def sample(self, now: float, completed: int, queue: int) -> Sample:
        rate = 0.0
        if self.samples:
            prev = self.samples[-1]
            if now > prev.t and completed >= prev.completed:
                rate = (completed - prev.completed) / (now - prev.t)
        sample = Sample(now, completed, queue, rate)
        self.samples.append(sample)
        return sample


def _end_open_attempt(entry: JobEntry, at: float, result: str) -> None:
    """End the job's last attempt, if it has one still open, at `at`, saying `result`."""
    last = entry.attempts[-1] if entry.attempts else None
    if last is not None and last.finished_at is None:
        last.finished_at, last.result = at, result


def _matches(entry: JobEntry, state: str | None, search: str) -> bool:
    return (not state or entry.state == state) and (not search or search in entry.ticket)
