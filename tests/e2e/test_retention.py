"""RESULT_TTL on a real node, through the real `nc`: a result stays readable while its ticket
is pending and for RESULT_TTL after, then the ticket is forgotten, on disk too (a `kill -9`
and restart does not bring it back), and a client asking for it is told why."""

from __future__ import annotations

import re
import time

import pytest

from tests.procs import Cluster, nc

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("need_nc")]
TICKET = re.compile(r"^Ticket ID: ([a-z2-7]{24})$")


def submit(port: int, line: str) -> str:
    out = nc(port, line + "\n")
    match = TICKET.match(out[0])
    assert match, out
    return match.group(1)


def answer(port: int, ticket: str) -> str:
    return nc(port, f"r{ticket}\n")[0]


def wait_until_forgotten(port: int, ticket: str, seconds: float = 20) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = answer(port, ticket)
        if line.startswith("ERR unknown ticket"):
            return line
        time.sleep(0.2)
    raise AssertionError(f"{ticket} still known after {seconds} s: {line}")


def test_results_expire_after_result_ttl_and_stay_gone_after_a_restart(
        cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", RESULT_TTL="2")
    quick = submit(node.port, "sleep 0")
    slow = submit(node.port, "sleep 3500")  # pending for longer than RESULT_TTL
    assert nc(node.port, f"wait {quick} 10\n", timeout=20)[0].startswith("Result: slept 0 ms")
    assert "(RESULT_TTL): expired here" in wait_until_forgotten(node.port, quick)
    # the pending ticket outlived RESULT_TTL and is still there; its result arrives
    assert nc(node.port, f"wait {slow} 20\n", timeout=30)[0].startswith("Result: slept 3500 ms")
    assert answer(node.port, slow).startswith("Result: slept 3500 ms")  # kept after it
    wait_until_forgotten(node.port, slow)
    node.restart()  # SIGKILL, same data directory
    assert "(RESULT_TTL): expired here" in answer(node.port, quick)
    assert "(RESULT_TTL): expired here" in answer(node.port, slow)
    assert "tickets.expired count=" in node.log()


def test_an_expired_ticket_is_named_as_such(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", RESULT_TTL="1")
    ticket = submit(node.port, "sleep 0")
    assert nc(node.port, f"wait {ticket} 10\n", timeout=20)[0].startswith("Result:")
    time.sleep(2.2)  # the ticket itself says it was issued over RESULT_TTL ago
    assert re.fullmatch(
        f"ERR unknown ticket '{ticket}': issued [23] s ago, and this node keeps results 1 s "
        r"after their job finished \(RESULT_TTL\): expired here, or issued by another node",
        wait_until_forgotten(node.port, ticket))
    # a ticket of another node, issued a moment ago: the plain answer
    other = cluster.start_node("node-2")
    fresh = submit(other.port, "sleep 0")
    assert answer(node.port, fresh) == (f"ERR unknown ticket '{fresh}': this node never "
                                        "issued it (ask the node you submitted it to)")


def test_result_ttl_zero_keeps_results(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", RESULT_TTL="0")
    ticket = submit(node.port, "sleep 0")
    assert nc(node.port, f"wait {ticket} 10\n", timeout=20)[0].startswith("Result:")
    time.sleep(1.5)
    assert answer(node.port, ticket).startswith("Result: slept 0 ms")


def test_past_max_results_the_oldest_results_are_forgotten_first(cluster: Cluster) -> None:
    cluster.start_proxy()
    node = cluster.start_node("node-1", MAX_RESULTS="3")
    tickets = [submit(node.port, "sleep 0") for _ in range(5)]
    for ticket in tickets:
        assert nc(node.port, f"wait {ticket} 10\n", timeout=20)[0].startswith("Result:")
    for ticket in tickets[:2]:  # issued a moment ago, but before the oldest one kept
        assert "keeps the newest 3 results (MAX_RESULTS): expired here" in wait_until_forgotten(
            node.port, ticket)
    for ticket in tickets[2:]:
        assert answer(node.port, ticket).startswith("Result: slept 0 ms")
    # a ticket still pending is never counted nor dropped
    slow = submit(node.port, "sleep 2500")
    newer = [submit(node.port, "sleep 0") for _ in range(4)]
    assert nc(node.port, f"wait {newer[-1]} 10\n", timeout=20)[0].startswith("Result:")
    wait_until_forgotten(node.port, tickets[4])
    assert nc(node.port, f"wait {slow} 20\n", timeout=30)[0].startswith("Result: slept 2500")
