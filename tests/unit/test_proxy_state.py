"""Conversation tests of `reverse_proxy.state.ProxyState` with real `NodeState`s, wired by
`tests.sim.Cluster`: jobs go out by slots and come back to the node they came from, once,
through dead nodes, reconnects, new incarnations and crashes of either side. Plus a few
direct tests of the handshake, the views and `restore`."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_node.jobtypes import fibonacci
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import MemoryKV
from common.messages import (
    PROTOCOL_VERSION,
    Ack,
    AckOf,
    Hello,
    Info,
    Job,
    JobStatus,
    Leaving,
    NodeStats,
    RequestOfRes,
    Result,
    Revoke,
    Stats,
    StatusQuery,
    StatusReply,
    Unknown,
)
from common.packer import pack
from reverse_proxy.records import DISPATCHED, DONE, QUEUED, Outgoing, ProxySettings
from reverse_proxy.state import FORGET_NODE_SECONDS, STATS_NODES, ProxyState
from tests.sim import Cluster

SETTINGS = ProxySettings(node_timeout=2.0)
A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def check_invariants(proxy: ProxyState) -> None:
    """A job is in exactly one place, and `assigned` is exactly the jobs dispatched there."""
    for job_id, rec in proxy.jobs.items():
        if rec.state == DISPATCHED:
            assert rec.node is not None
            assert job_id in proxy.nodes[rec.node].assigned, job_id
        else:
            assert all(job_id not in n.assigned for n in proxy.nodes.values()), job_id
    for entry in proxy.nodes.values():
        for job_id in entry.assigned:
            rec = proxy.jobs[job_id]
            assert (rec.state, rec.node) == (DISPATCHED, entry.node_id), job_id
    assert proxy.queued == sum(1 for r in proxy.jobs.values() if r.state == QUEUED)


def assert_answered_once(c: Cluster, ids: list[JobId]) -> None:
    """Each ticket has its result at its origin, and clients were told exactly that one."""
    for job_id in ids:
        outcome = c.outcome(job_id)
        assert outcome is not None, job_id
        assert c.nodes[c.origins[job_id]].resolutions[job_id] == [outcome], job_id


def fib_jobs(c: Cluster, node: str, count: int, first: int = 10) -> list[JobId]:
    return [c.submit(node, "fib", str(first + i)) for i in range(count)]


def holders(c: Cluster) -> Counter[str]:
    return Counter({n: len(sim.state.held) for n, sim in c.nodes.items()})


# ---------------------------------------------------------------------------- happy paths


def test_submit_at_a_result_comes_back_to_a() -> None:
    c = Cluster({"a": 0, "b": 2}, SETTINGS)  # a runs nothing itself
    job_id = c.submit("a", "fib", "90")
    c.pump()
    outcome = c.outcome(job_id)
    assert outcome is not None
    assert (outcome.ok, outcome.output, outcome.node) == (True, str(fibonacci(90)), B)
    assert_answered_once(c, [job_id])
    assert c.proxy.jobs == {}  # delivered, acknowledged, forgotten
    assert c.is_done()


def test_a_job_that_runs_at_its_origin_is_answered_there() -> None:
    c = Cluster({"a": 1}, SETTINGS)
    job_id = c.submit("a", "sleep", "5")
    c.pump()
    outcome = c.outcome(job_id)
    assert outcome is not None and outcome.output == "slept 5 ms on a"
    assert_answered_once(c, [job_id])
    assert c.is_done()


def test_jobs_spread_by_slots() -> None:
    c = Cluster({"a": 1, "b": 2, "c": 4}, SETTINGS)
    ids = fib_jobs(c, "a", 100)
    c.pump(execute=False)
    # each node holds up to slots * (1 + prefetch); the rest waits at the proxy
    assert holders(c) == Counter({"a": 2, "b": 4, "c": 8})
    assert c.proxy.queued == 100 - 14
    check_invariants(c.proxy)
    c.settle()
    assert_answered_once(c, ids)
    assert sum(c.runs.values()) == 100


def test_more_slots_run_more_jobs() -> None:
    c = Cluster({"a": 2, "b": 8}, SETTINGS)
    ids = fib_jobs(c, "a", 200)
    c.pump(execute=False)
    assert holders(c) == Counter({"a": 4, "b": 16})
    c.settle()
    by_node = Counter(o.node for o in (c.outcome(j) for j in ids) if o is not None)
    assert by_node[B] > by_node[A]
    assert_answered_once(c, ids)


def test_submissions_from_every_node_come_home() -> None:
    c = Cluster({"a": 1, "b": 1, "c": 1}, SETTINGS)
    ids = {n: fib_jobs(c, n, 5, first=20) for n in ("a", "b", "c")}
    c.settle()
    for n, tickets in ids.items():
        assert all(c.origins[t] == n for t in tickets)
        assert_answered_once(c, tickets)
    assert c.proxy.completed == 15


def test_info_is_answered_with_stats() -> None:
    c = Cluster({"a": 1, "b": 2}, SETTINGS)
    c.advance(0.6)
    cluster = c.node("a").state.cluster
    assert cluster is not None
    assert [(n.node_id, n.alive, n.slots) for n in cluster.nodes] == [(A, True, 1),
                                                                      (B, True, 2)]


# ---------------------------------------------------------------------------- failures


def test_dead_node_jobs_run_elsewhere() -> None:
    c = Cluster({"a": 1, "b": 2, "c": 1}, SETTINGS)
    ids = fib_jobs(c, "a", 8)
    c.pump(execute=False)
    lost = sorted(c.node("b").state.held)
    assert len(lost) == 4
    c.kill_node("b")
    c.advance(SETTINGS.node_timeout - 0.5)
    assert all(c.proxy.jobs[j].node == B for j in lost)  # not yet: b may come back
    c.advance(1.0)
    assert not c.proxy.nodes[B].alive
    assert_answered_once(c, ids)
    assert all(c.runs[j] == 1 for j in ids)
    assert {o.node for o in (c.outcome(j) for j in lost) if o is not None} <= {A, C}
    # b comes back holding jobs that were done meanwhile: they are revoked, not run
    c.settle()
    assert all(c.runs[j] == 1 for j in ids)
    assert_answered_once(c, ids)
    assert c.proxy.duplicates == 0


def test_hung_node_is_disconnected_and_its_jobs_move() -> None:
    c = Cluster({"a": 1, "b": 1}, SETTINGS)
    ids = fib_jobs(c, "a", 2)
    c.pump(execute=False)
    # nothing is delivered for longer than node_timeout: the INFO frames sit in the queues
    c.advance(SETTINGS.node_timeout + 0.5, pump=False)
    assert all(sim.link is None for sim in c.nodes.values())  # the proxy closed both
    c.settle()
    assert_answered_once(c, ids)


def test_node_back_within_timeout_keeps_its_jobs() -> None:
    c = Cluster({"a": 1, "b": 2}, SETTINGS)
    ids = fib_jobs(c, "a", 6)
    c.pump(execute=False)
    kept = sorted(c.node("b").state.held)
    c.disconnect("b")
    c.advance(SETTINGS.node_timeout - 0.5)
    assert all(c.proxy.jobs[j].state == DISPATCHED and c.proxy.jobs[j].node == B
               for j in kept)
    c.heal()
    c.settle()
    assert_answered_once(c, ids)
    assert all(c.runs[j] == 1 for j in ids)
    assert {o.node for o in (c.outcome(j) for j in kept) if o is not None} == {B}
    assert all(c.outcome(j) is not None for j in kept)


def test_jobs_lost_in_flight_are_sent_again_on_reconnect() -> None:
    c = Cluster({"a": 0, "b": 2}, SETTINGS)
    ids = fib_jobs(c, "a", 2)
    c.deliver_to_proxy("a")  # stored and dispatched: the JOB to b is in flight
    link = c.node("b").link
    assert link is not None and all(isinstance(m, Job) for m in link.to_node)
    assert all(c.proxy.jobs[j].node == B for j in ids)
    c.disconnect("b")
    c.connect("b")
    c.pump()
    assert_answered_once(c, ids)
    assert all(c.runs[j] == 1 for j in ids)


def test_new_incarnation_requeues_its_jobs() -> None:
    c = Cluster({"a": 1, "b": 2}, SETTINGS)
    ids = fib_jobs(c, "a", 6)
    c.pump(execute=False)
    lost = sorted(c.node("b").state.held)
    c.wipe_node("b")
    assert c.connect("b") is None
    assert all(c.proxy.jobs[j].attempts == 2 for j in lost)
    check_invariants(c.proxy)
    c.settle()
    assert_answered_once(c, ids)
    assert all(c.runs[j] == 1 for j in ids)


def test_wiped_origin_gets_results_it_no_longer_knows() -> None:
    c = Cluster({"a": 0, "b": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "10")
    c.deliver_to_proxy("a")
    c.wipe_node("a")
    c.settle()
    assert job_id not in c.node("a").state.tickets
    assert c.proxy.jobs == {}


def test_proxy_crash_mid_run_then_everything_completes() -> None:
    c = Cluster({"a": 1, "b": 2, "c": 3}, SETTINGS)
    ids = fib_jobs(c, "a", 20) + fib_jobs(c, "c", 20, first=40)
    for _ in range(3):
        for n in ("a", "b", "c"):
            c.deliver_to_proxy(n, limit=1)
            c.deliver_to_node(n, limit=1)
        c.execute("b")
    c.crash_proxy()
    check_invariants(c.proxy)
    c.settle()
    assert_answered_once(c, ids)


def test_proxy_crash_with_results_waiting_for_their_origin() -> None:
    c = Cluster({"a": 0, "b": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "30")
    c.deliver_to_proxy("a")
    c.disconnect("a")
    c.pump()  # b runs it; the proxy keeps the result for a
    assert c.proxy.jobs[job_id].state == DONE
    c.crash_proxy()
    assert c.proxy.jobs[job_id].state == DONE
    c.settle()
    assert_answered_once(c, [job_id])
    assert c.runs[job_id] == 1


def test_proxy_wiped_nodes_submit_again() -> None:
    c = Cluster({"a": 0, "b": 1}, SETTINGS)
    ids = fib_jobs(c, "a", 3)
    c.pump(execute=False)  # stored at the proxy, dispatched to b
    c.wipe_proxy()
    c.settle()  # REQUEST_OF_RES -> UNKNOWN -> JOB again
    assert_answered_once(c, ids)


def test_node_crash_between_finish_and_commit_runs_the_job_again() -> None:
    c = Cluster({"a": 0, "b": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "50")
    c.pump(execute=False)
    c.start_jobs("b")
    c.finish_jobs("b", commit=False)
    c.crash_node("b")
    assert c.node("b").state.held.keys() == {job_id}
    c.settle()
    assert c.runs[job_id] == 2
    assert_answered_once(c, [job_id])


def test_origin_crash_between_finish_and_commit_tells_its_client_once() -> None:
    c = Cluster({"a": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "12")
    c.pump(execute=False)
    c.start_jobs("a")
    c.finish_jobs("a", commit=False)
    c.crash_node("a")
    assert c.node("a").resolutions == {}
    c.settle()
    assert c.runs[job_id] == 2
    assert_answered_once(c, [job_id])


def test_origin_crash_after_the_result_arrived() -> None:
    c = Cluster({"a": 0, "b": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "25")
    c.pump()
    c.crash_node("a")
    c.settle()
    assert_answered_once(c, [job_id])


def test_running_job_survives_a_revoke_race() -> None:
    """b was declared dead while it ran a job; the job ran elsewhere too. The first result
    to reach the proxy wins; the origin hears once."""
    c = Cluster({"a": 0, "b": 1, "c": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "33")
    c.pump(execute=False)
    runner = "b" if c.node("b").state.held else "c"
    c.start_jobs(runner)
    c.disconnect(runner)
    c.advance(SETTINGS.node_timeout + 0.5)  # requeued and run by the other node
    assert c.outcome(job_id) is not None
    c.finish_jobs(runner)
    c.settle()
    assert c.runs[job_id] == 2
    assert_answered_once(c, [job_id])


# ---------------------------------------------------------------------------- random


# Delivery steps are drawn most often, so that crashes and timeouts land mid-conversation.
_NODE = st.integers(0, 2)
OPS = st.one_of(
    st.tuples(st.just("submit"), _NODE, st.integers(1, 4)),
    st.tuples(st.just("to_proxy"), _NODE, st.integers(1, 3)),
    st.tuples(st.just("to_proxy"), _NODE, st.integers(1, 3)),
    st.tuples(st.just("to_node"), _NODE, st.integers(1, 3)),
    st.tuples(st.just("to_node"), _NODE, st.integers(1, 3)),
    st.tuples(st.just("start"), _NODE, st.just(0)),
    st.tuples(st.just("finish"), _NODE, st.integers(0, 1)),
    st.tuples(st.just("crash"), _NODE, st.just(0)),
    st.tuples(st.just("kill"), _NODE, st.just(0)),
    st.tuples(st.just("crash_proxy"), st.just(0), st.just(0)),
    st.tuples(st.just("disconnect"), _NODE, st.just(0)),
    st.tuples(st.just("connect"), _NODE, st.just(0)),
    st.tuples(st.just("advance"), st.integers(1, 30), st.integers(0, 2)),
)
RARE_OPS = st.one_of(
    st.tuples(st.just("wipe"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("wipe_proxy"), st.just(0), st.just(0)),
)


def apply_op(c: Cluster, names: list[str], op: tuple[str, int, int]) -> None:  # noqa: C901
    kind, x, y = op
    name = names[x % len(names)]
    match kind:
        case "submit":
            if c.node(name).up:
                for i in range(y):
                    c.submit(name, "fib", str(x * 10 + i))
        case "to_proxy":
            c.deliver_to_proxy(name, limit=y)
        case "to_node":
            c.deliver_to_node(name, limit=y)
        case "start":
            c.start_jobs(name)
        case "finish":
            c.finish_jobs(name, commit=bool(y))
        case "crash":
            c.crash_node(name)
        case "kill":
            c.kill_node(name)
        case "crash_proxy":
            c.crash_proxy()
        case "disconnect":
            c.disconnect(name)
        case "connect":
            c.start_node(name)
            c.connect(name)
        case "advance":
            c.advance(x / 10, pump=y > 0, execute=y > 1)
        case "wipe":
            c.wipe_node(name)
        case "wipe_proxy":
            c.wipe_proxy()
        case "damage":
            c.damage_node(name, y)
        case "damage_proxy":
            c.damage_proxy(y)


def check_end_state(c: Cluster) -> None:
    """After healing and settling: every ticket answered once, with the right output, and
    nothing left anywhere (the proxy forgot every completed job)."""
    check_invariants(c.proxy)
    for job_id in c.live_tickets():
        origin = c.nodes[c.origins[job_id]]
        ticket = origin.state.tickets[job_id]  # a ticket once issued is never lost
        assert ticket.outcome is not None, job_id
        expected = str(fibonacci(int(ticket.spec.args[0])))
        assert (ticket.outcome.ok, ticket.outcome.output) == (True, expected), job_id
        assert origin.resolutions[job_id] == [ticket.outcome], job_id
    assert c.proxy.jobs == {}
    assert c.proxy.queued == 0
    assert all(not entry.assigned for entry in c.proxy.nodes.values())
    assert c.is_done()


def run_ops(slots: list[int], ops: list[tuple[str, int, int]]) -> Cluster:
    names = ["a", "b", "c"]
    c = Cluster(dict(zip(names, slots, strict=True)), SETTINGS)
    for op in ops:
        apply_op(c, names, op)
        check_invariants(c.proxy)
        for sim in c.nodes.values():
            assert all(len(seen) == 1 for seen in sim.resolutions.values())
    c.settle(max_seconds=120)
    return c


SLOTS = st.lists(st.integers(0, 3), min_size=3, max_size=3).filter(any)


@given(slots=SLOTS, ops=st.lists(OPS, max_size=60))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_interleavings_answer_every_ticket_once(slots: list[int],
                                                       ops: list[tuple[str, int, int]]) -> None:
    check_end_state(run_ops(slots, ops))


@given(slots=SLOTS, ops=st.lists(st.one_of(OPS, OPS, OPS, RARE_OPS), max_size=60))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_interleavings_with_wiped_data_dirs(slots: list[int],
                                                   ops: list[tuple[str, int, int]]) -> None:
    check_end_state(run_ops(slots, ops))


def test_random_walks_with_damaged_records() -> None:
    """A record of the proxy's, or of a node's other than its tickets, that a restart cannot
    read is set aside (common/set_aside.py) and what it held comes back as after a crash:
    every ticket is still answered once. Seeded walks rather than hypothesis's draws, which
    mostly damaged stores still empty."""
    names = ["a", "b", "c"]
    damaged = {"proxy": 0, "node": 0}
    for seed in range(200):
        rnd = random.Random(seed)
        c = Cluster({"a": 1, "b": 2, "c": 1}, SETTINGS)
        for _ in range(40):
            kind = rnd.choice(["submit", "submit", "to_proxy", "to_proxy", "to_node",
                               "to_node", "start", "finish", "crash", "connect", "damage",
                               "damage"] + ["proxy"] * (seed % 2))
            name, pick = rnd.choice(names), rnd.randrange(1, 50)
            if kind == "damage":
                damaged["node"] += c.damage_node(name, pick) is not None
                c.heal()
            elif kind == "proxy":
                damaged["proxy"] += c.damage_proxy(pick) is not None
                c.heal()
            else:
                apply_op(c, names, (kind, names.index(name), pick % 4))
            check_invariants(c.proxy)
        c.settle(max_seconds=120)
        check_end_state(c)
    assert damaged["proxy"] > 50 and damaged["node"] > 50, damaged


# ---------------------------------------------------------------------------- direct


def hello(node: NodeId, incarnation: str = "i1", slots: int = 1,
          queued: tuple[JobId, ...] = (), version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(node, incarnation, slots, version, queued, (), ())


def spec(n: int, origin: NodeId = A) -> JobSpec:
    return JobSpec(JobId(f"job{n}"), "fib", (str(n),), origin, 1.0)


def test_hello_refusals() -> None:
    proxy = ProxyState("p", ProxySettings(max_nodes=1))
    assert proxy.on_hello(hello(A, version=PROTOCOL_VERSION + 1), 0.0)[0] is not None
    assert proxy.on_hello(hello(A), 0.0) == (None, [])
    reason, out = proxy.on_hello(hello(A), 0.0)
    assert reason is not None and "already connected" in reason and out == []
    reason, _ = proxy.on_hello(hello(B), 0.0)
    assert reason is not None and "cluster full" in reason
    proxy.on_disconnect(A, 1.0)
    assert proxy.on_hello(hello(B), 1.0)[0] is None


def test_dispatch_status_and_stats() -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    out = proxy.on_message(A, Job((spec(1), spec(2))), 0.0)
    assert out == [Outgoing(A, Ack(AckOf.JOB, (JobId("job1"), JobId("job2"))))]
    assert proxy.stats().queue_length == 2
    _, out = proxy.on_hello(hello(B, slots=1), 0.5)
    assert Outgoing(B, Job((spec(1), spec(2)))) in out
    assert proxy.status(JobId("job1"), 0.5) == JobStatus(JobId("job1"), DISPATCHED, B, 1)
    assert proxy.status(JobId("nope"), 0.5) == JobStatus(JobId("nope"), "unknown", "", 0)
    reply = proxy.on_message(A, StatusQuery((JobId("job2"),)), 0.6)
    assert reply == [Outgoing(A, StatusReply((JobStatus(JobId("job2"), DISPATCHED, B, 1),)))]
    out = proxy.on_message(B, Info(queued=1, running=1, slots=1, done=0, failed=0), 0.7)
    assert out == [Outgoing(B, Stats(0, (NodeStats(A, True, 0, 0, 0, 0, 0, 0),
                                         NodeStats(B, True, 1, 1, 1, 0, 0, 0))))]


def test_the_status_of_a_running_job_says_when_it_started() -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B, slots=1), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    proxy.release_due(1_000_000.0)  # the wall clock, at the monotonic 10.0 below
    running = Info(queued=0, running=1, slots=1, done=0, failed=0, running_ids=(JobId("job1"),))
    proxy.on_message(B, running, 7.5)
    proxy.on_message(B, running, 9.0)  # still: seen first at 7.5
    assert proxy.status(JobId("job1"), 10.0) == JobStatus(JobId("job1"), "running", B, 1,
                                                          999_997.5)
    said = Info(queued=0, running=1, slots=1, done=0, failed=0, running_ids=(JobId("job1"),),
                running_started=(999_997.25,))  # a node of protocol 4 says when
    proxy.on_message(B, said, 10.0)
    assert proxy.status(JobId("job1"), 10.0).started == 999_997.25


def test_a_node_says_why_it_leaves_until_its_next_hello() -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    assert proxy.on_message(A, Leaving("store failing: disk is full"), 0.1) == []
    proxy.on_disconnect(A, 0.1)
    assert proxy.nodes[A].leaving == "store failing: disk is full"
    assert proxy.nodes[A].assigned == {JobId("job1")}  # nothing else changes: it may be back
    proxy.on_hello(hello(A, queued=(JobId("job1"),)), 0.5)
    assert proxy.nodes[A].leaving == ""


def test_reconnect_revokes_what_went_elsewhere() -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    proxy.on_hello(hello(B), 0.0)  # job1 -> b
    proxy.on_disconnect(B, 1.0)
    proxy.on_hello(hello(C), 3.0)
    proxy.tick(3.5)  # b is dead: job1 -> c
    assert proxy.jobs[JobId("job1")].node == C
    _, out = proxy.on_hello(hello(B, queued=(JobId("job1"),)), 4.0)
    assert Outgoing(B, Revoke((JobId("job1"),))) in out


def test_restore_rebuilds_the_same_state() -> None:
    proxy, records = stored_proxy({})
    again = ProxyState.restore(records, SETTINGS, 10.0)
    assert again is not None
    check_invariants(again)
    assert again.jobs == proxy.jobs
    assert again.queued == proxy.queued
    assert {n: e.assigned for n, e in again.nodes.items()} == {
        n: e.assigned for n, e in proxy.nodes.items()}
    _, out = again.on_hello(hello(A, slots=0), 10.0)
    done = Outcome(JobId("job0"), True, "0", B, 1.0, 2.0)
    assert Outgoing(A, Result((done,))) in out  # still owed to a


def stored_proxy(damage: dict[str, bytes]) -> tuple[ProxyState, list[tuple[str, bytes]]]:
    """A proxy with job0 done (owed to a, gone), job1 dispatched to b, job2-4 queued, as
    its store holds it, some records replaced by `damage`."""
    proxy = ProxyState("p", SETTINGS)
    kv = MemoryKV()
    kv.apply(proxy.initial_records())
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B, slots=1), 0.0)
    proxy.on_message(A, Job(tuple(spec(n) for n in range(5))), 0.0)
    proxy.on_disconnect(A, 0.5)
    proxy.on_message(B, Result((Outcome(JobId("job0"), True, "0", B, 1.0, 2.0),)), 1.0)
    kv.apply(proxy.take_changes())
    kv.commit()
    return proxy, [(k, damage.get(k, v)) for k, v in kv.stored_items()] + [
        (k, v) for k, v in damage.items() if k not in kv.committed]


@pytest.mark.parametrize(("key", "record"), [
    *((key, record) for key in ("j:job0", "j:job1", "j:job3", "n:b", "m:proxy")
      for record in (b"\xc1", b"\x93\x01\x02\x03")),  # not msgpack; [1, 2, 3]
    ("m:times", b"\xc1")])  # (learned times of another shape are learned again)
def test_a_damaged_record_is_set_aside_and_the_proxy_starts(
        key: str, record: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Used to stop the proxy, and with it the cluster. The record is set aside (x:<key>,
    its bytes as they were), the rest restored; a job it held is UNKNOWN to its origin,
    which submits it again; a node's jobs are queued again; a damaged identity is new."""
    proxy, records = stored_proxy({key: record})
    with caplog.at_level(logging.ERROR):
        again = ProxyState.restore(records, SETTINGS, 10.0)
    assert again is not None and len(again.set_aside) == 1
    assert f"store.record_damaged store=proxy key={key}" in caplog.text
    changes = again.take_changes()
    assert (changes[f"x:{key}"] == record and changes[key] is None) or key == "m:proxy"
    check_invariants(again)
    lost = JobId(key[2:]) if key.startswith("j:") else None
    assert set(again.jobs) == set(proxy.jobs) - {lost}
    if lost is not None:
        assert again.on_message(A, RequestOfRes((lost,)), 10.0) == [
            Outgoing(A, Unknown((lost,)))]
    if key == "n:b":
        assert again.jobs[JobId("job1")].state == QUEUED
    if key == "m:proxy":
        assert again.proxy_id != "p" and changes["m:proxy"] == {"proxy_id": again.proxy_id}
    # set aside once: the next restart finds it there, and says nothing
    caplog.clear()
    committed = {**dict(records), **changes}
    with caplog.at_level(logging.ERROR):
        later = ProxyState.restore([(k, v if isinstance(v, bytes) else pack(v))
                                    for k, v in committed.items() if v is not None],
                                   SETTINGS, 20.0)
    assert later is not None and len(later.set_aside) == 1 and not caplog.text


