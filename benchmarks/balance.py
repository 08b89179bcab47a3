"""Balance: how busy the slots stay and how close the finish time comes to its lower bound.

A real proxy and 4 nodes with 1, 2, 4 and 8 slots run as processes on free ports. 2,000 sleep
jobs of 5-100 ms (random, fixed seed) are submitted through the nodes at once. While they
run, every node's `stats` line is sampled; afterwards every result (it names its node and
when the sleep started and finished) is read back with `getall`. Figures, per scenario:

- makespan: first submission to last finish; lower_bound: the larger of total work / total
  slots and the longest job; their ratio;
- busy: mean fraction of all slots running a job over the 50 ms bins in which the global
  queue was non-empty (computed from the results' start and finish times), and over those
  in which any job waited, at the proxy or queued at a node;
- spread: per-slot load ((running + queued at the node) / slots) of the most minus the least
  loaded node, its largest and mean value over those bins.

Scenarios: `balanced` (this proxy), `original` (the original's policy: timer-only dispatch
of 30 jobs every 5 s to the shortest reported queue, no prefetch bound; by default on the
first 300 jobs, since 2,000 take 5.5 minutes at 6 jobs/s: `--original-jobs 2000`),
`queue_length` (the original's policy at this proxy's dispatch rate, to separate policy from
rate), `join` (a fifth node with 4 slots joins 2 s in: time from its connection to all its
slots busy) and `slow` (the 8-slot node's sleeps take 10x longer from 2 s on: time from the
first slow job to its node holding no queued job).

`python benchmarks/balance.py [--json] [--scenarios balanced,original,...]`
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

from tests.procs import Cluster, LineConn, submit_many  # noqa: E402

SLOTS = {"node-1": 1, "node-2": 2, "node-3": 4, "node-4": 8}
DISPATCH_PERIOD_MS = 100
BIN = 0.05  # seconds per bin of the timeline
SAMPLE_PERIOD = 0.02  # seconds between `stats` samples of one node
RESULT = re.compile(r"slept (\d+) ms on (\S+) \(started (\S+), finished (\S+)\)")
STATS_FIELD = re.compile(r"(\w+)=(\S+)")
SCENARIOS = ("balanced", "original", "queue_length", "join", "slow")


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    node: str
    slots: int
    running: int
    queued: int
    pending: int
    connected: bool
    queue: int | None  # the global queue, as the proxy last told this node


@dataclass(frozen=True, slots=True)
class Ran:
    node: str
    ms: int
    start: float
    end: float


@dataclass
class Run:
    t0: float
    slots: dict[str, int]
    ran: list[Ran] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=dict)


def parse_stats(line: str, now: float) -> Sample:
    local, _, cluster = line.partition(" | ")
    f = dict(STATS_FIELD.findall(local))
    queue = re.search(r"queue=(\d+)", cluster)
    return Sample(now, f["node"], int(f["slots"]), int(f["running"]), int(f["queued"]),
                  int(f["pending"]), f["proxy"] == "connected",
                  int(queue.group(1)) if queue else None)


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Sampler(threading.Thread):
    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop_event = port, stop
        self.samples: list[Sample] = []

    def run(self) -> None:
        with LineConn(self.port) as conn:
            while not self.stop_event.is_set():
                line = conn.ask("stats")
                self.samples.append(parse_stats(line, time.time()))
                time.sleep(SAMPLE_PERIOD)

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


def read_results(port: int) -> list[Ran]:
    ran: list[Ran] = []
    with LineConn(port) as conn:
        conn.send("getall")
        while not (line := conn.expect_line(30)).startswith("END "):
            match = RESULT.search(line)
            if match is None:
                raise RuntimeError(f"unexpected getall line {line!r}")
            ms, node, start, end = match.groups()
            ran.append(Ran(node, int(ms), iso_seconds(start), iso_seconds(end)))
    return ran


def wait_all_answered(samplers: list[Sampler], timeout: float) -> None:
    """Until every origin node has a result for every ticket it issued."""
    since = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = [s.latest for s in samplers]
        if all(s is not None and s.t > since and s.pending == 0 for s in latest):
            return
        time.sleep(0.05)
    raise RuntimeError("the jobs did not finish in time")


@dataclass(frozen=True, slots=True)
class Late:
    delay: float
    name: str
    slots: int


def start_submitting(cluster: Cluster, names: list[str], jobs: list[int]
                     ) -> list[threading.Thread]:
    """Each node gets every len(names)-th job, pipelined over one connection."""
    threads = [threading.Thread(target=submit_many,
                                args=(cluster.nodes[n].port,
                                      [f"sleep {ms}" for ms in jobs[i::len(names)]]))
               for i, n in enumerate(names)]
    for thread in threads:
        thread.start()
    return threads


def start_late(cluster: Cluster, late: Late, stop: threading.Event) -> Sampler:
    node = cluster.start_node(late.name, late.slots, INFO_PERIOD="50")
    sampler = Sampler(node.port, stop)
    sampler.start()
    return sampler


def run_cluster(tmp: Path, proxy_env: dict[str, str], jobs: list[int],
                node_env: dict[str, dict[str, str]] | None = None, late: Late | None = None,
                timeout: float = 900) -> Run:
    tmp.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(tmp)
    stop = threading.Event()
    samplers: dict[str, Sampler] = {}
    try:
        cluster.start_proxy(**proxy_env)
        for name, slots in SLOTS.items():
            cluster.start_node(name, slots, None, INFO_PERIOD="50",
                               **(node_env or {}).get(name, {}))
        for name, node in cluster.nodes.items():
            samplers[name] = Sampler(node.port, stop)
            samplers[name].start()
        names = list(SLOTS)
        run = Run(time.time(), dict(SLOTS))
        submitters = start_submitting(cluster, names, jobs)
        if late is not None:
            time.sleep(late.delay)
            samplers[late.name] = start_late(cluster, late, stop)
            run.slots[late.name] = late.slots
        for thread in submitters:
            thread.join()
        wait_all_answered([samplers[n] for n in names], timeout)
        for name in names:
            run.ran += read_results(cluster.nodes[name].port)
        if len(run.ran) != len(jobs):
            raise RuntimeError(f"{len(run.ran)} results of {len(jobs)}")
        stop.set()
        for sampler in samplers.values():
            sampler.join(timeout=5)
            if sampler.samples:
                run.samples[sampler.samples[0].node] = sampler.samples
        return run
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        stop.set()
        cluster.stop()


# ---------------------------------------------------------------------------- analysis


def latest_before(samples: list[Sample], t: float) -> Sample | None:
    i = bisect.bisect_right([s.t for s in samples], t)
    return samples[i - 1] if i else None


@dataclass
class Bin:
    t: float
    busy: float  # fraction of connected slots running a job
    queue: int
    spread: float | None
    waiting: int  # jobs waiting anywhere: the global queue plus those queued at nodes


def timeline(run: Run) -> list[Bin]:
    end = max(r.end for r in run.ran)
    joined = {n: next((s.t for s in ss if s.connected), None) for n, ss in run.samples.items()}
    bins: list[Bin] = []
    t = run.t0
    while t < end:
        hi = t + BIN
        slots = sum(run.slots[n] for n, at in joined.items() if at is not None and at < hi)
        busy = sum(max(0.0, min(r.end, hi) - max(r.start, t)) for r in run.ran
                   if r.start < hi and r.end > t)
        latest = [s for n in run.samples if (s := latest_before(run.samples[n], hi))]
        queues = [(s.t, s.queue) for s in latest if s.queue is not None]
        queue = max(queues)[1] if queues else 0
        loads = [(s.running + s.queued) / s.slots for s in latest if s.connected]
        spread = max(loads) - min(loads) if len(loads) > 1 else None
        waiting = queue + sum(s.queued for s in latest if s.connected)
        bins.append(Bin(t - run.t0, busy / (slots * BIN) if slots else 0.0, queue, spread,
                        waiting))
        t = hi
    return bins


def lower_bound(work: float, longest: float, capacity: list[tuple[float, float]]) -> float:
    """Earliest finish of `work` slot-seconds when from time t on `slots` run at once, for
    each (t, slots) in `capacity` (sorted, the first at 0), and never before `longest`."""
    done = 0.0
    for i, (t, slots) in enumerate(capacity):
        until = capacity[i + 1][0] if i + 1 < len(capacity) else float("inf")
        if done + slots * (until - t) >= work:
            return max(longest, t + (work - done) / slots)
        done += slots * (until - t)
    raise ValueError("no capacity")


def summarise(report: Report, name: str, run: Run, jobs: list[int],
              capacity: list[tuple[float, float]] | None = None) -> list[Bin]:
    makespan = max(r.end for r in run.ran) - run.t0
    bound = lower_bound(sum(jobs) / 1000, max(jobs) / 1000,
                        capacity or [(0.0, sum(SLOTS.values()))])
    bins = timeline(run)
    busy_bins = [b for b in bins if b.queue > 0]
    report.add(f"{name}.jobs", len(jobs), "jobs")
    report.add(f"{name}.makespan", makespan, "s")
    report.add(f"{name}.lower_bound", bound, "s")
    report.add(f"{name}.makespan_over_bound", makespan / bound, "x")
    if busy_bins:
        report.add(f"{name}.busy_while_queued", 100 * sum(b.busy for b in busy_bins)
                   / len(busy_bins), "%")
        spreads = [b.spread for b in busy_bins if b.spread is not None]
        if spreads:
            report.add(f"{name}.spread_max_while_queued", max(spreads), "jobs/slot")
            report.add(f"{name}.spread_p95_while_queued",
                       sorted(spreads)[int(0.95 * (len(spreads) - 1))], "jobs/slot")
            report.add(f"{name}.spread_mean_while_queued", sum(spreads) / len(spreads),
                       "jobs/slot")
    waiting_bins = [b for b in bins if b.waiting > 0]
    if waiting_bins:  # the original's policy empties the global queue into the nodes' queues
        report.add(f"{name}.busy_while_any_job_waits", 100 * sum(b.busy for b in waiting_bins)
                   / len(waiting_bins), "%")
    report.add(f"{name}.busy_overall", 100 * sum(b.busy for b in bins) / len(bins), "%")
    per_node = {n: sum(1 for r in run.ran if r.node == n) for n in run.slots}
    report.note(f"{name}: jobs per node " + " ".join(
        f"{n}({run.slots[n]} slots)={c}" for n, c in per_node.items()))
    step = max(1, len(bins) // 20)
    for b in bins[::step]:
        spread = "-" if b.spread is None else f"{b.spread:.2f}"
        report.note(f"{name}: t={b.t:6.2f}s busy={100 * b.busy:5.1f}% queue={b.queue:5d} "
                    f"waiting={b.waiting:5d} spread={spread}")
    return bins


def first_time(samples: list[Sample], after: float, cond: Callable[[Sample], bool]
               ) -> float | None:
    return next((s.t for s in samples if s.t >= after and cond(s)), None)


# ---------------------------------------------------------------------------- scenarios


@dataclass
class Report:
    figures: dict[str, tuple[float, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quiet: bool = False

    def add(self, name: str, value: float, unit: str) -> None:
        self.figures[name] = (round(value, 4), unit)
        if not self.quiet:
            print(f"{name}={value:.4g} {unit}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        if not self.quiet:
            print(f"# {text}", flush=True)


def balanced_env() -> dict[str, str]:
    return {"DISPATCH_PERIOD": str(DISPATCH_PERIOD_MS)}


def scenario_join(report: Report, tmp: Path, jobs: list[int]) -> None:
    run = run_cluster(tmp, balanced_env(), jobs, late=Late(2.0, "node-5", 4))
    samples = run.samples.get("node-5", [])
    joined = first_time(samples, 0, lambda s: s.connected)
    full = None if joined is None else first_time(samples, joined, lambda s: s.running >= 4)
    if joined is None or full is None:
        summarise(report, "join", run, jobs)
        report.note("join: node-5 never had all its slots busy")
        return
    total = sum(SLOTS.values())
    summarise(report, "join", run, jobs, [(0.0, total), (joined - run.t0, total + 4)])
    report.add("join.first_sample_to_full", 1000 * (full - samples[0].t), "ms")
    report.add("join.connected_to_full", 1000 * (full - joined), "ms")
    report.add("join.connected_to_full_periods", 1000 * (full - joined) / DISPATCH_PERIOD_MS,
               "dispatch periods")
    report.add("join.node5_jobs", sum(1 for r in run.ran if r.node == "node-5"), "jobs")


def scenario_slow(report: Report, tmp: Path, jobs: list[int]) -> None:
    env = {"node-4": {"SLOW_FACTOR": "10", "SLOW_AFTER": "2000"}}
    run = run_cluster(tmp, balanced_env(), jobs, node_env=env)
    slow = [r for r in run.ran if r.node == "node-4" and r.end - r.start >= 5 * r.ms / 1000]
    samples = run.samples["node-4"]
    if not slow:
        summarise(report, "slow", run, jobs)
        report.note("slow: no slow job ran on node-4")
        return
    onset = min(r.start for r in slow)
    total = sum(SLOTS.values())
    # From the onset node-4's 8 slots do the work of 0.8.
    summarise(report, "slow", run, jobs, [(0.0, total), (onset - run.t0, total - 8 + 0.8)])
    first_result = min(r.end for r in slow)
    shed = first_time(samples, onset, lambda s: s.queued == 0)
    report.add("slow.jobs_on_slow_node_after_onset", len(slow), "jobs")
    if shed is None:
        report.note("slow: node-4 never shed its queue")
        return
    report.add("slow.onset_to_shed", 1000 * (shed - onset), "ms")
    report.add("slow.onset_to_shed_periods", 1000 * (shed - onset) / DISPATCH_PERIOD_MS,
               "dispatch periods")
    report.add("slow.first_slow_result_to_shed", 1000 * (shed - first_result), "ms")
    after = [s for s in samples if s.t >= shed and (s.queue or 0) > 0]
    if after:
        report.add("slow.queued_at_slow_node_after_shed_mean",
                   sum(s.queued for s in after) / len(after), "jobs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--original-jobs", type=int, default=300,
                        help="jobs for the original's policy (6 jobs/s: 2000 take 5.5 min)")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--json", action="store_true", help="one JSON object at the end")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    jobs = [rng.randint(5, 100) for _ in range(args.jobs)]
    report = Report(quiet=args.json)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    report.note(f"{len(jobs)} sleep jobs of 5-100 ms (seed {args.seed}), total "
                f"{sum(jobs) / 1000:.1f} s of work, nodes {SLOTS}, "
                f"DISPATCH_PERIOD={DISPATCH_PERIOD_MS} ms")
    with tempfile.TemporaryDirectory(prefix="djs-balance-") as tmp:
        for scenario in chosen:
            where = Path(tmp) / scenario
            if scenario == "balanced":
                summarise(report, "balanced", run_cluster(where, balanced_env(), jobs),
                          jobs)
            elif scenario == "original":
                part = jobs[:args.original_jobs]
                env = {"POLICY": "original", "DISPATCH_PERIOD": "5000",
                       "MAX_NUM_JOBS_DISPATCH": "30"}
                summarise(report, "original", run_cluster(where, env, part), part)
            elif scenario == "queue_length":
                env = {"POLICY": "original", **balanced_env(), "MAX_NUM_JOBS_DISPATCH": "1000"}
                summarise(report, "queue_length", run_cluster(where, env, jobs), jobs)
            elif scenario == "join":
                scenario_join(report, where, jobs)
            elif scenario == "slow":
                scenario_slow(report, where, jobs)
    if args.json:
        print(json.dumps({"benchmark": "balance", "notes": report.notes,
                          "figures": {k: {"value": v, "unit": u}
                                      for k, (v, u) in report.figures.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
