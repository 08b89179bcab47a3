"""ProxyState's balancing rounds, message by message: dispatch on events, REVOKE of jobs not
started when loads drift apart (an idle or new node, a node that slowed down, seen from its
results or from its overdue running jobs, by the proxy's rule or as the node reports them
against their expected time), one revoke in flight per node, nodes that vanish
between INFO and dispatch, and the original's policy."""

from __future__ import annotations

from typing import Any

import pytest

from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import PROTOCOL_VERSION, Hello, Info, Job, Result, Returned, Revoke, Stats
from common.packer import pack
from reverse_proxy.balancer import MAX_PREFETCH, overdue_after
from reverse_proxy.records import DISPATCHED, ORIGINAL, QUEUED, Outgoing, ProxySettings
from reverse_proxy.state import TIMES_SAVE_SECONDS, ProxyState

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def hello(node: NodeId, slots: int) -> Hello:
    return Hello(node, "i1", slots, PROTOCOL_VERSION, (), (), ())


def spec(n: int, origin: NodeId = C) -> JobSpec:
    return JobSpec(JobId(f"job{n:03d}"), "sleep", ("50",), origin, 1.0)


def outcome(n: int, node: NodeId, seconds: float = 0.05) -> Outcome:
    return Outcome(JobId(f"job{n:03d}"), True, "ok", node, 100.0, 100.0 + seconds)


def jobs_to(out: list[Outgoing], node: NodeId) -> list[JobId]:
    return [s.job_id for o in out if o.node == node and isinstance(o.msg, Job)
            for s in o.msg.jobs]


def revokes(out: list[Outgoing]) -> dict[NodeId, tuple[JobId, ...]]:
    return {o.node: o.msg.ids for o in out if isinstance(o.msg, Revoke)}


def proxy_with(settings: ProxySettings | None = None, **slots: int) -> ProxyState:
    proxy = ProxyState("p", settings or ProxySettings(node_timeout=5.0, prefetch=1))
    proxy.on_hello(hello(C, 0), 0.0)  # the origin of every job; runs nothing
    for name, n in slots.items():
        proxy.on_hello(hello(NodeId(name), n), 0.0)
    return proxy


def submit(proxy: ProxyState, first: int, count: int) -> list[Outgoing]:
    return proxy.on_message(C, Job(tuple(spec(n) for n in range(first, first + count))), 0.1)


def finish(proxy: ProxyState, node: NodeId, count: int, seconds: float, now: float) -> None:
    """`node` reports `count` of its jobs done, each after `seconds`, one at a time."""
    for _ in range(count):
        first = int(min(proxy.nodes[node].assigned).removeprefix("job"))
        proxy.on_message(node, Result((outcome(first, node, seconds),)), now)


def test_a_job_arriving_while_a_slot_is_idle_is_dispatched_at_once() -> None:
    proxy = proxy_with(a=2)
    assert jobs_to(submit(proxy, 0, 1), A) == [JobId("job000")]


def test_a_freed_slot_is_filled_at_once_from_the_queue() -> None:
    proxy = proxy_with(a=1)
    out = submit(proxy, 0, 5)
    assert jobs_to(out, A) == [JobId("job000"), JobId("job001")]  # slot + prefetch
    out = proxy.on_message(A, Result((outcome(0, A),)), 0.2)
    assert jobs_to(out, A) == [JobId("job002")]


def test_nodes_running_very_short_jobs_hold_more_of_them() -> None:
    """Jobs shorter than a refill (REFILL_SECONDS) would leave a slot idle between two: a node
    holds enough to cover it, up to MAX_PREFETCH per slot; jobs of 5 ms or more keep
    PREFETCH, whatever their number."""
    for seconds, held in ((0.0002, 1 + MAX_PREFETCH), (0.002, 1 + 3), (0.05, 1 + 1)):
        proxy = proxy_with(a=1)
        submit(proxy, 0, 100)
        assert len(proxy.nodes[A].assigned) == 2  # no typical time yet: slot + PREFETCH
        finish(proxy, A, 25, seconds, 0.2)  # results enough to trust the typical time
        assert len(proxy.nodes[A].assigned) == held, seconds


def test_a_node_joining_a_busy_cluster_gets_work_at_once() -> None:
    proxy = proxy_with(a=1)
    submit(proxy, 0, 10)
    _, out = proxy.on_hello(hello(B, 4), 0.3)
    assert len(jobs_to(out, B)) == 8  # 4 slots + 4 prefetched, from the global queue


