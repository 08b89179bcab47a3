"""Unit tests for `reverse_proxy.balancer`: least load after taking the job, ties by node id,
the capacity bound, proportion to slots, slowness, overdue jobs (when a running job is
overdue, effective slots, no prefetch, giving back what waits behind them), rebalancing
(ties, empty clusters, zero slots, nodes that vanished between INFO and dispatch), and the
original's queue-length policy."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.jobs import JobId, NodeId
from reverse_proxy.balancer import (
    EXPECTED_MARGIN,
    EXPECTED_RATIO,
    MAX_PREFETCH,
    OVERDUE_GRACE,
    SLOW_RATIO,
    NodeLoad,
    assign,
    assign_by_queue_length,
    capacity,
    effective,
    overdue,
    overdue_after,
    prefetch_per_slot,
    rebalance,
    slowness,
)

FUZZ = settings(max_examples=200, deadline=None)

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def load(node: str, slots: int, outstanding: int = 0, weight: float = 1.0,
         overdue: int = 0) -> NodeLoad:
    return NodeLoad(NodeId(node), slots, outstanding, weight, overdue)


@pytest.mark.parametrize("slots, prefetch, expected", [(1, 0, 1), (2, 1, 4), (8, 1, 16),
                                                       (3, 2, 9), (0, 5, 0)])
def test_capacity(slots: int, prefetch: int, expected: int) -> None:
    assert capacity(slots, prefetch) == expected


def test_empty_cluster_gets_nothing() -> None:
    assert assign(10, [], max_jobs=100, prefetch=1) == []


def test_empty_queue_assigns_nothing() -> None:
    assert assign(0, [load("a", 4)], max_jobs=100, prefetch=1) == []


def test_ties_go_to_the_first_node_id() -> None:
    assert assign(1, [load("b", 1), load("a", 1), load("c", 1)], 10, 1) == [A]
    assert assign(3, [load("c", 2), load("b", 2), load("a", 2)], 10, 1) == [A, B, C]


def test_least_loaded_first() -> None:
    loads = [load("a", 2, outstanding=2), load("b", 2, outstanding=0)]
    assert assign(3, loads, 10, 1) == [B, B, A]


def test_zero_slot_nodes_get_nothing() -> None:
    assert assign(5, [load("a", 0), load("b", 0)], 10, 1) == []
    assert Counter(assign(5, [load("a", 0), load("b", 1)], 10, 1)) == Counter({B: 2})


def test_capacity_is_never_exceeded() -> None:
    loads = [load("a", 1), load("b", 2, outstanding=3), load("c", 1, outstanding=5)]
    targets = assign(100, loads, 1000, prefetch=1)
    assert Counter(targets) == Counter({A: 2, B: 1})


def test_full_nodes_leave_the_queue_at_the_proxy() -> None:
    assert assign(10, [load("a", 2, outstanding=4)], 100, prefetch=1) == []


@pytest.mark.parametrize(("base", "typical", "expected"), [
    (1, None, 1), (1, 0.0, 1), (2, None, 2),  # no typical time: PREFETCH
    (1, 0.05, 1), (1, 0.005, 1), (1, 0.0049, 2),  # a refill covered by 1 job, or not
    (0, 0.0001, 0),  # PREFETCH=0: none at all
    (1, 0.002, 3), (1, 0.001, 5), (1, 0.0001, MAX_PREFETCH), (1, 1e-9, MAX_PREFETCH),
    (12, 0.0001, 12),  # never below PREFETCH
])
def test_prefetch_per_slot_covers_a_refill_of_short_jobs(
        base: int, typical: float | None, expected: int) -> None:
    assert prefetch_per_slot(base, typical) == expected


def test_prefetch_zero_means_slots_only() -> None:
    assert Counter(assign(10, [load("a", 3), load("b", 1)], 100, prefetch=0)) == Counter(
        {A: 3, B: 1})


def test_proportional_to_slots() -> None:
    counts = Counter(assign(1000, [load("big", 8), load("small", 2)], 1000, prefetch=100))
    assert counts[NodeId("big")] + counts[NodeId("small")] == 1000
    assert counts[NodeId("big")] == 4 * counts[NodeId("small")]


def test_proportional_to_slots_at_capacity() -> None:
    counts = Counter(assign(1000, [load("big", 8), load("small", 2)], 1000, prefetch=1))
    assert counts == Counter({NodeId("big"): 16, NodeId("small"): 4})


def test_max_jobs_caps_one_round() -> None:
    assert len(assign(100, [load("a", 50)], max_jobs=7, prefetch=1)) == 7
    assert len(assign(3, [load("a", 50)], max_jobs=7, prefetch=1)) == 3
    assert assign(100, [load("a", 50)], max_jobs=0, prefetch=1) == []


# ---------------------------------------------------------------------------- properties


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeLoad]:
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), unique=True,
                          max_size=6))
    loads: list[NodeLoad] = []
    for name in names:
        slots = draw(st.integers(0, 8))
        outstanding = draw(st.integers(0, capacity(slots, 2) + 3))
        loads.append(load(name, slots, outstanding))
    return loads


def free_capacity(loads: list[NodeLoad], prefetch: int) -> int:
    return sum(max(0, capacity(n.slots, prefetch) - n.outstanding) for n in loads
               if n.slots > 0)


@given(loads=clusters(), queued=st.integers(0, 120), max_jobs=st.integers(0, 120),
       prefetch=st.integers(0, 2))
@FUZZ
def test_assignment_properties(loads: list[NodeLoad], queued: int, max_jobs: int,
                               prefetch: int) -> None:
    targets = assign(queued, loads, max_jobs, prefetch)
    assert len(targets) == min(queued, max_jobs, free_capacity(loads, prefetch))

    # Replay: each job goes to the node whose load after taking it is lowest among the
    # nodes with room (ties by node id), and no node ends above its capacity.
    outstanding = {n.node_id: n.outstanding for n in loads}
    slots = {n.node_id: n.slots for n in loads}
    for target in targets:
        room = [n for n in outstanding
                if slots[n] > 0 and outstanding[n] < capacity(slots[n], prefetch)]
        best = min(room, key=lambda n: (Fraction(outstanding[n] + 1, slots[n]), n))
        assert target == best
        outstanding[target] += 1
    for n in loads:
        if n.slots == 0:
            assert n.node_id not in targets
        elif n.node_id in targets:
            assert outstanding[n.node_id] <= capacity(n.slots, prefetch)


@given(loads=clusters(), queued=st.integers(0, 50), prefetch=st.integers(0, 2))
@FUZZ
def test_order_of_loads_does_not_matter(loads: list[NodeLoad], queued: int,
                                        prefetch: int) -> None:
    assert assign(queued, loads, 100, prefetch) == assign(queued, loads[::-1], 100, prefetch)


# ---------------------------------------------------------------------------- the original


def test_queue_length_policy_shortest_first_ties_by_id() -> None:
    reported = [(B, 0), (A, 0), (C, 2)]
    assert assign_by_queue_length(5, reported, 100) == [A, B, A, B, A]


def test_queue_length_policy_has_no_capacity_bound() -> None:
    assert assign_by_queue_length(50, [(A, 0)], 100) == [A] * 50


def test_queue_length_policy_limits() -> None:
    assert assign_by_queue_length(10, [], 100) == []
    assert assign_by_queue_length(0, [(A, 0)], 100) == []
    assert len(assign_by_queue_length(10, [(A, 0), (B, 0)], 3)) == 3


@given(reported=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 20), max_size=6),
       queued=st.integers(0, 60), max_jobs=st.integers(0, 60))
@FUZZ
def test_queue_length_policy_evens_out(reported: dict[str, int], queued: int,
                                       max_jobs: int) -> None:
    pairs = [(NodeId(n), q) for n, q in reported.items()]
    targets = assign_by_queue_length(queued, pairs, max_jobs)
    assert len(targets) == (min(queued, max_jobs) if pairs else 0)
    lengths = dict(pairs)
    for target in targets:
        assert (lengths[target], target) == min((q, n) for n, q in lengths.items())
        lengths[target] += 1


# ---------------------------------------------------------------------------- slowness


def test_slow_nodes_get_no_prefetch() -> None:
    assert capacity(4, 1, weight=1.0) == 8
    assert capacity(4, 1, weight=SLOW_RATIO) == 4
    assert Counter(assign(100, [load("a", 2), load("b", 2, weight=10.0)], 100, 1)) == Counter(
        {A: 4, B: 2})


def test_slow_nodes_are_chosen_last() -> None:
    assert assign(2, [load("a", 2, weight=5.0), load("b", 2)], 100, 1) == [B, B]


def test_slowness_against_the_typical_job_time() -> None:
    means = {A: 0.05, B: 0.09, C: 0.5}
    assert slowness(means, 0.05) == {A: 1.0, B: 1.0, C: pytest.approx(10.0)}
    assert slowness(means, None) == {A: 1.0, B: 1.0, C: 1.0}
    assert slowness(means, 0.0) == {A: 1.0, B: 1.0, C: 1.0}
    assert slowness({}, 0.05) == {}
    assert slowness({A: 0.1}, 0.05) == {A: pytest.approx(2.0)}  # exactly the ratio: slow


# ---------------------------------------------------------------------------- rebalance


def test_rebalance_empty_cluster() -> None:
    assert rebalance([]) == {}


def test_rebalance_balanced_cluster_keeps_everything() -> None:
    assert rebalance([load("a", 1, 2), load("b", 2, 4), load("c", 8, 16)]) == {}


def test_rebalance_idle_node_takes_from_the_heavy_one() -> None:
    # a holds 2 per slot (one waiting), b is idle: the gap is 2 > 1, a gives back 1.
    assert rebalance([load("a", 1, 2), load("b", 4, 0)]) == {A: 1}


def test_rebalance_a_gap_of_exactly_one_job_per_slot_is_a_tie() -> None:
    assert rebalance([load("a", 2, 4), load("b", 2, 2)]) == {}
    assert rebalance([load("a", 2, 4), load("b", 2, 1)]) == {A: 1}


def test_rebalance_gives_back_only_what_can_be_waiting() -> None:
    # 4 slots, 6 held: at most 2 are not started, however large the gap.
    assert rebalance([load("a", 4, 6), load("b", 100, 0)]) == {A: 2}
    # all held jobs may be running: nothing to give back.
    assert rebalance([load("a", 4, 4), load("b", 100, 0)]) == {}


def test_rebalance_closes_the_gap_only() -> None:
    # a: 8 slots, 16 held (2 per slot); b: idle. Bringing a to 1 per slot closes the gap.
    assert rebalance([load("a", 8, 16), load("b", 8, 0)]) == {A: 8}
    # c at 0.5 per slot: a needs to come down to 1.5 per slot only.
    assert rebalance([load("a", 8, 16), load("c", 8, 4)]) == {A: 4}


def test_rebalance_several_heavy_nodes_in_node_id_order() -> None:
    out = rebalance([load("c", 1, 2), load("b", 1, 2), load("a", 4, 0)])
    assert list(out) == [B, C] and out == {B: 1, C: 1}


def test_rebalance_zero_slot_node_gives_back_everything() -> None:
    assert rebalance([load("a", 0, 5), load("b", 1, 1)]) == {A: 5}
    assert rebalance([load("a", 0, 5)]) == {}  # nobody could run them: keep them
    assert rebalance([load("a", 0, 0), load("b", 0, 3)]) == {}


def test_rebalance_slow_node_sheds_its_waiting_jobs() -> None:
    # b runs 10x slower: its 4 waiting jobs would start after 10 typical jobs' time.
    assert rebalance([load("a", 4, 8), load("b", 4, 8, weight=10.0)]) == {B: 4}


def test_rebalance_vanished_node_is_neither_source_nor_measure() -> None:
    # c reported an empty queue in its last INFO, then disconnected before this round:
    # the shell leaves it out, so a is not drained towards a node that is gone ...
    assert rebalance([load("a", 1, 2), load("b", 1, 2)]) == {}
    # ... and a heavy node that vanished is not asked for anything.
    assert rebalance([load("b", 4, 0)]) == {}


def test_rebalance_single_node() -> None:
    assert rebalance([load("a", 1, 50)]) == {}


def settle(loads: list[NodeLoad], prefetch: int, rounds: int = 6
           ) -> tuple[list[NodeLoad], int]:
    """Dispatch rounds as the proxy runs them, each a REVOKE and the RETURNED jobs placed
    again: the loads once nothing more is given back, and how many rounds gave back."""
    queued = 0
    for round_ in range(rounds):
        out = rebalance(loads, prefetch)
        if not out:
            return loads, round_
        queued += sum(out.values())
        loads = [NodeLoad(n.node_id, n.slots, n.outstanding - out.get(n.node_id, 0),
                          n.weight, n.overdue) for n in loads]
        placed = Counter(assign(queued, loads, 10**6, prefetch))
        queued -= sum(placed.values())
        loads = [NodeLoad(n.node_id, n.slots, n.outstanding + placed[n.node_id], n.weight,
                          n.overdue) for n in loads]
    return loads, rounds


@given(loads=clusters(), weights=st.lists(st.sampled_from([1.0, 2.0, 10.0]), max_size=6),
       prefetch=st.sampled_from([0, 1, 2, 8]))
@FUZZ
def test_rebalance_properties(loads: list[NodeLoad], weights: list[float],
                              prefetch: int) -> None:
    loads = [NodeLoad(n.node_id, n.slots, n.outstanding, w)
             for n, w in zip(loads, weights + [1.0] * len(loads), strict=False)]
    out = rebalance(loads, prefetch)
    assert out == rebalance(loads[::-1], prefetch)
    by_id = {n.node_id: n for n in loads}
    for node_id, count in out.items():
        n = by_id[node_id]
        assert 0 < count <= n.outstanding - n.slots  # only jobs that cannot be running
    # Given back and placed again, the jobs come to rest: no endless back and forth.
    _, rounds = settle(loads, prefetch)
    assert rounds <= 2


def test_jobs_given_back_are_not_dispatched_back_for_good() -> None:
    """b is slow (capacity: its slots, all taken); a fast one took 36 with the prefetch of
    short jobs. Measured against b, a gave back 22 in every round, and the proxy sent them
    back to a at once: 1,900 hand-offs of one job in 1.5 s on a real cluster."""
    loads = [load("a", 4, 36), load("b", 4, 4, weight=2.5)]
    assert rebalance(loads, prefetch=8) == {}
    assert settle(loads, 8)[1] == 0
    # b not slow, with room: a gives back what b can take, and it stays there
    loads = [load("a", 4, 36), load("b", 4, 4)]
    out = rebalance(loads, prefetch=8)
    assert out[A] > 0
    settled, rounds = settle(loads, 8)
    assert rounds == 1 and rebalance(settled, 8) == {}


def test_a_one_slot_slow_taker_does_not_draw_jobs_it_would_not_get() -> None:
    # c (1 slot, slow) is the lightest with room, but `assign` would keep a's job at a.
    loads = [load("a", 4, 8), load("c", 1, 0, weight=2.5)]
    assert rebalance(loads, prefetch=1) == {}


# ---------------------------------------------------------------------------- overdue jobs

J1, J2, J3 = JobId("j1"), JobId("j2"), JobId("j3")
LIMIT = SLOW_RATIO * (1 + OVERDUE_GRACE) * 0.05  # for a typical job of 50 ms: 110 ms


@pytest.mark.parametrize("age, late", [(0.0, False), (0.1, False), (LIMIT - 1e-6, False),
                                       (LIMIT, False), (LIMIT + 1e-6, True), (5.0, True)])
def test_a_job_is_overdue_past_slow_ratio_typical_jobs_plus_a_grace(age: float,
                                                                     late: bool) -> None:
    assert overdue({J1: 10.0}, 10.0 + age, 0.05, {}) == ({J1} if late else set())


def test_overdue_picks_the_late_jobs_only() -> None:
    seen = {J1: 9.0, J2: 9.95, J3: 9.8}
    assert overdue(seen, 10.0, 0.05, {}) == {J1, J3}
    assert overdue(seen, 10.0, 1.0, {}) == set()  # typical jobs take 1 s here: none is late
    assert overdue({}, 10.0, 0.05, {}) == set()


def test_a_job_with_a_limit_of_its_own_is_judged_by_it_alone() -> None:
    # Typical jobs take 50 ms (the rule says 110 ms); J1 is known to take ~1 s (limit 1.5 s).
    seen = {J1: 9.0, J2: 9.0}
    assert overdue(seen, 10.0, 0.05, {J1: 1.5}) == {J2}
    assert overdue(seen, 10.6, 0.05, {J1: 1.5}) == {J1, J2}
    assert overdue(seen, 10.0, 5.0, {J1: 0.5}) == {J1}  # sooner than the rule, too
    assert overdue(seen, 10.0, None, {J1: 0.5}) == {J1}  # with no typical time yet
    assert overdue(seen, 10.0, None, {J3: 0.5}) == set()  # a limit of a job not running


@pytest.mark.parametrize("expected, limit", [
    (None, None),  # nothing expected: the typical-time rule judges it
    (0.0, EXPECTED_MARGIN),
    (0.005, 0.005 + EXPECTED_MARGIN),  # short jobs: the margin, against a stalled loop
    (0.04, 0.04 + EXPECTED_MARGIN),  # where ratio and margin meet
    (0.1, EXPECTED_RATIO * 0.1),  # longer ones: the ratio
    (60.0, EXPECTED_RATIO * 60.0),
])
def test_overdue_after_an_expected_time(expected: float | None, limit: float | None) -> None:
    assert overdue_after(expected) == (None if limit is None else pytest.approx(limit))


@given(st.floats(0, 1e6))
def test_overdue_after_leaves_room_for_a_normal_run(expected: float) -> None:
    limit = overdue_after(expected)
    assert limit is not None
    assert limit >= expected * EXPECTED_RATIO and limit >= expected + EXPECTED_MARGIN
    assert EXPECTED_RATIO > 1 and EXPECTED_MARGIN > 0


@pytest.mark.parametrize("typical", [None, 0.0, -1.0])
def test_nothing_is_overdue_without_a_typical_job_time(typical: float | None) -> None:
    assert overdue({J1: 0.0}, 1e6, typical, {}) == set()


@pytest.mark.parametrize("n, expected", [
    (load("a", 8, 16, overdue=1), (7, 15)),
    (load("a", 8, 3, overdue=3), (5, 0)),
    (load("a", 2, 2, overdue=2), (0, 0)),
    (load("a", 2, 5, overdue=4), (0, 3)),  # more overdue than slots (slots just shrank)
    (load("a", 4, 1, overdue=3), (3, 0)),  # fewer held than overdue: a stale count
    (load("a", 0, 3, overdue=1), (0, 3)),
])
def test_effective_slots_leave_out_those_stuck_on_overdue_jobs(
        n: NodeLoad, expected: tuple[int, int]) -> None:
    assert effective(n) == expected


def test_a_node_running_an_overdue_job_gets_no_prefetch() -> None:
    assert capacity(8, 1, overdue=0) == 16
    assert capacity(8, 1, overdue=1) == 8
    assert capacity(8, 2, weight=1.0, overdue=8) == 8


def test_one_heavy_job_on_eight_slots_leaves_seven_fed() -> None:
    # a runs one overdue job and nothing else: its 7 other slots weigh like b's 7.
    counts = Counter(assign(100, [load("a", 8, 1, overdue=1), load("b", 7)], 100, prefetch=1))
    assert counts == Counter({A: 7, B: 14})  # a: 1 + 7 running, no prefetch; b: 7 + 7
    # Least load on the effective slots: alternate (ties to a) until a's slots are full.
    assert assign(4, [load("a", 8, 1, overdue=1), load("b", 7)], 100, 1) == [A, B, A, B]


def test_a_node_with_every_slot_overdue_gets_nothing() -> None:
    assert assign(5, [load("a", 2, 2, overdue=2), load("b", 1)], 100, 1) == [B, B]
    assert assign(5, [load("a", 2, 2, overdue=2)], 100, 1) == []


def test_rebalance_an_overdue_job_sends_back_all_that_waits_behind_the_slots() -> None:
    # a: 8 slots, one overdue, 16 held: the 8 that cannot have started go back, although
    # measured on its 7 other slots its load (15/7) is within one job per slot of b's (2).
    assert rebalance([load("a", 8, 16, overdue=1), load("b", 4, 8)]) == {A: 8}
    assert rebalance([load("a", 8, 16, overdue=8), load("b", 4, 8)]) == {A: 8}


def test_rebalance_one_heavy_job_takes_nothing_from_the_other_slots() -> None:
    assert rebalance([load("a", 8, 8, overdue=1), load("b", 2, 0)]) == {}


def test_rebalance_overdue_jobs_keep_theirs_when_no_other_slot_runs_freely() -> None:
    assert rebalance([load("a", 8, 16, overdue=1)]) == {}
    assert rebalance([load("a", 8, 16, overdue=1), load("b", 2, 4, overdue=2)]) == {B: 2}


def test_rebalance_is_measured_on_effective_slots() -> None:
    # b holds only its 2 overdue jobs: its 2 other slots are idle (0 per slot, not 0.5), so
    # c at 2.5 per slot is 1.5 above it and gives back 3 (counting b's 4 slots: 2).
    assert rebalance([load("b", 4, 2, overdue=2), load("c", 2, 5)]) == {C: 3}


@st.composite
def overdue_clusters(draw: st.DrawFn) -> list[NodeLoad]:
    return [NodeLoad(n.node_id, n.slots, n.outstanding, draw(st.sampled_from([1.0, 10.0])),
                     draw(st.integers(0, min(n.slots, n.outstanding))))
            for n in draw(clusters())]


@given(loads=overdue_clusters(), queued=st.integers(0, 120), prefetch=st.integers(0, 2))
@FUZZ
def test_assignment_properties_with_overdue_jobs(loads: list[NodeLoad], queued: int,
                                                 prefetch: int) -> None:
    targets = assign(queued, loads, 1000, prefetch)
    room = sum(max(0, capacity(n.slots, prefetch, n.weight, n.overdue) - n.outstanding)
               for n in loads if effective(n)[0] > 0)
    assert len(targets) == min(queued, room)
    got = Counter(targets)
    for n in loads:
        assert n.outstanding + got[n.node_id] <= max(
            n.outstanding, capacity(n.slots, prefetch, n.weight, n.overdue))
        if effective(n)[0] == 0:
            assert got[n.node_id] == 0
    assert targets == assign(queued, loads[::-1], 1000, prefetch)


@given(loads=overdue_clusters())
@FUZZ
def test_rebalance_properties_with_overdue_jobs(loads: list[NodeLoad]) -> None:
    out = rebalance(loads)
    assert out == rebalance(loads[::-1])
    by_id = {n.node_id: n for n in loads}
    free = {n.node_id for n in loads if effective(n)[0] > 0}
    for node_id, count in out.items():
        n = by_id[node_id]
        assert 0 < count <= n.outstanding - n.slots  # only jobs that cannot be running
        assert free - {node_id}  # somewhere else to run them
    for n in loads:  # whatever waits behind an overdue job goes, if it can go anywhere
        if n.overdue and n.outstanding > n.slots and free - {n.node_id}:
            assert out[n.node_id] == n.outstanding - n.slots
