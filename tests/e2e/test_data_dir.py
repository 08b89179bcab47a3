"""One process per data directory: a second node or proxy started on a directory in use is
refused with a clear error, and the first one serves on as if nothing happened."""

from __future__ import annotations

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
    with pytest.raises(RuntimeError, match="not ready"):
        second.start()
    assert second.proc is not None and second.proc.wait(timeout=10) == 3
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
