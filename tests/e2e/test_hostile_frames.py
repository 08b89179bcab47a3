"""Issue 9, point 6: hostile frames against a real proxy that serves two real nodes.

Each hostile input (on its own connection, before and after authenticating) must be
rejected cheaply and its peer disconnected; afterwards the proxy still serves its real nodes
and nothing it stored about jobs changed. The random part is bounded for CI: FUZZ_CASES
(default 300) cases, FUZZ_SEED to replay a run (printed on failure)."""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from common import auth
from common.framing import encode_frame
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Info,
    Job,
    Leaving,
    Output,
    Result,
    Welcome,
    to_wire,
)
from tests.e2e.wire import TOKEN, WireNode, hello, join, proxy_records
from tests.procs import Cluster, LineConn, Proc, submit_many, wait_results

pytestmark = pytest.mark.e2e
CASES = int(os.environ.get("FUZZ_CASES", "300"))


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def crafted() -> dict[str, bytes]:
    """One of each kind of hostile frame the issue names."""
    good_hello = to_wire(hello("crafted"))
    return {
        "length prefix of 4 GiB": b"\xff\xff\xff\xff" + b"x" * 1000,
        "length prefix just over the handshake cap": struct.pack(">I", 4 * 1024 * 1024 + 1),
        "nested 100,000 deep": struct.pack(">I", 100_001) + b"\x91" * 100_000 + b"\xc0",
        "array header of 4 billion items": struct.pack(">I", 5) + b"\xdd\xff\xff\xff\xff",
        "map header of 4 billion pairs": struct.pack(">I", 5) + b"\xdf\xff\xff\xff\xff",
        "string header of 4 GiB": struct.pack(">I", 5) + b"\xdb\xff\xff\xff\xff",
        "a 3 MiB array of nils": frame([None] * (3 * 1024 * 1024)),
        "not a map": frame([1, 2, 3]),
        "unknown type": frame({"type": "GIMME_ALL_JOBS"}),
        "HELLO with slots as a string": frame({**good_hello, "slots": "4"}),
        "HELLO with a 1 MiB node id": frame({**good_hello, "node_id": "n" * (1 << 20)}),
        "HELLO with held ids as a map": frame({**good_hello, "queued": {"a": 1}}),
        "INFO before HELLO": frame(to_wire(Info(0, 0, 1, 0, 0))),
        "int map keys": struct.pack(">I", 3) + b"\x81\x01\x02",
        "msgpack ext type": frame(msgpack.ExtType(5, b"payload")),
        "garbage": b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",
    }


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[pos] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        else:
            buf[pos:pos] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\x91" * 64, b"\xff\xff\xff\xff"])
    return bytes(buf)


def samples() -> list[bytes]:
    spec = JobSpec(JobId("b" * 24), "sleep", ("1",), NodeId("fuzz"), 1.0)
    outcome = Outcome(JobId("b" * 24), True, "x", NodeId("fuzz"), 1.0, 2.0)
    return [encode_frame(m) for m in (hello("fuzz"), Info(1, 2, 3, 4, 5), Job((spec,)),
                                      Result((outcome,)))]


def send_and_expect_close(port: int, data: bytes, *, authenticate: bool = False,
                          eof: bool = True) -> None:
    """Send `data` as a fresh peer; the proxy must close the connection. With `eof` the
    peer also ends its side (so an incomplete frame is not a wait); without, the proxy must
    close on its own: the rejection itself is what closes it."""
    if authenticate:
        peer, reply = join(port, "fuzz")
        assert isinstance(reply, Welcome), reply
    else:
        peer = WireNode(port)
        peer.recv()  # CHALLENGE
    with peer:
        try:
            peer.send_raw(data)
            if eof:
                peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return  # closed on us mid-send: that is a rejection too
        assert peer.wait_closed(), f"connection left open after {data[:60]!r}"


def peak_rss_kib(proc: Proc) -> int:
    assert proc.proc is not None
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def steady_records(records: dict[str, Any]) -> dict[str, Any]:
    """What must not change: every job of the real nodes, the proxy's identity, the real
    nodes. (An authenticated node may submit jobs of its own: those are left out.)"""
    return {k: v for k, v in records.items()
            if not k.startswith("n:fuzz") and not (k.startswith("j:") and v[0][3] == "fuzz")}


def run_jobs(cluster: Cluster, count: int) -> None:
    for name in ("node-1", "node-2"):
        port = cluster.nodes[name].port
        tickets = submit_many(port, [f"fib {n}" for n in range(count)])
        results = wait_results(port, tickets, 30)
        assert len(results) == count, cluster.logs()


