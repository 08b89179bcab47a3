"""Balancing end to end: real proxy and node processes. A node that joins a busy cluster
gets work, and jobs a node holds without having started them are revoked and run elsewhere.
No timing assertions: where a job ran is read from its result text."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from tests.procs import Cluster, LineConn, submit_many, wait_results

pytestmark = pytest.mark.e2e
RAN_ON = re.compile(r"^slept \d+ ms on (node-\d) ")


def wait_stats(port: int, wanted: str, seconds: float = 20) -> bool:
    """Until the node's `stats` line shows `wanted` (bounded)."""
    with LineConn(port) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if f" {wanted} " in conn.ask("stats"):
                return True
            time.sleep(0.02)
    return False


def ran_on(results: dict[str, str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in results.values():
        match = RAN_ON.match(text)
        assert match, text
        counts[match.group(1)] += 1
    return counts


def test_a_node_joining_a_busy_cluster_gets_work(cluster: Cluster) -> None:
    cluster.start_proxy()
    first = cluster.start_node("node-1", slots=1)
    tickets = submit_many(first.port, ["sleep 200"] * 40)  # 8 s of work for one slot
    cluster.start_node("node-2", slots=4)
    results = wait_results(first.port, tickets, 45)
    assert len(results) == len(tickets), cluster.logs()
    counts = ran_on(results)
    assert sum(counts.values()) == 40
    assert counts["node-2"] >= 1, counts  # all were submitted before it joined


def test_jobs_waiting_at_a_node_move_to_a_node_that_joins(cluster: Cluster) -> None:
    # A prefetch of 20 per slot lets node-1 take every job: the global queue is empty when
    # node-2 joins, so node-2 can only get work by node-1 giving back what it holds.
    cluster.start_proxy(PREFETCH="20")
    first = cluster.start_node("node-1", slots=1)
    tickets = submit_many(first.port, ["sleep 500"] * 16)  # 8 s of work for one slot
    assert wait_stats(first.port, "queued=15"), cluster.logs()  # 1 running, 15 waiting there
    cluster.start_node("node-2", slots=4)
    results = wait_results(first.port, tickets, 45)
    assert len(results) == len(tickets), cluster.logs()
    counts = ran_on(results)
    assert sum(counts.values()) == 16
    assert counts["node-2"] >= 1, counts


def test_a_node_that_slows_down_reports_its_late_jobs_and_gives_back_its_queue(
        cluster: Cluster) -> None:
    # A long INFO_PERIOD keeps the proxy's own rule (jobs it sees running in INFO) from
    # acting first: only the node's timers, armed with each job's overdue_after, can.
    cluster.start_proxy()
    fast = cluster.start_node("node-1", slots=2)
    warm = submit_many(fast.port, ["sleep 50"] * 6)  # the proxy learns what `sleep 50` takes
    assert len(wait_results(fast.port, warm, 20)) == 6, cluster.logs()
    slow = cluster.start_node("node-2", slots=2, SLOW_FACTOR="60", INFO_PERIOD="1000")
    tickets = submit_many(slow.port, ["sleep 50"] * 30)  # 3 s each on node-2
    results = wait_results(slow.port, tickets, 45)
    assert len(results) == len(tickets), cluster.logs()
    counts = ran_on(results)
    # It got 4 (2 slots, 2 prefetched) and ran the 2 it had started: the 2 waiting behind
    # them went back when it said its first jobs were overdue, and ran on node-1.
    assert counts["node-2"] <= 2, counts
    assert counts["node-1"] >= 28, counts
    assert cluster.proxy is not None
    log = cluster.proxy.log_path.read_text()
    assert re.search(r"job\.overdue job_id=\S+ node=node-2 seen_by=node", log), log[-4000:]


def test_sh_jobs_go_only_to_the_nodes_that_run_them(cluster: Cluster) -> None:
    """In a cluster whose nodes differ, a node without ALLOW_SHELL failed every `sh` job it
    was given and, failing them at once, was given about half of them. Each node now says
    in its HELLO the job types it runs, and gets no other; it still gets the rest."""
    proxy = cluster.start_proxy()
    shell = cluster.start_node("node-1", slots=2, ALLOW_SHELL="1")
    plain = cluster.start_node("node-2", slots=4)  # no ALLOW_SHELL
    sh = submit_many(shell.port, [f"sh echo job-{i}" for i in range(40)])
    sleeps = submit_many(shell.port, ["100"] * 12)
    results = wait_results(shell.port, sh + sleeps, 60)
    assert len(results) == 52, cluster.logs()
    assert [results[t] for t in sh] == [f"exit 0: job-{i}" for i in range(40)]
    assert ran_on({t: results[t] for t in sleeps})["node-2"] > 0  # it gets the rest
    assert "sh jobs are disabled" not in plain.log()
    assert "node.info_period_too_long" not in proxy.log()
