"""Prometheus metrics of the proxy: counters fed by the observer's hooks, gauges read from
`ProxyState` at scrape time, and the store's (`common.store_metrics`). Served at `/metrics`
on the dashboard port.

Counters count since this process started (Prometheus handles resets):
submitted (new jobs stored), dispatched (jobs handed to a node, re-sends after a reconnect
included), retried (hand-offs after a failed attempt or a lost node), rebalanced (jobs a
node gave back unstarted, to run elsewhere), done / failed (first outcomes); duplicated
(second runs: outcomes of another run than the recorded one) and overdue (running jobs
found overdue) are read from the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from reverse_proxy.state import ProxyState

# Dispatch latency (stored at the proxy -> handed to a node) and job run time, in seconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DURATION_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ProxyMetrics:
    def __init__(self, state: Callable[[], ProxyState], store: Collector) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("djs_jobs_submitted", "Jobs stored by the proxy.", registry=r)
        self.dispatched = Counter("djs_jobs_dispatched", "Jobs handed to a node.", registry=r)
        self.retried = Counter("djs_jobs_retried",
                               "Hand-offs of a job after a failed attempt or a lost node.",
                               registry=r)
        self.rebalanced = Counter("djs_jobs_rebalanced",
                                  "Jobs a node gave back unstarted (REVOKE, or reconciled "
                                  "on rejoin), to run elsewhere.", registry=r)
        self.done = Counter("djs_jobs_done", "Jobs whose first outcome succeeded.", registry=r)
        self.failed = Counter("djs_jobs_failed", "Jobs whose first outcome failed.", registry=r)
        self.dispatch_latency = Histogram(
            "djs_dispatch_latency_seconds", "From stored at the proxy to first handed to a "
            "node.", buckets=LATENCY_BUCKETS, registry=r)
        self.job_duration = Histogram(
            "djs_job_duration_seconds", "Run time of a job, as the node that ran it measured.",
            buckets=DURATION_BUCKETS, registry=r)
        r.register(_StateCollector(state))
        r.register(store)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], ProxyState]) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.state()
        yield CounterMetricFamily("djs_jobs_overdue",
                                  "Running jobs found overdue (past their expected time, or "
                                  "past the usual time for jobs with none).",
                                  value=state.overdue_marks)
        yield CounterMetricFamily("djs_jobs_duplicated",
                                  "Outcomes of a second run of a job (at-least-once: the "
                                  "first recorded stands).", value=state.duplicates)
        yield GaugeMetricFamily("djs_queue_length", "Jobs waiting in the global queue.",
                                value=state.queued)
        yield GaugeMetricFamily("djs_jobs_tracked",
                                "Jobs the proxy holds (queued, dispatched, or done and not "
                                "yet delivered to their origin).", value=len(state.jobs))
        yield GaugeMetricFamily("djs_nodes_connected", "Nodes connected and alive.",
                                value=sum(1 for n in state.nodes.values()
                                          if n.connected and n.alive))
        per_node = {
            "slots": ("djs_node_slots", "Slots of each node."),
            "running": ("djs_node_running", "Jobs running on each node (its last INFO)."),
            "queued": ("djs_node_queued", "Jobs waiting at each node (its last INFO)."),
            "assigned": ("djs_node_assigned", "Jobs the proxy has dispatched to each node."),
            "alive": ("djs_node_up", "1 if the node is connected and alive, else 0."),
        }
        families = {k: GaugeMetricFamily(name, doc, labels=["node"])
                    for k, (name, doc) in per_node.items()}
        for n in state.nodes.values():
            values = {"slots": n.slots, "running": n.running, "queued": n.queued,
                      "assigned": len(n.assigned), "alive": int(n.connected and n.alive)}
            for key, value in values.items():
                families[key].add_metric([n.node_id], value)
        yield from families.values()
