"""One process per data directory: a second node or proxy started on a directory in use is
refused with a clear error, and the first one serves on as if nothing happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import Cluster, Proc, submit_many, wait_results

pytestmark = pytest.mark.e2e


def second_on(first: Proc) -> Proc:
    """The same command as `first` (its data directory), on another port."""
    args = list(first.args)
    args[args.index("--port") + 1] = "0"
    return Proc(f"{first.name}-again", first.module, args, first.env, first.log_path.parent)


def refused(first: Proc, name: str) -> None:
    """A second process on `first`'s data directory stops at once, saying who holds it."""
    assert first.proc is not None
    second = second_on(first)
    try:
        with pytest.raises(RuntimeError, match="not ready"):
            second.start()
        assert second.proc is not None and second.proc.wait(timeout=10) == 3
    finally:
        second.kill()  # had it started (the lock broken), it would outlive the test
    data_dir = first.args[first.args.index("--data-dir") + 1]
    assert (f"data directory {data_dir} is in use by another {name} (pid {first.proc.pid})"
            in second.log()), second.log()


def test_a_second_node_on_a_data_directory_in_use_is_refused(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    refused(node, "node")
    tickets = submit_many(node.port, ["fib 30"] * 3)
    assert len(wait_results(node.port, tickets, 20)) == 3


def test_a_second_proxy_on_a_data_directory_in_use_is_refused(cluster: Cluster) -> None:
    proxy = cluster.start_proxy()
    node = cluster.start_node("node-1")
    refused(proxy, "proxy")
    tickets = submit_many(node.port, ["fib 20"] * 3)  # through the first proxy, unharmed
    assert len(wait_results(node.port, tickets, 20)) == 3


def test_djs_cluster_started_twice_on_one_folder_says_why_the_second_stops(
        tmp_path: Path) -> None:
    djs = [sys.executable, "-c", "from common.cli import app; app()", "cluster", "--nodes",
           "1", "--proxy-port", "0", "--first-port", "0", "--dashboard-port", "0", "--data",
           str(tmp_path / "data")]
    first = subprocess.Popen(djs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert first.stdout is not None
    try:
        lines: list[str] = []
        while not lines or not lines[-1].startswith("cluster ready"):
            line = first.stdout.readline().decode()
            assert line, "".join(lines)
            lines.append(line)
        second = subprocess.run(djs, capture_output=True, text=True, timeout=60)
    finally:
        first.terminate()
        first.communicate(timeout=30)
    assert second.returncode == 1
    assert "is in use by another proxy" in second.stdout, second.stdout
    assert "cluster not started: proxy exited with code 3 before it was ready" in second.stderr
    # it was reaped by asyncio, not by the signal of the shutdown: no "Unknown child process"
    assert "Unknown child process" not in second.stdout + second.stderr
    assert first.returncode == 0
