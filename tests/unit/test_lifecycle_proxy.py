"""The lifecycle rules of `ProxyState` (issue 6), driven directly: priority order, delays,
retries with backoff, cancel, lost nodes, and that all of it survives `restore`."""

from __future__ import annotations

from typing import Any

from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import (
    PROTOCOL_VERSION,
    Ack,
    AckOf,
    Cancel,
    Hello,
    Job,
    Output,
    Result,
)
from common.packer import pack
from reverse_proxy.records import DONE, QUEUED, Outgoing, ProxySettings
from reverse_proxy.state import ProxyState, _clock

A, B = NodeId("a"), NodeId("b")
T0 = 1_800_000_000.0  # a wall clock


def spec(name: str, **opts: Any) -> JobSpec:
    return JobSpec(JobId(name), "sleep", ("1",), A, T0, **opts)


def proxy_with(slots: int = 0, **settings: Any) -> tuple[ProxyState, list[Any]]:
    proxy = ProxyState("p", ProxySettings(prefetch=0, **settings))
    records: list[Any] = []
    proxy.release_due(T0)
    reason, _ = proxy.on_hello(Hello(A, "inc-a", 0, PROTOCOL_VERSION, (), (), ()), 0.0)
    assert reason is None
    if slots:
        reason, _ = proxy.on_hello(Hello(B, "inc-b", slots, PROTOCOL_VERSION, (), (), ()), 0.0)
        assert reason is None
    return proxy, records


def dispatched(out: list[Outgoing]) -> list[str]:
    return [s.job_id for o in out if isinstance(o.msg, Job) for s in o.msg.jobs]


def submit(proxy: ProxyState, *specs: JobSpec) -> list[Outgoing]:
    return proxy.on_message(A, Job(specs), 0.0)


def fail(proxy: ProxyState, job: str, at: float, text: str = "exit 1: boom") -> list[Outgoing]:
    return proxy.on_message(B, Result((Outcome(JobId(job), False, text, B, at, at),)), 0.0)


def restart(proxy: ProxyState, changes: dict[str, Any]) -> ProxyState:
    restored = ProxyState.restore(
        [(k, pack(v)) for k, v in changes.items() if v is not None], proxy.settings, 0.0)
    assert restored is not None
    return restored


def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    proxy, _ = proxy_with()
    submit(proxy, spec("low1"), spec("high1", priority=5), spec("low2"),
           spec("high2", priority=5), spec("neg", priority=-1), spec("mid", priority=1))
    changes = {"m:proxy": {"proxy_id": "p"}, **proxy.take_changes()}
    order: list[str] = []
    for state in (proxy, restart(proxy, changes)):  # the same order after a restart
        state.release_due(T0)
        _, out = state.on_hello(Hello(B, "inc-b", 1, PROTOCOL_VERSION, (), (), ()), 0.0)
        got: list[str] = []
        while ids := dispatched(out):  # one slot: one job at a time, in queue order
            got += ids
            out = state.on_message(B, Result((Outcome(JobId(ids[0]), True, "", B, T0, T0),)),
                                   0.0)
        order.append(" ".join(got))
        state.on_disconnect(B, 0.0)
    assert order[0] == "high1 high2 mid low1 low2 neg"
    assert order[1] == order[0]


def test_a_delayed_job_waits_until_its_time_even_across_a_restart() -> None:
    proxy, _ = proxy_with(slots=4)
    out = submit(proxy, spec("later", not_before=T0 + 10), spec("now"))
    assert dispatched(out) == ["now"]
    assert proxy.status(JobId("later"), 0.0).state == QUEUED
    proxy.release_due(T0 + 9.9)
    assert dispatched(proxy.dispatch()) == []
    restored = restart(proxy, {"m:proxy": {"proxy_id": "p"}, **proxy.take_changes()})
    restored.on_hello(Hello(B, "inc-b", 4, PROTOCOL_VERSION, (JobId("now"),), (), ()), 0.0)
    restored.release_due(T0 + 5)
    assert dispatched(restored.dispatch()) == []
    restored.release_due(T0 + 10)
    assert dispatched(restored.dispatch()) == ["later"]


