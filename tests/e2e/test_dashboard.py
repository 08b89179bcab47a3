"""The dashboard's JSON API, /metrics on the proxy and the nodes, and JSON logs, against a
real cluster: numbers must match what the test really did."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reverse_proxy.state import TIMES_SAVE_SECONDS
from tests.procs import Cluster, LineConn, free_port, metrics, submit_many, wait_results

pytestmark = pytest.mark.e2e
SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "dashboard-api.schema.json")
                    .read_text())


def check(instance: object, kind: str) -> None:
    """`instance` has the documented shape `kind` (docs/dashboard-api.schema.json)."""
    jsonschema.validate(instance, {**SCHEMA, "$ref": f"#/$defs/{kind}"})


def get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        return json.load(resp)


def job_once_known(base: str, ticket: str) -> Any:
    """The job's detail, or None while the proxy has not heard of it (its node forwards
    the submission a moment after the ticket went out: 404 until then)."""
    try:
        return get(base, f"/api/jobs/{ticket}")
    except urllib.error.HTTPError as err:
        with err:
            if err.code == 404:
                return None
            raise


class RawJson(bytes):
    """A body `post` sends as it is."""


def post(base: str, body: object) -> tuple[int, Any]:
    data = body if isinstance(body, RawJson) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/api/jobs", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        with err:  # an HTTPError holds its connection open until closed
            return err.code, json.load(err)


def wait_for(what: str, probe: Any, deadline_s: float = 20) -> Any:
    """Poll `probe()` until it returns something truthy; fail saying `what` otherwise."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, f"gave up waiting for {what}"
            return value
        time.sleep(0.1)


