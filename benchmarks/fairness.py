"""Fairness: one request-reply client alone, then beside one client that pipes `sleep 0`
lines without end into the same node (`cat jobs.txt | nc`); the first one's wait for each
ticket, p50 / p99 / max in milliseconds, and the piping client's tickets per second.
`python benchmarks/fairness.py [--seconds 5] [--fsync] [--json]`
"""

from __future__ import annotations

import socket
import threading
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

FLOOD_CHUNK = b"sleep 0\n" * 2000


def request_reply_waits(port: int, seconds: float) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    waits: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        sock.sendall(b"sleep 0\n")
        line = read_lines(sock, 1, buf)[0]
        waits.append((time.perf_counter() - started) * 1000)
        if not line.startswith(TICKET_PREFIX):
            raise RuntimeError(f"no ticket: {line!r}")
    sock.close()
    return waits


class Flood:
    """A client that pipes lines without end and reads its tickets as they come."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.tickets = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _write(self) -> None:
        while not self.stop.is_set():
            self.sock.sendall(FLOOD_CHUNK)
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            self.tickets += chunk.count(b"\n")

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)
        self.sock.close()


def add_figures(report: Report, prefix: str, waits: list[float]) -> None:
    report.add(f"{prefix}_wait_p50_ms", percentile(waits, 0.5), "ms")
    report.add(f"{prefix}_wait_p99_ms", percentile(waits, 0.99), "ms")
    report.add(f"{prefix}_wait_max_ms", max(waits), "ms")
    report.add(f"{prefix}_tickets", len(waits), "tickets")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], runs=False)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    report = Report("fairness")
    mode = "FSYNC=1" if args.fsync else "default (no fsync)"
    report.note(f"proxy + 1 node, {args.seconds:g} s each, durability {mode}")
    with djs_cluster(1, fsync=args.fsync) as cluster:
        port = cluster.nodes["node-1"].port
        request_reply_waits(port, 0.5)  # warm up
        add_figures(report, "alone", request_reply_waits(port, args.seconds))
        flood = Flood(port)
        time.sleep(1.0)  # under way
        before, started = flood.tickets, time.monotonic()
        add_figures(report, "beside_flood", request_reply_waits(port, args.seconds))
        report.add("flood_tickets_per_s",
                   (flood.tickets - before) / (time.monotonic() - started), "tickets/s")
        flood.end()
    return finish(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
