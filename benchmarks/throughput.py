"""Ticket throughput: C clients push tiny jobs (`sleep 0`) into one node over raw sockets.

- pipelined: each client sends its J lines at once (as `cat jobs.txt | nc` does) and reads
  the tickets as they come;
- request-reply: each client sends one line and waits for its ticket before the next.

Every ticket is sent only after its job is committed to the node's store (the node's rule),
so the figures are of durable tickets. `python benchmarks/throughput.py [--fsync] [--json]`
"""

from __future__ import annotations

import functools
import time

from harness import (
    TICKET_PREFIX,
    CpuMeter,
    Report,
    djs_cluster,
    finish,
    median_of,
    parser,
    pipelined,
    request_reply,
    run_clients,
)

JOB = b"sleep 0\n"


def measure_pipelined(port: int, clients: int, jobs: int) -> float:
    payload = JOB * jobs
    seconds, good = run_clients(
        clients, lambda _i: pipelined(port, payload, jobs, TICKET_PREFIX))
    if good != clients * jobs:
        raise RuntimeError(f"pipelined: {good} tickets of {clients * jobs}")
    return good / seconds


def measure_request_reply(port: int, clients: int, jobs: int) -> float:
    seconds, good = run_clients(
        clients, lambda _i: request_reply(port, JOB, jobs, TICKET_PREFIX))
    if good != clients * jobs:
        raise RuntimeError(f"request-reply: {good} tickets of {clients * jobs}")
    return good / seconds


def run_djs(report: Report, fsync: bool, clients: int, jobs: int, rr_jobs: int,
            runs: int, prefix: str = "djs") -> None:
    with djs_cluster(1, fsync=fsync) as cluster:
        port = cluster.nodes["node-1"].port
        assert cluster.proxy is not None and cluster.proxy.proc is not None
        node = cluster.nodes["node-1"].proc
        assert node is not None
        cpu = CpuMeter([node.pid, cluster.proxy.proc.pid])
        measure_pipelined(port, clients, min(jobs, 1000))  # warm up
        for kind, measure, count in (("pipelined", measure_pipelined, jobs),
                                     ("request_reply", measure_request_reply, rr_jobs)):
            cpu.start()
            rate = median_of(runs, functools.partial(measure, port, clients, count))
            time.sleep(0.3)  # the node forwards the last jobs to the proxy
            node_cpu, proxy_cpu = cpu.stop()
            tickets = clients * count * max(1, runs)
            report.add(f"{prefix}_{kind}_tickets_per_s", rate, "tickets/s")
            report.add(f"{prefix}_{kind}_node_cpu_us_per_ticket", node_cpu / tickets * 1e6, "us")
            report.add(f"{prefix}_{kind}_proxy_cpu_us_per_ticket", proxy_cpu / tickets * 1e6,
                       "us")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4, help="C: concurrent clients")
    p.add_argument("--jobs", type=int, default=10_000, help="J: jobs per pipelined client")
    p.add_argument("--rr-jobs", type=int, default=1_000,
                   help="jobs per request-reply client")
    args = p.parse_args(argv)
    report = Report("throughput")
    mode = "FSYNC=1" if args.fsync else "default (no fsync)"
    report.note(f"one node, {args.clients} clients, durability {mode}, median of {args.runs}")
    run_djs(report, args.fsync, args.clients, args.jobs, args.rr_jobs, args.runs)
    return finish(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