def test_api_shapes_metrics_and_json_logs_match_the_real_cluster(cluster: Cluster) -> None:
    dash = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dash), LOG_FORMAT="json")
    base = f"http://127.0.0.1:{dash}"
    metric_ports = {}
    for name in ("node-1", "node-2", "node-3"):
        metric_ports[name] = free_port()
        cluster.start_node(name, METRICS_PORT=str(metric_ports[name]))
    wait_for("3 alive nodes", lambda: [n["state"] for n in get(base, "/api/cluster")["nodes"]]
             == ["alive"] * 3)

    tickets = {"node-1": submit_many(cluster.nodes["node-1"].port, ["fib 50"] * 20),
               "node-2": submit_many(cluster.nodes["node-2"].port, ["sleep 20"] * 10)}
    status, reply = post(base, {"type": "fib", "args": "30", "priority": 0,
                                "node": "node-3"})
    assert status == 201, reply
    check(reply, "submitted")
    tickets["node-3"] = [reply["ticket"]]
    for node, mine in tickets.items():
        assert len(wait_results(cluster.nodes[node].port, mine, 30)) == len(mine)
    with LineConn(cluster.nodes["node-3"].port) as conn:
        assert conn.ask(f"r{reply['ticket']}") == "Result: 832040"

    for bad, code in (({"type": "Bad Type"}, 400), ({"type": "fib", "args": "-1"}, 400),
                      ({"type": "fib", "args": "1\n2"}, 400), ([1, 2], 400),
                      ({"type": "fib", "args": "1", "node": "nope"}, 400),
                      ({"type": "fib", "args": "1", "priority": "high"}, 400),
                      ({"type": "fib", "args": "1", "priority": 10**7}, 400),
                      (RawJson(b"[" * 100_000 + b"]" * 100_000), 400)):  # was a 500
        status, body = post(base, bad)
        assert status == code, (bad, body)
        check(body, "error")
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(base, "/api/jobs/" + "a" * 24)
    assert missing.value.code == 404
    missing.value.close()  # its socket: else a garbage collection in a later test warns

    total = 31
    proxy = wait_for("the proxy to count every outcome",
                     lambda: (m := metrics(dash))["djs_jobs_done_total"] == total and m)
    assert proxy["djs_jobs_submitted_total"] == total
    assert proxy["djs_jobs_dispatched_total"] >= total
    assert proxy["djs_jobs_failed_total"] == 0
    assert proxy["djs_jobs_retried_total"] == 0
    assert proxy["djs_jobs_duplicated_total"] == 0
    assert proxy["djs_job_duration_seconds_count"] == total
    assert proxy["djs_dispatch_latency_seconds_count"] == total
    assert proxy["djs_queue_length"] == 0
    assert proxy["djs_nodes_connected"] == 3
    assert proxy["djs_store_healthy"] == 1
    # Each job's record was written and, once its result reached its origin, deleted.
    assert proxy["djs_store_records_committed_total"] >= 2 * total
    assert 0 < proxy["djs_store_commit_seconds_count"] == proxy[
        "djs_store_commit_seconds_bucket{le=+Inf}"]
    assert proxy["djs_store_commit_seconds_sum"] > 0
    assert proxy["djs_store_commit_failures_total"] == 0
    assert {proxy[f"djs_node_up{{node={n}}}"] for n in tickets} == {1}

    per_node = {n: metrics(p) for n, p in metric_ports.items()}
    assert {n: m["djs_jobs_submitted_total"] for n, m in per_node.items()} == {
        "node-1": 20, "node-2": 10, "node-3": 1}
    assert sum(m["djs_jobs_done_total"] for m in per_node.values()) == total
    assert {m["djs_jobs_abandoned_total"] for m in per_node.values()} == {0}
    assert sum(m["djs_job_duration_seconds_count"] for m in per_node.values()) == total
    assert all(m["djs_node_proxy_connected"] == 1 for m in per_node.values())
    assert all(m["djs_node_store_healthy"] == 1 for m in per_node.values())
    assert {n: m["djs_node_store_records_committed_total"] >= m["djs_jobs_submitted_total"]
            for n, m in per_node.items()} == dict.fromkeys(per_node, True)
    assert all(m["djs_node_store_commit_seconds_count"] > 0 for m in per_node.values())

    # Node counts come with each node's periodic INFO, a moment after the results.
    cluster_view = wait_for("every node's INFO to count its jobs", lambda: (
        c := get(base, "/api/cluster")) and sum(n["done"] for n in c["nodes"]) == total and c)
    check(cluster_view, "cluster")
    assert cluster_view["completed"] == total and cluster_view["queue_length"] == 0
    jobs = get(base, "/api/jobs?limit=1000")
    check(jobs, "jobs")
    every = {t for mine in tickets.values() for t in mine}
    assert {j["ticket"] for j in jobs["jobs"]} == every
    assert jobs["counts"] == {"queued": 0, "dispatched": 0, "done": total, "failed": 0,
                              "cancelled": 0}
    fib = get(base, f"/api/jobs/{reply['ticket']}")
    check(fib, "job")
    assert (fib["state"], fib["result"], fib["origin"]) == ("done", "832040", "node-3")
    # Part of the ticket: its random end (its start is the time: tickets made in the same
    # 10 ms share it, and this search once found two).
    assert [j["ticket"] for j in get(base, f"/api/jobs?q={reply['ticket'][-12:]}")["jobs"]] == [
        reply["ticket"]]
    five = get(base, "/api/jobs?state=done&limit=5")
    assert len(five["jobs"]) == 5 and five["matched"] == total  # the table says "5 of N"
    with urllib.request.urlopen(base + "/api/events", timeout=5) as events:
        line = events.readline().decode()
    assert line.startswith("data: ")
    check(json.loads(line.removeprefix("data: ")), "event")

    screen = subprocess.run(
        [sys.executable, "-c", "from common.cli import app; app()", "status", "--dashboard",
         f"127.0.0.1:{dash}"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "COLUMNS": "140"}, check=True).stdout
    assert "nodes alive 3/3" in screen and f"completed {total}" in screen
    assert reply["ticket"] in screen and "832040" in screen

    assert cluster.proxy is not None
    records = [json.loads(x) for x in cluster.proxy.log_path.read_text().splitlines()]
    joined = [r for r in records if r.get("event") == "node.joined"]
    assert sorted(r["node"] for r in joined) == ["node-1", "node-2", "node-3"]
    assert all(r["level"] == "info" and r["slots"] == "4" for r in joined)

    # A node that stops says so as it goes; one killed cannot.
    cluster.nodes["node-3"].kill(signal.SIGTERM)
    cluster.nodes["node-2"].kill(signal.SIGKILL)
    rows = wait_for("both nodes to be seen gone", lambda: (
        r := {n["node_id"]: n for n in get(base, "/api/cluster")["nodes"]})
        and r["node-3"]["state"] != "alive" and r["node-2"]["state"] != "alive" and r)
    assert rows["node-3"]["leaving"] == "stopping"
    assert rows["node-2"]["leaving"] is None and rows["node-1"]["leaving"] is None
    check(get(base, "/api/cluster"), "cluster")
    records = [json.loads(x) for x in cluster.proxy.log_path.read_text().splitlines()]
    gone = {r["node"]: r.get("leaving") for r in records if r.get("event") == "node.disconnected"}
    assert (gone["node-3"], gone["node-2"]) == ("stopping", None)


