"""kill -9 of the proxy while it holds jobs in every state: queued at the proxy,
dispatched to a node, and finished with the result still owed to an origin that is down."""

from __future__ import annotations

import contextlib
import re
import signal
import time
from pathlib import Path

import pytest

from tests.procs import (
    Cluster,
    LineConn,
    children_of,
    processes_with,
    running,
    submit_many,
    wait_results,
    wait_until,
)

pytestmark = pytest.mark.e2e


def cluster_numbers(port: int) -> tuple[int, int]:
    """(global queue, this node's done) from a node's `stats` line; the queue is -1 until
    the node has heard the cluster's numbers from the proxy."""
    with LineConn(port) as conn:
        stats = conn.ask("stats")
    queue = re.search(r"cluster queue=(\d+)", stats)
    done = re.search(r" done=(\d+)", stats)
    assert done, stats
    return int(queue.group(1)) if queue else -1, int(done.group(1))


def stats_line(port: int) -> str:
    with LineConn(port) as conn:
        return conn.ask("stats")


def test_proxy_killed_with_jobs_queued_dispatched_and_undelivered(cluster: Cluster) -> None:
    proxy = cluster.start_proxy(NODE_TIMEOUT="1000")
    origin = cluster.start_node("origin", slots=1)
    worker = cluster.start_node("worker", slots=1)
    tickets = submit_many(origin.port, ["300"] * 20)
    wait_until(lambda: cluster_numbers(worker.port)[0] > 0)  # the proxy has them
    origin.kill()  # down: results of its jobs can only wait at the proxy
    # the worker finished some (owed to origin), the rest still queued
    wait_until(lambda: cluster_numbers(worker.port)[1] >= 2)
    assert cluster_numbers(worker.port)[0] > 0
    proxy.kill()
    proxy.restart()
    origin.restart()
    results = wait_results(origin.port, tickets, 40)
    assert len(results) == 20, cluster.logs()
    # exactly one result recorded: asking again gives the same text
    assert wait_results(origin.port, tickets, 5) == results


@pytest.mark.parametrize("victim", ["origin", "worker"])
def test_a_node_killed_mid_job_restarts_and_loses_nothing(cluster: Cluster,
                                                          victim: str) -> None:
    cluster.start_proxy()
    nodes = {"origin": cluster.start_node("origin", slots=2),
             "worker": cluster.start_node("worker", slots=2)}
    tickets = submit_many(nodes["origin"].port, ["400"] * 8 + ["fib 300"] * 4)
    time.sleep(0.2)  # running on both
    nodes[victim].restart()  # SIGKILL, same data directory
    results = wait_results(nodes["origin"].port, tickets, 30)
    assert len(results) == 12, cluster.logs()


