"""`djs status`: the cluster on one screen, read from the proxy dashboard's JSON API
(`/api/cluster` and `/api/jobs`) and drawn with rich tables. `render` is pure."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"alive": "green", "suspected": "yellow", "dead": "red", "done": "green",
               "failed": "red", "queued": "yellow", "dispatched": "cyan",
               "cancelled": "bright_black"}
# Jobs shown under the nodes.
RECENT_JOBS = 10


def fetch(base: str, timeout: float = 5.0, token: str | None = None
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cluster and the recent jobs from the dashboard at `base` (http://host:port)."""
    return (_get(f"{base}/api/cluster", timeout, token),
            _get(f"{base}/api/jobs?limit={RECENT_JOBS}", timeout, token))


def _get(url: str, timeout: float, token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout) as resp:
        body: dict[str, Any] = json.load(resp)
    return body


def _state(text: str) -> Text:
    return Text(text, style=STATE_STYLE.get(text, ""))


def render(cluster: dict[str, Any], jobs: dict[str, Any], width: int = 120) -> Group:
    """The screen; below 110 columns the job table leaves out results."""
    nodes = cluster["nodes"]
    alive = sum(1 for n in nodes if n["state"] == "alive")
    samples = cluster["throughput"]
    rate = samples[-1]["rate"] if samples else 0.0
    summary = Table.grid(padding=(0, 3))
    for _ in range(6):
        summary.add_column()
    summary.add_row(f"[b]queue[/] {cluster['queue_length']}", f"[b]nodes alive[/] {alive}/"
                    f"{len(nodes)}", f"[b]throughput[/] {rate:.1f} jobs/s",
                    f"[b]completed[/] {cluster['completed']}",
                    f"[b]duplicates[/] {cluster['duplicates']}",
                    f"[b]typical job[/] {_job_time(cluster.get('typical_job_seconds')) or '-'}")
    # Node names are what tells rows apart: the other columns give way first (at 80
    # columns every name read `node…`).
    names = min(24, max((len(n["node_id"]) for n in nodes), default=4))
    table = Table(title=f"nodes (proxy {cluster['proxy_id']})", title_justify="left")
    for col in ("node", "state", "slots", "run", "queue", "asgn", "done", "fail", "dup",
                "mean job", "INFO age"):
        table.add_column(col, justify="left" if col in ("node", "state") else "right",
                         min_width=names if col == "node" else None)
    for n in nodes:
        table.add_row(n["node_id"], _state(n["state"]), str(n["slots"]), str(n["running"]),
                      str(n["queued"]), str(n["assigned"]), str(n["done"]), str(n["failed"]),
                      str(n["duplicates"]), _job_time(n.get("mean_job_seconds")),
                      f"{n['last_info_age']:.1f} s")
    recent = Table(title="recent jobs", title_justify="left")
    wide = width >= 110
    for col in ("ticket", "job", "state", "origin", "node", "tries", "took",
                *(("result",) * wide)):
        recent.add_column(col, overflow="ellipsis", no_wrap=True,
                          min_width={"ticket": 24, "state": 10, "origin": names,
                                     "node": names}.get(col),
                          max_width=width - 80 if col == "result" else None)
    for j in jobs["jobs"]:
        row = [j["ticket"], " ".join([j["type"], *j["args"]]), _state(j["state"]), j["origin"],
               j["node"] or "", str(len(j["attempts"])), _took(j, cluster["time"])]
        recent.add_row(*row, *((j["result"] or "",) * wide))
    counts = " · ".join(f"{k} {v}" for k, v in jobs["counts"].items())
    stamp = time.strftime("%H:%M:%S", time.gmtime(cluster["time"]))
    footer = Text(f"history: {counts}   at {stamp} UTC", style="dim")
    left = [Text(f"{n['node_id']} left: {n['leaving']}", style="yellow")
            for n in nodes if n.get("leaving")]
    error = cluster.get("store_error")
    alert = [] if error is None else [Text(
        f"the proxy's stable storage is failing: {error} (nodes are refused until it takes "
        "commits again)", style="bold red")]
    return Group(*alert, summary, table, *left, recent, footer)


def _took(job: dict[str, Any], now: float) -> str:
    """How long it ran; for a running job, how long so far (by the proxy's clock, `now`)."""
    started, finished = job["started_at"], job["finished_at"]
    if started is None:
        return ""
    if finished is None:
        return _job_time(max(0.0, now - started)) + "…"
    return _job_time(max(0.0, finished - started))


def _job_time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
