"""Issue 9, points 4, 5 and 7 against real processes: client auth and ALLOW_LIST, `sh`
permission, allowlist, clean environment, working directory and process group, and the
permissions of the data directories."""

from __future__ import annotations

import base64
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.wire import TOKEN
from tests.procs import Cluster, LineConn, free_port, nc, processes_with, wait_until

pytestmark = pytest.mark.e2e
CLIENT_TOKEN = "let-me-in-please-0123"
SECRET = "s3cr3t-in-the-node-environment"


def ticket_of(line: str) -> str:
    assert line.startswith("Ticket ID: "), line
    return line.removeprefix("Ticket ID: ")


def run_sh(conn: LineConn, command: str) -> str:
    ticket = ticket_of(conn.ask(f"sh {command}"))
    line = conn.ask(f"wait {ticket} 20", timeout=25)
    assert line.startswith("Result: "), line
    return line.removeprefix("Result: ")


def test_client_token_and_allow_list(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", CLIENT_TOKEN=CLIENT_TOKEN, ALLOW_LIST="0")
    out = nc(node.port, "getall\n100\nhelp\nauth wrong\n"
                        f"auth {CLIENT_TOKEN}\ngetall\nlist\n100\n")
    assert out[:3] == ["ERR authenticate first: auth <token>"] * 3
    assert out[3] == "ERR authentication failed"
    assert out[4] == "OK authenticated"
    assert out[5] == out[6] == "ERR listing is disabled on this node (ALLOW_LIST=0)"
    ticket = ticket_of(out[7])
    assert out[8] == "Come back later to check your results."
    # a ticket is a capability: a new connection must authenticate again to use it
    out = nc(node.port, f"r{ticket}\n")
    assert out[0] == "ERR authenticate first: auth <token>"
    # three wrong guesses close the connection
    out = nc(node.port, "auth a\nauth b\nauth c\nauth d\n")
    assert out == ["ERR authentication failed"] * 2 + ["ERR authentication failed, closing"]


def test_tickets_carry_80_random_bits_after_the_time(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    before = time.time()
    with LineConn(node.port) as conn:
        conn.file.write(b"sleep 0\n" * 200)
        conn.file.flush()
        tickets = [ticket_of(conn.expect_line()) for _ in range(200)]
    after = time.time()
    assert len(set(tickets)) == 200
    assert all(re.fullmatch(r"[a-z2-7]{24}", t) for t in tickets)  # 24 x 5 bits = 120 bits
    # the first 8 characters are the submission time in 10 ms units, in ticket order ...
    ticks = [int.from_bytes(base64.b32decode(t.upper())[:5], "big") for t in tickets]
    assert ticks == sorted(ticks)
    assert before - 0.01 <= ticks[0] / 100 and ticks[-1] / 100 <= after
    # ... and the other 16 (80 bits) are chance: every position varies, no counter in them
    assert all(len({t[i] for t in tickets}) > 8 for i in range(8, 24))


def test_sh_is_off_by_default(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    with LineConn(node.port) as conn:
        assert conn.ask("sh echo hi").startswith(
            "ERR job refused, no ticket issued: sh jobs are disabled")


def test_sh_allowlist_runs_without_a_shell_in_a_clean_environment(cluster: Cluster) -> None:
    cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    node = cluster.start_node("node-1", CLUSTER_TOKEN=TOKEN, ALLOW_SHELL="1",
                              SHELL_ALLOW="echo, env, pwd", MY_API_KEY=SECRET,
                              CLIENT_TOKEN=CLIENT_TOKEN)
    with LineConn(node.port) as conn:
        assert conn.ask(f"auth {CLIENT_TOKEN}") == "OK authenticated"
        for refused in ("cat /etc/passwd", "sh -c env", "printenv CLUSTER_TOKEN",
                        "echoo hi", "'echo"):
            line = conn.ask(f"sh {refused}")
            assert line.startswith("ERR job refused, no ticket issued: sh command"), line
        # no shell: `;`, `$VAR` and `$(...)` are words handed to echo, not commands
        assert run_sh(conn, "echo hi; env $CLUSTER_TOKEN $(cat /etc/passwd)") == (
            "exit 0: hi; env $CLUSTER_TOKEN $(cat /etc/passwd)")
        env = run_sh(conn, "env")
        pwd = run_sh(conn, "pwd")
    assert TOKEN not in env and SECRET not in env and CLIENT_TOKEN not in env
    names = sorted(v.split("=", 1)[0] for v in env.removeprefix("exit 0: ").split("\\n"))
    assert names == ["DJS_JOB_DIR", "HOME", "LANG", "PATH", "PWD"]
    workdir = Path(pwd.removeprefix("exit 0: "))
    assert workdir.parent == cluster.tmp / "node-1" / "sh" and workdir.name.startswith("sh-")
    assert not workdir.exists()  # removed when the job ended
    assert stat.S_IMODE(workdir.parent.stat().st_mode) == 0o700


def test_sh_through_the_shell_cannot_read_the_token_and_is_killed_as_a_group(
        cluster: Cluster) -> None:
    cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    node = cluster.start_node("node-1", CLUSTER_TOKEN=TOKEN, ALLOW_SHELL="1",
                              SH_TIMEOUT="1.5", MY_API_KEY=SECRET)
    with LineConn(node.port) as conn:
        out = run_sh(conn, 'echo "[$CLUSTER_TOKEN][$MY_API_KEY]"; env | grep -c . ; pwd')
        assert out.startswith("exit 0: [][]\\n5\\n"), out
        # a background child outlives its shell: it is killed with the job's group
        assert run_sh(conn, "sleep 987.654 & echo started") == "exit 0: started"
        deadline = time.monotonic() + 10
        while processes_with("987.654") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with("987.654") == []
        # past SH_TIMEOUT the whole group goes, grandchildren included
        ticket = ticket_of(conn.ask("sh (sleep 876.543; echo never) & sleep 876.543"))
        line = conn.ask(f"wait {ticket} 20", timeout=25)
    assert line == "Result: FAILED: timed out after 1.5 s", line
    assert processes_with("876.543") == []


def test_sh_children_that_left_the_group_end_with_the_job(cluster: Cluster) -> None:
    """A background child in a process group of its own (`setpgid`, as a shell's job
    control does) is out of reach of a kill of the job's group. It outlived the job and
    its node, and held the output pipe: a job that had exited 0 at once was reported as
    timed out. Now the job's session is ended with it, on exit, timeout and cancel."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", ALLOW_SHELL="1", SH_TIMEOUT="3")
    # the shell goes on once the child has moved (the file), not before: a kill of the
    # group would still reach it
    own_group = (f"{sys.executable} -c 'import os; os.setpgid(0, 0); open(\"moved\", \"w\"); "
                 'os.execvp("sleep", ["sleep", "{}"])\' & '
                 "while [ ! -e moved ]; do sleep 0.01; done")
    with LineConn(node.port) as conn:
        # its exit, not the timeout the pipe held open by the child made of it
        assert run_sh(conn, f"{own_group.format(765.432)}; echo started") == (
            "exit 0: started")
        assert processes_with("765.432") == []
        ticket = ticket_of(conn.ask(f"sh {own_group.format(654.321)}; sleep 654.321"))
        line = conn.ask(f"wait {ticket} 20", timeout=25)
        assert line == "Result: FAILED: timed out after 3 s", line
        assert processes_with("654.321") == []
        ticket = ticket_of(conn.ask(f"sh {own_group.format(543.21)}; sleep 543.21"))
        wait_until(lambda: len(processes_with("543.21")) == 3)  # the shell, two sleeps
        assert conn.ask(f"cancel {ticket}").startswith(f"Cancelled: {ticket}")
    wait_until(lambda: processes_with("543.21") == [], seconds=5)


def test_data_directories_are_owner_only(cluster: Cluster) -> None:
    old = os.umask(0o022)  # the usual umask: what the processes inherit
    try:
        cluster.start_proxy()
        node = cluster.start_node("node-1")
    finally:
        os.umask(old)
    with LineConn(node.port) as conn:  # something written through the WAL on both sides
        ticket = ticket_of(conn.ask("fib 10"))
        assert conn.ask(f"wait {ticket} 20", timeout=25) == "Result: 55"
    for name in ("proxy", "node-1"):
        directory = cluster.tmp / name
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, name
        files = list(directory.iterdir())
        assert files, name
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, (f, oct(f.stat().st_mode))


def test_djs_cluster_shares_a_fresh_token_and_the_cli_client_authenticates(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    djs = [sys.executable, "-c", "from common.cli import app; app()"]
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTER_TOKEN",
                                                            "CLUSTER_TOKEN_FILE")}
    env |= {"CLIENT_TOKEN": CLIENT_TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*djs, "cluster", "--nodes", "2", "--proxy-port", "0",
                             "--first-port", "0", "--data", str(tmp_path / "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("cluster ready"):
            line = proc.stdout.readline().decode()
            assert line, "".join(lines)
            lines.append(line)
        port = re.search(r"nodes on ports (\d+)", lines[-1])
        assert port, lines[-1]
        address = f"127.0.0.1:{port.group(1)}"
        ticket = subprocess.run([*djs, "submit", "fib", "20", "--node", address], env=env,
                                capture_output=True, text=True, timeout=30, check=True)
        result = subprocess.run([*djs, "wait", ticket.stdout.strip(), "--node", address],
                                env=env, capture_output=True, text=True, timeout=60,
                                check=True)
        assert result.stdout.strip() == "6765"
        bad = subprocess.run([*djs, "submit", "fib", "20", "--node", address],
                             env={**env, "CLIENT_TOKEN": "wrong"}, capture_output=True,
                             text=True, timeout=30)
        assert bad.returncode != 0 and "refused CLIENT_TOKEN" in bad.stderr
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    text = "".join(lines) + out.decode(errors="replace")
    assert "node.auth_failed" not in text and "security.no_cluster_token" not in text


def _scrape(port: int, authorization: str | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_nodes_metrics_need_metrics_token_when_it_is_set(cluster: Cluster) -> None:
    cluster.start_proxy()
    port = free_port()
    node = cluster.start_node("node-1", METRICS_PORT=str(port), METRICS_TOKEN=TOKEN)
    assert nc(node.port, "sleep 0\n")[0].startswith("Ticket ID: ")
    assert _scrape(port, None)[0] == 401
    assert _scrape(port, "Bearer not-the-token")[0] == 401
    status, body = _scrape(port, f"Bearer {TOKEN}")
    assert status == 200 and "djs_jobs_submitted_total 1.0" in body
    assert "djs_node_tickets 1.0" in body and "djs_tickets_expired_total 0.0" in body
    # without a token on an address others reach, the node says so at start
    open_port = free_port()
    other = cluster.start_node("node-2", HOST="0.0.0.0", METRICS_PORT=str(open_port))
    assert _scrape(open_port, None)[0] == 200
    assert "security.open_metrics" in other.log()
