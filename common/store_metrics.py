"""Prometheus metrics of a process's store, for the node's and the proxy's /metrics: whether
it takes commits, and what its commits cost. A disk that slows down shows in the commit
times before anything fails; records per commit show how much group commit gathers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from common.kvstore import COMMIT_BUCKETS, CommitStats
from common.store_health import StoreHealth


class StoreCollector(Collector):
    """Read at scrape time. `prefix` names the metrics (`djs_store` at the proxy,
    `djs_node_store` at a node); `stats` gives the store in use's (a failed commit reopens
    the store as another object)."""

    def __init__(self, prefix: str, health: StoreHealth,
                 stats: Callable[[], CommitStats], set_aside: Callable[[], int]) -> None:
        self.prefix = prefix
        self.health = health
        self.stats = stats
        self.set_aside = set_aside

    def collect(self) -> Iterator[Metric]:
        kind, stats = self.health.kind, self.stats()
        waits = {"node": "no new job is taken", "proxy": "nodes are refused"}[kind]
        yield GaugeMetricFamily(f"{self.prefix}_healthy",
                                f"1 while the {kind}'s store takes commits; 0 while it fails "
                                f"({waits} meanwhile).", value=int(self.health.healthy))
        bounds = [*(str(b) for b in COMMIT_BUCKETS), "+Inf"]
        yield HistogramMetricFamily(
            f"{self.prefix}_commit_seconds", f"Time of each commit of the {kind}'s store "
            "(one group commit: encoding, statements, COMMIT; and an fsync with FSYNC=1).",
            buckets=list(zip(bounds, accumulate(stats.buckets), strict=True)),
            sum_value=stats.seconds)
        yield CounterMetricFamily(f"{self.prefix}_records_committed",
                                  "Records written or deleted by the commits.",
                                  value=stats.records)
        yield CounterMetricFamily(f"{self.prefix}_commit_failures",
                                  "Commits that failed (a full disk, an I/O error), the "
                                  "probes' while the store fails included.",
                                  value=stats.failures)
        yield GaugeMetricFamily(f"{self.prefix}_records_set_aside",
                                "Damaged records a restore could not read, kept aside under "
                                "x: keys (common/set_aside.py); 0 on a sound store.",
                                value=self.set_aside())
