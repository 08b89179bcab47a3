"""Node scale: one node of a proxy + 1 node cluster made to hold N tickets with their results
(4 clients pipe `sleep 0` lines in rounds of 50,000 each), then: its resident memory and
store size, the time from `kill -9` to `listening` again on the same data directory, and its
resident memory after the restart. `python benchmarks/node_scale.py [--tickets 1000000]
[--fsync] [--json]`
"""

from __future__ import annotations

import functools
import socket
import time

from harness import TICKET_PREFIX, Report, djs_cluster, finish, parser, pipelined, run_clients

CLIENTS = 4
ROUND = 50_000  # lines per client and round: a round is 200,000 tickets
SETTLE_SECONDS = 60.0  # at most, for every job to run and every result to be stored


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
        deadline = time.monotonic() + SETTLE_SECONDS
        while b" pending=0 " not in _stats(node.port) and time.monotonic() < deadline:
            time.sleep(0.5)
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


def _stats(port: int) -> bytes:
    """The node's `stats` line (it says how many of its tickets still wait for a result)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"stats\nexit\n")
        return b"".join(iter(lambda: sock.recv(65536), b""))


if __name__ == "__main__":
    raise SystemExit(main())