@pytest.mark.parametrize("slots", [0, 1])
def test_tick_before_the_timeout_changes_nothing(slots: int) -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=slots), 0.0)
    assert proxy.tick(SETTINGS.node_timeout) == []
    assert proxy.nodes[A].alive
    assert proxy.tick(SETTINGS.node_timeout + 0.01) == [Outgoing(A, Leaving(
        f"no INFO for more than NODE_TIMEOUT ({SETTINGS.node_timeout:g} s): its jobs were "
        "requeued"))]
    assert not proxy.nodes[A].alive


def test_a_tick_without_a_round_still_declares_the_dead_and_sends_their_jobs_on() -> None:
    """The shell ticks every 0.1 s whatever DISPATCH_PERIOD is (a round only every period):
    a dead node is declared and logged on time, and its jobs go out at once."""
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B, slots=1), 0.0)
    proxy.on_message(A, Job((spec(1), spec(2))), 0.0)  # b: one to run, one prefetched
    proxy.on_hello(hello(C, slots=1), 0.0)
    for t in (0.5, 1.0, 1.5, 2.0):  # a and c keep talking; b is silent
        proxy.on_message(A, Info(0, 0, 0, 0, 0), t)
        proxy.on_message(C, Info(0, 0, 1, 0, 0), t)
        assert proxy.tick(t, dispatch=False) == []
    out = proxy.tick(2.01, dispatch=False)
    assert not proxy.nodes[B].alive
    assert proxy.notices == [("node.dead", "node=b silent_for=2.0s requeued=2")]
    assert [o for o in out if isinstance(o.msg, Job)] == [  # on at once, without a round
        Outgoing(C, Job((spec(1), spec(2))))]