def authorized(url: str, authorization: str | None) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": authorization} if authorization else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        err.close()
        return err.code, dict(err.headers)


def test_the_dashboard_asks_for_its_token_and_submits_with_the_client_token(
    cluster: Cluster,
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DASHBOARD_", "CLIENT_"))}
    public = subprocess.run(
        [sys.executable, "-m", "reverse_proxy", "--port", "0", "--data-dir",
         str(cluster.tmp / "p"), "--dashboard-host", "0.0.0.0"],
        env=clean, capture_output=True, text=True, timeout=30)
    assert public.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0 without DASHBOARD_TOKEN" in public.stderr

    dash, token, client_token = free_port(), "dashboard-secret-1", "client-secret-1"
    cluster.start_proxy(DASHBOARD_PORT=str(dash), DASHBOARD_TOKEN=token,
                        CLIENT_TOKEN=client_token)
    node = cluster.start_node("node-1", 2, CLIENT_TOKEN=client_token)
    base = f"http://127.0.0.1:{dash}"
    status, headers = authorized(base + "/api/cluster", None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert authorized(base + "/metrics", f"Bearer {token}x")[0] == 401
    basic = "Basic " + base64.b64encode(f"anyone:{token}".encode()).decode()
    assert authorized(base + "/", basic)[0] == 200  # what the browser's prompt sends
    assert authorized(base + "/metrics", f"Bearer {token}")[0] == 200
    wait_for("node-1 in the dashboard", lambda: get_with(base, "/api/cluster", token)["nodes"])

    # The node wants CLIENT_TOKEN: the dashboard sends it, then the submission.
    req = urllib.request.Request(base + "/api/jobs", data=b'{"type": "fib", "args": "20"}',
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
        ticket = json.load(resp)["ticket"]
    with LineConn(node.port) as conn:
        assert conn.ask(f"r{ticket}").startswith("ERR authenticate first")
        assert conn.ask(f"auth {client_token}") == "OK authenticated"
        assert conn.ask(f"wait {ticket} 20", timeout=25) == "Result: 6765"


def get_with(base: str, path: str, token: str) -> Any:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def test_the_job_detail_shows_an_sh_jobs_live_output_while_it_runs(cluster: Cluster) -> None:
    dash = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dash))
    node = cluster.start_node("node-1", 1, ALLOW_SHELL="1")
    base = f"http://127.0.0.1:{dash}"
    with LineConn(node.port) as conn:
        line = conn.ask("sh for i in 1 2 3; do echo step $i; sleep 0.2; done; sleep 4; echo end")
    ticket = line.removeprefix("Ticket ID: ")
    wait_for("the proxy to have the job", lambda: ticket in {
        j["ticket"] for j in get(base, "/api/jobs")["jobs"]})
    running = wait_for("the three steps while the job runs", lambda: (
        (job := get(base, f"/api/jobs/{ticket}"))["output"] == ["step 1", "step 2", "step 3"]
        and job))
    check(running, "job")
    assert running["state"] == "dispatched" and running["result"] is None
    done = wait_for("the result", lambda: (job := get(base, f"/api/jobs/{ticket}"))["result"]
                    and job)
    assert done["result"] == r"exit 0: step 1\nstep 2\nstep 3\nend"
    assert done["output"][-1] == "end"
    assert "output" not in get(base, "/api/jobs")["jobs"][0]


def test_the_job_list_shows_retries_and_cancels_as_the_nodes_do(cluster: Cluster) -> None:
    """A job retried after failed attempts is listed with each attempt and how it ended
    (it showed the first failure as the job's end, and one attempt); a job cancelled is
    `cancelled` (a queued one stayed `queued` for good, a running one showed `failed`)."""
    dash = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dash), RETRY_BACKOFF="100")
    node = cluster.start_node("node-1", 2, ALLOW_SHELL="1")
    base = f"http://127.0.0.1:{dash}"
    with LineConn(node.port) as conn:
        retried = conn.ask("submit --retries 2 sh echo no; exit 3").removeprefix("Ticket ID: ")
        queued = conn.ask("submit --delay 3600 sleep 0").removeprefix("Ticket ID: ")
        running = conn.ask("sleep 20000").removeprefix("Ticket ID: ")
        wait_for("the sleep to run", lambda: any(
            j["ticket"] == running for j in get(base, "/api/jobs?state=dispatched")["jobs"]))
        for ticket, how in ((queued, "cancelled while queued"), (running, "stopped")):
            assert how in conn.ask(f"cancel {ticket}", timeout=10)
        assert conn.ask(f"wait {retried} 20", timeout=25) == "Result: FAILED: exit 3: no"
    jobs = {j["ticket"]: j for j in get(base, "/api/jobs?state=cancelled")["jobs"]}
    assert set(jobs) == {queued, running}
    for job in jobs.values():
        check(job, "job")
    assert jobs[queued]["attempts"] == []
    assert jobs[running]["attempts"][0]["result"].startswith("cancelled while running")
    job = wait_for("the last attempt's end", lambda: (
        (j := get(base, f"/api/jobs/{retried}"))["state"] == "failed" and j))
    check(job, "job")
    assert [(a["node"], a["result"]) for a in job["attempts"]] == [("node-1", "exit 3: no")] * 3
    assert job["finished_at"] == job["attempts"][-1]["finished_at"]
    assert get(base, "/api/jobs")["counts"]["cancelled"] == 2


