"""Shared pieces of the benchmarks: figures and their report, argument parsing, and djs
clusters started as real processes through the test harness (`tests/procs.py`).

Run every benchmark from the repository root: `python benchmarks/<name>.py [--json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

from tests.procs import Cluster  # noqa: E402

TICKET_PREFIX = b"Ticket ID: "


@dataclass
class Report:
    """Figures in the order they were measured: `name=value unit` lines, or one JSON object."""

    name: str
    figures: dict[str, tuple[float, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str) -> float:
        self.figures[name] = (value, unit)
        print(f"{name}={_fmt(value)} {unit}", flush=True)
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"# {text}", flush=True)

    def json(self) -> str:
        return json.dumps({"benchmark": self.name, "notes": self.notes,
                           "figures": {k: {"value": v, "unit": u}
                                       for k, (v, u) in self.figures.items()}})


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) >= 100:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def parser(description: str, runs: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes; `--runs` only where it repeats its measurements
    (a benchmark that makes one run refuses it, rather than print one run as a median)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    if runs:
        p.add_argument("--runs", type=int, default=1, help="repeat and report the median")
    p.add_argument("--fsync", action="store_true",
                   help="run djs with FSYNC=1 (power-loss durability)")
    return p


def finish(report: Report, as_json: bool) -> int:
    if as_json:
        print(report.json(), flush=True)
    return 0


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(max(1, runs)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def durability_env(fsync: bool) -> dict[str, str]:
    return {"FSYNC": "1"} if fsync else {}


@contextlib.contextmanager
def djs_cluster(nodes: int, fsync: bool = False, slots: int = 4,
                **proxy_env: str) -> Iterator[Cluster]:
    """A proxy and `nodes` nodes as real processes on free ports, with default periods
    (not the tests' shortened ones), stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="djs-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        env = durability_env(fsync)
        try:
            cluster.start_proxy(**{"DISPATCH_PERIOD": "100", "NODE_TIMEOUT": "5000",
                                   **env, **proxy_env})
            for i in range(1, nodes + 1):
                cluster.start_node(f"node-{i}", slots, None, INFO_PERIOD="500", **env)
            yield cluster
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.stop()


def cluster_pids(cluster: Cluster) -> list[subprocess.Popen[bytes]]:
    """The proxy's process first, then the nodes'."""
    procs = [p.proc for p in (cluster.proxy, *cluster.nodes.values()) if p is not None]
    return [p for p in procs if p is not None]


def node_ports(cluster: Cluster) -> list[int]:
    return [p.port for p in cluster.nodes.values()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc): a figure that the
    other load on a shared machine disturbs far less than wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by some processes between `start()` and `stop()`."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.used = [0.0] * len(pids)

    def start(self) -> None:
        self._at = [cpu_seconds(p) for p in self.pids]

    def stop(self) -> list[float]:
        self.used = [cpu_seconds(p) - a for p, a in zip(self.pids, self._at, strict=True)]
        return self.used


# ---------------------------------------------------------------------- raw line clients

def read_lines(sock: socket.socket, count: int, buf: bytearray) -> list[bytes]:
    """Read until `count` complete lines are in; leftovers stay in `buf`."""
    while buf.count(b"\n") < count:
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed by the server")
        buf += data
    lines: list[bytes] = []
    for _ in range(count):
        end = buf.index(b"\n")
        lines.append(bytes(buf[:end]).rstrip(b"\r"))
        del buf[:end + 1]
    return lines


def wait_idle(port: int, timeout: float = 300.0) -> None:
    """Until the node at `port` holds no ticket without its result (its `stats` line says
    pending=0): the jobs of the last run have all finished, the next run starts on an idle
    cluster rather than beside the execution of 40,000 jobs."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port)) as sock:
        buf = bytearray()
        while True:
            sock.sendall(b"stats\n")
            line = read_lines(sock, 1, buf)[0]
            fields = dict(f.split(b"=", 1) for f in line.split() if b"=" in f)
            if fields.get(b"pending") == b"0":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node still holds unfinished tickets: {line[:200]!r}")
            time.sleep(0.1)


def pipelined(port: int, payload: bytes, replies: int, ok_prefix: bytes) -> int:
    """Send a whole batch as `cat jobs.txt | nc` does while reading the replies; the number
    of replies that start with `ok_prefix`."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    buf = bytearray()
    good = 0
    remaining = replies
    while remaining:
        while b"\n" not in buf:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed by the server")
            buf += data
        cut = buf.rindex(b"\n") + 1
        chunk = bytes(buf[:cut])
        del buf[:cut]
        lines = chunk.split(b"\n")[:-1]
        good += sum(1 for line in lines if line.startswith(ok_prefix))
        remaining -= len(lines)
    sender.join()
    sock.close()
    return good


def request_reply(port: int, line: bytes, count: int, ok_prefix: bytes,
                  reply_lines: int = 1) -> int:
    """One request, wait for its answer, the next request."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    good = 0
    for _ in range(count):
        sock.sendall(line)
        first = read_lines(sock, reply_lines, buf)[0]
        good += first.startswith(ok_prefix)
    sock.close()
    return good


def run_clients(clients: int, work: Callable[[int], int]) -> tuple[float, int]:
    """Run `work(i)` in `clients` threads started together; (seconds, sum of results)."""
    results = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def body(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started, sum(results)
