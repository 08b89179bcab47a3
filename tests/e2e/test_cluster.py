"""The backbone end to end: real proxy and node processes, real sockets, real `nc`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.procs import (
    Cluster,
    LineConn,
    children_of,
    nc,
    submit_many,
    wait_results,
    wait_until,
)

pytestmark = pytest.mark.e2e
TICKET = re.compile(r"^Ticket ID: [a-z2-7]{24}$")


@pytest.mark.usefixtures("need_nc")
def test_the_readme_transcript_through_nc(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    first = nc(node.port, "1500\n")
    assert first[0].startswith("Ticket ID: ") and TICKET.match(first[0])
    assert first[1] == "Come back later to check your results."
    ticket = first[0].removeprefix("Ticket ID: ")
    assert nc(node.port, f"r{ticket}\n")[0] == (
        "Result has not been executed yet, come back later.")
    time.sleep(1.7)
    result = nc(node.port, f"r{ticket}\nexit\n")
    assert re.match(r"^Result: slept 1500 ms on node-1 \(started \S+Z, finished \S+Z\)$",
                    result[0]), result
    assert result[1] == "Come back later to check your results."


@pytest.mark.usefixtures("need_nc")
def test_end_of_input_answers_every_line_then_says_goodbye(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    lines = nc(node.port, "100\n200")  # the last line even without its newline
    assert [bool(TICKET.match(x)) for x in lines[:2]] == [True, True]
    assert lines[2:] == ["Come back later to check your results."]


@pytest.mark.usefixtures("need_nc")
def test_120_jobs_through_two_nodes_come_back_balanced(cluster: Cluster) -> None:
    cluster.start_proxy()
    for name in ("node-1", "node-2", "node-3"):
        cluster.start_node(name)
    submitted: dict[str, list[str]] = {}
    for name in ("node-1", "node-2"):
        port = cluster.nodes[name].port
        out = nc(port, "50\n" * 60)
        submitted[name] = [x.removeprefix("Ticket ID: ") for x in out if TICKET.match(x)]
        assert len(submitted[name]) == 60
    ran_on: Counter[str] = Counter()
    for name, tickets in submitted.items():
        results = wait_results(cluster.nodes[name].port, tickets, 30)
        assert len(results) == len(tickets), cluster.logs()
        for text in results.values():
            match = re.match(r"slept 50 ms on (node-\d)", text)
            assert match, text
            ran_on[match.group(1)] += 1
    assert sum(ran_on.values()) == 120
    for name in ("node-1", "node-2", "node-3"):
        assert 0.25 * 120 <= ran_on[name] <= 0.42 * 120, ran_on


def test_job_types_and_refusals(cluster: Cluster) -> None:
    cluster.start_proxy()
    plain = cluster.start_node("node-1")
    shell = cluster.start_node("node-2", ALLOW_SHELL="1")
    with LineConn(plain.port) as conn:
        fib = conn.ask("fib 90")
        assert TICKET.match(fib)
        assert conn.ask(f"wait {fib.removeprefix('Ticket ID: ')} 10") == (
            "Result: 2880067194370816120")
        assert conn.ask("sh echo hi").startswith("ERR job refused, no ticket issued: sh jobs "
                                                 "are disabled")
        for bad in ("fib -1", "sleep abc", "fib 10**9", "fib 100001", "submit nope 1"):
            reply = conn.ask(bad)
            assert reply.startswith("ERR "), (bad, reply)
            assert "Ticket" not in reply
        assert conn.ask("r" + "a" * 24).startswith("ERR unknown ticket")
        assert conn.ask("what is this").startswith("ERR unknown command")
        assert conn.ask("getall") == f"{fib.removeprefix('Ticket ID: ')} done 2880067194370816120"
        assert conn.expect_line() == "END 1"
    with LineConn(shell.port) as conn:
        ticket = conn.ask("sh echo hi").removeprefix("Ticket ID: ")
        result = conn.ask(f"wait {ticket} 10")
        # the proxy may have sent it to node-1, which refuses to run sh: both are honest
        assert result in ("Result: exit 0: hi",) or "disabled on node-1" in result, result


def test_a_node_restarted_answers_for_all_its_tickets(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    tickets = submit_many(node.port, ["20"] * 50 + ["fib 50"] * 10)
    assert len(wait_results(node.port, tickets, 20)) == 60
    pending = submit_many(node.port, ["300"] * 12)
    node.kill(signal.SIGTERM)
    node.restart()
    results = wait_results(node.port, tickets + pending, 20)
    assert len(results) == 72, cluster.logs()


def test_kill9_of_a_node_and_of_the_proxy_loses_no_ticket(cluster: Cluster) -> None:
    proxy = cluster.start_proxy()
    a = cluster.start_node("node-1", slots=2)
    b = cluster.start_node("node-2", slots=2)
    tickets_a = submit_many(a.port, ["100"] * 40)
    tickets_b = submit_many(b.port, ["fib 70"] * 20 + ["50"] * 20)
    time.sleep(0.3)
    b.kill()  # mid-run: its queued and running jobs
    proxy.kill()
    proxy.restart()
    b.restart()
    ra = wait_results(a.port, tickets_a, 40)
    rb = wait_results(b.port, tickets_b, 40)
    assert len(ra) == 40 and len(rb) == 40, cluster.logs()
    assert all(v == "190392490709135" for k, v in rb.items() if k in tickets_b[:20])


def test_a_node_killed_for_good_has_its_jobs_run_elsewhere(cluster: Cluster) -> None:
    cluster.start_proxy(NODE_TIMEOUT="1500")
    a = cluster.start_node("node-1", slots=2)
    b = cluster.start_node("node-2", slots=2)
    tickets = submit_many(a.port, ["400"] * 8)
    time.sleep(0.2)  # dispatched: two running and two queued on each node
    b.kill()
    results = wait_results(a.port, tickets, 20)  # 8 jobs of 0.4 s on 2 slots, after 1.5 s
    assert len(results) == 8, cluster.logs()
    assert all("on node-1" in r for r in results.values() if "node-2" not in r)


def test_a_node_id_back_with_another_data_directory_is_reported(cluster: Cluster) -> None:
    """Same NODE_ID, another (empty) data directory: the proxy runs the old one's jobs again
    and says why, naming the likely mistake (two nodes with one NODE_ID)."""
    proxy = cluster.start_proxy()
    first = cluster.start_node("node-1", slots=1)
    submit_many(first.port, ["5000"])
    with LineConn(first.port) as conn:
        wait_until(lambda: " running=1 " in conn.ask("stats"))
    first.kill()
    cluster.start_node("node-1", slots=1, data_dir=cluster.tmp / "node-1-elsewhere")
    wait_until(lambda: "node.new_incarnation" in proxy.log())
    (line,) = [x for x in proxy.log().splitlines() if "node.new_incarnation" in x]
    assert "node=node-1" in line and "requeued=1" in line, line
    assert "another node uses this NODE_ID" in line


def test_one_node_more_than_max_num_nodes_is_refused(cluster: Cluster) -> None:
    cluster.start_proxy(MAX_NUM_NODES="1")
    cluster.start_node("node-1")
    extra = cluster.start_node("node-2")
    deadline = time.monotonic() + 10
    while "cluster full" not in extra.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cluster full: MAX_NUM_NODES=1" in extra.log()
    assert cluster.proxy is not None and "node.refused node=node-2" in cluster.proxy.log()
    with LineConn(extra.port) as conn:  # still takes tickets, kept until it is admitted
        assert TICKET.match(conn.ask("10"))


def test_garbage_on_the_client_port_gets_errors_and_the_node_keeps_serving(
        cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    with LineConn(node.port) as conn:
        conn.send(b"\xff\xfb\x01\x00\x80garbage")
        assert conn.expect_line().startswith("ERR line is not UTF-8")
        conn.send(b"x" * 100_000)
        assert conn.expect_line().startswith("ERR line longer than")
        conn.send(b"a\x00b")
        assert conn.expect_line().startswith("ERR line contains a NUL")
        assert TICKET.match(conn.ask("10"))
    half = socket.create_connection(("127.0.0.1", node.port))
    half.sendall(b"15")  # half a line, then gone
    half.close()
    with LineConn(node.port) as conn:
        assert conn.ask("stats").startswith("Stats: node=node-1")


def test_garbage_frames_to_the_proxy_drop_that_peer_only(cluster: Cluster) -> None:
    proxy = cluster.start_proxy()
    node = cluster.start_node("node-1")
    for junk in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"GET / HTTP/1.0\r\n\r\n",
                 b"\x00\x00\x00\x02\x91\x01"):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(8)
            while s.recv(4096):
                pass
    tickets = submit_many(node.port, ["10"] * 5)
    assert len(wait_results(node.port, tickets, 10)) == 5


def test_djs_cluster_starts_a_killed_process_again_on_its_port(tmp_path: Path) -> None:
    """`kill -9` of a node or of the proxy under `djs cluster` took the whole cluster down.
    Now the dead one is started again on its data directory and port, and every ticket is
    still answered; one stopped by SIGTERM is left stopped, the others run on."""
    djs = [sys.executable, "-c", "from common.cli import app; app()", "cluster", "--nodes",
           "2", "--proxy-port", "0", "--first-port", "0", "--dashboard-port", "0", "--data",
           str(tmp_path / "data")]
    cluster = subprocess.Popen(djs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert cluster.stdout is not None
    lines: list[str] = []

    def pid_of(name: str) -> int:
        marker = b"reverse_proxy\0" if name == "proxy" else f"--node-id\0{name}\0".encode()
        (pid,) = [p for p in children_of(cluster.pid)
                  if marker in Path(f"/proc/{p}/cmdline").read_bytes()]
        return pid

    def read_until(prefix: str) -> str:
        while True:
            line = cluster.stdout.readline() if cluster.stdout else ""
            assert line, "".join(lines)
            lines.append(line)
            if line.startswith(prefix):
                return line

    try:
        ready = read_until("cluster ready")
        ports = [int(p) for p in re.findall(r"\d+", ready.split("nodes on ports")[1])[:2]]
        tickets = submit_many(ports[0], ["fib 30", "200"])
        for name in ("node-1", "proxy"):
            os.kill(pid_of(name), signal.SIGKILL)
            assert read_until("[cluster] ") == (
                f"[cluster] {name} exited with code -9; starting it again in 1 s\n")
            held = None
            if name == "node-1":  # its port taken meanwhile: it cannot start, then can
                held = socket.create_server(("127.0.0.1", ports[0]))
            if held is not None:
                assert read_until("[cluster] ") == (
                    "[cluster] node-1 exited with code 3; starting it again in 2 s\n")
                held.close()
            port = ports[0] if name == "node-1" else None
            assert read_until(f"[cluster] {name} is back on port {port or ''}")
        results = wait_results(ports[0], tickets, 30)
        assert len(results) == 2 and results[tickets[0]] == "832040"
        assert len(wait_results(ports[0], submit_many(ports[0], ["fib 20"]), 30)) == 1
        os.kill(pid_of("node-2"), signal.SIGTERM)
        assert read_until("[cluster] ") == (
            "[cluster] node-2 exited with code 0; not started again\n")
        assert len(wait_results(ports[0], submit_many(ports[0], ["fib 21"]), 30)) == 1
    finally:
        cluster.terminate()
        rest, _ = cluster.communicate(timeout=30)
    assert cluster.returncode == 0, "".join(lines) + rest
    assert "Traceback" not in "".join(lines) + rest
