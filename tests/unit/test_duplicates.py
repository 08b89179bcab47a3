"""Duplicate executions are counted, re-sends are not (issue 3): `ProxyState` driven
directly. At-least-once means a job may run twice; the first result recorded stands and
every other run shows in `duplicates`, however late it reports."""

from __future__ import annotations

from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import PROTOCOL_VERSION, Ack, AckOf, Hello, Job, Result
from reverse_proxy.records import ProxySettings
from reverse_proxy.state import ProxyState

ORIGIN, B, C = NodeId("origin"), NodeId("b"), NodeId("c")
JOB = JobId("j" * 24)
T0 = 1_800_000_000.0


def hello(node: NodeId, slots: int, finished: tuple[JobId, ...] = ()) -> Hello:
    return Hello(node, f"inc-{node}", slots, PROTOCOL_VERSION, (), (), finished)


def ran(node: NodeId, at: float, ok: bool = True) -> Outcome:
    return Outcome(JOB, ok, f"ran on {node}", node, T0 + at, T0 + at + 1)


def cluster() -> ProxyState:
    """The origin (no slots) submits JOB; b, the only node with a slot, gets it."""
    proxy = ProxyState("p", ProxySettings(prefetch=0, node_timeout=5.0))
    for node, slots in ((ORIGIN, 0), (B, 1)):
        assert proxy.on_hello(hello(node, slots), 0.0)[0] is None
    proxy.on_message(ORIGIN, Job((JobSpec(JOB, "sleep", ("1",), ORIGIN, T0),)), 0.0)
    assert proxy.jobs[JOB].node == B
    return proxy


def b_declared_dead_and_c_runs_it(proxy: ProxyState) -> None:
    proxy.on_disconnect(B, 1.0)
    proxy.on_message(ORIGIN, Ack(AckOf.RESULT, ()), 7.0)  # the origin is alive
    assert proxy.on_hello(hello(C, 1), 7.0)[0] is None
    proxy.tick(7.0)
    assert proxy.jobs[JOB].node == C


def test_a_result_from_a_node_declared_dead_counts_as_a_second_run() -> None:
    proxy = cluster()
    b_declared_dead_and_c_runs_it(proxy)
    assert proxy.on_hello(hello(B, 1, finished=(JOB,)), 8.0)[0] is None
    proxy.on_message(B, Result((ran(B, 2),)), 8.0)  # b ran it before it was cut off
    assert proxy.duplicates == 1 and proxy.jobs[JOB].outcome is None  # c's run will stand
    proxy.on_message(C, Result((ran(C, 9),)), 10.0)
    recorded = proxy.jobs[JOB].outcome
    assert recorded is not None and recorded.node == C and proxy.duplicates == 1


def test_a_second_run_reported_after_the_origin_got_the_first_still_counts() -> None:
    proxy = cluster()
    b_declared_dead_and_c_runs_it(proxy)
    proxy.on_message(C, Result((ran(C, 9),)), 10.0)
    proxy.on_message(ORIGIN, Ack(AckOf.RESULT, (JOB,)), 10.5)  # stored: the proxy forgets
    assert JOB not in proxy.jobs
    proxy.on_message(C, Result((ran(C, 9),)), 11.0)  # c's ACK was lost: a re-send
    assert proxy.duplicates == 0
    assert proxy.on_hello(hello(B, 1, finished=(JOB,)), 12.0)[0] is None
    proxy.on_message(B, Result((ran(B, 2),)), 12.0)
    assert proxy.duplicates == 1
    assert proxy.nodes[B].duplicates == 1 and proxy.nodes[C].duplicates == 0


def test_the_re_send_of_a_retried_failed_attempt_is_not_a_second_run() -> None:
    proxy = ProxyState("p", ProxySettings(prefetch=0, retry_backoff=0.0))
    for node, slots in ((ORIGIN, 0), (B, 1)):
        assert proxy.on_hello(hello(node, slots), 0.0)[0] is None
    proxy.release_due(T0)
    proxy.on_message(ORIGIN, Job((JobSpec(JOB, "sleep", ("1",), ORIGIN, T0, retries=1),)),
                     0.0)
    proxy.on_message(B, Result((ran(B, 1, ok=False),)), 1.0)  # failed: it will run again
    proxy.on_message(B, Result((ran(B, 1, ok=False),)), 1.5)  # the ACK was lost
    assert proxy.duplicates == 0
