"""Scale: 100,000 jobs queued at a real proxy process with 50 connected nodes.

The nodes are lightweight simulations in this process that speak the real protocol over
real sockets (HELLO, INFO, JOB, ACK, RESULT through `common.messages` and the framing);
they take the jobs the proxy dispatches and hold them, so their slots stay full and the
rest of the queue waits at the proxy. Figures:
- the proxy's resident memory with the queue in place;
- a dispatch round over the sockets: every node reports one result at once, and the time
  until each has its replacement job (the proxy runs one round per result);
- one dispatch round of the proxy's pure core (`ProxyState`) in this process, with the same
  queue and nodes, and with a queue 100 times shorter: the cost must not grow with it;
- restart: `kill -9` the proxy, start it on the same data directory, time to `listening`.
`python benchmarks/scale.py [--jobs 100000] [--nodes 50] [--json]`
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import Report, finish, parser

from common.jobs import JobId, JobSpec, NodeId, Outcome, new_job_id
from common.messages import (
    PROTOCOL_VERSION,
    Ack,
    AckOf,
    Challenge,
    Hello,
    Info,
    Job,
    Message,
    Result,
    Welcome,
)
from common.transport import FramedStream
from reverse_proxy.records import ProxySettings
from reverse_proxy.state import ProxyState
from tests.procs import Cluster

SLOTS = 4
CAPACITY = SLOTS * 2  # slots * (1 + prefetch) with the default PREFETCH=1
FRAME_JOBS = 2000


def specs(count: int, origin: NodeId) -> list[JobSpec]:
    now = time.time()
    return [JobSpec(new_job_id(), "sleep", ("0",), origin, now) for _ in range(count)]


class SimNode:
    """A node that holds whatever it is given and acknowledges like a real one."""

    def __init__(self, name: str) -> None:
        self.node_id = NodeId(name)
        self.held: list[JobId] = []
        self.acked = 0
        self.changed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.stream = FramedStream(reader, writer)
        challenge = await self.stream.recv(10)  # the proxy speaks first; no token here
        if not isinstance(challenge, Challenge):
            raise RuntimeError(f"{self.node_id}: expected CHALLENGE, got {challenge}")
        await self.stream.send([Hello(self.node_id, f"sim-{self.node_id}", SLOTS,
                                      PROTOCOL_VERSION, (), (), ())])
        reply = await self.stream.recv(10)
        if not isinstance(reply, Welcome):
            raise RuntimeError(f"{self.node_id}: {reply}")
        self.tasks = [asyncio.create_task(self._recv()), asyncio.create_task(self._info())]

    async def _recv(self) -> None:
        while True:
            out: list[Message] = []
            for msg in await self.stream.recv_batch(60):
                if isinstance(msg, Job):
                    self.held += [s.job_id for s in msg.jobs]
                    out.append(Ack(AckOf.JOB, tuple(s.job_id for s in msg.jobs)))
                elif isinstance(msg, Ack) and msg.of == AckOf.JOB:
                    self.acked += len(msg.ids)
                elif isinstance(msg, Result):  # results for us as the origin
                    out.append(Ack(AckOf.RESULT, tuple(o.job_id for o in msg.outcomes)))
            self.changed.set()
            if out:
                await self.stream.send(out)

    async def _info(self) -> None:
        while True:
            await self.stream.send([Info(len(self.held), 0, SLOTS, 0, 0)])
            await asyncio.sleep(0.5)

    async def wait_for(self, test: Callable[[], bool]) -> None:
        while not test():
            self.changed.clear()
            await self.changed.wait()

    async def finish_one(self) -> float:
        """Report one held job done; seconds until the proxy sends a replacement."""
        job_id = self.held.pop(0)
        before = len(self.held)
        started = time.perf_counter()
        now = time.time()
        await self.stream.send([Result((Outcome(job_id, True, "slept 0 ms", self.node_id,
                                                now, now),))])
        await self.wait_for(lambda: len(self.held) > before)
        return time.perf_counter() - started

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.stream.aclose()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    return kb / 1024


def acked_at_least(sim: SimNode, count: int) -> bool:
    return sim.acked >= count


def holds_at_least(sim: SimNode, count: int) -> bool:
    return len(sim.held) >= count


async def fill(port: int, jobs: int, nodes: int) -> tuple[list[SimNode], float]:
    sims = [SimNode(f"sim-{i:02d}") for i in range(nodes)]
    for sim in sims:
        await sim.connect(port)
    submitter = sims[0]
    total = jobs + nodes * CAPACITY  # the nodes' capacity fills first; `jobs` stay queued
    started = time.perf_counter()
    sent = 0
    while sent < total:
        batch = specs(min(FRAME_JOBS, total - sent), submitter.node_id)
        await submitter.stream.send([Job(tuple(batch))])
        sent += len(batch)
        window = sent - 4 * FRAME_JOBS  # a few frames in flight, no more
        await submitter.wait_for(functools.partial(acked_at_least, submitter, window))
    await submitter.wait_for(functools.partial(acked_at_least, submitter, total))
    seconds = time.perf_counter() - started
    for sim in sims:
        await sim.wait_for(functools.partial(holds_at_least, sim, CAPACITY))
    return sims, total / seconds


def core_round_ms(queued: int, nodes: int) -> float:
    """Median time of `ProxyState.on_message(RESULT)` (which runs one dispatch round) with
    `queued` jobs waiting and `nodes` full nodes, each freeing one slot in turn."""
    state = ProxyState("bench", ProxySettings())
    ids = [NodeId(f"sim-{i:02d}") for i in range(nodes)]
    for node_id in ids:
        state.on_hello(Hello(node_id, "x", SLOTS, PROTOCOL_VERSION, (), (), ()), 0.0)
    state.on_message(ids[0], Job(tuple(specs(queued + nodes * CAPACITY, ids[0]))), 0.0)
    state.take_changes()
    samples = []
    for node_id in ids:
        job_id = next(iter(state.nodes[node_id].assigned))
        result = Result((Outcome(job_id, True, "ok", node_id, 0.0, 0.0),))
        started = time.perf_counter()
        out = state.on_message(node_id, result, 0.0)
        samples.append((time.perf_counter() - started) * 1000)
        state.take_changes()
        if not any(isinstance(o.msg, Job) for o in out):
            raise RuntimeError("no dispatch after a result")
    return statistics.median(samples)


async def over_sockets(report: Report, cluster: Cluster, jobs: int, nodes: int) -> None:
    assert cluster.proxy is not None and cluster.proxy.proc is not None
    sims, rate = await fill(cluster.proxy.port, jobs, nodes)
    try:
        report.add("scale_submit_jobs_per_s", rate, "jobs/s")
        await asyncio.sleep(1.0)
        report.add("scale_proxy_rss_mb", rss_mb(cluster.proxy.proc.pid), "MB")
        waits = await asyncio.gather(*(s.finish_one() for s in sims))
        report.add("scale_refill_all_nodes_ms", max(waits) * 1000, "ms")
        report.add("scale_refill_median_node_ms", statistics.median(waits) * 1000, "ms")
    finally:
        for sim in sims:
            with contextlib.suppress(OSError, ConnectionError):
                await sim.close()


def restart_seconds(cluster: Cluster) -> tuple[float, str]:
    assert cluster.proxy is not None
    cluster.proxy.kill()  # SIGKILL: nothing gets flushed on the way out
    started = time.perf_counter()
    cluster.proxy.restart()
    seconds = time.perf_counter() - started
    restored = re.findall(r"proxy\.restored .*", cluster.proxy.log())
    return seconds, restored[-1] if restored else "?"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], runs=False)
    p.add_argument("--jobs", type=int, default=100_000, help="jobs left queued at the proxy")
    p.add_argument("--nodes", type=int, default=50)
    args = p.parse_args(argv)
    report = Report("scale")
    report.note(f"{args.jobs} queued jobs, {args.nodes} simulated nodes of {SLOTS} slots "
                f"(full), durability {'FSYNC=1' if args.fsync else 'default'}")
    with tempfile.TemporaryDirectory(prefix="djs-bench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            env = {"FSYNC": "1"} if args.fsync else {}
            cluster.start_proxy(DISPATCH_PERIOD="100", NODE_TIMEOUT="5000", **env)
            asyncio.run(over_sockets(report, cluster, args.jobs, args.nodes))
            seconds, restored = restart_seconds(cluster)
            report.add("scale_restart_s", seconds, "s")
            report.note(f"after restart: {restored}")
        finally:
            cluster.stop()
    report.add("scale_core_round_ms", core_round_ms(args.jobs, args.nodes), "ms")
    report.add("scale_core_round_short_queue_ms",
               core_round_ms(max(1, args.jobs // 100), args.nodes), "ms")
    return finish(report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