def test_a_node_gone_has_no_overdue_jobs() -> None:
    """Its jobs are not late: it is gone (each kill -9 of a node logged them overdue)."""
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B, slots=1), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    proxy.job_times.observe(spec(1), 0.1)
    proxy.job_times.observe(spec(1), 0.1)
    proxy.on_message(B, Info(0, 1, 1, 0, 0, (JobId("job1"),)), 0.1)
    proxy.on_disconnect(B, 0.2)
    proxy.tick(1.5)
    assert proxy.take_overdue() == [] and proxy.overdue_marks == 0


def test_silence_is_excused_when_the_proxy_could_not_hear() -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=1), 0.0)
    proxy.excuse_silence(10.0)  # stalled from 0 to 10: its INFO frames wait unread
    assert proxy.tick(10.0 + SETTINGS.node_timeout) == []
    assert proxy.nodes[A].alive


def test_duplicate_results_count_only_when_different() -> None:
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B), 0.0)
    # C ran job1 in an earlier attempt (it says so in its HELLO): a late, honest duplicate
    proxy.on_hello(Hello(C, "i1", 1, PROTOCOL_VERSION, (), (), (JobId("job1"),)), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    first = Outcome(JobId("job1"), True, "1", B, 1.0, 2.0)
    out = proxy.on_message(B, Result((first,)), 2.0)
    assert out[:2] == [Outgoing(B, Ack(AckOf.RESULT, (JobId("job1"),))),
                       Outgoing(A, Result((first,)))]
    proxy.on_message(B, Result((first,)), 2.1)  # a re-send after a lost ACK
    assert proxy.duplicates == 0
    proxy.on_message(C, Result((Outcome(JobId("job1"), True, "1", C, 1.5, 2.5),)), 2.2)
    assert proxy.duplicates == 1 and proxy.nodes[C].duplicates == 1
    assert proxy.jobs[JobId("job1")].outcome == first
    assert proxy.take_duplicates() == [(C, JobId("job1"), "done")]  # for the log
    proxy.on_message(A, Ack(AckOf.RESULT, (JobId("job1"),)), 2.3)
    assert proxy.jobs == {}
    assert proxy.take_changes()["j:job1"] is None
    proxy.on_message(C, Result((Outcome(JobId("job1"), True, "1", C, 1.6, 2.6),)), 2.4)
    assert proxy.take_duplicates() == [(C, JobId("job1"), "delivered")]
    assert proxy.take_duplicates() == [] and proxy.duplicates == 2


def test_node_timeout_counts_from_the_disconnect() -> None:
    proxy = ProxyState("p", SETTINGS)  # node_timeout 2.0
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    proxy.on_message(B, Info(queued=1, running=0, slots=1, done=0, failed=0), 1.0)
    proxy.on_disconnect(B, 1.5)
    proxy.tick(3.2)  # 1.7 s after the disconnect, 2.2 s after the last INFO
    assert proxy.nodes[B].alive
    assert proxy.jobs[JobId("job1")].node == B


def presumed_dead_while_running(c: Cluster, job_id: JobId) -> str:
    """The node running `job_id` is cut off past node_timeout, still running it; the job
    goes to the other node. Returns the cut-off node's name (not reconnected yet)."""
    c.deliver_to_proxy(c.origins[job_id])
    c.pump(execute=False)
    runner = next(n for n, sim in c.nodes.items() if job_id in sim.state.held)
    c.start_jobs(runner)
    c.disconnect(runner)
    c.advance(SETTINGS.node_timeout + 0.5, execute=False)  # declared dead: job moved
    other = next(n for n in c.nodes if n != runner)
    assert not c.proxy.nodes[NodeId(runner)].alive
    assert c.proxy.jobs[job_id].node == NodeId(other)
    return runner


@pytest.mark.parametrize("origin", ["a", "b"])
@pytest.mark.parametrize("other_finished_first", [False, True])
def test_a_node_back_from_the_dead_stops_the_jobs_that_moved_on(
        origin: str, other_finished_first: bool) -> None:
    """Running a job when it was declared dead, a node comes back: the job runs on another
    node now (or ran there, its result delivered): the proxy tells it to ABANDON its run,
    which ends without an outcome, also when that node is the job's origin (its ticket gets
    the other run's result). One run, no duplicate."""
    c = Cluster({"a": 1, "b": 1}, SETTINGS)
    job_id = c.submit(origin, "fib", "23")
    runner = presumed_dead_while_running(c, job_id)
    other = next(n for n in c.nodes if n != runner)
    if other_finished_first:
        c.execute(other)
        c.pump(execute=False)
        assert job_id not in c.proxy.jobs or c.proxy.jobs[job_id].state == DONE
    assert c.connect(runner) is None
    c.pump(execute=False)
    assert job_id not in c.node(runner).state.held  # abandoned: stopped, nothing kept
    assert not c.node(runner).executing
    assert job_id not in c.node(runner).state.finished
    c.settle()
    assert c.runs[job_id] == 1
    assert_answered_once(c, [job_id])
    outcome = c.outcome(job_id)
    assert outcome is not None and outcome.node == NodeId(other)
    assert c.proxy.duplicates == 0


def test_a_wiped_proxy_does_not_stop_a_running_job_it_cannot_know() -> None:
    """After the proxy's store was wiped, a job running on a node is unknown to it and was
    never delivered: not abandoned (the origin submits it again; this run counts too)."""
    c = Cluster({"a": 0, "b": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "24")
    c.pump(execute=False)
    c.start_jobs("b")
    c.wipe_proxy()
    c.heal()
    c.pump(execute=False)
    assert job_id in c.node("b").state.running
    assert [spec.job_id for spec, _ in c.node("b").executing] == [job_id]
    c.settle()
    assert_answered_once(c, [job_id])


def test_origin_runs_its_own_job_while_presumed_dead() -> None:
    """a is cut off while running its own job; the job runs on b too. a keeps its own
    result (first recorded), b's arrives later as a duplicate, and the client hears once."""
    c = Cluster({"a": 1, "b": 1}, SETTINGS)
    job_id = c.submit("a", "fib", "21")
    c.deliver_to_proxy("a")
    c.pump(execute=False)
    runner = next(n for n, sim in c.nodes.items() if sim.state.held)
    c.start_jobs(runner)
    c.disconnect(runner)
    c.advance(SETTINGS.node_timeout + 0.5)  # requeued, run by the other node
    c.finish_jobs(runner)
    c.settle()
    assert c.runs[job_id] == 2
    assert_answered_once(c, [job_id])
    assert c.node("a").state.duplicates == 1


def typed_hello(node: NodeId, types: tuple[str, ...], slots: int = 4,
                info_period: float = 0.0) -> Hello:
    return Hello(node, "i1", slots, PROTOCOL_VERSION, (), (), (), job_types=types,
                 info_period=info_period)


def sh_spec(n: int) -> JobSpec:
    return JobSpec(JobId(f"sh{n}"), "sh", ("echo",), A, 1.0)


def test_a_node_gets_only_the_job_types_it_runs() -> None:
    """A node that cannot run `sh` (ALLOW_SHELL unset) failed every `sh` job it was given,
    and, failing them at once, got half of them. It now gets none; the jobs it passes over
    keep their place in the queue."""
    proxy = ProxyState("p", ProxySettings(prefetch=0))
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(typed_hello(B, ("fib", "sleep")), 0.0)
    proxy.on_message(A, Job((sh_spec(1), spec(2), sh_spec(3), spec(4))), 0.0)
    check_invariants(proxy)
    assert proxy.nodes[B].assigned == {JobId("job2"), JobId("job4")}
    assert proxy.queued == 2
    proxy.on_hello(typed_hello(C, ("fib", "sh", "sleep"), slots=1), 0.0)  # in queue order
    assert proxy.nodes[C].assigned == {JobId("sh1")}
    proxy.on_message(C, Result((Outcome(JobId("sh1"), True, "", C, 1.0, 2.0),)), 2.0)
    assert proxy.nodes[C].assigned == {JobId("sh3")}
    check_invariants(proxy)


def test_a_node_that_does_not_say_runs_any_type() -> None:
    proxy = ProxyState("p", ProxySettings(prefetch=0))
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B, slots=2), 0.0)  # an older node: no job types in its HELLO
    proxy.on_message(A, Job((sh_spec(1), spec(2))), 0.0)
    assert proxy.nodes[B].assigned == {JobId("sh1"), JobId("job2")}