def test_what_the_proxy_learned_of_job_times_survives_its_restart(cluster: Cluster) -> None:
    """The typical job time and each node's mean are shown, and a restarted proxy still
    knows them: it calls a job overdue at once, not after 20 new results."""
    dash = free_port()
    proxy = cluster.start_proxy(DASHBOARD_PORT=str(dash))
    base = f"http://127.0.0.1:{dash}"
    for name in ("node-1", "node-2"):
        cluster.start_node(name, slots=2, LOG_FORMAT="json")
    assert get(base, "/api/cluster")["typical_job_seconds"] is None  # nothing learned yet
    tickets = submit_many(cluster.nodes["node-1"].port, ["sleep 30"] * 24)
    assert len(wait_results(cluster.nodes["node-1"].port, tickets, 30)) == 24
    learned = get(base, "/api/cluster")
    check(learned, "cluster")
    assert 0.03 <= learned["typical_job_seconds"] < 0.1
    means = {n["node_id"]: n["mean_job_seconds"] for n in learned["nodes"]}
    assert all(0.03 <= m < 0.1 for m in means.values()), means

    proxy.kill(signal.SIGTERM)  # a clean stop saves what was learned since the last save
    proxy.restart()
    again = wait_for("both nodes back", lambda: (c := get(base, "/api/cluster")) and [
        n["state"] for n in c["nodes"]] == ["alive"] * 2 and c)
    # and tells the nodes why it goes (a proxy killed cannot: below)
    assert [links_lost(cluster, name) for name in ("node-1", "node-2")] == [["stopping"]] * 2
    assert again["typical_job_seconds"] == learned["typical_job_seconds"]
    assert {n["node_id"]: n["mean_job_seconds"] for n in again["nodes"]} == means

    # A kill -9 keeps what the ticker saved: every TIMES_SAVE_SECONDS, when it changed.
    tickets = submit_many(cluster.nodes["node-2"].port, ["sleep 80"] * 24)
    assert len(wait_results(cluster.nodes["node-2"].port, tickets, 30)) == 24
    time.sleep(TIMES_SAVE_SECONDS + 1)
    learned = get(base, "/api/cluster")
    assert learned["typical_job_seconds"] > again["typical_job_seconds"]
    proxy.kill(signal.SIGKILL)
    proxy.restart()
    assert get(base, "/api/cluster")["typical_job_seconds"] == learned["typical_job_seconds"]
    wait_for("the nodes to see the link lost", lambda: all(
        len(links_lost(cluster, name)) == 2 for name in ("node-1", "node-2")))
    assert [links_lost(cluster, name) for name in ("node-1", "node-2")] == [
        ["stopping", None]] * 2