def test_a_node_killed_takes_its_worker_processes_with_it(cluster: Cluster) -> None:
    """`fib` of a large n runs in the node's worker processes: a `kill -9` of the node must
    not leave them behind (they lived on for good, ~40 MB each)."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=2)
    tickets = submit_many(node.port, ["fib 60000"] * 4)
    assert len(wait_results(node.port, tickets, 30)) == 4
    assert node.proc is not None
    workers = set(children_of(node.proc.pid))
    assert workers, "no worker process: fib did not run in the pool"
    node.kill()  # SIGKILL
    deadline = time.monotonic() + 10
    while workers and time.monotonic() < deadline:
        workers = {w for w in workers if running(w)}
        time.sleep(0.05)
    assert not workers, f"worker processes left behind: {workers}"
    # Among them, the pool's resource tracker: it cleans up the pool's semaphores when the
    # node goes, as it should, without a warning of "leaked semaphore objects" in the log
    # after every kill -9 (nothing leaked).
    assert "leaked" not in node.log(), node.log()


def test_a_node_killed_leaves_no_sh_job_running_beside_its_rerun(cluster: Cluster) -> None:
    """An `sh` job runs in a session of its own, so a `kill -9` of its node leaves it
    running; the restarted node runs the job again (at-least-once). The old copy must be
    gone before that: two copies of a shell job at once is what a user cannot have."""
    runs = cluster.tmp / "runs.txt"
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=1, ALLOW_SHELL="1")
    with LineConn(node.port) as conn:
        line = conn.ask(f"sh echo $$ >> {runs}; sleep 3.21987")
    assert line.startswith("Ticket ID: "), line
    ticket = line.removeprefix("Ticket ID: ")
    wait_until(lambda: runs.exists() and bool(processes_with("3.21987")))
    first_run = processes_with("3.21987")
    node.kill()  # SIGKILL
    assert all(running(pid) for pid in first_run), "the premise: they outlive the node"
    node.restart()
    assert not any(running(pid) for pid in first_run), "the first run still runs"
    assert wait_results(node.port, [ticket], 30)[ticket].startswith("exit 0")
    assert len(runs.read_text().split()) == 2  # the first run, killed, and the rerun
    assert not list((cluster.tmp / "node-1" / "sh").iterdir())  # both directories gone


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # gone meanwhile


def test_a_node_killed_leaves_nothing_of_an_sh_job_that_cleared_its_environment(
        cluster: Cluster) -> None:
    """`env -i` drops the variable that marks a job's processes; the session the node
    recorded for the job still finds it when the node restarts after a kill -9."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=1, ALLOW_SHELL="1")
    with LineConn(node.port) as conn:
        line = conn.ask("sh env -i sleep 8.4242 & sleep 30")
    assert line.startswith("Ticket ID: "), line
    wait_until(lambda: any(command_line(pid) == b"sleep\x008.4242\x00"
                           for pid in processes_with("8.4242")))
    leftovers = processes_with("8.4242")
    node.kill()  # SIGKILL
    assert all(running(pid) for pid in leftovers), "the premise: they outlive the node"
    node.restart()
    assert not any(running(pid) for pid in leftovers), "a process of the first run still runs"
    assert "sh.leftovers_cleared" in node.log()


def job_dirs_running(marker: str) -> set[str]:
    """The DJS_JOB_DIR of the running processes whose command line has `marker`."""
    dirs: set[str] = set()
    for pid in processes_with(marker):
        with contextlib.suppress(OSError):
            if running(pid):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                dirs |= {e.split(b"=", 1)[1].decode() for e in env
                         if e.startswith(b"DJS_JOB_DIR=")}
    return dirs


def test_a_node_frozen_past_node_timeout_stops_its_copy_when_it_comes_back(
        cluster: Cluster) -> None:
    """A node hangs (SIGSTOP) while its `sh` job runs on (in a session of its own): past
    NODE_TIMEOUT the proxy declares it dead and gives the job to the other node. When the
    node wakes and says HELLO, the proxy has it ABANDON its copy: one copy finishes, its
    result reaches the origin, and the two never run on together for long."""
    runs = cluster.tmp / "runs.txt"
    cluster.start_proxy(NODE_TIMEOUT="1000")
    nodes = {name: cluster.start_node(name, slots=1, ALLOW_SHELL="1")
             for name in ("node-1", "node-2")}
    command = f'echo "start $DJS_JOB_DIR" >> {runs}; sleep 6.2831; echo end >> {runs}'
    with LineConn(nodes["node-1"].port) as conn:
        line = conn.ask(f"sh {command}")
    assert line.startswith("Ticket ID: "), line
    ticket = line.removeprefix("Ticket ID: ")
    wait_until(lambda: len(job_dirs_running("6.2831")) == 1)
    (first,) = job_dirs_running("6.2831")
    runner = next(n for n in nodes if f"/{n}/sh/" in first)
    other = next(n for n in nodes if n != runner)
    proc = nodes[runner].proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: any(f"/{other}/sh/" in d for d in job_dirs_running("6.2831")))
        assert any(f"/{runner}/sh/" in d for d in job_dirs_running("6.2831"))  # both run
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_until(lambda: not any(f"/{runner}/sh/" in d for d in job_dirs_running("6.2831")),
               seconds=5)
    assert any(f"/{other}/sh/" in d for d in job_dirs_running("6.2831"))
    # logged once the job's task has ended, a moment after its process
    wait_until(lambda: "job.abandoned" in nodes[runner].log(), seconds=5)
    # the proxy said why it closed the link (the node read it once awake)
    assert "leaving=no INFO for more than NODE_TIMEOUT (1 s): its jobs were requeued" in nodes[
        runner].log()
    with LineConn(nodes[runner].port) as conn:
        assert " abandoned=1 " in conn.ask("stats")
    result = wait_results(nodes["node-1"].port, [ticket], 30)[ticket]
    assert result == "exit 0: ", result
    lines = runs.read_text().splitlines()
    assert len(lines) == 3 and lines.count("end") == 1, lines  # two starts, one end
    assert f"/{other}/sh/" in lines[1]


