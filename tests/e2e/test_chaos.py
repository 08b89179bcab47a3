"""Never lose a ticket: SIGKILL random processes, the proxy included, during a mixed
workload, then check every acknowledged ticket ticket by ticket."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from cluster_node.jobtypes import fibonacci
from tests.procs import Cluster, LineConn, wait_results

pytestmark = pytest.mark.e2e

JOBS = int(os.environ.get("CHAOS_JOBS", "2000"))
CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", "20"))
BATCH = 25


def _submitter(port_of: dict[str, int], name: str, jobs: list[str],
               acked: dict[str, tuple[str, str]], stop: threading.Event) -> None:
    """Submit in batches spread over the chaos window; a ticket counts only once its line
    was read back. A batch cut by a kill is retried (its unacknowledged jobs were never
    promised to anyone)."""
    i = 0
    pause = 0.8 * CHAOS_SECONDS / max(1, len(jobs) / BATCH)
    while i < len(jobs) and not stop.is_set():
        time.sleep(pause)
        batch = jobs[i:i + BATCH]
        try:
            with LineConn(port_of[name]) as conn:
                conn.file.write(("\n".join(batch) + "\n").encode())
                conn.file.flush()
                for job in batch:
                    line = conn.expect_line(10)
                    assert line.startswith("Ticket ID: "), line
                    acked[line.removeprefix("Ticket ID: ")] = (name, job)
                    i += 1
        except (OSError, ConnectionError):
            time.sleep(0.1)


@pytest.mark.timeout(300)
def test_sigkill_anything_any_time_loses_no_ticket(cluster: Cluster) -> None:
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "7")))
    cluster.start_proxy(NODE_TIMEOUT="2000")
    names = ["node-1", "node-2", "node-3"]
    for name in names:
        cluster.start_node(name, slots=4)
    port_of = {n: cluster.nodes[n].port for n in names}
    workload = {n: [rng.choice([f"{rng.randint(0, 150)}", f"fib {rng.randint(0, 400)}"])
                    for _ in range(JOBS // 3 + (1 if i < JOBS % 3 else 0))]
                for i, n in enumerate(names)}
    acked: dict[str, tuple[str, str]] = {}
    stop = threading.Event()
    threads = [threading.Thread(target=_submitter, args=(port_of, n, workload[n], acked, stop))
               for n in names]
    for t in threads:
        t.start()
    kills: list[str] = []
    chaos_until = time.monotonic() + CHAOS_SECONDS
    while time.monotonic() < chaos_until:
        time.sleep(rng.uniform(1.0, 2.0))
        victim = rng.choice(["proxy", *names])
        proc = cluster.proxy if victim == "proxy" else cluster.nodes[victim]
        assert proc is not None
        proc.restart()  # SIGKILL, then the same command on the same data directory
        kills.append(victim)
    for t in threads:
        t.join(timeout=60)
    stop.set()
    assert len(acked) == JOBS, f"only {len(acked)} of {JOBS} submitted"

    by_origin: dict[str, list[str]] = {n: [] for n in names}
    for ticket, (origin, _) in acked.items():
        by_origin[origin].append(ticket)
    results: dict[str, str] = {}
    for origin, tickets in by_origin.items():
        results |= wait_results(port_of[origin], tickets, 90)
    lost = [t for t in acked if t not in results]
    assert not lost, f"{len(lost)} tickets without a result after kills {kills}"
    wrong = [(t, job, results[t]) for t, (_, job) in acked.items()
             if job.startswith("fib") and results[t] != str(fibonacci(int(job.split()[1])))]
    assert not wrong, wrong[:5]
    # the first result recorded is the one kept: asking again gives the same text
    for origin, tickets in by_origin.items():
        again = wait_results(port_of[origin], tickets, 10)
        assert again == {t: results[t] for t in tickets}
    duplicates = 0
    for origin in names:
        with LineConn(port_of[origin]) as conn:
            stats = conn.ask("stats")
        duplicates += int(stats.split(" duplicates=")[1].split()[0])
    print(f"chaos: {JOBS} tickets, kills={kills}, duplicate results seen at origins="
          f"{duplicates}")
