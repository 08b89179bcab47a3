"""The job lifecycle (issue 6) on a real cluster, through the real `nc`: states and
attempts in `status`, cancel, timeouts, retries, priorities and delays, each also across a
`kill -9` and restart; and transcripts of every new command and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_node.jobtypes import fibonacci
from tests.procs import Cluster, free_port, nc, wait_results

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("need_nc")]
TICKET = re.compile(r"^Ticket ID: ([a-z2-7]{24})$")
STARTED = re.compile(r" started=(\S+)")


def tickets_of(lines: list[str]) -> list[str]:
    found = [m.group(1) for line in lines if (m := TICKET.match(line))]
    assert found, lines
    return found


def one_ticket(port: int, line: str) -> str:
    out = nc(port, line + "\n")
    assert TICKET.match(out[0]), out
    return tickets_of(out)[0]


def wait_line(port: int, ticket: str, seconds: float = 30) -> str:
    return nc(port, f"wait {ticket} {seconds}\n", timeout=seconds + 10)[0]


def status(port: int, ticket: str) -> str:
    return nc(port, f"status {ticket}\n")[0]


def processes_running(marker: str) -> list[str]:
    """Command lines of live processes that contain `marker` (this machine's /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(cmd)
    return found


def test_status_shows_state_node_attempts_and_times(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=1)
    ticket = one_ticket(node.port, "submit --priority 3 sleep 1500")
    deadline = time.monotonic() + 10
    while " running " not in (running := status(node.port, ticket)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert re.match(rf"^Status: {ticket} running node=node-1 job='sleep 1500' "
                    r"submitted=\S+Z priority=3 started=\S+Z attempts=1$", running), running
    assert wait_line(node.port, ticket).startswith("Result: slept 1500 ms on node-1")
    done = status(node.port, ticket)
    assert re.match(rf"^Status: {ticket} done node=node-1 job='sleep 1500' submitted=\S+Z "
                    r"priority=3 started=\S+Z finished=\S+Z attempts=1$", done), done
    assert nc(node.port, f"json\nstatus {ticket}\n")[1].startswith(
        f'{{"ticket":"{ticket}","state":"done","node":"node-1"')


def test_timeout_kills_the_job_and_retries_back_off_then_fail_across_a_proxy_kill9(
        cluster: Cluster) -> None:
    proxy = cluster.start_proxy(RETRY_BACKOFF="500")
    node = cluster.start_node("node-1", ALLOW_SHELL="1")
    marker = "sleep 31.4159"
    ticket = one_ticket(node.port, f"submit --timeout 1 --retries 2 sh {marker}")
    deadline = time.monotonic() + 10
    while not processes_running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_running(marker), "the job should be running"
    deadline = time.monotonic() + 10
    while "attempts=2" not in status(node.port, ticket) and time.monotonic() < deadline:
        time.sleep(0.2)  # wait for the second attempt's dispatch
    # Before the job ends, `status` shows its failed attempts too (it showed none).
    assert "failed_attempts=[node-1 " in status(node.port, ticket)
    assert "timed out after 1 s]" in status(node.port, ticket)
    proxy.kill()  # between attempts: the retry count and history are on the proxy's disk
    proxy.restart()
    result = wait_line(node.port, ticket, 40)
    assert result == "Result: FAILED: timed out after 1 s", result
    final = status(node.port, ticket)
    assert " failed node=node-1 " in final and "attempts=3" in final, final
    assert final.count("timed out after 1 s") == 3, final  # the reason, and 2 in the history
    assert not processes_running(marker), "a timed-out job's process must be killed"


def test_a_retry_that_succeeds_reports_its_earlier_failures(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    cluster.start_proxy(RETRY_BACKOFF="200")
    node = cluster.start_node("node-1", ALLOW_SHELL="1")
    flag = tmp_path / "second-time"
    ticket = one_ticket(node.port, f"submit --retries 3 sh test -e {flag} && echo ok || "
                                   f"(touch {flag}; echo first; exit 7)")
    assert wait_line(node.port, ticket) == "Result: exit 0: ok"
    final = status(node.port, ticket)
    assert "attempts=2" in final and "exit 7: first" in final, final
    plain = one_ticket(node.port, "sh exit 4")  # no retries: fails at once, code kept
    assert wait_line(node.port, plain) == "Result: FAILED: exit 4: "


def test_cancel_queued_running_and_finished_and_it_survives_a_restart(
        cluster: Cluster) -> None:
    cluster.start_proxy()
    origin = cluster.start_node("node-1", slots=1, ALLOW_SHELL="1")
    runner = cluster.start_node("node-2", slots=1, ALLOW_SHELL="1")
    marker = "sleep 27.1828"
    done = one_ticket(origin.port, "fib 20")
    assert wait_line(origin.port, done) == "Result: 6765"
    queued = one_ticket(origin.port, "submit --delay 60 fib 10")
    running = [one_ticket(origin.port, f"sh {marker}") for _ in range(2)]
    deadline = time.monotonic() + 10
    while len(processes_running(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes_running(marker)) >= 2
    for ticket in running:  # it showed attempts 0 (JSON) where it ran at its origin
        seen = json.loads(nc(origin.port, f"json\nstatus {ticket}\n")[1])
        assert (seen["state"], seen["attempts"]) in {("running", 1), ("dispatched", 1)}
    lines = nc(origin.port, "".join(f"cancel {t}\n" for t in [queued, *running, done]))
    assert lines[0] == f"Cancelled: {queued} cancelled while queued, it never ran"
    assert {lines[1], lines[2]} == {
        f"Cancelled: {running[0]} cancelled while running on node-1, stopped",
        f"Cancelled: {running[1]} cancelled while running on node-2, stopped"} or all(
        re.match(r"^Cancelled: \S+ cancelled while running on node-[12], stopped$", x)
        for x in lines[1:3]), lines
    assert lines[3] == f"Not cancelled: {done} had already finished (done)"
    assert not processes_running(marker)
    assert nc(origin.port, f"cancel {queued}\n")[0] == (
        f"Not cancelled: {queued} had already finished (cancelled)")
    never_ran = nc(origin.port, f"status {queued}\n")[0]
    assert " finished=" in never_ran, never_ran
    assert " started=" not in never_ran and " attempts=" not in never_ran, never_ran
    assert json.loads(nc(origin.port, f"json\ncancel {done}\n")[1]) == {
        "ticket": done, "cancel": "finished", "state": "done",
        "detail": "had already finished (done)"}  # as documented: it had no detail
    assert nc(origin.port, "cancel " + "a" * 24 + "\n")[0].startswith("ERR unknown ticket")
    origin.kill()
    runner.kill()
    origin.restart()
    assert nc(origin.port, f"r{queued}\n")[0] == (
        "Result: CANCELLED: cancelled while queued, it never ran")
    assert status(origin.port, running[0]).split()[2] == "cancelled"
    listed = nc(origin.port, "list cancelled\n")
    assert [row.split()[:2] for row in listed[:3]] == [
        [running[1], "cancelled"], [running[0], "cancelled"], [queued, "cancelled"]]
    assert listed[3:] == ["END 3", "Come back later to check your results."]


def test_priority_order_and_delay_survive_a_kill9_of_proxy_and_node(
        cluster: Cluster) -> None:
    proxy = cluster.start_proxy(PREFETCH="0")
    node = cluster.start_node("node-1", slots=1)
    blocker = one_ticket(node.port, "sleep 2500")
    deadline = time.monotonic() + 10  # the blocker runs; everything below waits at the proxy
    while " running " not in status(node.port, blocker) and time.monotonic() < deadline:
        time.sleep(0.05)
    # sleeps of 31-36 ms: start times (shown to the ms) are sure to differ
    jobs = ["submit --priority 1 sleep 31", "submit sleep 32", "submit --priority 9 sleep 33",
            "submit --priority 1 sleep 34", "submit --priority -5 sleep 35",
            "submit --priority 9 --delay 6 sleep 36"]
    order = tickets_of(nc(node.port, "\n".join(jobs) + "\n"))
    submitted = time.time()
    proxy.kill()
    proxy.restart()
    node.kill()
    node.restart()  # the blocker runs again after the restart (at-least-once)
    assert wait_line(node.port, blocker).startswith("Result: slept 2500 ms")
    for t in order:
        assert wait_line(node.port, t, 40).startswith("Result: "), cluster.logs()
    started = {t: STARTED.search(status(node.port, t)) for t in order}
    by_start = sorted(order, key=lambda t: started[t].group(1))  # type: ignore[union-attr]
    ms = {t: int(j.rsplit(" ", 1)[1]) for t, j in zip(order, jobs, strict=True)}
    assert [ms[t] - 30 for t in by_start] == [3, 1, 4, 2, 5, 6], by_start
    delayed_start = started[order[5]].group(1)  # type: ignore[union-attr]
    stamp = time.mktime(time.strptime(delayed_start[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert stamp >= int(submitted + 6) - 1, delayed_start


def test_transcript_of_the_new_commands_and_their_errors(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    out = nc(node.port, "\n".join([
        "fib 10", "submit --priority 2 --timeout 5 --retries 1 fib 11", "list", "list done 1",
        "list pending", "list bogus", "list 0", "cancel", "submit --delay x fib 1",
        "submit --retries 101 fib 1", "submit --nope 1 fib 1", "submit --priority 1",
        "json", "fib 12", "r" + "b" * 24, "nonsense", "list 1", "text", "exit"]) + "\n")
    first, second = tickets_of(out[:2])
    assert out[2].startswith(f"{second} ") and out[3].startswith(f"{first} ")
    assert out[4] == "END 2"
    rest = out[5:]
    # list done 1 / list pending: depend on timing; each ends with END <n>
    ends = [i for i, line in enumerate(rest) if line.startswith("END ")]
    assert len(ends) == 2, rest
    rest = rest[ends[1] + 1:]
    assert rest[0].startswith("ERR usage: list [state] [limit]")
    assert rest[1] == "ERR usage: list [state] [limit]; limit from 1 to 10000"
    assert rest[2] == "ERR cancel takes one ticket, e.g. 'cancel <ticket>'"
    assert rest[3] == "ERR --delay takes a number of seconds, got 'x'"
    assert rest[4] == "ERR --retries must be from 0 to 100, got '101'"
    assert rest[5].startswith("ERR unknown option '--nope'")
    assert rest[6].startswith("ERR usage: submit [options] <type> <args...>")
    assert rest[7] == '{"mode":"json"}'
    assert set(json.loads(rest[8])) == {"ticket"}
    assert json.loads(rest[9])["error"].startswith("unknown ticket")
    assert json.loads(rest[10])["error"].startswith("unknown command")
    row = json.loads(rest[11])
    assert set(row) == {"ticket", "state", "submitted", "job"} and row["job"] == "fib 12"
    assert json.loads(rest[12]) == {"end": 1}
    assert rest[13:] == ["OK text mode", "Come back later to check your results."]


def test_bulk_submission_from_json_and_text_files(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    djs = str(Path(sys.executable).parent / "djs")
    entries = [{"job_type": "fib", "payload": n} for n in range(300)]
    entries.append({"job_type": "sleep", "payload": "5", "priority": 2, "retries": 1})
    entries.append({"job_type": "fib", "payload": -1})  # refused: reported, not fatal
    (tmp_path / "jobs.json").write_text(json.dumps(entries))
    (tmp_path / "jobs.txt").write_text("# comment\n1500\nfib 12\n\nsubmit --delay 1 fib 13\n")
    address = f"127.0.0.1:{node.port}"
    run = subprocess.run([djs, "submit", "--file", str(tmp_path / "jobs.json"),
                          "--node", address], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr  # one job was refused
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    assert len(rows) == 301 and all(len(t) == 24 for t, _ in rows)
    assert rows[0][1] == "fib 0" and rows[300][1] == "--priority 2 --retries 1 sleep 5"
    assert "ERR job refused, no ticket issued: fib argument" in run.stderr
    assert "301 submitted, 1 refused" in run.stderr
    results = wait_results(node.port, [t for t, _ in rows[:300]], 30)
    assert [results[t] for t, _ in rows[:300]] == [str(fibonacci(n)) for n in range(300)]
    run = subprocess.run([djs, "submit", "-f", str(tmp_path / "jobs.txt"), "--node", address],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert [line.split("\t")[1] for line in run.stdout.splitlines()] == [
        "sleep 1500", "fib 12", "--delay 1 fib 13"]
    (tmp_path / "bad.txt").write_text("fib 1\ngetall\n")
    run = subprocess.run([djs, "submit", "-f", str(tmp_path / "bad.txt"), "--node", address],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "line 2: 'getall' is not a job" in run.stderr


def test_the_cli_passes_a_jobs_own_dashes_and_says_when_no_node_answers(
        cluster: Cluster) -> None:
    """`djs submit fib -1` was refused by the CLI itself ("No such option: -1"), and a node
    that could not be reached was a traceback."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", ALLOW_SHELL="1")
    djs = str(Path(sys.executable).parent / "djs")
    address = f"127.0.0.1:{node.port}"
    run = subprocess.run([djs, "submit", "fib", "-1", "--node", address],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and run.stderr.startswith(
        "ERR job refused, no ticket issued: fib argument must be a whole number"), run.stderr
    run = subprocess.run([djs, "submit", "--node", address, "sh", "echo", "-n", "x", "-y"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([djs, "wait", run.stdout.strip(), "--node", address],
                         capture_output=True, text=True, timeout=30)
    assert run.stdout.strip() == "exit 0: x -y"
    run = subprocess.run([djs, "result", "a" * 24, "--node", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert run.stderr.startswith("cannot talk to the node at 127.0.0.1:"), run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr


def test_tail_streams_an_sh_jobs_lines_from_another_node_then_its_result(
        cluster: Cluster) -> None:
    cluster.start_proxy()
    origin = cluster.start_node("node-1", slots=1, ALLOW_SHELL="1")
    cluster.start_node("node-2", slots=1, ALLOW_SHELL="1")
    script = "sleep 1; for i in 1 2 3; do echo line $i; sleep 0.3; done; exit 5"
    # a blocker takes one node's only slot, so the sh job runs on the other one: its
    # output travels runner -> proxy -> origin when that is node-2
    blocker = one_ticket(origin.port, "sleep 4000")
    time.sleep(0.3)
    ticket = one_ticket(origin.port, f"sh {script}")
    lines = nc(origin.port, f"tail {ticket}\n", timeout=30)
    blocker_done = json.loads(nc(origin.port, f"json\ntail {blocker}\n")[1])
    assert blocker_done["state"] == "done" and blocker_done["result"].startswith("slept 4000")
    ran_on = re.search(r" node=(\S+)", status(origin.port, ticket))
    assert ran_on is not None and ran_on.group(1) != blocker_done["node"]
    assert lines == ["Output: line 1", "Output: line 2", "Output: line 3",
                     "Result: FAILED: exit 5: line 1\\nline 2\\nline 3",
                     "Come back later to check your results."], lines
    assert nc(origin.port, "tail " + "c" * 24 + "\n")[0].startswith("ERR unknown ticket")


def test_status_says_running_for_a_job_running_on_another_node(cluster: Cluster) -> None:
    cluster.start_proxy()
    origin = cluster.start_node("node-1", slots=1)
    cluster.start_node("node-2", slots=1)
    first = one_ticket(origin.port, "sleep 3000")
    second = one_ticket(origin.port, "sleep 3000")
    deadline = time.monotonic() + 10
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {t: status(origin.port, t) for t in (first, second)}
        if all(" running node=" in s for s in states.values()):
            break
        time.sleep(0.2)
    nodes = {re.search(r" running node=(\S+)", s).group(1)  # type: ignore[union-attr]
             for s in states.values() if " running node=" in s}
    assert nodes == {"node-1", "node-2"}, states  # one ran here, one there (via the proxy)
    # When it started, here or there (the node running it says so in its INFO): the same
    # time as its result's.
    for ticket, running in states.items():
        began = STARTED.search(running)
        assert began is not None, running
        assert wait_line(origin.port, ticket).startswith("Result: slept 3000 ms on ")
        done = STARTED.search(status(origin.port, ticket))
        assert done is not None and done.group(1) == began.group(1), (running, done)



def test_djs_submit_options_cancel_list_and_tail(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", ALLOW_SHELL="1")
    djs = [str(Path(sys.executable).parent / "djs")]
    where = ["--node", f"127.0.0.1:{node.port}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*djs, *args, *where], capture_output=True, text=True,
                              timeout=60)

    later = run("submit", "--delay", "100", "--priority", "3", "fib", "10").stdout.strip()
    assert "priority=3 not_before=" in status(node.port, later)
    assert run("cancel", later).stdout.strip() == (
        f"Cancelled: {later} cancelled while queued, it never ran")
    script = run("submit", "sh", "sleep 0.5; echo one; sleep 0.3; echo two").stdout.strip()
    tailed = run("tail", script)
    assert tailed.returncode == 0 and tailed.stdout.endswith("exit 0: one\\ntwo\n"), tailed
    listed = run("list", "all", "5").stdout.splitlines()
    assert [row.split()[:2] for row in listed] == [[script, "done"], [later, "cancelled"]]
    assert run("cancel", "nope").returncode == 1


def test_djs_result_and_wait_say_what_became_of_a_job_by_their_exit_status(
        cluster: Cluster) -> None:
    """A cancelled job exited 0 (a script took it for a success) and a failed one's reason
    was printed without its FAILED: mark."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", slots=2)
    djs = [sys.executable, "-c", "from common.cli import app; app()"]

    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run([*djs, *args, "--node", f"127.0.0.1:{node.port}"],
                              capture_output=True, text=True, timeout=60, check=False)
        return done.returncode, (done.stdout + done.stderr).strip()

    tickets = [line.removeprefix("Ticket ID: ") for line in nc(node.port, (
        "fib 20\nsubmit --timeout 0.001 fib 100000\n30000\n30000\n")) if "Ticket" in line]
    fine, failed, cancelled, pending = tickets
    assert run("wait", fine, "10") == (0, "6765")  # seconds as the protocol takes them
    code, text = run("wait", failed)
    assert (code, text) == (1, "FAILED: timed out after 0.001 s"), text
    assert run("wait", pending, "0.2")[0] == 2
    nc(node.port, f"cancel {cancelled}\n")
    code, text = run("wait", cancelled, "10")
    assert code == 3 and text.startswith("CANCELLED: "), text
    assert run("result", "a" * 24)[0] == 4