def test_a_long_dispatch_period_delays_neither_dead_nodes_nor_delayed_jobs(
        cluster: Cluster) -> None:
    """DISPATCH_PERIOD is the period of dispatch rounds only (dispatch also runs on every
    event): a node's death is noticed, and a delayed job released, on time. (They waited
    for the next round: a minute with this period; never with one of hours.)"""
    proxy = cluster.start_proxy(DISPATCH_PERIOD="60000", NODE_TIMEOUT="1000")
    origin = cluster.start_node("origin", slots=1)
    doomed = cluster.start_node("doomed", slots=2)
    submitted = time.monotonic()
    with LineConn(origin.port) as conn:
        delayed = conn.ask("submit --delay 1 fib 20").removeprefix("Ticket ID: ")
    assert wait_results(origin.port, [delayed], 10) == {delayed: "6765"}
    assert time.monotonic() - submitted < 5
    submit_many(origin.port, ["30000"] * 4)
    wait_until(lambda: "running=0" not in stats_line(doomed.port))
    doomed.kill()
    killed = time.monotonic()
    wait_until(lambda: "node.dead node=doomed" in proxy.log(), 10)
    assert time.monotonic() - killed < 5, proxy.log()
    assert re.search(r"node\.dead node=doomed silent_for=1\.\ds requeued=[1-9]", proxy.log())


def test_a_proxy_stopped_past_node_timeout_declares_no_node_dead(cluster: Cluster) -> None:
    """A proxy that did not run for longer than NODE_TIMEOUT (SIGSTOP here; a VM pause or a
    blocking disk alike) used to declare every node dead on waking, before reading their
    INFO frames: every link closed, jobs run twice, a cancel told "its node was lost"."""
    proxy = cluster.start_proxy(NODE_TIMEOUT="1000")
    node = cluster.start_node("node-1", slots=4)
    tickets = submit_many(node.port, ["2000"] * 4)
    wait_until(lambda: "running=4" in stats_line(node.port))
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    proxy.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: "proxy.stalled" in proxy.log(), 10)
    results = wait_results(node.port, tickets, 20)
    assert len(results) == 4, cluster.logs()
    time.sleep(1.5)  # past NODE_TIMEOUT after the stall: no late verdict either
    log = proxy.log()
    assert "node.dead" not in log, log
    assert "no INFO for more than NODE_TIMEOUT" not in log
    with LineConn(node.port) as conn:
        assert " duplicates=0 " in conn.ask("stats")


def test_a_node_says_when_its_proxy_comes_back_as_another(cluster: Cluster) -> None:
    """A proxy restarted on an empty (or another) data directory knows none of the jobs: its
    nodes submit them again, and some may run again. That happened without a word."""
    proxy = cluster.start_proxy()
    node = cluster.start_node("node-1")
    assert wait_results(node.port, submit_many(node.port, ["fib 10"]), 20)
    proxy.kill()
    proxy.args[proxy.args.index("--data-dir") + 1] = str(cluster.tmp / "another-proxy")
    proxy.restart()
    wait_until(lambda: "proxy.changed was=" in node.log())
    tickets = submit_many(node.port, ["fib 11"])
    assert wait_results(node.port, tickets, 20) == {tickets[0]: "89"}
