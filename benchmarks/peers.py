"""djs side by side with beanstalkd and RQ in one run: ticket throughput (pipelined and
request-reply), drain and latency, in matching durability modes, with djs/peer ratios.

Modes (each system's own setting for "survives kill -9" and "survives a power cut"):
- default: djs default (commit reaches the OS) | beanstalkd -b DIR (fsync every 50 ms) |
  Redis appendonly, appendfsync everysec
- fsync:   djs FSYNC=1 (fsync per group commit) | beanstalkd -b DIR -f 0 (fsync every
  write) | Redis appendonly, appendfsync always

Peers get 3 Python worker processes for drain and latency (beanstalkd: a greenstalk loop
in benchmarks/peer_jobs.py; RQ: the stock `rq worker`). A peer whose server binary or client
library is missing is skipped with a message. Needs `pip install -e '.[bench]'` and
`apt-get install beanstalkd redis-server`.
`python benchmarks/peers.py [--modes default,fsync] [--runs 1] [--json]`
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import drain
import latency
import throughput
from harness import (
    Report,
    finish,
    free_port,
    median_of,
    parser,
    percentile,
    pipelined,
    read_lines,
    request_reply,
    run_clients,
    wait_port,
)

HERE = Path(__file__).resolve().parent
WORKERS = 3
BEANSTALK_FSYNC = {"default": ["-f", "50"], "fsync": ["-f", "0"]}
REDIS_FSYNC = {"default": "everysec", "fsync": "always"}


class Settings:
    def __init__(self, clients: int, jobs: int, rr_jobs: int, drain_jobs: int,
                 count: int, runs: int, rq_drain_jobs: int, rq_worker: str) -> None:
        self.clients, self.jobs, self.rr_jobs = clients, jobs, rr_jobs
        self.drain_jobs, self.count, self.runs = drain_jobs, count, runs
        self.rq_drain_jobs, self.rq_worker = rq_drain_jobs, rq_worker


@contextlib.contextmanager
def _server(cmd: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def _workers(cmd: list[str]) -> Iterator[None]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(WORKERS)]
    try:
        time.sleep(1.0)  # let them connect and block on their queue
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------- beanstalkd

def _put(body: bytes) -> bytes:
    return b"put 0 0 60 %d\r\n%s\r\n" % (len(body), body)


def _bs_drain_client(port: int, index: int, jobs: int) -> int:
    tube = b"results-%d" % index
    sock = socket.create_connection(("127.0.0.1", port))
    buf = bytearray()
    sock.sendall(b"use jobs\r\n" + _put(b"sleep 0 " + tube) * jobs)
    replies = read_lines(sock, jobs + 1, buf)
    if sum(r.startswith(b"INSERTED") for r in replies) != jobs:
        raise RuntimeError("beanstalkd refused a put")
    sock.sendall(b"watch " + tube + b"\r\nignore default\r\n")
    read_lines(sock, 2, buf)
    done = 0
    for _ in range(jobs):  # reserve and delete each result, as a client reads it
        sock.sendall(b"reserve\r\n")
        head = read_lines(sock, 2, buf)[0]  # RESERVED <id> <bytes>, then the body
        job_id = head.split()[1]
        sock.sendall(b"delete " + job_id + b"\r\n")
        done += read_lines(sock, 1, buf)[0] == b"DELETED"
    sock.close()
    return done


def _bs_latency(port: int, count: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    sock.sendall(b"use jobs\r\nwatch results-lat\r\nignore default\r\n")
    read_lines(sock, 3, buf)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(_put(b"sleep 0 results-lat"))
        read_lines(sock, 1, buf)
        sock.sendall(b"reserve\r\n")
        job_id = read_lines(sock, 2, buf)[0].split()[1]
        samples.append((time.perf_counter() - started) * 1000)
        sock.sendall(b"delete " + job_id + b"\r\n")
        read_lines(sock, 1, buf)
    sock.close()
    return samples


def run_beanstalkd(report: Report, mode: str, s: Settings) -> None:
    binary = shutil.which("beanstalkd")
    if binary is None or importlib.util.find_spec("greenstalk") is None:
        report.note("beanstalkd skipped: needs `apt-get install beanstalkd` and greenstalk")
        return
    prefix = f"{mode}_beanstalkd"

    def fresh() -> contextlib.AbstractContextManager[None]:
        return _server([binary, "-l", "127.0.0.1", "-p", str(port), "-b", tmp,
                        *BEANSTALK_FSYNC[mode]], port)

    put = _put(b"sleep 0")
    with tempfile.TemporaryDirectory(prefix="bench-bs-") as tmp:
        port = free_port()
        with fresh():
            report.add(f"{prefix}_pipelined_tickets_per_s", median_of(s.runs, lambda: _rate(
                s.clients, s.jobs, lambda: pipelined(port, put * s.jobs, s.jobs, b"INSERTED"))),
                "puts/s")
            report.add(f"{prefix}_request_reply_tickets_per_s", median_of(s.runs, lambda: _rate(
                s.clients, s.rr_jobs, lambda: request_reply(port, put, s.rr_jobs, b"INSERTED"))),
                "puts/s")
    with tempfile.TemporaryDirectory(prefix="bench-bs-") as tmp:
        port = free_port()
        with fresh(), _workers([sys.executable, str(HERE / "peer_jobs.py"), "beanstalk",
                                str(port)]):
            seconds = median_of(s.runs, lambda: _drain(
                lambda i, n: _bs_drain_client(port, i, n), s.drain_jobs))
            report.add(f"{prefix}_drain_jobs_per_s", s.drain_jobs / seconds, "jobs/s")
            _latency_figures(report, prefix, _bs_latency(port, s.count))


# ---------------------------------------------------------------------- RQ

def run_rq(report: Report, mode: str, s: Settings) -> None:
    binary = shutil.which("redis-server")
    if binary is None or importlib.util.find_spec("rq") is None:
        report.note("RQ skipped: needs `apt-get install redis-server` and rq")
        return
    from peer_jobs import sleep0
    from redis import Redis
    from rq import Queue

    prefix = f"{mode}_rq"
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        port = free_port()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
               "--save", "", "--appendonly", "yes", "--appendfsync", REDIS_FSYNC[mode]]
        with _server(cmd, port):
            url = f"redis://127.0.0.1:{port}"

            def queue() -> Queue:
                return Queue("bench", connection=Redis.from_url(url))

            def enqueue_pipelined(jobs: int) -> int:
                q = queue()
                done = 0
                for start in range(0, jobs, 1000):
                    batch = [Queue.prepare_data(sleep0) for _ in range(min(1000, jobs - start))]
                    done += len(q.enqueue_many(batch))
                return done

            def enqueue_one_by_one(jobs: int) -> int:
                q = queue()
                return sum(1 for _ in range(jobs) if q.enqueue(sleep0).id)

            report.add(f"{prefix}_pipelined_tickets_per_s", median_of(s.runs, lambda: _rate(
                s.clients, s.jobs, lambda: enqueue_pipelined(s.jobs))), "enqueues/s")
            report.add(f"{prefix}_request_reply_tickets_per_s", median_of(s.runs, lambda: _rate(
                s.clients, s.rr_jobs, lambda: enqueue_one_by_one(s.rr_jobs))), "enqueues/s")
            queue().connection.flushall()

            rq_cmd = [str(Path(sys.executable).parent / "rq"), "worker", "-u", url, "-q",
                      "-w", s.rq_worker, "bench"]
            with _workers(rq_cmd):
                seconds = median_of(s.runs, lambda: _drain(
                    lambda _i, n: _rq_drain_client(queue(), n), s.rq_drain_jobs))
                report.add(f"{prefix}_drain_jobs_per_s", s.rq_drain_jobs / seconds, "jobs/s")
                _latency_figures(report, prefix, _rq_latency(queue(), s.count))


def _rq_drain_client(q: object, jobs: int) -> int:
    from peer_jobs import sleep0
    from rq import Queue
    from rq.job import Job

    assert isinstance(q, Queue)
    enqueued = []
    for start in range(0, jobs, 1000):
        batch = [Queue.prepare_data(sleep0) for _ in range(min(1000, jobs - start))]
        enqueued += q.enqueue_many(batch)
    pending = [job.id for job in enqueued]
    deadline = time.monotonic() + 600
    while pending and time.monotonic() < deadline:  # until every result is readable here
        window = Job.fetch_many(pending[:200], connection=q.connection)
        finished = {j.id for j in window if j is not None and j.return_value() is not None}
        pending = [i for i in pending if i not in finished]
        if not finished:
            time.sleep(0.02)
    return len(enqueued) - len(pending)


def _rq_latency(q: object, count: int) -> list[float]:
    from peer_jobs import sleep0
    from rq import Queue

    assert isinstance(q, Queue)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        job = q.enqueue(sleep0)
        result = job.latest_result(timeout=30)
        samples.append((time.perf_counter() - started) * 1000)
        if result is None:
            raise RuntimeError("RQ: no result within 30 s")
    return samples


# ---------------------------------------------------------------------- common

def _rate(clients: int, per_client: int, work: Callable[[], int]) -> float:
    seconds, good = run_clients(clients, lambda _i: work())
    if good != clients * per_client:
        raise RuntimeError(f"{good} accepted of {clients * per_client}")
    return good / seconds


def _drain(client: Callable[[int, int], int], jobs: int) -> float:
    shares = [jobs // 3 + (i < jobs % 3) for i in range(3)]
    seconds, done = run_clients(3, lambda i: client(i, shares[i]))
    if done != jobs:
        raise RuntimeError(f"drain: {done} of {jobs}")
    return seconds


def _latency_figures(report: Report, prefix: str, samples: list[float]) -> None:
    report.add(f"{prefix}_latency_p50_ms", percentile(samples, 0.5), "ms")
    report.add(f"{prefix}_latency_p99_ms", percentile(samples, 0.99), "ms")
    report.add(f"{prefix}_latency_max_ms", max(samples), "ms")


def run_djs(report: Report, mode: str, s: Settings) -> None:
    fsync = mode == "fsync"
    prefix = f"{mode}_djs"
    throughput.run_djs(report, fsync, s.clients, s.jobs, s.rr_jobs, s.runs, prefix)
    drain.run_djs(report, fsync, s.drain_jobs, s.runs, 4, prefix)
    latency.run_djs(report, fsync, s.count, prefix)


RATIOS = ("pipelined_tickets_per_s", "request_reply_tickets_per_s", "drain_jobs_per_s",
          "latency_p50_ms", "latency_p99_ms")


def ratios(report: Report, mode: str) -> None:
    for peer in ("beanstalkd", "rq"):
        for figure in RATIOS:
            ours = report.figures.get(f"{mode}_djs_{figure}")
            theirs = report.figures.get(f"{mode}_{peer}_{figure}")
            if ours and theirs and theirs[0]:
                report.add(f"{mode}_ratio_djs_{peer}_{figure}", ours[0] / theirs[0], "x")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--modes", default="default,fsync")
    p.add_argument("--peers", default="beanstalkd,rq")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--jobs", type=int, default=10_000, help="jobs per pipelined client")
    p.add_argument("--rr-jobs", type=int, default=1_000, help="jobs per request-reply client")
    p.add_argument("--drain-jobs", type=int, default=10_000)
    p.add_argument("--count", type=int, default=500, help="latency samples")
    p.add_argument("--rq-drain-jobs", type=int, default=0,
                   help="drain jobs for RQ (default: --drain-jobs; its forking workers "
                        "run ~50-150 jobs/s here, so 10,000 take minutes)")
    p.add_argument("--rq-worker", default="rq.worker.Worker",
                   help="RQ worker class (the stock forking one by default; "
                        "rq.worker.SimpleWorker does not fork)")
    args = p.parse_args(argv)
    s = Settings(args.clients, args.jobs, args.rr_jobs, args.drain_jobs, args.count, args.runs,
                 args.rq_drain_jobs or args.drain_jobs, args.rq_worker)
    report = Report("peers")
    report.note(f"ratios are djs/peer (for latency, below 1 is better); median of {s.runs}")
    peers = {"beanstalkd": run_beanstalkd, "rq": run_rq}
    for mode in args.modes.split(","):
        run_djs(report, mode, s)
        for name in args.peers.split(","):
            peers[name](report, mode, s)
        ratios(report, mode)
    return finish(report, args.json)


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"client failed: {a.exc_value!r}", file=sys.stderr)
    raise SystemExit(main())