def test_failed_attempts_are_retried_with_backoff_then_fail_with_the_reasons() -> None:
    proxy, _ = proxy_with(slots=1, retry_backoff=2.0)
    assert dispatched(submit(proxy, spec("j", retries=2))) == ["j"]
    fail(proxy, "j", T0 + 1, "exit 3: first")
    rec = proxy.jobs[JobId("j")]
    assert (rec.state, rec.not_before) == (QUEUED, T0 + 1 + 2.0)
    proxy.release_due(T0 + 2.9)
    assert dispatched(proxy.dispatch()) == []  # backing off, not blocking: the slot is free
    proxy.release_due(T0 + 3)
    assert dispatched(proxy.dispatch()) == ["j"]
    fail(proxy, "j", T0 + 4, "timed out after 1 s")
    assert proxy.jobs[JobId("j")].not_before == T0 + 4 + 4.0  # doubled
    # the retry survives a restart of the proxy, history included
    proxy = restart(proxy, {"m:proxy": {"proxy_id": "p"}, **proxy.take_changes()})
    proxy.on_hello(Hello(B, "inc-b", 1, PROTOCOL_VERSION, (), (), ()), 0.0)
    proxy.on_hello(Hello(A, "inc-a", 0, PROTOCOL_VERSION, (), (), ()), 0.0)
    proxy.release_due(T0 + 8)
    assert dispatched(proxy.dispatch()) == ["j"]
    out = fail(proxy, "j", T0 + 9, "exit 1: third")
    final = [o.msg for o in out if o.node == A and isinstance(o.msg, Result)]
    assert len(final) == 1
    outcome = final[0].outcomes[0]
    assert (outcome.ok, outcome.output, outcome.attempts) == (False, "exit 1: third", 3)
    assert [h.split(": ", 1)[1] for h in outcome.history] == ["exit 3: first",
                                                                "timed out after 1 s"]
    assert proxy.jobs[JobId("j")].state == DONE


def test_a_copy_of_a_retried_jobs_attempt_sent_again_is_no_second_run() -> None:
    """The node sends a result again when the proxy's periodic RES_REQ crosses its RESULT.
    The recorded outcome of a retried job carries its failed attempts, so a copy of the
    last attempt never equals it, nor a late copy of a retried one: both were counted (and
    logged) as jobs run twice, 1 in ~20,000 jobs of a mix on a healthy cluster."""
    proxy, _ = proxy_with(slots=1, retry_backoff=1.0)
    submit(proxy, spec("j", retries=1))
    first = Outcome(JobId("j"), False, "exit 3: no", B, T0 + 1, T0 + 1.1)
    proxy.on_message(B, Result((first,)), 0.0)
    proxy.release_due(T0 + 3)
    assert dispatched(proxy.dispatch()) == ["j"]
    last = Outcome(JobId("j"), True, "exit 0: ok", B, T0 + 3, T0 + 3.1)
    proxy.on_message(B, Result((last,)), 0.0)
    assert proxy.jobs[JobId("j")].outcome == last._replace(history=(f"b {_clock(T0 + 1)}: "
                                                                     "exit 3: no",))
    proxy.on_message(B, Result((last,)), 0.0)  # the same run again
    proxy.on_message(B, Result((first,)), 0.0)  # and the retried one
    assert proxy.duplicates == 0 and proxy.take_duplicates() == []
    again = Outcome(JobId("j"), True, "exit 0: ok", B, T0 + 5, T0 + 5.1)  # a second run
    proxy.on_message(B, Result((again,)), 0.0)
    assert proxy.take_duplicates() == [(B, JobId("j"), "done")]


def test_a_job_without_retries_fails_at_once() -> None:
    proxy, _ = proxy_with(slots=1)
    submit(proxy, spec("j"))
    out = fail(proxy, "j", T0)
    assert [o.msg.outcomes[0].output for o in out
            if o.node == A and isinstance(o.msg, Result)] == ["exit 1: boom"]


