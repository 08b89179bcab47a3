"""The dashboard's bounded job history and throughput samples: pure, no clock."""

from __future__ import annotations

import pytest

from common.jobs import PROXY_NODE, JobId, JobSpec, NodeId, Outcome
from reverse_proxy.history import NODE_LOST_ATTEMPT, OUTPUT_LINES, JobHistory, Throughput

A, B = NodeId("node-a"), NodeId("node-b")


def spec(n: int, origin: NodeId = A) -> JobSpec:
    return JobSpec(JobId(f"{n:024d}"), "sleep", (str(n),), origin, 1000.0 + n)


def outcome(n: int, node: NodeId = B, ok: bool = True, text: str = "fine") -> Outcome:
    return Outcome(JobId(f"{n:024d}"), ok, text, node, 2000.0, 2001.5)


def test_a_job_goes_from_queued_through_attempts_to_done() -> None:
    h = JobHistory()
    h.on_submitted(spec(1))
    assert h.recent()[0].state == "queued"
    h.on_dispatched(spec(1), A, 1500.0)
    h.on_dispatched(spec(1), A, 1500.5)  # the same hand-off re-sent after a reconnect
    h.on_requeued(JobId(f"{1:024d}"), B, 1550.0)  # not its node: nothing happens
    h.on_requeued(JobId(f"{1:024d}"), A, 1550.0)  # node-a gave it back
    h.on_dispatched(spec(1), B, 1600.0)
    h.on_outcome(outcome(1))
    h.on_outcome(outcome(1, node=A, text="second run"))  # the first outcome stands
    entry = h.recent()[0]
    assert (entry.state, entry.node, entry.result) == ("done", B, "fine")
    assert [(a.node, a.dispatched_at) for a in entry.attempts] == [(A, 1500.0), (B, 1600.0)]
    body = entry.to_json()
    assert body["attempts"] == [
        {"node": A, "dispatched_at": 1500.0, "finished_at": 1550.0,
         "result": "given back before it started"},
        {"node": B, "dispatched_at": 1600.0, "finished_at": 2001.5, "result": "fine"}]
    assert (body["started_at"], body["finished_at"]) == (2000.0, 2001.5)


def test_failed_outcomes_and_filters_and_search() -> None:
    h = JobHistory()
    for n in range(6):
        h.on_submitted(spec(n))
    h.on_outcome(outcome(1, ok=False, text="boom"))
    h.on_outcome(outcome(2))
    h.on_dispatched(spec(3), A, 1.0)
    assert [e.ticket for e in h.recent()] == [f"{n:024d}" for n in (5, 4, 3, 2, 1, 0)]
    assert [e.ticket[-1] for e in h.recent("failed")] == ["1"]
    assert [e.ticket[-1] for e in h.recent("dispatched")] == ["3"]
    assert [e.ticket[-1] for e in h.recent(search="0004")] == ["4"]
    assert len(h.recent(limit=2)) == 2
    assert h.counts() == {"queued": 3, "dispatched": 1, "done": 1, "failed": 1,
                          "cancelled": 0}
    assert len(h.recent("queued", limit=2)) == 2 and h.matching("queued") == 3
    assert h.matching() == 6 and h.matching(search="0004") == 1
    assert h.matching("failed", "0004") == 0


def test_a_failed_attempt_that_is_retried_goes_back_to_queued_with_its_reason() -> None:
    """It showed the first attempt's failure as the job's end, and no later attempt."""
    h = JobHistory()
    h.on_submitted(spec(1))
    h.on_dispatched(spec(1), A, 1500.0)
    h.on_attempt_failed(outcome(1, node=A, ok=False, text="exit 1"))
    entry = h.recent()[0]
    assert (entry.state, entry.node, entry.result) == ("queued", None, None)
    h.on_dispatched(spec(1), B, 1600.0)
    h.on_outcome(outcome(1, node=B, ok=False, text="exit 2")._replace(finished_at=2600.0))
    body = h.recent()[0].to_json()
    assert (body["state"], body["result"], body["finished_at"]) == ("failed", "exit 2", 2600.0)
    assert body["attempts"] == [
        {"node": A, "dispatched_at": 1500.0, "finished_at": 2001.5, "result": "exit 1"},
        {"node": B, "dispatched_at": 1600.0, "finished_at": 2600.0, "result": "exit 2"}]


def test_a_cancelled_job_is_cancelled_not_failed() -> None:
    h = JobHistory()
    for n in (1, 2):
        h.on_submitted(spec(n))
    h.on_dispatched(spec(2), B, 1500.0)
    h.on_outcome(outcome(1, node=NodeId("proxy"), ok=False, text="cancelled while queued")
                 ._replace(cancelled=True))
    h.on_outcome(outcome(2, ok=False, text="stopped")._replace(cancelled=True))
    assert [e.state for e in h.recent()] == ["cancelled", "cancelled"]
    assert [e.ticket[-1] for e in h.recent("cancelled")] == ["2", "1"]
    assert h.counts()["cancelled"] == 2


def test_the_history_is_bounded_and_drops_the_oldest() -> None:
    h = JobHistory(capacity=3)
    for n in range(5):
        h.on_submitted(spec(n))
    assert len(h) == 3
    assert h.get(f"{0:024d}") is None and h.get(f"{4:024d}") is not None
    h.on_outcome(outcome(0))  # forgotten: nothing to attach it to, nothing breaks
    assert h.counts()["done"] == 0


def test_a_job_first_seen_at_dispatch_is_recreated_from_its_spec() -> None:
    h = JobHistory()
    h.on_dispatched(spec(7), B, 5.0)  # e.g. after a proxy restart
    assert h.recent()[0].state == "dispatched"