def test_a_round_passes_over_a_bounded_number_of_jobs() -> None:
    """Only `sh` jobs queued and only a node that does not run them free: a round looks
    at MAX_PASSED_OVER of them, not at the whole queue, and they all stay in line."""
    proxy = ProxyState("p", ProxySettings(prefetch=0, max_jobs_dispatch=5000))
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_message(A, Job((*(sh_spec(n) for n in range(3000)), spec(1))), 0.0)
    proxy.on_hello(typed_hello(B, ("fib",)), 0.0)
    assert proxy.nodes[B].assigned == set()  # job1 is 3,001st: past what a round looks at
    assert proxy.queued == 3001
    proxy.on_hello(hello(C, slots=2), 0.0)
    assert proxy.nodes[C].assigned == {JobId("sh0"), JobId("sh1")}  # the order kept


def test_an_info_period_the_node_timeout_leaves_no_room_for_is_warned_of() -> None:
    proxy = ProxyState("p", SETTINGS)  # NODE_TIMEOUT 2 s
    proxy.on_hello(typed_hello(A, ("fib",), info_period=0.5), 0.0)
    assert proxy.notices == []
    proxy.on_hello(typed_hello(B, ("fib",), info_period=1.5), 0.0)
    assert [event for event, _ in proxy.notices] == ["node.info_period_too_long"]
    assert "node=b info_period=1.5s node_timeout=2s" in proxy.notices[0][1]


