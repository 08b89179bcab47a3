"""Drain: N `sleep 0` jobs submitted through the 3 nodes of a proxy + 3 node cluster; the
wall time from the first submission until every result is readable at its origin node.

Each origin gets its share pipelined over one connection, then one pipelined `wait <ticket>`
per job on a second connection: the last answer is the moment the last result is there.
`python benchmarks/drain.py [--jobs 10000] [--fsync] [--json]`
"""

from __future__ import annotations

import socket
import threading
import time

from harness import (
    TICKET_PREFIX,
    CpuMeter,
    Report,
    cluster_pids,
    djs_cluster,
    finish,
    median_of,
    node_ports,
    parser,
    read_lines,
    run_clients,
)


def submit_and_wait(port: int, jobs: int) -> int:
    """Submit `jobs` sleep-0 jobs to one node, then wait for all their results there."""
    sock = socket.create_connection(("127.0.0.1", port))
    sender = threading.Thread(target=sock.sendall, args=(b"sleep 0\n" * jobs,), daemon=True)
    sender.start()
    buf = bytearray()
    tickets = [line.removeprefix(TICKET_PREFIX).decode() for line in read_lines(sock, jobs, buf)]
    sender.join()
    if any(len(t) != 24 for t in tickets):
        raise RuntimeError("a submission was refused")
    waits = "".join(f"wait {t} 120\n" for t in tickets).encode()
    sender = threading.Thread(target=sock.sendall, args=(waits,), daemon=True)
    sender.start()
    results = read_lines(sock, jobs, buf)
    sender.join()
    sock.close()
    return sum(1 for r in results if r.startswith(b"Result: slept 0 ms"))


def measure(ports: list[int], jobs: int) -> float:
    shares = [jobs // len(ports) + (i < jobs % len(ports)) for i in range(len(ports))]
    seconds, done = run_clients(len(ports), lambda i: submit_and_wait(ports[i], shares[i]))
    if done != jobs:
        raise RuntimeError(f"drain: {done} results of {jobs}")
    return seconds


def run_djs(report: Report, fsync: bool, jobs: int, runs: int, slots: int,
            prefix: str = "djs") -> None:
    with djs_cluster(3, fsync=fsync, slots=slots) as cluster:
        ports = node_ports(cluster)
        measure(ports, 300)  # warm up
        time.sleep(0.5)
        cpu = CpuMeter([p.pid for p in cluster_pids(cluster)])
        cpu.start()
        seconds = median_of(runs, lambda: measure(ports, jobs))
        used = cpu.stop()
    report.add(f"{prefix}_drain_seconds", seconds, "s")
    report.add(f"{prefix}_drain_jobs_per_s", jobs / seconds, "jobs/s")
    done = jobs * max(1, runs)
    report.add(f"{prefix}_drain_proxy_cpu_us_per_job", used[0] / done * 1e6, "us")
    report.add(f"{prefix}_drain_nodes_cpu_us_per_job", sum(used[1:]) / done * 1e6, "us")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--slots", type=int, default=4, help="slots of each node")
    args = p.parse_args(argv)
    report = Report("drain")
    mode = "FSYNC=1" if args.fsync else "default (no fsync)"
    report.note(f"proxy + 3 nodes of {args.slots} slots, {args.jobs} sleep-0 jobs, "
                f"durability {mode}, median of {args.runs}")
    run_djs(report, args.fsync, args.jobs, args.runs, args.slots)
    return finish(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
