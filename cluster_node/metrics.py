"""Prometheus metrics of a cluster node, served at `/metrics` on METRICS_PORT (aiohttp, in
the node's own event loop). Counts come from `NodeState` at scrape time (done, failed and
duplicates are the node's durable counters); the job duration histogram is fed by the
executor through `NodeService.finished_hooks`; the store's, as the proxy's
(`common.store_metrics`). With METRICS_TOKEN, a scrape without it
(`Authorization: Bearer <token>`, Prometheus' `authorization` setting) gets 401.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster_node.service import NodeService
from common import auth
from common.jobs import Outcome
from common.store_metrics import StoreCollector

logger = logging.getLogger(__name__)

# Run time of a job on this node, in seconds.
DURATION_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class NodeMetrics:
    def __init__(self, service: NodeService, token: str | None = None) -> None:
        self.token = token
        self.registry = CollectorRegistry()
        self.job_duration = Histogram(
            "djs_job_duration_seconds", "Run time of the jobs this node ran.",
            buckets=DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_NodeCollector(service))
        self.registry.register(StoreCollector("djs_node_store", service.store_health,
                                              lambda: service.store.stats,
                                              lambda: len(service.state.set_aside)))
        service.finished_hooks.append(self.on_finished)

    def on_finished(self, outcome: Outcome) -> None:
        self.job_duration.observe(max(0.0, outcome.finished_at - outcome.started_at))

    async def start(self, host: str, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        logger.info("metrics.listening host=%s port=%d", host, runner.addresses[0][1])
        return runner

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None and not auth.bearer_allowed(
                self.token, request.headers.get("Authorization", "")):
            return web.Response(status=401, text="this node's /metrics needs METRICS_TOKEN\n",
                                headers={"WWW-Authenticate": 'Bearer realm="djs node"'})
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


class _NodeCollector(Collector):
    def __init__(self, service: NodeService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service, state = self.service, self.service.state
        yield CounterMetricFamily("djs_jobs_submitted", "Tickets this process issued.",
                                  value=service.submitted)
        yield CounterMetricFamily("djs_tickets_expired",
                                  "Tickets this process forgot (RESULT_TTL, MAX_RESULTS).",
                                  value=service.expired)
        yield CounterMetricFamily("djs_jobs_done", "Jobs this node ran that succeeded.",
                                  value=state.done)
        yield CounterMetricFamily("djs_jobs_failed", "Jobs this node ran that failed.",
                                  value=state.failed)
        yield CounterMetricFamily("djs_jobs_duplicated",
                                  "Results for this node's tickets that came again, different.",
                                  value=state.duplicates)
        yield CounterMetricFamily("djs_jobs_abandoned",
                                  "Runs this node stopped, told that another node's run of "
                                  "the job counts (it was declared dead meanwhile).",
                                  value=state.abandoned)
        yield CounterMetricFamily("djs_tickets_repaired",
                                  "Tickets whose record could not be read at the start, read "
                                  "again from the proxy's copy of their result.",
                                  value=state.repaired)
        gauges = {
            "djs_node_slots": ("Jobs this node runs at once.", state.slots),
            "djs_node_running": ("Jobs running now.", len(state.running)),
            "djs_node_queued": ("Jobs dispatched here, not started.", state.queued),
            "djs_node_tickets": ("Tickets this node keeps, with or without a result.",
                                 len(state.tickets)),
            "djs_node_pending_tickets": ("Tickets of this node without a result yet.",
                                         state.pending_tickets),
            "djs_node_unacked_results": ("Results not yet acknowledged by the proxy.",
                                         len(state.finished)),
            "djs_node_proxy_connected": ("1 while the link to the proxy is up.",
                                         int(service.proxy_connected)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
