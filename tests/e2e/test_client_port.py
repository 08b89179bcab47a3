"""The client port against hostile input and hostile clients (issue 6), on a real node:
fuzzing (hypothesis and raw random bytes), the connection limit, the idle timeout, a
client that never reads, and 2,000 connections at once. Afterwards the node still serves,
its tickets still give the same results, and its memory did not grow without bound.

FUZZ_EXAMPLES (default 40) and FUZZ_RANDOM_MIB (default 4) make the fuzzing longer."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_node.jobtypes import fibonacci
from tests.procs import Cluster, LineConn, Proc, children_of, submit_many, wait_results

pytestmark = pytest.mark.e2e
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ_RANDOM_MIB = int(os.environ.get("FUZZ_RANDOM_MIB", "4"))
# Generous: a Python process's RSS moves by a few MiB with allocator noise; unbounded
# buffering of the inputs below would take hundreds.
RSS_GROWTH_LIMIT_KIB = 64 * 1024

TELNET = [b"\xff\xfb\x01", b"\xff\xfd\x03", b"\xff\xf4\xff\xfd\x06", b"\xff\xf3"]
FRAGMENTS = [b"\n", b"\r\n", b"\x00", b"r", b"getall", b"stats", b"submit ", b"--priority ",
             b"--delay 99999999", b"cancel ", b"list ", b"json", b"text", b"wait ",
             b"fib 100000", b"sleep 0", b"\xc3\x28", b"\xe2\x82", b"help", b" " * 50,
             *TELNET]


def rss_kib(proc: Proc) -> int:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_and_drain(port: int, data: bytes, read: bool = True) -> None:
    """Send `data`, stop writing, read whatever comes back until the node closes."""
    with (socket.create_connection(("127.0.0.1", port), timeout=10) as s,
          contextlib.suppress(OSError)):
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while read and s.recv(65536):
            pass


def node_with_tickets(cluster: Cluster, **env: str) -> tuple[Proc, dict[str, str]]:
    cluster.start_proxy()
    node = cluster.start_node("node-1", 4, None, **env)
    tickets = submit_many(node.port, ["fib 80", "5", "fib 5000"] * 10)
    results = wait_results(node.port, tickets, 30)
    assert len(results) == len(tickets)
    return node, results


def assert_still_serving(node: Proc, results: dict[str, str]) -> None:
    with LineConn(node.port) as conn:
        assert conn.ask("stats").startswith("Stats: node=node-1")
    assert wait_results(node.port, list(results), 10) == results


@pytest.mark.timeout(300)
def test_fuzz_the_client_port(cluster: Cluster) -> None:
    node, results = node_with_tickets(cluster)
    before = rss_kib(node)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=300)),
                    max_size=60), st.booleans())
    def one_client(parts: list[bytes], read: bool) -> None:
        send_and_drain(node.port, b"".join(parts), read)

    one_client()
    for _ in range(FUZZ_RANDOM_MIB):  # raw random bytes, a MiB per connection
        send_and_drain(node.port, os.urandom(1024 * 1024))
    assert node.alive
    assert_still_serving(node, results)
    after = rss_kib(node)
    print(f"fuzz: {FUZZ_EXAMPLES} hypothesis clients, {FUZZ_RANDOM_MIB} MiB random; "
          f"node RSS {before} -> {after} KiB")
    assert after - before < RSS_GROWTH_LIMIT_KIB, (before, after)


def test_connections_beyond_max_clients_get_an_error(cluster: Cluster) -> None:
    node, _ = node_with_tickets(cluster, MAX_CLIENTS="20")
    conns = [LineConn(node.port) for _ in range(19)]  # + none left open by the helpers
    try:
        for conn in conns:
            assert conn.ask("stats").startswith("Stats:")
        with LineConn(node.port) as last:
            assert last.ask("stats").startswith("Stats:")
            with LineConn(node.port) as extra:
                assert extra.expect_line() == (
                    "ERR too many connections (MAX_CLIENTS=20), try again later")
                with pytest.raises(ConnectionError):
                    extra.expect_line()
        deadline = time.monotonic() + 10
        while True:  # the closed one's place is free again once the node has noticed
            with LineConn(node.port) as again:
                line = again.ask("stats")
            if line.startswith("Stats:") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert line.startswith("Stats:"), line
    finally:
        for conn in conns:
            conn.close()


def test_an_idle_client_and_half_a_line_are_closed_with_a_reason(cluster: Cluster) -> None:
    node, results = node_with_tickets(cluster, CLIENT_IDLE_TIMEOUT="1")
    with LineConn(node.port) as conn:
        conn.file.write(b"15")  # half a line, then silence
        conn.file.flush()
        assert conn.expect_line(10) == "ERR idle for 1 s (CLIENT_IDLE_TIMEOUT), closing"
        with pytest.raises(ConnectionError):
            conn.expect_line(10)
    assert_still_serving(node, results)


def test_a_client_that_never_reads_is_not_buffered_without_bound(cluster: Cluster) -> None:
    node, results = node_with_tickets(cluster, CLIENT_IDLE_TIMEOUT="4")
    before = rss_kib(node)
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", node.port))
    hog.setblocking(False)
    sent = 0
    request = b"getall\n" * 10_000  # each answer is 31 lines: ~2.5 KiB; ~250 MiB in all
    for _ in range(200):
        with contextlib.suppress(BlockingIOError):
            sent += hog.send(request)
        time.sleep(0.005)
    # meanwhile everyone else is served
    assert_still_serving(node, results)
    grown = rss_kib(node) - before
    print(f"never-reading client: sent {sent} bytes of getall; node RSS grew {grown} KiB")
    assert grown < RSS_GROWTH_LIMIT_KIB, grown
    # and the hog is dropped once it has not read for CLIENT_IDLE_TIMEOUT: what it finds
    # when it reads at last is what was in flight, then the end (not 250 MiB)
    time.sleep(8)
    hog.setblocking(True)
    hog.settimeout(30)
    received = 0
    with contextlib.suppress(ConnectionError):
        while chunk := hog.recv(1 << 20):
            received += len(chunk)
            assert received < 32 * 1024 * 1024, "the node kept writing to a dead reader"
    hog.close()
    assert sent > 0
    assert_still_serving(node, results)


@pytest.mark.timeout(180)
def test_two_thousand_connections_at_once(cluster: Cluster) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4400) if hard ==
                                                resource.RLIM_INFINITY else hard, hard))
    node, results = node_with_tickets(cluster)
    socks = []
    try:
        for _ in range(2000):
            socks.append(socket.create_connection(("127.0.0.1", node.port), timeout=30))
        for s in socks:
            s.sendall(b"fib 30\n")
        tickets = []
        for s in socks:
            f = s.makefile("rb")
            line = f.readline().decode()
            assert line.startswith("Ticket ID: "), line
            tickets.append(line.strip().removeprefix("Ticket ID: "))
            f.close()
        assert len(set(tickets)) == 2000
        assert_still_serving(node, results)  # while all 2,000 are open
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    done = wait_results(node.port, tickets, 60)
    assert set(done.values()) == {"832040"} and len(done) == 2000


def test_the_largest_fib_then_exit_ends_the_connection(cluster: Cluster) -> None:
    """`fib` of a large n runs in the node's worker processes, started by the first such
    job. They were forked from the node and held a copy of the client's connection: after
    `exit` the client got the goodbye line but never the end of the connection (`nc` hung).
    And fib(100,000), 20,899 digits, failed on Python's 4,300-digit limit of `str()`."""
    cluster.start_proxy()
    node = cluster.start_node("node-1", 2)
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        expected = str(fibonacci(100_000))
    finally:
        sys.set_int_max_str_digits(limit)
    with LineConn(node.port) as conn:
        ticket = conn.ask("fib 100000").removeprefix("Ticket ID: ")
        assert conn.ask(f"wait {ticket} 30", timeout=35) == f"Result: {expected}"
        assert node.proc is not None
        workers = children_of(node.proc.pid)
        assert workers, "no worker process: fib did not run in the pool"
        for pid in workers:
            held = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            assert not [h for h in held if h.startswith("socket:")], (pid, held)
        assert conn.ask("exit") == "Come back later to check your results."
        conn.sock.settimeout(10)
        assert conn.file.read() == b""  # the end of the connection, not a timeout


def test_a_waiting_client_is_told_when_its_node_stops(cluster: Cluster) -> None:
    """Clients in a `wait` or a `tail` saw their connection end without a word."""
    cluster.start_proxy()
    node = cluster.start_node("node-1")
    with LineConn(node.port) as conn:
        ticket = conn.ask("60000").removeprefix("Ticket ID: ")
        conn.send(f"wait {ticket} 60")
        time.sleep(0.3)  # waiting
        node.kill(signal.SIGTERM)
        assert conn.expect_line(10) == (
            "ERR the node is stopping; ask again once it is back (tickets are kept)")
