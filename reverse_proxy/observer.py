"""Watches the proxy's traffic for the dashboard and the metrics, without changing it.

`ProxyServer` calls `received()` for every message from a node *before* `ProxyState`
handles it (so "is this job new?" can be asked), `handled()` after (what became of it: a
failed attempt may be queued again for a retry), and `sent()` for every message it routes
to a node *after* the state produced it (a result on its way to its origin is final, also
one the proxy made itself). The observer only reads the state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.registry import Collector

from common.jobs import JobId, NodeId, Outcome
from common.messages import Info, Job, Message, Output, ResReq, Result, Returned
from reverse_proxy.history import JobHistory, Throughput
from reverse_proxy.metrics import ProxyMetrics
from reverse_proxy.records import DONE
from reverse_proxy.state import ProxyState

# Arrival times kept for the dispatch-latency histogram; beyond this the oldest are dropped.
MAX_ARRIVALS = 1_000_000


class ProxyObserver:
    def __init__(self, state: Callable[[], ProxyState], store: Collector) -> None:
        self.state = state
        self.history = JobHistory()
        self.throughput = Throughput()
        self.metrics = ProxyMetrics(state, store)
        self._arrived: dict[JobId, float] = {}  # monotonic time a new job was stored
        self._fresh: list[Outcome] = []  # first outcomes of the message being handled
        self.completed = 0  # first outcomes seen by this process

    def received(self, node: NodeId, msg: Message) -> None:
        match msg:
            case Job():
                self._on_submissions(msg)
            case Result() | ResReq():
                self._on_outcomes(msg.outcomes)
            case Output():
                self.history.on_output(msg.job_id, node, msg.lines)
            case Info():
                for job_id, started in zip(msg.running_ids, msg.running_started,
                                           strict=False):
                    if started:
                        self.history.on_running(job_id, node, started)
            case Returned():
                self.metrics.rebalanced.inc(len(msg.ids))
                wall = time.time()
                for job_id in msg.ids:
                    self.history.on_requeued(job_id, node, wall)

    def _on_submissions(self, msg: Job) -> None:
        jobs = self.state().jobs
        now = time.monotonic()
        new = 0
        for spec in msg.jobs:
            if spec.job_id in jobs:
                continue  # re-sent after a lost ACK
            new += 1
            self.history.on_submitted(spec)
            if len(self._arrived) < MAX_ARRIVALS:
                self._arrived[spec.job_id] = now
        if new:
            self.metrics.submitted.inc(new)

    def _on_outcomes(self, outcomes: tuple[Outcome, ...]) -> None:
        jobs = self.state().jobs
        for outcome in outcomes:
            rec = jobs.get(outcome.job_id)
            if rec is None:
                continue  # delivered and forgotten already
            if rec.state == DONE:
                continue  # a copy, or a second run (the state counts those)
            (self.metrics.done if outcome.ok else self.metrics.failed).inc()
            self.completed += 1
            self.metrics.job_duration.observe(max(0.0, outcome.finished_at - outcome.started_at))
            self._fresh.append(outcome)
            self._arrived.pop(outcome.job_id, None)

    def handled(self, node: NodeId, msg: Message) -> None:
        fresh, self._fresh = self._fresh, []
        jobs = self.state().jobs
        for outcome in fresh:
            rec = jobs.get(outcome.job_id)
            if rec is None:  # finished and forgotten at once: its origin ran it
                self.history.on_outcome(outcome)
            elif rec.state == DONE and rec.outcome is not None:
                self.history.on_outcome(rec.outcome)  # with its failed attempts, if any
            elif (outcome.node, outcome.started_at) in rec.retried:
                self.history.on_attempt_failed(outcome)

    def sent(self, node: NodeId, msg: Message) -> None:
        if isinstance(msg, Result):  # to the origin: final
            for outcome in msg.outcomes:
                self.history.on_outcome(outcome)
            return
        if not isinstance(msg, Job):
            return
        jobs = self.state().jobs
        mono, wall = time.monotonic(), time.time()
        retried = 0
        self.metrics.dispatched.inc(len(msg.jobs))
        for spec in msg.jobs:
            rec = jobs.get(spec.job_id)
            if rec is not None and rec.history:  # failed attempts and lost nodes, not revokes
                retried += 1
            arrived = self._arrived.pop(spec.job_id, None)
            if arrived is not None:
                self.metrics.dispatch_latency.observe(mono - arrived)
            self.history.on_dispatched(spec, node, wall)
        if retried:
            self.metrics.retried.inc(retried)

    def sample(self) -> None:
        """One throughput sample (the dashboard calls this once a second)."""
        state = self.state()
        self.throughput.sample(time.time(), self.completed, state.queued)