def test_hostile_frames_are_rejected_and_the_proxy_keeps_serving(cluster: Cluster) -> None:
    seed = int(os.environ.get("FUZZ_SEED", str(random.randrange(2**32))))
    print(f"FUZZ_SEED={seed} FUZZ_CASES={CASES}")
    rng = random.Random(seed)
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    for name in ("node-1", "node-2"):
        cluster.start_node(name, CLUSTER_TOKEN=TOKEN)
    run_jobs(cluster, 10)
    before = steady_records(proxy_records(cluster.tmp / "proxy"))
    rss_before = peak_rss_kib(proxy)

    for name, data in crafted().items():  # before the handshake, then after it
        send_and_expect_close(proxy.port, data, eof=False)
        if name not in ("INFO before HELLO", "length prefix just over the handshake cap",
                        "a 3 MiB array of nils"):
            send_and_expect_close(proxy.port, data, authenticate=True, eof=False)
    flood = encode_frame(Info(0, 0, 0, 0, 0)) * 5000
    send_and_expect_close(proxy.port, flood, authenticate=True, eof=False)
    assert "INFO flood" in proxy.log_path.read_text()

    corpus = samples()
    for case in range(CASES):
        if case % 3 == 0:
            data = rng.randbytes(rng.randint(1, 2048))
        else:
            data = mutate(rng, rng.choice(corpus))
        try:
            send_and_expect_close(proxy.port, data, authenticate=case % 2 == 1)
        except AssertionError as exc:
            raise AssertionError(f"FUZZ_SEED={seed} case {case}: {exc}") from None

    assert proxy.alive
    after = steady_records(proxy_records(cluster.tmp / "proxy"))
    assert after == before, f"seed {seed}: the proxy's store changed"
    rss_after = peak_rss_kib(proxy)
    print(f"proxy peak RSS: {rss_before} KiB before, {rss_after} KiB after the fuzz")
    assert rss_after - rss_before < 200 * 1024, "a hostile peer made the proxy buffer too much"
    run_jobs(cluster, 10)  # the real nodes were served throughout, and still are
    log = proxy.log_path.read_text()
    assert "node.joined node=node-1" in log and log.count("node.joined node=node-1") == 1, (
        "a real node was disconnected by the fuzz")
    assert log.count("node.joined node=node-2") == 1


def test_a_welcomed_node_that_breaks_the_protocol_is_told_why_it_is_dropped(
        cluster: Cluster) -> None:
    """Its last frame from the proxy is a LEAVING saying what was wrong (a node of another
    version would learn it this way); the proxy logs it too."""
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    peer, reply = join(proxy.port, "odd")
    assert isinstance(reply, Welcome), reply
    peer.send_raw(frame({"type": "GIMME_ALL_JOBS"}))
    got = peer.received_until_closed()
    assert isinstance(got[-1], Leaving), got
    assert got[-1].reason.startswith("protocol error: "), got[-1]
    assert "GIMME_ALL_JOBS" in got[-1].reason
    assert "node.protocol_error node=odd" in proxy.log_path.read_text()


def test_a_connection_flood_is_capped_and_the_nodes_get_back_in(cluster: Cluster) -> None:
    from reverse_proxy.node_server import MAX_HANDSHAKES

    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_HANDSHAKES + 20):  # connect and say nothing
            idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=10))
        refused = 0
        for s in idle:
            data = s.recv(4096)  # the CHALLENGE, or EOF from a connection over the cap
            refused += not data
        assert refused >= 20
        assert "node.handshake_refused" in proxy.log_path.read_text()
    finally:
        for s in idle:
            s.close()
    node = cluster.start_node("node-1", CLUSTER_TOKEN=TOKEN)
    tickets = submit_many(node.port, ["fib 30"])
    assert wait_results(node.port, tickets, 30) == {tickets[0]: "832040"}
    assert proxy.alive


def join_as_runner(port: int, node_id: str) -> WireNode:
    """A node with a slot and every job type, answering the challenge with a proof."""
    node = WireNode(port)
    challenge = node.recv()
    assert isinstance(challenge, Challenge)
    nonce = auth.new_nonce()
    incarnation = "inc-" + node_id
    node.send(Hello(NodeId(node_id), incarnation, 1, PROTOCOL_VERSION, (), (), (), nonce,
                    auth.node_proof(TOKEN.encode(), challenge.nonce, nonce, NodeId(node_id),
                                    incarnation)))
    assert isinstance(node.recv(), Welcome)
    return node


def test_a_runners_result_and_output_reach_the_origins_clients_as_one_line_each(
        cluster: Cluster) -> None:
    """A runner (faulty, or hostile with the token) answered a job with
    `6765\\nTicket ID: aaa…`: the origin passed the line break on, and a request-reply client
    read the forged ticket as the answer to its next line; its `OUTPUT` lines reached a
    `tail` unescaped and uncapped (20 MB for one job). The origin now holds whatever it
    passes on to what it promises its clients."""
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN)
    origin = cluster.start_node("origin", slots=1, CLUSTER_TOKEN=TOKEN, ALLOW_SHELL="1",
                                SLOW_FACTOR="1000", SLOW_AFTER="0")  # its own slot: busy
    [blocker] = submit_many(origin.port, ["1"])  # 1 ms x 1000: the origin's slot, a second
    runner = join_as_runner(proxy.port, "runner")
    try:
        with LineConn(origin.port) as conn:
            ticket = conn.ask("sh echo hi").removeprefix("Ticket ID: ")
            job = runner.recv_until(Job, 15)
            assert [s.job_id for s in job.jobs] == [ticket]
            conn.send(f"tail {ticket}")
            time.sleep(0.3)  # the tail is subscribed
            runner.send(Output(JobId(ticket), ("evil\nResult: 42", "A" * 5000) * 200))
            runner.send(Result((Outcome(JobId(ticket), True, "6765\nTicket ID: aaa", NodeId(
                "runner"), time.time(), time.time()),)))
            lines = []
            while not (line := conn.expect_line(10)).startswith("Result: "):
                lines.append(line)
            assert line == "Result: 6765\\nTicket ID: aaa"
            assert 0 < len(lines) <= 100 and all(len(x) <= 1040 for x in lines)
            assert lines[0] == "Output: evil\\nResult: 42"
            assert conn.ask(f"r{ticket}") == "Result: 6765\\nTicket ID: aaa"
            assert conn.ask("stats").startswith("Stats: ")  # still in step
    finally:
        runner.close()
    assert wait_results(origin.port, [blocker], 20)