def test_an_idle_node_takes_jobs_not_started_elsewhere() -> None:
    proxy = proxy_with(a=2)
    submit(proxy, 0, 4)  # a: 2 running + 2 waiting; the global queue is empty
    _, out = proxy.on_hello(hello(B, 2), 0.3)
    assert revokes(out) == {A: (JobId("job002"), JobId("job003"))}  # the ones it got last
    assert revokes(proxy.tick(0.4)) == {}  # one revoke in flight per node
    out = proxy.on_message(A, Returned((JobId("job003"),)), 0.5)  # job002 had started
    assert jobs_to(out, B) == [JobId("job003")]
    assert proxy.jobs[JobId("job002")].node == A
    assert revokes(proxy.tick(0.6)) == {}  # a: 1 waiting at most, b: 0.5 per slot


def test_loads_within_one_job_per_slot_are_left_alone() -> None:
    proxy = proxy_with(a=2, b=2)
    submit(proxy, 0, 6)  # a: 3, b: 3 ... then b finishes two
    proxy.on_message(B, Result((outcome(1, B), outcome(3, B))), 0.2)
    assert revokes(proxy.tick(0.3)) == {}  # a at 1.5, b at 0.5 per slot: a gap of exactly 1


def test_a_slow_node_sheds_its_waiting_jobs_and_gets_no_prefetch() -> None:
    proxy = proxy_with(a=2, b=2)
    submit(proxy, 0, 20)  # a: job000, 002, 004, 006; b: 001, 003, 005, 007
    proxy.typical.seconds = 0.05  # the cluster's typical job so far, over 100 jobs
    proxy.typical.results = 100
    out = proxy.on_message(A, Result((outcome(0, A),)), 0.2)
    assert jobs_to(out, A) == [JobId("job008")] and revokes(out) == {}
    out = proxy.on_message(B, Result((outcome(1, B, 0.5),)), 0.3)
    # b now runs 10x slower: it keeps no more than its slots, the job it got last goes back
    assert jobs_to(out, B) == [] and revokes(out) == {B: (JobId("job007"),)}
    out = proxy.on_message(B, Returned((JobId("job007"),)), 0.35)
    assert jobs_to(out, B) == [] and proxy.jobs[JobId("job007")].state == QUEUED
    out = proxy.on_message(A, Result((outcome(2, A),)), 0.4)
    assert jobs_to(out, A) == [JobId("job007")]  # back at the front of the queue
    out = proxy.on_message(B, Result((outcome(3, B, 0.5),)), 0.5)
    assert jobs_to(out, B) == [JobId("job009")]  # a slot freed: refilled up to its slots
    for n in (5, 9, 100, 101):  # typical again: the slow mark lasts a few jobs ...
        proxy.on_message(B, Result((outcome(n, B, 0.05),)), 0.6)
    assert len(proxy.nodes[B].assigned) <= 2
    for n in (102, 103, 104):  # ... then its prefetch comes back
        proxy.on_message(B, Result((outcome(n, B, 0.05),)), 0.7)
    assert len(proxy.nodes[B].assigned) == 4


def test_cancelled_runs_do_not_teach_how_fast_a_node_is() -> None:
    """A run killed early (a user's cancel, a timeout stop) is cut short: b would look fast
    and get more than its share."""
    proxy = proxy_with(a=2, b=2)
    submit(proxy, 0, 4)
    proxy.on_message(B, Result((outcome(1, B, 0.5),)), 0.5)
    before = (proxy.nodes[B].job_seconds, proxy.typical.seconds, proxy.typical.results)
    cut_short = outcome(3, B, 0.001)._replace(ok=False, cancelled=True)
    proxy.on_message(B, Result((cut_short,)), 0.6)
    assert (proxy.nodes[B].job_seconds, proxy.typical.seconds,
            proxy.typical.results) == before


def test_a_node_that_vanished_after_its_info_gets_nothing() -> None:
    proxy = proxy_with(a=1, b=1)
    proxy.on_message(B, Info(queued=0, running=0, slots=1, done=0, failed=0), 0.1)
    proxy.on_disconnect(B, 0.15)
    out = submit(proxy, 0, 4)
    assert jobs_to(out, B) == [] and len(jobs_to(out, A)) == 2
    assert revokes(proxy.tick(0.2)) == {}
    assert all(rec.node != B for rec in proxy.jobs.values())