def test_every_change_bumps_the_version() -> None:
    h = JobHistory()
    versions = [h.version]
    h.on_submitted(spec(1))
    versions.append(h.version)
    h.on_dispatched(spec(1), A, 1.0)
    versions.append(h.version)
    h.on_outcome(outcome(1))
    versions.append(h.version)
    assert versions == sorted(set(versions))


@pytest.mark.parametrize("samples, rates", [
    ([(0.0, 0, 5), (1.0, 10, 3), (3.0, 20, 0)], [0.0, 10.0, 5.0]),
    ([(0.0, 50, 0), (1.0, 0, 0)], [0.0, 0.0]),  # counter reset (proxy restart): no negative
    ([(1.0, 0, 0), (1.0, 5, 0)], [0.0, 0.0]),  # same instant: no division by zero
])
def test_throughput_rates(samples: list[tuple[float, int, int]], rates: list[float]) -> None:
    t = Throughput(size=10)
    assert [t.sample(*s).rate for s in samples] == rates


def test_throughput_keeps_the_last_samples() -> None:
    t = Throughput(size=3)
    for i in range(5):
        t.sample(float(i), i, 0)
    assert [s.t for s in t.samples] == [2.0, 3.0, 4.0]


def test_a_running_job_shows_when_its_attempt_started() -> None:
    h = JobHistory()
    job = JobId(f"{1:024d}")
    h.on_dispatched(spec(1), A, 1500.0)
    h.on_running(job, B, 1500.2)  # not the node it was dispatched to: ignored
    assert h.recent()[0].started_at is None
    version = h.version
    h.on_running(job, A, 1500.1)
    assert h.recent()[0].started_at == 1500.1 and h.version == version + 1
    h.on_running(job, A, 1500.1)  # every INFO says it again: no change, no push
    assert h.version == version + 1
    h.on_requeued(job, A, 1550.0)  # given back: no start until the next attempt
    assert h.recent()[0].started_at is None
    h.on_dispatched(spec(1), B, 1600.0)
    h.on_running(job, B, 1600.1)
    h.on_attempt_failed(outcome(1, node=B, ok=False))
    assert h.recent()[0].started_at is None
    h.on_dispatched(spec(1), B, 1700.0)
    h.on_running(job, B, 1700.1)
    h.on_outcome(outcome(1, node=B))  # the outcome's own start stands
    assert h.recent()[0].started_at == 2000.0
    h.on_running(job, B, 1700.1)  # a late INFO
    assert h.recent()[0].started_at == 2000.0


def test_an_attempt_whose_node_was_lost_ends_when_the_job_is_handed_on() -> None:
    """The proxy takes a dead node's jobs back without a message the dashboard sees: the
    attempt showed no end at all. It ends when the job goes to its next node, or when the
    proxy ends the job itself (lost too often, or cancelled meanwhile)."""
    h = JobHistory()
    h.on_dispatched(spec(1), A, 1500.0)
    h.on_dispatched(spec(1), B, 1509.0)  # node-a declared dead: node-b runs it now
    h.on_dispatched(spec(2), A, 1500.0)
    h.on_outcome(Outcome(JobId(f"{2:024d}"), False, "node lost 5 times", PROXY_NODE,
                         1520.0, 1520.0))
    one, two = (h.get(f"{n:024d}") for n in (1, 2))
    assert one is not None and two is not None
    assert [(a.node, a.finished_at, a.result) for a in one.attempts] == [
        (A, 1509.0, NODE_LOST_ATTEMPT), (B, None, None)]
    assert [(a.finished_at, a.result) for a in two.attempts] == [(1520.0, NODE_LOST_ATTEMPT)]
    assert two.result == "node lost 5 times"


def test_live_output_is_kept_from_the_running_node_only_and_bounded() -> None:
    h = JobHistory()
    h.on_submitted(spec(1))
    h.on_output(JobId(f"{1:024d}"), B, ("too early",))  # not dispatched yet: nowhere to run
    h.on_dispatched(spec(1), B, 1500.0)
    h.on_output(JobId(f"{1:024d}"), A, ("forged",))  # A does not run it
    lines = tuple(f"line {i}" for i in range(OUTPUT_LINES + 5))
    h.on_output(JobId(f"{1:024d}"), B, lines)
    entry = h.recent()[0]
    assert "output" not in entry.to_json()  # lists stay small; the detail view has it
    assert entry.to_json(with_output=True)["output"] == list(lines[5:])
    h.on_outcome(outcome(1))
    assert entry.to_json(with_output=True)["output"] == list(lines[5:])  # kept once done


def test_a_job_that_never_ran_shows_no_start_and_no_proxy_node() -> None:
    """A job cancelled before it started showed a start time and 'took 0.000 s'; one
    cancelled while queued at the proxy showed the node 'proxy'."""
    h = JobHistory()
    for n in (1, 2):
        h.on_submitted(spec(n))
    h.on_dispatched(spec(2), B, 1500.0)
    h.on_outcome(Outcome(JobId(f"{1:024d}"), False, "cancelled while queued, it never ran",
                         NodeId("proxy"), 1600.0, 1600.0, cancelled=True))
    h.on_outcome(Outcome(JobId(f"{2:024d}"), False, "cancelled before it started on node-b",
                         B, 1700.0, 1700.0, cancelled=True))
    first, second = h.get(f"{1:024d}"), h.get(f"{2:024d}")
    assert first is not None and second is not None
    assert (first.node, first.started_at, first.finished_at) == (None, None, 1600.0)
    assert (second.node, second.started_at, second.finished_at) == (B, None, 1700.0)
