"""A node's disk fails under it: full, read-only, corrupted. It says so with `ERR` instead
of issuing a ticket it cannot keep, keeps answering for the tickets it has, and takes new
jobs again once the disk is back. Full and read-only disks are real small tmpfs mounts
(needs root; skipped otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import StoreError
from common.kvstore import SqliteKV
from tests.procs import (
    Cluster,
    LineConn,
    free_port,
    metrics,
    submit_many,
    wait_results,
    wait_until,
)
from tests.stores import damage_page_holding

pytestmark = pytest.mark.e2e

STORAGE_ERR = "ERR storage failure"
DJS = [sys.executable, "-c", "from common.cli import app; app()"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a small tmpfs")
    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write until the file system is full; the filler file, to delete later."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


def cluster_view(dashboard: int) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/cluster", timeout=5) as r:
        return json.load(r)


def submit_until_refused(port: int, limit: int = 2000) -> tuple[list[str], str]:
    """Submit 5 ms jobs one by one until the node refuses one; (tickets, refusal)."""
    tickets: list[str] = []
    with LineConn(port) as conn:
        for _ in range(limit):
            reply = conn.ask("5")
            if not reply.startswith("Ticket ID: "):
                return tickets, reply
            tickets.append(reply.removeprefix("Ticket ID: "))
    raise AssertionError(f"{limit} jobs accepted on a full disk")


def submit_when_back(port: int, seconds: float = 15) -> str:
    """The disk is back: the node tries it again within a second or so; the ticket."""
    deadline = time.monotonic() + seconds
    with LineConn(port) as conn:
        while True:
            reply = conn.ask("5")
            if reply.startswith("Ticket ID: ") or time.monotonic() > deadline:
                assert reply.startswith("Ticket ID: "), reply
                return reply.removeprefix("Ticket ID: ")
            assert reply.startswith(STORAGE_ERR), reply
            time.sleep(0.2)


def test_a_full_disk_refuses_jobs_with_err_and_recovers(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    metrics_port = free_port()
    # Room for sqlite's WAL, which grows to ~4 MB (1,000 pages) before its first
    # checkpoint: on a 4 MB disk, freed, the store filled it again by itself.
    with tmpfs(tmp_path / "disk", "16m") as disk:
        dashboard = free_port()
        cluster.start_proxy(DASHBOARD_PORT=str(dashboard))
        node = cluster.start_node("node-1", data_dir=disk / "node-1",
                                  METRICS_PORT=str(metrics_port))
        before = submit_many(node.port, ["5"] * 20)
        assert len(wait_results(node.port, before, 20)) == 20
        filler = fill(disk)
        accepted, refusal = submit_until_refused(node.port)
        assert refusal.startswith(STORAGE_ERR), refusal
        with LineConn(node.port) as conn:  # still serving: answers from what it holds
            assert conn.ask(f"r{before[0]}").startswith("Result: ")
            assert conn.ask("5").startswith(STORAGE_ERR)
            assert "store=failing" in conn.ask("stats")
        seen = metrics(metrics_port)  # what an alert sees
        assert seen["djs_node_store_healthy"] == 0
        assert seen["djs_node_store_commit_failures_total"] >= 1
        # The node closed its link saying why: the proxy's page shows it.
        wait_until(lambda: cluster_view(dashboard)["nodes"][0]["leaving"] is not None)
        (row,) = cluster_view(dashboard)["nodes"]
        assert row["leaving"].startswith("store failing: "), row
        assert "disk is full" in row["leaving"], row
        filler.unlink()
        tickets = [*before, *accepted, submit_when_back(node.port)]
        log = node.log_path.read_text()
        assert log.count("store.failed") == 1 and "store.back node" in log
        assert metrics(metrics_port)["djs_node_store_healthy"] == 1
        with LineConn(node.port) as conn:
            assert "store=ok" in conn.ask("stats")
        assert len(wait_results(node.port, tickets, 30)) == len(tickets), cluster.logs()
        assert cluster_view(dashboard)["nodes"][0]["leaving"] is None  # back: HELLO cleared it
        node.kill(signal.SIGKILL)  # and every one of them was really on disk
        node.restart()
        assert len(wait_results(node.port, tickets, 30)) == len(tickets), cluster.logs()


def test_a_job_running_when_the_disk_fails_is_not_started_again_beside_itself(
        cluster: Cluster, tmp_path: Path) -> None:
    """A failed commit rolls the node's state back to the disk, where a running job is held
    and not running: its attempt runs on, and it must not be started a second time."""
    runs = tmp_path / "runs.txt"
    with tmpfs(tmp_path / "disk", "4m") as disk:
        cluster.start_proxy()
        node = cluster.start_node("node-1", slots=2, data_dir=disk / "node-1",
                                  ALLOW_SHELL="1")
        with LineConn(node.port) as conn:
            reply = conn.ask(f"sh echo start >> {runs}; sleep 2; echo end >> {runs}")
        assert reply.startswith("Ticket ID: "), reply
        wait_until(lambda: runs.exists())
        filler = fill(disk)
        _, refusal = submit_until_refused(node.port)
        assert refusal.startswith(STORAGE_ERR), refusal
        filler.unlink()
        ticket = reply.removeprefix("Ticket ID: ")
        assert wait_results(node.port, [ticket], 30)[ticket] == "exit 0: "
        time.sleep(1)  # a second run would have started by now
        assert runs.read_text().split() == ["start", "end"]


def test_the_proxy_on_a_full_disk_loses_nothing_and_catches_up(cluster: Cluster,
                                                             tmp_path: Path) -> None:
    """The proxy's disk fills while nodes keep taking jobs: it cannot store them, says so,
    and keeps running; the nodes keep their tickets (their own disks are fine) and hand them
    over again. Once there is room, every job runs and every result reaches its origin, also
    after a `kill -9` of the proxy."""
    # Room for sqlite's WAL, which grows to ~4 MB (1,000 pages) before its first
    # checkpoint: on a 4 MB disk, freed, the store filled it again by itself.
    with tmpfs(tmp_path / "disk", "16m") as disk:
        cluster.proxy_dir = disk / "proxy"
        dashboard = free_port()
        proxy = cluster.start_proxy(DASHBOARD_PORT=str(dashboard))
        nodes = [cluster.start_node(f"node-{i}", slots=2) for i in (1, 2)]
        before = submit_many(nodes[0].port, ["5"] * 20)
        assert len(wait_results(nodes[0].port, before, 20)) == 20
        filler = fill(disk)
        during = {n.port: submit_many(n.port, ["fib 5000"] * 200) for n in nodes}
        wait_until(lambda: "store.failed" in proxy.log() or "commit_failed" in proxy.log())
        assert proxy.proc is not None and proxy.proc.poll() is None  # still serving
        time.sleep(1)  # the nodes try to hand the jobs over meanwhile
        log = proxy.log_path.read_text()
        assert log.count("store.failed") == 1  # one rollback, then the nodes are refused
        assert "reason=the proxy's stable storage is failing" in log
        seen = metrics(dashboard)  # what an alert sees
        assert seen["djs_store_healthy"] == 0
        assert seen["djs_store_commit_failures_total"] >= 1
        assert "disk is full" in cluster_view(dashboard)["store_error"]  # the page says why
        filler.unlink()
        for port, tickets in during.items():
            assert len(wait_results(port, tickets, 60)) == len(tickets), cluster.logs()
        assert "store.back proxy" in proxy.log_path.read_text()
        assert metrics(dashboard)["djs_store_healthy"] == 1
        assert cluster_view(dashboard)["store_error"] is None
        proxy.kill(signal.SIGKILL)
        proxy.restart()
        more = submit_many(nodes[1].port, ["5"] * 10)
        assert len(wait_results(nodes[1].port, more, 30)) == 10, cluster.logs()
        for port, tickets in during.items():
            assert len(wait_results(port, tickets, 10)) == len(tickets)


def test_a_batch_that_does_not_fit_on_a_full_disk_is_committed_whole_or_not_at_all(
        tmp_path: Path) -> None:
    """The store itself: a batch of 4 MB of new records and the delete of an old one, on a
    disk with 300 KB left. The commit fails, and nothing of it is on disk: not the delete
    either (with sqlite's defaults the big write, spilled early, failed alone, and the
    delete after it was committed)."""
    with tmpfs(tmp_path / "disk", "3m") as disk:
        store = SqliteKV(disk / "node-1", "node")
        store.apply({"t:old": ["sleep 0", True, None]})
        store.commit()
        filler = disk / "filler"
        left = os.statvfs(disk)
        filler.write_bytes(b"\0" * (left.f_bavail * left.f_frsize - 300_000))
        batch: dict[str, object] = {f"t:{i:06d}": "y" * 1000 for i in range(4000)}
        batch["t:old"] = None
        with pytest.raises(StoreError, match="disk is full"):
            store.apply(batch)
            store.commit()
        store.close()
        filler.unlink()
        again = SqliteKV(disk / "node-1", "node")
        try:
            assert dict(again.items()) == {"t:old": ["sleep 0", True, None]}
        finally:
            again.close()


def test_a_read_only_disk_is_reported_and_no_ticket_is_issued(cluster: Cluster,
                                                             tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        cluster.start_proxy()
        node = cluster.start_node("node-1", data_dir=disk / "node-1")
        before = submit_many(node.port, ["5"] * 10)
        assert len(wait_results(node.port, before, 20)) == 10
        node.kill(signal.SIGTERM)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(RuntimeError, match="not ready"):
            node.start()
        assert node.proc is not None and node.proc.wait(timeout=10) != 0
        assert "read-only" in node.log() or "readonly" in node.log(), node.log()
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        node.start()
        tickets = [*before, submit_when_back(node.port)]
        assert len(wait_results(node.port, tickets, 20)) == len(tickets), cluster.logs()


def test_a_corrupted_store_stops_the_node_with_a_clear_error(cluster: Cluster) -> None:
    """Rather than start afresh (and forget every ticket), the node refuses to start."""
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    tickets = submit_many(node.port, ["5"] * 5)
    assert len(wait_results(node.port, tickets, 20)) == 5
    node.kill(signal.SIGTERM)
    data = cluster.tmp / "node-1"
    for path in data.glob("*.sqlite*"):
        path.write_bytes(b"this is not a database " * 200)
    with pytest.raises(RuntimeError, match="not ready"):
        node.start()
    assert node.proc is not None
    assert node.proc.wait(timeout=10) != 0
    assert "node.sqlite" in node.log() or "database" in node.log(), node.log()


def damage(store: Path, keys: list[str]) -> None:
    """Overwrite records of a stopped process's store with bytes no version writes (a bit
    rot sqlite does not see: its pages are sound)."""
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        for key in keys:
            changed = db.execute("UPDATE records SET value = ? WHERE key = ?",
                                 (b"\xc1damaged", key)).rowcount
            assert changed == 1, key


def store_keys(store: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(store)) as db:
        return {key for (key,) in db.execute("SELECT key FROM records WHERE value NOT NULL")}


def test_a_damaged_record_costs_a_node_what_it_held_not_its_start(cluster: Cluster) -> None:
    """A record the node cannot read used to stop it (every ticket out of reach for one
    record's sake). It is set aside (x:<key>) and the node serves: a done ticket whose
    record is damaged says so once the proxy has said it does not have its result, one
    whose job was still running is read again from the proxy's copy of its result, and a
    held job set aside is re-sent by the proxy."""
    metrics_port = free_port()
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=1, METRICS_PORT=str(metrics_port))
    [done] = submit_many(node.port, ["fib 20"])
    assert wait_results(node.port, [done], 20) == {done: "6765"}
    [running] = submit_many(node.port, ["1500"])
    intact = submit_many(node.port, ["fib 21"])[0]  # queued behind it at the proxy
    store = cluster.tmp / "node-1" / "node.sqlite"
    wait_until(lambda: f"q:{running}" in store_keys(store))
    node.kill()  # SIGKILL
    damage(store, [f"t:{done}", f"t:{running}", f"q:{running}"])
    node.start()
    with LineConn(node.port) as conn:  # until the proxy says whether it has the result
        assert conn.ask(f"r{done}") == "Result has not been executed yet, come back later."
    lost = wait_results(node.port, [done], 10)[done]  # it has not: forgotten when delivered
    assert lost.startswith("FAILED: its stored record cannot be read"), lost
    results = wait_results(node.port, [running, intact], 30)
    assert results[running].startswith("slept 1500 ms on node-1"), cluster.logs()
    assert results[intact] == "10946"
    log = node.log()
    for key in (f"t:{done}", f"t:{running}", f"q:{running}"):
        assert f"store.record_damaged store=node key={key}" in log
    assert f"store.record_repaired ticket={running} from=proxy" in log
    assert metrics(metrics_port)["djs_node_store_records_set_aside"] == 3
    assert metrics(metrics_port)["djs_tickets_repaired_total"] == 1
    node.kill(signal.SIGTERM)
    keys = store_keys(store)
    assert {f"x:t:{done}", f"x:t:{running}", f"x:q:{running}"} <= keys
    node.start()  # set aside once: not read (nor logged) again, the repaired ticket sound
    assert wait_results(node.port, [running], 5)[running].startswith("slept 1500 ms")
    assert node.log().count(f"store.record_damaged store=node key=t:{running}") == 1


def test_a_damaged_job_record_of_the_proxy_is_submitted_again_by_its_origin(
        cluster: Cluster) -> None:
    """The proxy holds every queued job: one of its records it cannot read used to stop it,
    and the cluster with it. The record is set aside; the job's origin, told it is UNKNOWN
    when it asks for the result, submits it again."""
    dashboard = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dashboard), REQUEST_RESULT_PERIOD="200")
    node = cluster.start_node("node-1", slots=1)
    with LineConn(node.port) as conn:
        reply = conn.ask("submit --delay 2 fib 22")
    ticket = reply.removeprefix("Ticket ID: ")
    store = cluster.tmp / "proxy" / "proxy.sqlite"
    wait_until(lambda: f"j:{ticket}" in store_keys(store))
    assert cluster.proxy is not None
    cluster.proxy.kill()
    damage(store, [f"j:{ticket}"])
    cluster.proxy.restart()
    assert wait_results(node.port, [ticket], 30) == {ticket: "17711"}, cluster.logs()
    assert f"store.record_damaged store=proxy key=j:{ticket}" in cluster.proxy.log()
    assert metrics(dashboard)["djs_store_records_set_aside"] == 1


def test_a_store_with_a_damaged_page_is_salvaged_and_the_node_serves(
        cluster: Cluster) -> None:
    """A bad sector under a node's store: it refuses to start and says what to run;
    `djs salvage` keeps every record it can read (the damaged file kept beside it), and the
    node serves again: tickets on sound pages answer as before, those of the damaged page
    are pending until the proxy says whether it has their results (their jobs' results
    were delivered, and forgotten: they read as failed, saying why)."""
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    tickets = submit_many(node.port, [f"fib {n}" for n in range(1, 1201)])
    before = wait_results(node.port, tickets, 60)
    assert len(before) == 1200
    node.kill(signal.SIGTERM)
    data = cluster.tmp / "node-1"
    hit = tickets[600]
    damage_page_holding(data / "node.sqlite", f"t:{hit}")
    with pytest.raises(RuntimeError, match="not ready"):
        node.start()
    assert f"djs salvage --data-dir {data}" in node.log(), node.log()
    salvaged = subprocess.run([*DJS, "salvage", "--data-dir", str(data)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert salvaged.returncode == 0, salvaged.stderr
    assert re.search(r"salvaged \d+ records", salvaged.stdout)
    assert f"t:{hit}" in salvaged.stdout and "damaged store is kept as" in salvaged.stdout
    node.start()
    after = wait_results(node.port, tickets, 30)
    lost = {t for t in tickets if after[t] != before[t]}
    assert hit in lost and len(lost) < 100, len(lost)
    assert all(after[t].startswith("FAILED: its stored record cannot be read") for t in lost)
    assert "its page could not be read (djs salvage)" in after[hit]
    assert len(list(data.glob("node.sqlite.damaged-*"))) >= 1


def test_a_node_whose_identity_record_is_damaged_goes_on_in_a_new_incarnation(
        cluster: Cluster) -> None:
    """Its tickets say which node it was: it starts as that node, a new incarnation of it,
    and the proxy runs again the jobs the old one held."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=1)
    done = submit_many(node.port, ["fib 30"])
    assert wait_results(node.port, done, 20) == {done[0]: "832040"}
    held = submit_many(node.port, ["1000", "fib 31"])  # one running, one queued at the kill
    store = cluster.tmp / "node-1" / "node.sqlite"
    wait_until(lambda: f"q:{held[0]}" in store_keys(store))
    node.kill()  # SIGKILL
    damage(store, ["m:identity"])
    node.start()
    assert "store.identity_rebuilt node=node-1" in node.log(), node.log()
    results = wait_results(node.port, [*done, *held], 30)
    assert results[done[0]] == "832040" and results[held[1]] == "1346269"
    assert results[held[0]].startswith("slept 1000 ms on node-1"), cluster.logs()
    proxy = cluster.proxy
    assert proxy is not None
    wait_until(lambda: "node.new_incarnation node=node-1" in proxy.log())