def test_a_vanished_heavy_node_is_not_asked_to_give_back() -> None:
    proxy = proxy_with(a=1)
    submit(proxy, 0, 2)
    proxy.on_disconnect(A, 0.2)
    proxy.on_hello(hello(B, 4), 0.3)
    assert revokes(proxy.tick(0.4)) == {}
    assert {proxy.jobs[JobId(f"job00{n}")].state for n in (0, 1)} == {DISPATCHED}


def test_a_reconnect_clears_a_revoke_left_unanswered() -> None:
    proxy = proxy_with(a=2)
    submit(proxy, 0, 4)
    _, out = proxy.on_hello(hello(B, 2), 0.3)
    assert A in revokes(out)
    proxy.on_disconnect(A, 0.4)  # the revoke is lost with the connection
    held = tuple(JobId(f"job00{n}") for n in range(4))
    _, out = proxy.on_hello(Hello(A, "i1", 2, PROTOCOL_VERSION, held[2:], held[:2], ()), 0.5)
    assert A in revokes(out + proxy.tick(0.6))


def test_the_original_policy_dispatches_on_the_timer_only_and_unbounded() -> None:
    proxy = proxy_with(ProxySettings(max_jobs_dispatch=30, policy=ORIGINAL), a=1, b=8)
    assert jobs_to(submit(proxy, 0, 50), A) == []
    proxy.on_message(A, Info(queued=0, running=0, slots=1, done=0, failed=0), 0.2)
    proxy.on_message(B, Info(queued=3, running=8, slots=8, done=0, failed=0), 0.2)
    out = proxy.tick(0.3)
    # by reported queue length: a (0) takes 3 before b (3) gets any, then they alternate;
    # 30 in all, far past a's one slot
    assert len(jobs_to(out, A)) == 17 and len(jobs_to(out, B)) == 13
    assert revokes(out) == {}
    assert jobs_to(proxy.on_message(A, Result((outcome(0, A),)), 0.4), A) == []


def test_the_revoke_names_the_job_a_node_got_last_even_if_it_was_requeued() -> None:
    proxy = proxy_with(ProxySettings(node_timeout=1.0, prefetch=1), a=1, b=1)
    submit(proxy, 0, 4)  # a: job000 (running), job002; b: job001, job003
    proxy.on_disconnect(B, 0.2)
    proxy.on_message(A, Info(queued=1, running=1, slots=1, done=0, failed=0), 1.5)
    proxy.tick(1.5)  # b is dead: job001 and job003 go to the front of the queue
    out = proxy.on_message(A, Result((outcome(0, A),)), 1.6)
    (requeued,) = jobs_to(out, A)  # job002 now runs at a; this one waits behind it
    assert proxy.jobs[requeued].seq < proxy.jobs[JobId("job002")].seq
    _, out = proxy.on_hello(hello(NodeId("d"), 4), 1.7)  # takes the last queued job
    assert revokes(out) == {A: (requeued,)}  # not job002, which sorts later in the queue


# ---------------------------------------------------------------------------- overdue jobs


def info(proxy: ProxyState, node: NodeId, running: tuple[int, ...], now: float
         ) -> list[Outgoing]:
    ids = tuple(JobId(f"job{n:03d}") for n in running)
    entry = proxy.nodes[node]
    return proxy.on_message(node, Info(queued=max(0, len(entry.assigned) - len(ids)),
                                       running=len(ids), slots=entry.slots, done=0,
                                       failed=0, running_ids=ids), now)


def held(proxy: ProxyState, node: NodeId) -> list[int]:
    """The jobs dispatched to `node`, in dispatch order, as numbers."""
    return [int(j[3:]) for j in sorted(proxy.nodes[node].assigned,
                                       key=lambda j: proxy.jobs[j].sent)]


def overdue_held(proxy: ProxyState, node: NodeId) -> int:
    entry = proxy.nodes[node]
    return len(entry.overdue & entry.assigned)


def with_typical(proxy: ProxyState, seconds: float = 0.05) -> ProxyState:
    proxy.typical.seconds, proxy.typical.results = seconds, 100  # the cluster's history
    return proxy


