"""Latency: one job at a time on an idle proxy + 1 node cluster, N times: from sending
`sleep 0` to reading its result with `wait <ticket>`; p50 / p99 / max in milliseconds.
`python benchmarks/latency.py [--count 500] [--fsync] [--json]`
"""

from __future__ import annotations

import socket
import time

from harness import (
    TICKET_PREFIX,
    Report,
    djs_cluster,
    finish,
    parser,
    percentile,
    read_lines,
)


def measure(port: int, count: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(b"sleep 0\n")
        ticket = read_lines(sock, 1, buf)[0].removeprefix(TICKET_PREFIX)
        sock.sendall(b"wait " + ticket + b" 30\n")
        result = read_lines(sock, 1, buf)[0]
        samples.append((time.perf_counter() - started) * 1000)
        if not result.startswith(b"Result: "):
            raise RuntimeError(f"no result: {result!r}")
    sock.close()
    return samples


def add_figures(report: Report, prefix: str, samples: list[float]) -> None:
    report.add(f"{prefix}_latency_p50_ms", percentile(samples, 0.5), "ms")
    report.add(f"{prefix}_latency_p99_ms", percentile(samples, 0.99), "ms")
    report.add(f"{prefix}_latency_max_ms", max(samples), "ms")


def run_djs(report: Report, fsync: bool, count: int, prefix: str = "djs") -> None:
    with djs_cluster(1, fsync=fsync) as cluster:
        port = cluster.nodes["node-1"].port
        measure(port, 20)  # warm up
        add_figures(report, prefix, measure(port, count))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], runs=False)
    p.add_argument("--count", type=int, default=500)
    args = p.parse_args(argv)
    report = Report("latency")
    mode = "FSYNC=1" if args.fsync else "default (no fsync)"
    report.note(f"proxy + 1 node, {args.count} jobs one at a time, durability {mode}")
    run_djs(report, args.fsync, args.count)
    return finish(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
