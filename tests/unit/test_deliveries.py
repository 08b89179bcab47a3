"""Unit tests for `reverse_proxy.deliveries`: what each origin is owed and when it is offered
again, and the bounded memory of forgotten jobs' recorded runs."""

from __future__ import annotations

from common.jobs import JobId, NodeId, Outcome
from reverse_proxy.deliveries import Deliveries

A, B = NodeId("a"), NodeId("b")


def outcome(n: int) -> Outcome:
    return Outcome(JobId(f"job{n}"), True, "ok", B, 10.0 + n, 11.0 + n)


OUTCOMES = {JobId(f"job{n}"): outcome(n) for n in range(5)}


def test_owed_results_are_offered_again_only_after_the_period() -> None:
    owed = Deliveries()
    owed.owe(A, JobId("job0"))  # never offered (origin away)
    owed.owe(A, JobId("job1"), offered=100.0)  # offered just now
    assert owed.due(A, 100.5, older_than=100.0, outcome_of=OUTCOMES.get) == [outcome(0)]
    assert owed.due(A, 101.0, older_than=100.0, outcome_of=OUTCOMES.get) == []  # both fresh
    assert owed.due(A, 102.0, older_than=101.5, outcome_of=OUTCOMES.get) == [
        outcome(0), outcome(1)]
    assert owed.due(B, 102.0, older_than=200.0, outcome_of=OUTCOMES.get) == []  # not B's


def test_a_job_without_an_outcome_yet_is_not_offered() -> None:
    owed = Deliveries()
    owed.owe(A, JobId("job9"))
    assert owed.due(A, 1.0, older_than=2.0, outcome_of=OUTCOMES.get) == []


def test_forgetting_settles_the_debt_and_remembers_the_run() -> None:
    owed = Deliveries()
    owed.owe(A, JobId("job0"))
    owed.forget(A, JobId("job0"), (B, 10.0))
    assert owed.due(A, 1.0, older_than=2.0, outcome_of=OUTCOMES.get) == []
    assert owed.recorded_run(JobId("job0")) == (B, 10.0)
    owed.forget(A, JobId("job1"), None)  # no outcome: nothing to remember
    assert owed.recorded_run(JobId("job1")) is None


def test_the_memory_of_forgotten_runs_is_bounded_oldest_out() -> None:
    owed = Deliveries(memory=3)
    for n in range(5):
        owed.forget(A, JobId(f"job{n}"), (B, float(n)))
    assert [owed.recorded_run(JobId(f"job{n}")) for n in range(5)] == [
        None, None, (B, 2.0), (B, 3.0), (B, 4.0)]