def test_a_node_whose_running_jobs_are_overdue_sheds_before_any_result() -> None:
    proxy = with_typical(proxy_with(a=2, b=2))  # overdue after 2.2 x 50 ms = 110 ms
    submit(proxy, 0, 20)  # a: job000, 002, 004, 006; b: 001, 003, 005, 007
    out = info(proxy, B, (1, 3), 1.0)
    assert [type(o.msg) for o in out] == [Stats]
    out = info(proxy, B, (1, 3), 1.1)  # running 100 ms: within a slow node's job time
    assert [type(o.msg) for o in out] == [Stats]
    out = info(proxy, B, (1, 3), 1.15)  # 150 ms: overdue; the INFO runs a round at once
    assert revokes(out) == {B: (JobId("job005"), JobId("job007"))} and jobs_to(out, B) == []
    out = proxy.on_message(B, Returned((JobId("job005"), JobId("job007"))), 1.16)
    assert jobs_to(out, B) == []  # its 2 slots hold its 2 overdue jobs: no room
    out = proxy.on_message(A, Result((outcome(0, A),)), 1.2)
    assert jobs_to(out, A) == [JobId("job007")]  # from the front of the queue
    assert revokes(info(proxy, B, (1, 3), 1.25)) == {}  # not new: no second round


def test_overdue_jobs_are_noticed_on_the_timer_too() -> None:
    proxy = with_typical(proxy_with(a=2, b=2))
    submit(proxy, 0, 20)
    info(proxy, B, (1, 3), 1.0)
    assert revokes(proxy.tick(1.05)) == {}
    assert revokes(proxy.tick(1.2)) == {B: (JobId("job005"), JobId("job007"))}


def test_nothing_is_overdue_before_the_typical_job_time_is_known() -> None:
    proxy = proxy_with(a=2, b=2)
    submit(proxy, 0, 20)
    info(proxy, B, (1, 3), 1.0)
    assert revokes(info(proxy, B, (1, 3), 3.0) + proxy.tick(3.0)) == {}
    proxy.typical.seconds, proxy.typical.results = 0.05, 19  # too few results to trust
    assert revokes(info(proxy, B, (1, 3), 3.5) + proxy.tick(3.5)) == {}
    proxy.typical.results = 20
    assert B in revokes(info(proxy, B, (1, 3), 4.0))


def restarted(proxy: ProxyState, records: dict[str, Any], now: float) -> ProxyState:
    """The proxy as a restart rebuilds it from what it committed, its nodes back."""
    records.update(proxy.take_changes())
    again = ProxyState.restore([(k, pack(v)) for k, v in records.items() if v is not None],
                               proxy.settings, now)
    assert again is not None
    for node_id, entry in proxy.nodes.items():
        again.on_hello(Hello(node_id, "i1", entry.slots, PROTOCOL_VERSION, (),
                             tuple(again.nodes[node_id].assigned), ()), now)
    return again


@pytest.mark.parametrize("saved", [True, False])
def test_what_was_learned_of_job_times_survives_a_restart(saved: bool) -> None:
    """A restarted proxy that had to see TRUSTED_AFTER_RESULTS results again before it
    trusted the typical time called no job overdue meanwhile (with jobs of minutes, for
    hours). The ticker saves what was learned every TIMES_SAVE_SECONDS; a kill -9 loses
    only what came since."""
    proxy = proxy_with(a=2, b=2)
    records = proxy.initial_records()
    submit(proxy, 0, 60)
    finish(proxy, A, 15, 0.05, 0.5)
    proxy.tick(1.0)
    records.update(changes := proxy.take_changes())
    assert "m:times" in changes
    finish(proxy, A, 10, 0.05, 1.5)
    finish(proxy, B, 2, 0.06, 1.5)
    if saved:
        proxy.tick(1.0 + TIMES_SAVE_SECONDS)
    records.update(changes := proxy.take_changes())
    assert ("m:times" in changes) == saved
    assert proxy.typical.trusted() == pytest.approx((25 * 0.05 + 2 * 0.06) / 27)  # a plain mean

    again = restarted(proxy, records, 20.0)
    if not saved:  # what was learned since the last save is lost: 15 results, not trusted
        assert again.typical.results == 15 and again.typical.trusted() is None
        return
    assert again.typical.trusted() == pytest.approx(proxy.typical.seconds)
    assert again.typical.results == proxy.typical.results == 27
    assert again.job_times.expected(spec(0)) == pytest.approx(0.05)
    assert again.nodes[B].job_seconds == pytest.approx(0.06)
    running = tuple(int(j[3:]) for j in sorted(again.nodes[B].assigned))[:2]
    info(again, B, running, 21.0)  # B's jobs, running since: overdue past 2.2 x 50 ms
    assert B in revokes(info(again, B, running, 21.15))