def test_jobs_are_not_taken_back_for_a_node_that_does_not_run_them() -> None:
    """Rebalancing runs among nodes of the same job types: an `sh` job taken back from a
    busy node for an idle one that does not run `sh` would go straight back, every round."""
    proxy = ProxyState("p", ProxySettings(prefetch=2))
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(typed_hello(C, ("sh",), slots=1), 0.0)
    proxy.on_message(A, Job(tuple(sh_spec(n) for n in range(6))), 0.0)
    _, out = proxy.on_hello(typed_hello(B, ("fib",), slots=4), 0.0)
    assert not [o for o in out if isinstance(o.msg, Revoke)]
    held = set(proxy.nodes[C].assigned)
    assert len(held) == 3  # one to run, two prefetched
    for t in range(1, 6):
        out = proxy.on_message(C, Info(2, 1, 1, 0, 0), float(t)) + proxy.tick(float(t))
        assert not [o for o in out if isinstance(o.msg, Revoke)]
    assert proxy.nodes[C].assigned == held and proxy.nodes[B].assigned == set()


def test_a_node_dead_for_an_hour_with_nothing_is_forgotten() -> None:
    """A removed node was listed as dead for good; every id that ever said HELLO was kept."""
    proxy = ProxyState("p", SETTINGS)
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)  # b holds it
    proxy.on_disconnect(B, 1.0)
    proxy.on_hello(hello(C), 1.0)
    proxy.on_disconnect(C, 2.0)
    proxy.tick(10.0)  # both dead; b's job back in the queue
    proxy.take_changes()
    proxy.tick(FORGET_NODE_SECONDS + 1.0)
    assert B in proxy.nodes and C in proxy.nodes  # dead, but not for an hour yet
    proxy.tick(FORGET_NODE_SECONDS + 3.0)
    assert B not in proxy.nodes and C not in proxy.nodes and A in proxy.nodes
    assert proxy.take_changes() == {"n:b": None, "n:c": None}
    assert ("node.forgotten", "node=b dead_for=3602s") in proxy.notices
    proxy.on_hello(hello(B), FORGET_NODE_SECONDS + 4.0)  # back: a node like any other
    assert proxy.nodes[B].assigned == {JobId("job1")}