def test_cancel_a_queued_job_ends_it_at_once() -> None:
    proxy, _ = proxy_with()
    submit(proxy, spec("q"), spec("d", not_before=T0 + 60))
    out = proxy.on_message(A, Cancel((JobId("q"), JobId("d"))), 1.0)
    outcomes = [oc for o in out if isinstance(o.msg, Result) for oc in o.msg.outcomes]
    assert [(o.job_id, o.cancelled, o.output) for o in outcomes] == [
        ("q", True, "cancelled while queued, it never ran"),
        ("d", True, "cancelled while queued, it never ran")]
    assert proxy.queued == 0
    proxy.on_hello(Hello(B, "inc-b", 4, PROTOCOL_VERSION, (), (), ()), 0.0)
    proxy.release_due(T0 + 100)
    assert dispatched(proxy.dispatch()) == []


def test_cancel_a_dispatched_job_asks_its_node_and_never_retries_it() -> None:
    proxy, _ = proxy_with(slots=1)
    submit(proxy, spec("r", retries=3))
    out = proxy.on_message(A, Cancel((JobId("r"),)), 1.0)
    assert out == [Outgoing(B, Cancel((JobId("r"),)))]
    stopped = Outcome(JobId("r"), False, "cancelled while running on b, stopped", B, T0, T0,
                      cancelled=True)
    out = proxy.on_message(B, Result((stopped,)), 2.0)
    assert Outgoing(A, Result((stopped,))) in out
    assert proxy.jobs[JobId("r")].state == DONE


def test_cancel_of_a_dispatched_job_whose_node_dies_ends_it_instead_of_rerunning() -> None:
    proxy, _ = proxy_with(slots=1, node_timeout=2.0)
    submit(proxy, spec("r"))
    proxy.on_message(A, Cancel((JobId("r"),)), 1.0)
    proxy.on_message(A, Ack(AckOf.RESULT, ()), 10.0)  # a stays alive
    proxy.tick(10.0)  # b is silent: dead
    rec = proxy.jobs[JobId("r")]
    assert rec.state == DONE and rec.outcome is not None and rec.outcome.cancelled


def test_a_job_whose_node_is_lost_too_often_fails_with_that_reason() -> None:
    proxy, _ = proxy_with(slots=1, node_timeout=2.0, max_node_losses=2)
    submit(proxy, spec("x"))
    now = 0.0
    for _ in range(2):
        now += 10
        proxy.on_message(A, Ack(AckOf.RESULT, ()), now)
        proxy.tick(now)  # b dead: x is requeued (then fails on the second loss)
        proxy.on_disconnect(B, now)
        proxy.on_hello(Hello(B, "inc-b", 1, PROTOCOL_VERSION, (), (), ()), now)
    rec = proxy.jobs[JobId("x")]
    assert rec.outcome is not None, rec
    assert (rec.outcome.ok, rec.outcome.output) == (False, "node lost 2 times")
    assert len(rec.outcome.history) == 2


def test_live_output_goes_to_the_origin_only_from_the_running_node_and_never_back() -> None:
    proxy, _ = proxy_with(slots=1)
    assert dispatched(submit(proxy, spec("o"))) == ["o"]
    lines = Output(JobId("o"), ("step 1", "step 2"))
    assert proxy.on_message(B, lines, 1.0) == [Outgoing(A, lines)]
    assert proxy.on_message(A, lines, 1.0) == []  # A does not run it
    proxy.on_message(B, Result((Outcome(JobId("o"), True, "ok", B, T0, T0),)), 2.0)
    # B's own job runs on B: B showed its output to its own tails already.
    own = JobSpec(JobId("own"), "sleep", ("1",), B, T0)
    assert dispatched(proxy.on_message(B, Job((own,)), 3.0)) == ["own"]
    assert proxy.on_message(B, Output(JobId("own"), ("x",)), 3.0) == []