def test_one_heavy_job_on_eight_slots_keeps_the_other_seven_fed() -> None:
    proxy = with_typical(proxy_with(a=8, b=2))
    submit(proxy, 0, 40)
    first = held(proxy, A)
    assert len(first) == 16 and len(held(proxy, B)) == 4
    heavy, normal = first[0], first[1:8]
    info(proxy, A, (heavy, *normal), 1.0)
    out = proxy.on_message(A, Result(tuple(outcome(n, A) for n in normal)), 1.05)
    assert len(jobs_to(out, A)) == 7  # refilled to 16: nothing is overdue yet
    nxt = held(proxy, A)[1:8]  # the 7 it started next (the first waiting ones)
    out = info(proxy, A, (heavy, *nxt), 1.12)  # heavy: 120 ms since first seen
    (revoked,) = revokes(out).values()
    assert len(revoked) == 8  # everything waiting behind its slots goes back ...
    proxy.on_message(A, Returned(revoked), 1.13)
    assert held(proxy, A) == [heavy, *nxt]
    for i, n in enumerate(nxt):  # ... and its 7 other slots are refilled one for one
        out = proxy.on_message(A, Result((outcome(n, A),)), 1.14 + i / 100)
        assert len(jobs_to(out, A)) == 1 and len(held(proxy, A)) == 8
    assert proxy.nodes[A].overdue & proxy.nodes[A].assigned == {JobId(f"job{heavy:03d}")}


def test_a_node_is_no_longer_slow_once_its_jobs_are_typical_again() -> None:
    proxy = with_typical(proxy_with(a=2, b=2))
    submit(proxy, 0, 40)
    info(proxy, B, (1, 3), 1.0)
    out = info(proxy, B, (1, 3), 1.2)  # a hiccup: both its jobs overdue
    proxy.on_message(B, Returned(revokes(out)[B]), 1.21)
    assert len(held(proxy, B)) == 2
    # They end at 250 ms: slow by its results now, so still no prefetch ...
    proxy.on_message(B, Result((outcome(1, B, 0.25), outcome(3, B, 0.25))), 1.25)
    assert len(held(proxy, B)) == 2 and overdue_held(proxy, B) == 0
    # ... until a few typical jobs bring its mean back under 2x the typical time.
    for k in range(6):
        running = held(proxy, B)
        info(proxy, B, tuple(running), 1.3 + k / 10)
        proxy.on_message(B, Result(tuple(outcome(n, B) for n in running)), 1.35 + k / 10)
    assert len(held(proxy, B)) == 4 and overdue_held(proxy, B) == 0


# ------------------------------------------------ overdue jobs the node reports (expected time)


def learn(proxy: ProxyState, node: NodeId, first: int, seconds: float = 0.05) -> None:
    """Two runs of `sleep 50` (job `first` and the next, dispatched to `node`) end."""
    done = (outcome(first, node, seconds), outcome(first + 1, node, seconds))
    proxy.on_message(node, Result(done), 0.5)


def limits_to(out: list[Outgoing], node: NodeId) -> list[float]:
    return [x for o in out if o.node == node and isinstance(o.msg, Job)
            for x in o.msg.overdue_after]


def test_a_dispatch_says_when_a_job_is_overdue_once_its_signature_has_run() -> None:
    proxy = proxy_with(a=1)
    out = submit(proxy, 0, 2)  # nothing known of `sleep 50` yet
    assert jobs_to(out, A) and limits_to(out, A) == []
    learn(proxy, A, 0)  # two runs of 50 ms, by any node
    out = submit(proxy, 2, 1)
    assert jobs_to(out, A) == [JobId("job002")]
    assert limits_to(out, A) == [pytest.approx(overdue_after(0.05))]


def test_failed_and_second_runs_teach_nothing() -> None:
    proxy = proxy_with(a=2)
    submit(proxy, 0, 4)
    failed = Outcome(JobId("job000"), False, "boom", A, 100.0, 100.5)
    proxy.on_message(A, Result((failed, outcome(1, A))), 0.5)
    proxy.on_message(A, Result((outcome(1, A, 9.0),)), 0.6)  # ran twice: not its attempt
    assert proxy.job_times.expected(spec(9)) is None  # one good run only


