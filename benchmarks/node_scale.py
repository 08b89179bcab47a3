"""Node scale: one node of a proxy + 1 node cluster made to hold N tickets with their results
(4 clients pipe `sleep 0` lines in rounds of 50,000 each), then: its resident memory and
store size, the time from `kill -9` to `listening` again on the same data directory, and its
resident memory after the restart. `python benchmarks/node_scale.py [--tickets 1000000]
[--fsync] [--json]`
"""

from __future__ import annotations

import functools
import time

from harness import (
    TICKET_PREFIX,
    Report,
    djs_cluster,
    finish,
    parser,
    pipelined,
    run_clients,
    wait_idle,
)

CLIENTS = 4
ROUND = 50_000  # lines per client and round: a round is 200,000 tickets
SETTLE_SECONDS = 60.0  # at least, for every job to run and every result to be stored


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def fill(port: int, tickets: int) -> None:
    left = tickets
    while left > 0:
        per_client = min(ROUND, -(-left // CLIENTS))
        _, good = run_clients(CLIENTS, functools.partial(_pipe, port, per_client))
        if good != CLIENTS * per_client:
            raise RuntimeError(f"fill: {good} tickets of {CLIENTS * per_client}")
        left -= good


def _pipe(port: int, lines: int, _client: int) -> int:
    return pipelined(port, b"sleep 0\n" * lines, lines, TICKET_PREFIX)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], runs=False)
    p.add_argument("--tickets", type=int, default=1_000_000, help="N: tickets the node holds")
    args = p.parse_args(argv)
    report = Report("node_scale")
    with djs_cluster(1, fsync=args.fsync) as cluster:
        node = cluster.nodes["node-1"]
        assert node.proc is not None
        fill(node.port, args.tickets)
        store = next(cluster.tmp.glob("**/node.sqlite"))
        # Every job run and its result stored (a node drains ~5,000 jobs/s here): until
        # 2026-11-24 this waited at most 60 s and measured whatever state it was in then,
        # with two thirds of 1,000,000 tickets still without their results.
        wait_idle(node.port, timeout=max(SETTLE_SECONDS, args.tickets / 1000))
        report.note(f"{args.tickets} tickets held by one node, durability "
                    f"{'FSYNC=1' if args.fsync else 'default'}")
        report.add("node_scale_rss_mb", resident_mb(node.proc.pid), "MB")
        report.add("node_scale_store_mb", store.stat().st_size / 2**20, "MB")
        node.kill()
        started = time.perf_counter()
        node.start()
        report.add("node_scale_restart_s", time.perf_counter() - started, "s")
        time.sleep(2)  # the restored heap settles (one collection, then frozen)
        assert node.proc is not None
        report.add("node_scale_rss_after_restart_mb", resident_mb(node.proc.pid), "MB")
    return finish(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
