"""Unit tests for `reverse_proxy.job_times`: what makes two jobs alike, no estimate before
MIN_RUNS runs, the median of the last WINDOW runs (one slow run does not move it, a
lasting change does), and the LRU bound on signatures."""

from __future__ import annotations

import msgpack
import pytest

from common.jobs import JobId, JobSpec, NodeId
from reverse_proxy.job_times import (
    MIN_RUNS,
    RECENT_RESULTS,
    TRUSTED_AFTER_RESULTS,
    WINDOW,
    JobTimes,
    TypicalTime,
    node_mean,
    signature,
)


def job(kind: str = "sleep", *args: str, origin: str = "n1", priority: int = 0) -> JobSpec:
    return JobSpec(JobId("j"), kind, args or ("50",), NodeId(origin), 1.0, priority=priority)


def test_a_signature_is_the_type_and_the_arguments() -> None:
    assert signature(job("sleep", "50")) == signature(job("sleep", "50", origin="n2",
                                                          priority=5))
    assert signature(job("sleep", "50")) != signature(job("sleep", "51"))
    assert signature(job("sleep", "50")) != signature(job("fib", "50"))
    assert signature(job("sh", "a b")) != signature(job("sh", "a", "b"))  # not joined by " "
    assert signature(job("sh", "x" * 100_000)) != signature(job("sh", "x" * 99_999))


def test_no_estimate_before_min_runs() -> None:
    times = JobTimes()
    assert times.expected(job()) is None
    for _ in range(MIN_RUNS - 1):
        times.observe(job(), 0.05)
        assert times.expected(job()) is None
    times.observe(job(), 0.05)
    assert times.expected(job()) == pytest.approx(0.05)


def test_the_estimate_is_the_median_of_recent_runs() -> None:
    times = JobTimes()
    for seconds in (0.050, 0.052, 0.051, 0.5, 0.049):  # one run on a node that slowed down
        times.observe(job(), seconds)
    assert times.expected(job()) == pytest.approx(0.051)
    for _ in range(WINDOW // 2 + 1):  # the job really got longer: followed in a few runs
        times.observe(job(), 0.2)
    assert times.expected(job()) == pytest.approx(0.2)


def test_signatures_are_learned_apart() -> None:
    times = JobTimes()
    for _ in range(MIN_RUNS):
        times.observe(job("sleep", "10"), 0.01)
        times.observe(job("sleep", "90"), 0.09)
    assert times.expected(job("sleep", "10")) == pytest.approx(0.01)
    assert times.expected(job("sleep", "90")) == pytest.approx(0.09)
    assert times.expected(job("sleep", "50")) is None


def test_negative_run_times_count_as_zero() -> None:  # a clock step between start and end
    times = JobTimes()
    for _ in range(MIN_RUNS):
        times.observe(job(), -3.0)
    assert times.expected(job()) == 0.0


def test_the_least_recently_seen_signature_goes_first() -> None:
    times = JobTimes(max_signatures=2)
    for _ in range(MIN_RUNS):
        times.observe(job("sleep", "1"), 0.001)
        times.observe(job("sleep", "2"), 0.002)
    times.observe(job("sleep", "1"), 0.001)  # seen again: now the most recent
    times.observe(job("sleep", "3"), 0.003)  # evicts "2"
    assert len(times) == 2
    assert times.expected(job("sleep", "2")) is None
    assert times.expected(job("sleep", "1")) == pytest.approx(0.001)


def test_the_typical_time_is_trusted_after_enough_results() -> None:
    typical = TypicalTime()
    assert typical.trusted() is None
    for _ in range(TRUSTED_AFTER_RESULTS - 1):
        typical.observe(0.05)
    assert typical.seconds == pytest.approx(0.05) and typical.trusted() is None
    typical.observe(0.05)
    assert typical.trusted() == pytest.approx(0.05)


def test_the_typical_time_is_a_plain_mean_at_first_then_moves_slowly() -> None:
    typical = TypicalTime()
    for seconds in (0.01, 0.02, 0.03):
        typical.observe(seconds)
    assert typical.seconds == pytest.approx(0.02)
    for _ in range(100):
        typical.observe(0.02)
    typical.observe(1.0)  # one very long job moves it by a few percent of the gap only
    assert typical.seconds == pytest.approx(0.02 + 0.02 * 0.98)


def test_the_usual_longest_time_is_the_95th_percentile_of_recent_jobs() -> None:
    """A mix of 5 ms jobs and one-off long ones: the mean (the typical time) is no measure
    of how long a job may run; nearly all recent jobs ended within the usual longest."""
    typical = TypicalTime()
    for _ in range(TRUSTED_AFTER_RESULTS - 1):
        typical.observe(0.005)
    assert typical.usual_longest() is None  # not trusted yet
    for n in range(RECENT_RESULTS):  # 1 in 10 takes 0.3-0.8 s
        typical.observe(0.3 + n / 400 if n % 10 == 9 else 0.005)
    mean = typical.trusted()
    assert mean is not None and mean < 0.1
    longest = typical.usual_longest()
    assert longest is not None and 0.3 < longest < 0.8
    assert sum(s <= longest for s in typical.recent) >= 0.95 * RECENT_RESULTS
    for _ in range(RECENT_RESULTS):  # the long ones stop: it follows
        typical.observe(0.005)
    assert typical.usual_longest() == typical.trusted()  # never below the typical time


def test_a_typical_time_stored_by_an_older_proxy_is_its_own_usual_longest() -> None:
    typical = TypicalTime.from_wire([0.05, 100])
    assert typical.usual_longest() == typical.trusted() == 0.05
    typical.observe(0.9)
    assert typical.usual_longest() == pytest.approx(0.9)


def test_a_node_mean_rises_fast_and_falls_slowly() -> None:
    assert node_mean(None, 0.05) == 0.05
    assert node_mean(0.05, 0.5) == pytest.approx(0.05 + 0.7 * 0.45)
    assert node_mean(0.5, 0.05) == pytest.approx(0.5 - 0.3 * 0.45)


def test_what_was_learned_comes_back_from_the_wire_as_it_was() -> None:
    times, typical = JobTimes(max_signatures=3), TypicalTime()
    for n in range(4):  # "sleep 0" is evicted by "sleep 3"
        for run in range(n + 1):
            times.observe(job("sleep", str(n)), 0.01 * n + 0.001 * run)
            typical.observe(0.01 * n)
    wire = msgpack.unpackb(msgpack.packb([times.to_wire(), typical.to_wire()]))
    again, again_typical = JobTimes.from_wire(wire[0], 3), TypicalTime.from_wire(wire[1])
    assert len(again) == 3 and again.expected(job("sleep", "0")) is None
    for n in (1, 2, 3):
        assert again.expected(job("sleep", str(n))) == times.expected(job("sleep", str(n)))
    again.observe(job("sleep", "4"), 0.04)  # the least recently seen goes first, as before
    assert again.expected(job("sleep", "1")) is None and len(again) == 3
    assert (again_typical.seconds, again_typical.results) == (typical.seconds, 10)
    assert again_typical.recent == typical.recent
    assert len(JobTimes.from_wire(wire[0], max_signatures=2)) == 2  # a smaller bound now
