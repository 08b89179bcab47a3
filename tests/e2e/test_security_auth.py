"""Issue 9, points 1 and 2, against a real proxy: who may join as a node (HMAC handshake,
mutual), the refusal to listen publicly without a token, and result provenance."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import PROTOCOL_VERSION, Ack, Challenge, Job, Refused, Result, Welcome
from tests.e2e.wire import TOKEN, WireNode, hello, join, proxy_records
from tests.procs import Cluster, LineConn, Proc

pytestmark = pytest.mark.e2e
WRONG = "not-the-token-but-long-enough-0000"


def wait_for_log(proc: Proc, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = proc.log_path.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log of {proc.name}:\n{proc.log()}")


def test_a_node_without_the_token_is_refused_and_gets_nothing(cluster: Cluster) -> None:
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    good = cluster.start_node("node-1", CLUSTER_TOKEN=TOKEN)
    with LineConn(good.port) as conn:  # a job is waiting for a slot: nothing goes to the fake
        assert conn.ask("sleep 100").startswith("Ticket ID: ")
    fake = WireNode(proxy.port)
    assert isinstance(fake.recv(), Challenge)
    fake.send(hello("intruder"))
    assert fake.received_until_closed() == [Refused("authentication failed")]
    log = wait_for_log(proxy, "node.auth_failed node='intruder'")
    assert "no proof in HELLO" in log
    # a real node process without the token: refused at every attempt, never admitted
    plain = cluster.start_node("node-2")
    wait_for_log(plain, "proxy refused this node: authentication failed")
    wait_for_log(proxy, "node.auth_failed node='node-2'")
    assert "n:node-2" not in proxy_records(cluster.tmp / "proxy")
    assert "n:intruder" not in proxy_records(cluster.tmp / "proxy")


def test_a_node_of_the_protocol_before_challenge_is_told_its_version(cluster: Cluster) -> None:
    """Nodes of protocol 1 sent HELLO without nonce or proof: they learn why they are refused,
    not `authentication failed`; and a refusal is all an unproven peer gets."""
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    old = WireNode(proxy.port)
    assert isinstance(old.recv(), Challenge)
    old.send(dataclasses.replace(hello("old"), version=1))
    assert old.received_until_closed() == [
        Refused(f"protocol version 1 unsupported (need {PROTOCOL_VERSION})")]
    wait_for_log(proxy, "node.refused node=old")
    assert "n:old" not in proxy_records(cluster.tmp / "proxy")


def test_a_node_with_a_wrong_token_is_refused(cluster: Cluster) -> None:
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    fake, reply = join(proxy.port, "wrong", token=WRONG)
    assert reply == Refused("authentication failed")
    assert fake.received_until_closed() == []
    assert "wrong proof in HELLO" in wait_for_log(proxy, "node.auth_failed node='wrong'")
    node = cluster.start_node("node-1", CLUSTER_TOKEN=WRONG)
    wait_for_log(node, "proxy refused this node: authentication failed")
    ok, reply = join(proxy.port, "right")  # the proxy serves everyone else
    ok.close()
    assert isinstance(reply, Welcome) and reply.proof


def test_a_handshake_replayed_on_another_connection_is_refused(cluster: Cluster) -> None:
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    # An eavesdropper records a genuine node's HELLO (this test computes it with the token,
    # as the genuine node would) and sends it again on a connection of its own.
    first = WireNode(proxy.port)
    challenge = first.recv()
    assert isinstance(challenge, Challenge)
    from common import auth

    h = hello("node-x")
    nonce = auth.new_nonce()
    recorded = type(h)(h.node_id, h.incarnation, h.slots, h.version, h.queued, h.running,
                       h.finished, nonce, auth.node_proof(TOKEN.encode(), challenge.nonce,
                                                          nonce, h.node_id, h.incarnation))
    first.send(recorded)
    assert isinstance(first.recv(), Welcome)
    first.close()
    replay = WireNode(proxy.port)
    second = replay.recv()
    assert isinstance(second, Challenge) and second.nonce != challenge.nonce
    replay.send(recorded)
    assert replay.received_until_closed() == [Refused("authentication failed")]
    assert "wrong proof in HELLO" in wait_for_log(proxy, "node.auth_failed node='node-x'")


def test_nodes_with_the_token_run_jobs_and_the_node_authenticates_the_proxy(
        cluster: Cluster) -> None:
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    token_file = cluster.tmp / "token"
    token_file.write_text(TOKEN + "\n")
    node = cluster.start_node("node-1", CLUSTER_TOKEN_FILE=str(token_file))
    with LineConn(node.port) as conn:
        ticket = conn.ask("fib 90").removeprefix("Ticket ID: ")
        assert conn.ask(f"wait {ticket} 20", timeout=25) == "Result: 2880067194370816120"
    assert "node.auth_failed" not in proxy.log()
    # A proxy without the token cannot prove it knows it: the node will not talk to it.
    cluster.proxy = None
    impostor = Cluster(cluster.tmp / "impostor")
    impostor.tmp.mkdir()
    try:
        fake_proxy = impostor.start_proxy()
        lonely = Proc("node-2", "cluster_node",
                      ["--proxy", f"127.0.0.1:{fake_proxy.port}", "--port", "0", "--node-id",
                       "node-2", "--data-dir", str(cluster.tmp / "node-2")],
                      {"CLUSTER_TOKEN": TOKEN, "DASHBOARD_PORT": "0"}, cluster.tmp).start()
        cluster.nodes["node-2"] = lonely
        wait_for_log(lonely, "the proxy sent no proof")
    finally:
        cluster.proxy = proxy
        impostor.stop()


def run_proxy(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CLUSTER_TOKEN", "CLUSTER_TOKEN_FILE", "INSECURE", "HOST")}
    return subprocess.run([sys.executable, "-m", "reverse_proxy", "--port", "0",
                           "--data-dir", str(tmp / "p"), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=30)


def test_the_proxy_will_not_listen_publicly_without_a_token(cluster: Cluster) -> None:
    refused = run_proxy(cluster.tmp, "--host", "0.0.0.0")
    assert refused.returncode == 2
    assert "refusing to bind 0.0.0.0 without a cluster token" in refused.stderr
    assert "--insecure" in refused.stderr
    short = run_proxy(cluster.tmp, "--host", "0.0.0.0", CLUSTER_TOKEN="short")
    assert short.returncode == 2 and "at least 16 bytes" in short.stderr
    # loopback without a token: allowed, with a warning; public with --insecure: allowed
    local = cluster.start_proxy()
    assert "security.no_cluster_token" in wait_for_log(local, "security.no_cluster_token")
    insecure = Proc("insecure", "reverse_proxy", ["--host", "0.0.0.0", "--port", "0",
                                                  "--data-dir", str(cluster.tmp / "i")],
                    {"INSECURE": "1", "DASHBOARD_PORT": "0"}, cluster.tmp).start()
    cluster.nodes["insecure"] = insecure  # stopped with the cluster
    secure = Proc("secure", "reverse_proxy", ["--host", "0.0.0.0", "--port", "0",
                                              "--data-dir", str(cluster.tmp / "s")],
                  {"CLUSTER_TOKEN": TOKEN, "DASHBOARD_PORT": "0"}, cluster.tmp).start()
    cluster.nodes["secure"] = secure
    assert "security.no_cluster_token" not in secure.log()


def test_a_node_cannot_report_results_or_submit_for_others(cluster: Cluster) -> None:
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN, MAX_VIOLATIONS="3")
    node = cluster.start_node("node-1", CLUSTER_TOKEN=TOKEN)
    with LineConn(node.port) as conn:
        ticket = JobId(conn.ask("sleep 1500").removeprefix("Ticket ID: "))
        while "running" not in conn.ask(f"status {ticket}"):
            time.sleep(0.05)  # the proxy has it, and has given it to node-1
    # An authenticated node (it has the token) that misbehaves: it was given nothing.
    evil, reply = join(proxy.port, "evil")
    assert isinstance(reply, Welcome)
    evil.send(Result((Outcome(ticket, True, "forged", NodeId("evil"), 1.0, 2.0),)))
    evil.send(Result((Outcome(ticket, True, "forged", NodeId("node-1"), 1.0, 2.0),)))
    evil.send(Job((JobSpec(JobId("a" * 24), "sleep", ("1",), NodeId("node-1"), 1.0),)))
    got = evil.received_until_closed()
    assert not [m for m in got if isinstance(m, Ack)], got  # nothing was accepted
    log = wait_for_log(proxy, "disconnected after 3 violations")
    assert log.count("node.violation node=evil") == 4
    assert "which was never dispatched to it" in log and "as run by 'node-1'" in log
    assert "for origin 'node-1'" in log
    with LineConn(node.port) as conn:
        line = conn.ask(f"wait {ticket} 20", timeout=25)
    assert line.startswith("Result: slept 1500 ms on node-1"), line
    assert "j:" + "a" * 24 not in proxy_records(cluster.tmp / "proxy")
    # the same peer, reconnecting, is welcome again (the count is per connection)
    again, reply = join(proxy.port, "evil")
    assert isinstance(reply, Welcome)
    again.close()
