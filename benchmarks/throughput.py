"""Ticket throughput: C clients push tiny jobs (`sleep 0`) into one node over raw sockets.

- pipelined: each client sends its J lines at once (as `cat jobs.txt | nc` does) and reads
  the tickets as they come;
- request-reply: each client sends one line and waits for its ticket before the next.

Every ticket is sent only after its job is committed to the node's store (the node's rule),
so the figures are of durable tickets. Each run starts on an idle cluster (the jobs of the
runs before have all finished), and the CPU figures are of the runs themselves.
`python benchmarks/throughput.py [--fsync] [--json]`
"""

from __future__ import annotations

from collections.abc import Callable

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
    wait_idle,
)

JOB = b"sleep 0\n"


Measure = Callable[[int, int, int], float]


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
            used = [0.0, 0.0]  # node, proxy: CPU seconds during the runs

            def one_run(measure: Measure = measure, count: int = count,
                        used: list[float] = used) -> float:
                wait_idle(port)  # every run starts on an idle cluster
                cpu.start()
                rate = measure(port, clients, count)
                used[:] = [a + b for a, b in zip(used, cpu.stop(), strict=True)]
                return rate

            rate = median_of(runs, one_run)
            tickets = clients * count * max(1, runs)
            report.add(f"{prefix}_{kind}_tickets_per_s", rate, "tickets/s")
            report.add(f"{prefix}_{kind}_node_cpu_us_per_ticket", used[0] / tickets * 1e6, "us")
            report.add(f"{prefix}_{kind}_proxy_cpu_us_per_ticket", used[1] / tickets * 1e6,
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