def test_stats_list_the_live_nodes_first_and_a_bounded_number() -> None:
    proxy = ProxyState("p", SETTINGS)
    for n in range(STATS_NODES + 50):
        proxy.on_hello(hello(NodeId(f"gone-{n:05d}")), 0.0)
        proxy.on_disconnect(NodeId(f"gone-{n:05d}"), 0.0)
    proxy.on_hello(hello(NodeId("zz-live")), 0.0)
    nodes = proxy.stats().nodes
    assert len(nodes) == STATS_NODES and any(n.node_id == "zz-live" and n.alive for n in nodes)


def test_a_nodes_duplicate_count_survives_a_restart_of_the_proxy() -> None:
    """It went back to 0 while the node's done and failed beside it did not."""
    proxy = ProxyState("p", SETTINGS)
    kv = MemoryKV()
    kv.apply(proxy.initial_records())
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B), 0.0)
    proxy.on_hello(Hello(C, "i1", 1, PROTOCOL_VERSION, (), (), (JobId("job1"),)), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    proxy.on_message(B, Result((Outcome(JobId("job1"), True, "1", B, 1.0, 2.0),)), 2.0)
    proxy.on_message(C, Result((Outcome(JobId("job1"), True, "1", C, 1.5, 2.5),)), 2.2)
    assert proxy.nodes[C].duplicates == 1
    kv.apply(proxy.take_changes())
    kv.commit()
    again = ProxyState.restore(kv.stored_items(), SETTINGS, 10.0)
    assert again is not None and again.nodes[C].duplicates == 1
    assert again.nodes[B].duplicates == 0