def test_a_job_the_node_reports_overdue_sheds_its_queue_at_once() -> None:
    proxy = proxy_with(a=2, b=2)  # no typical time: the proxy's own rule is silent
    submit(proxy, 0, 20)  # a: job000, 002, 004, 006; b: 001, 003, 005, 007
    info(proxy, B, (1, 3), 1.0)
    ids = (JobId("job001"), JobId("job003"))
    late = Info(queued=2, running=2, slots=2, done=0, failed=0, running_ids=ids,
                overdue_ids=ids[:1])
    out = proxy.on_message(B, late, 1.01)  # 10 ms on: only the node knows it is late
    assert revokes(out) == {B: (JobId("job005"), JobId("job007"))} and jobs_to(out, B) == []
    assert proxy.nodes[B].overdue == {JobId("job001")}
    assert proxy.overdue_marks == 1
    assert proxy.take_overdue() == [(B, JobId("job001"), "node", "expected")]
    assert proxy.take_overdue() == []
    assert revokes(proxy.on_message(B, late, 1.02)) == {}  # not new: no second round
    assert proxy.overdue_marks == 1


def test_reported_overdue_ids_count_only_for_jobs_running_there() -> None:
    proxy = proxy_with(a=2, b=2)
    submit(proxy, 0, 20)
    # job000 is a's, job005 waits at b: neither is a running job of b's
    bogus = Info(queued=2, running=2, slots=2, done=0, failed=0,
                 running_ids=(JobId("job001"), JobId("job003")),
                 overdue_ids=(JobId("job000"), JobId("job005"), JobId("nope")))
    assert revokes(proxy.on_message(B, bogus, 1.0)) == {}
    assert proxy.nodes[B].overdue == set() and proxy.overdue_marks == 0


def test_a_reported_overdue_job_is_no_longer_overdue_once_it_ends() -> None:
    proxy = proxy_with(a=2, b=2)
    submit(proxy, 0, 20)
    ids = (JobId("job001"), JobId("job003"))
    out = proxy.on_message(B, Info(2, 2, 2, 0, 0, ids, ids), 1.0)
    proxy.on_message(B, Returned(revokes(out)[B]), 1.01)
    assert len(held(proxy, B)) == 2 and overdue_held(proxy, B) == 2
    out = proxy.on_message(B, Result((outcome(1, B), outcome(3, B))), 1.2)
    assert len(jobs_to(out, B)) == 4  # typical again: slots and prefetch refilled
    assert overdue_held(proxy, B) == 0


def test_a_job_that_runs_its_usual_time_is_not_overdue_however_long_that_is() -> None:
    """The cluster's typical job takes 50 ms, `sleep 1000` is known to take 1 s: judged
    by the typical-time rule, every run of it was overdue at 110 ms (the soak audit of
    2026-11-25: 9,244 marks on a healthy cluster, 7,049 jobs handed back). It is judged by
    its own limit, 1.5 s, whether the node reports it or not, and by the limit learned
    since for a job dispatched before a restart of the proxy."""
    proxy = with_typical(proxy_with(a=2, b=2))
    long = [JobSpec(JobId(f"long{n}"), "sleep", ("1000",), C, 1.0) for n in range(4)]
    proxy.on_message(C, Job(tuple(long[:2])), 0.1)
    for s in long[:2]:  # two runs of 1 s, wherever they ran
        ran_on = proxy.jobs[s.job_id].node
        assert ran_on is not None
        proxy.on_message(ran_on, Result((Outcome(s.job_id, True, "ok", ran_on, 100.0,
                                                 101.0),)), 1.2)
    out = proxy.on_message(C, Job(tuple(long[2:])), 1.3)
    assert sorted(limits_to(out, A) + limits_to(out, B)) == [pytest.approx(1.5)] * 2
    node = proxy.jobs[long[2].job_id].node
    assert node is not None
    running = (long[2].job_id,)
    for now in (1.4, 1.9, 2.8):  # seen running at 1.4: 0, 0.5 and 1.4 s on
        proxy.on_message(node, Info(0, 1, 2, 0, 0, running), now)
        assert proxy.nodes[node].overdue == set() and proxy.tick(now) == []
    records = proxy.initial_records()
    again = restarted(proxy, records, 2.85)  # the record's limit is not stored
    for p in (proxy, again):
        p.on_message(node, Info(0, 1, 2, 0, 0, running), 2.85)
        out = p.on_message(node, Info(0, 1, 2, 0, 0, running), 4.4)  # 1.55 s running
        assert p.nodes[node].overdue == {long[2].job_id}
        assert p.take_overdue()[-1:] == [(node, long[2].job_id, "proxy", "expected")]