def links_lost(cluster: Cluster, node: str) -> list[str | None]:
    """What the proxy's LEAVING said, for each `proxy.link_lost` in the node's log."""
    records = [json.loads(x) for x in cluster.nodes[node].log_path.read_text().splitlines()]
    return [r.get("leaving") for r in records if r.get("event") == "proxy.link_lost"]


def test_a_running_job_shows_when_it_started(cluster: Cluster) -> None:
    """The node running a job says when its attempt began (INFO): the API has it while the
    job runs, the same time as `status` at the origin and as its result's."""
    dash = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dash), INFO_PERIOD="100")
    cluster.start_node("node-1", slots=1, INFO_PERIOD="100")
    cluster.start_node("node-2", slots=1, INFO_PERIOD="100")
    base = f"http://127.0.0.1:{dash}"
    tickets = submit_many(cluster.nodes["node-1"].port, ["sleep 2000"] * 2)
    running = [wait_for(f"{t} running", lambda t=t: (
        j := job_once_known(base, t)) and j["started_at"] is not None and j) for t in tickets]
    assert {j["state"] for j in running} == {"dispatched"}
    assert {j["node"] for j in running} == {"node-1", "node-2"}  # here and there
    check(running[0], "job")
    results = wait_results(cluster.nodes["node-1"].port, tickets, 30)
    assert len(results) == 2
    for job in running:
        done = get(base, f"/api/jobs/{job['ticket']}")
        assert done["state"] == "done" and done["started_at"] == job["started_at"]


def test_an_attempt_on_a_node_that_died_ends_as_lost(cluster: Cluster) -> None:
    """kill -9 of the node running a job: past NODE_TIMEOUT the job runs elsewhere, and
    its first attempt says how it ended (it showed no end at all)."""
    dash = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dash), NODE_TIMEOUT="1000")
    for name in ("node-1", "node-2", "node-3"):
        cluster.start_node(name, slots=1)
    base = f"http://127.0.0.1:{dash}"
    [ticket] = submit_many(cluster.nodes["node-1"].port, ["sleep 4000"])
    first = wait_for("it runs", lambda: (j := job_once_known(base, ticket)) and j["started_at"]
                     and j)
    runner = first["node"]
    cluster.nodes[runner].kill()  # SIGKILL
    moved = wait_for("handed on", lambda: len(
        (j := get(base, f"/api/jobs/{ticket}"))["attempts"]) == 2 and j)
    check(moved, "job")
    lost, now = moved["attempts"]
    assert (lost["node"], lost["result"]) == (runner, "no result: its node was lost")
    assert lost["finished_at"] == now["dispatched_at"] and now["node"] != runner


def test_requests_it_cannot_parse_cost_one_throttled_line_not_a_traceback_each(
        cluster: Cluster) -> None:
    """An over-long request line, sent by anyone who reaches the port (token or not), was an
    ERROR with its traceback in the proxy's log: 2,000 of them, 1.4 MB in a second."""
    dash = free_port()
    proxy = cluster.start_proxy(DASHBOARD_PORT=str(dash))
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", dash), timeout=5) as sock:
            sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b" 400 " in sock.recv(100)
    log = proxy.log()
    assert "Traceback" not in log and "Error handling request" not in log
    assert 1 <= log.count("http.bad_request") <= 40, log.count("http.bad_request")
