"""`djs status` draws what the dashboard API returns (pure rendering)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from common.status import render

CLUSTER: dict[str, Any] = {
    "proxy_id": "p1", "time": 0.0, "queue_length": 7, "jobs_tracked": 9, "completed": 42,
    "duplicates": 1, "node_timeout": 5.0, "typical_job_seconds": 0.0502, "store_error": None,
    "nodes": [{"node_id": "node-1", "state": "alive", "connected": True, "slots": 4,
               "running": 3, "queued": 1, "assigned": 4, "done": 30, "failed": 2,
               "duplicates": 1, "last_info_age": 0.2, "client_address": "127.0.0.1:9000",
               "mean_job_seconds": 1.5, "leaving": None},
              {"node_id": "node-2", "state": "dead", "connected": False, "slots": 2,
               "running": 0, "queued": 0, "assigned": 0, "done": 12, "failed": 0,
               "duplicates": 0, "last_info_age": 9.0, "client_address": None,
               "mean_job_seconds": None,
               "leaving": "store failing: commit to /data/node.sqlite failed: disk is full"}],
    "throughput": [{"t": 0.0, "completed": 40, "queue": 7, "rate": 2.5}],
}
JOBS: dict[str, Any] = {
    "jobs": [{"ticket": "a" * 24, "type": "fib", "args": ["90"], "origin": "node-1",
              "state": "done", "node": "node-2", "submitted_at": 0.0, "started_at": 0.0,
              "finished_at": 0.0123, "result": "2880067194370816120",
              "attempts": [{"node": "node-2", "dispatched_at": 0.0}]},
             {"ticket": "b" * 24, "type": "sleep", "args": ["9000"], "origin": "node-1",
              "state": "dispatched", "node": "node-1", "submitted_at": 0.0,
              "started_at": -3.5, "finished_at": None, "result": None,
              "attempts": [{"node": "node-1", "dispatched_at": -3.6}]}],
    "counts": {"queued": 0, "dispatched": 0, "done": 1, "failed": 0},
}


def draw(width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(render(CLUSTER, JOBS, width=width))
    return console.export_text()


def test_the_screen_shows_nodes_queue_and_jobs() -> None:
    text = draw(140)
    for part in ("queue 7", "nodes alive 1/2", "2.5 jobs/s", "completed 42", "node-1",
                 "alive", "dead", "a" * 24, "fib 90", "2880067194370816120", "done 1",
                 "typical job 50.2 ms", "1.50 s", "12.3 ms", "3.50 s…",
                 "node-2 left: store failing: commit to /data/node.sqlite failed"):
        assert part in text, part
    assert "node-1 left" not in text


def test_a_narrow_terminal_keeps_whole_tickets_and_drops_results() -> None:
    text = draw(80)
    assert "a" * 24 in text and "2880067194370816120" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    # node names and job states whole: at 80 columns every name read `node…`, no state
    lines = text.splitlines()
    assert any(line.lstrip("│ ").startswith("node-1 ") for line in lines), text
    assert any(line.lstrip("│ ").startswith("node-2 ") for line in lines), text
    assert "dispatched" in text, text


def test_a_failing_store_at_the_proxy_is_said_first() -> None:
    assert "stable storage is failing" not in draw(120)
    failing = {**CLUSTER, "store_error": "commit to /data/proxy.sqlite failed: disk is full"}
    console = Console(width=120, record=True, color_system=None)
    console.print(render(failing, JOBS, width=120))
    first = console.export_text().splitlines()[0]
    assert first.startswith("the proxy's stable storage is failing: commit to /data/proxy")