def test_a_job_dispatched_before_its_time_was_learned_is_judged_by_it_once_it_is() -> None:
    proxy = with_typical(proxy_with(a=4))  # typical jobs: 50 ms
    long = [JobSpec(JobId(f"long{n}"), "sleep", ("1000",), C, 1.0) for n in range(3)]
    out = proxy.on_message(C, Job(tuple(long)), 0.1)
    assert limits_to(out, A) == []  # nothing known of `sleep 1000` yet: no limit sent
    proxy.on_message(A, Info(0, 3, 4, 0, 0, tuple(s.job_id for s in long)), 0.2)
    proxy.on_message(A, Result(tuple(Outcome(s.job_id, True, "ok", A, 100.0, 101.0)
                                     for s in long[:2])), 1.2)  # two runs of 1 s
    proxy.on_message(A, Info(0, 1, 4, 2, 0, (long[2].job_id,)), 1.25)
    assert proxy.nodes[A].overdue == set()  # 1.05 s: its usual time, not 2.2 x 50 ms
    proxy.on_message(A, Info(0, 1, 4, 2, 0, (long[2].job_id,)), 1.75)
    assert proxy.take_overdue() == [(A, long[2].job_id, "proxy", "expected")]  # 1.55 s


def test_a_job_nothing_is_known_of_is_judged_against_the_longest_usual_jobs() -> None:
    """Most jobs take 5 ms, one in ten 0.5 s (one-off commands: none has run twice). The
    mean, ~55 ms, called every long one overdue at ~120 ms on healthy nodes (the soak mix:
    45 % of its `sh sleep 0.05-0.8` jobs); the 95th percentile of recent jobs does not."""
    proxy = proxy_with(a=2, b=2)
    for n in range(200):
        proxy.typical.observe(0.5 if n % 10 == 0 else 0.005)
    submit(proxy, 0, 4)
    for now in (1.0, 1.5, 2.0):  # job001 and job003 running at b: 0, 0.5 and 1 s on
        info(proxy, B, (1, 3), now)
        assert proxy.nodes[B].overdue == set() and proxy.take_overdue() == []
    info(proxy, B, (1, 3), 2.2)  # past 2.2 x 0.5 s: a usual job is not that long
    assert proxy.take_overdue() == [(B, JobId("job001"), "proxy", "usual"),
                                    (B, JobId("job003"), "proxy", "usual")]


def test_learned_times_this_version_cannot_read_are_learned_again() -> None:
    proxy = proxy_with(a=1)
    records = {**proxy.initial_records(), **proxy.take_changes(), "m:times": {"typical": 3}}
    again = ProxyState.restore([(k, pack(v)) for k, v in records.items()], proxy.settings,
                               0.0)
    assert again is not None and again.typical.results == 0 and len(again.job_times) == 0


def test_jobs_given_back_do_not_come_back_to_the_same_node_again_and_again() -> None:
    """b turned slow (all it may hold: its slots, taken); a holds its slots and the
    prefetch of very short jobs. Measured against b, a gave back its waiting jobs, the
    proxy sent them straight back to a, which gave them back: 1,700-1,900 hand-offs of
    one job in 1.5 s on a real cluster."""
    proxy = proxy_with(a=4, b=4)
    proxy.typical.seconds, proxy.typical.results = 0.0002, 100  # very short jobs
    proxy.nodes[B].job_seconds = 0.0005  # b: 2.5x the typical job
    out = submit(proxy, 0, 60)
    assert len(jobs_to(out, A)) == 4 * (1 + MAX_PREFETCH) and len(jobs_to(out, B)) == 4
    hand_offs = 0
    for _ in range(10):
        revoked = revokes(out)
        if not revoked:
            break
        hand_offs += sum(len(ids) for ids in revoked.values())
        out = [o for node, ids in revoked.items()
               for o in proxy.on_message(node, Returned(ids), 0.3)]
    assert hand_offs == 0, hand_offs
    assert revokes(proxy.tick(0.4)) == {}
