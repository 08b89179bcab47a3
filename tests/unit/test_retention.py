"""RESULT_TTL: a node forgets a ticket some time after its job finished, never before; and
a client asking for an expired ticket is told so, from the time written in the ticket."""

from __future__ import annotations

import base64
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_node.client_protocol import render_unknown, span
from cluster_node.state import NodeState
from common.jobs import TICKET_TIME_BYTES, JobId, JobSpec, NodeId, Outcome, new_job_id, ticket_time
from common.kvstore import MemoryKV
from common.messages import Result

ME = NodeId("node-a")
T0 = 1_700_000_000.0
DAY = 86400.0


def jid(n: int) -> JobId:
    return JobId(f"job{n:04d}")


def submitted(state: NodeState, n: int, at: float) -> None:
    state.submit(JobSpec(jid(n), "sleep", ("0",), ME, at))


def resolved(state: NodeState, n: int, finished_at: float) -> None:
    state.on_message(Result((Outcome(jid(n), True, "ok", ME, finished_at - 1, finished_at),)))


def fresh() -> NodeState:
    state = NodeState(ME, "inc-1", 2)
    state.take_changes()
    return state


def test_only_results_older_than_the_cutoff_are_forgotten() -> None:
    state = fresh()
    submitted(state, 1, T0)
    resolved(state, 1, T0 + 10)  # finished long ago: expires
    submitted(state, 2, T0 + 1)  # old but never finished: stays
    submitted(state, 3, T0 + 2)
    resolved(state, 3, T0 + 5 * DAY)  # old submission, recent result: stays
    submitted(state, 4, T0 + 3)
    resolved(state, 4, T0 + 20)
    state.take_changes()
    assert state.expire_results(T0 + DAY, limit=100) == 2
    assert list(state.tickets) == [jid(2), jid(3)]
    assert state.take_changes() == {f"t:{jid(1)}": None, f"t:{jid(4)}": None}
    assert state.pending_tickets == 1  # the pending ticket is still awaited
    assert state.expire_results(T0 + DAY, limit=100) == 0


def test_the_walk_stops_at_a_ticket_submitted_after_the_cutoff_and_at_the_limit() -> None:
    state = fresh()
    for n in range(10):
        submitted(state, n, T0 + n * DAY)
        resolved(state, n, T0 + n * DAY + 1)
    assert state.expire_results(T0 + 3.5 * DAY, limit=100) == 4  # tickets 0 .. 3
    assert state.expire_results(T0 + 20 * DAY, limit=2) == 2
    assert next(iter(state.tickets)) == jid(6)
    assert state.expire_results(T0 + 20 * DAY, limit=100, scan=1) == 1  # a bounded sweep
    assert state.expire_results(T0 + 20 * DAY, limit=100) == 3
    assert state.tickets == {}


def test_forgotten_tickets_stay_forgotten_after_a_restart() -> None:
    state = fresh()
    kv = MemoryKV()
    kv.apply(state.initial_records())
    for n in range(3):
        submitted(state, n, T0 + n)
        resolved(state, n, T0 + n + 1)
    kv.apply(state.take_changes())
    kv.commit()
    state.expire_results(T0 + 1.5, limit=100)
    kv.apply(state.take_changes())
    kv.commit()
    again = NodeState.restore(kv.stored_items(), 2)
    assert again is not None and list(again.tickets) == [jid(1), jid(2)]


def test_restore_puts_tickets_in_submission_order() -> None:
    """A store written before rewritten records kept their place hands them back in the
    order of their last write (a result rewrote its ticket); `list` and expiry walk
    tickets in the order they were issued."""
    state = fresh()
    for n in range(3):
        submitted(state, n, T0 + n)
    resolved(state, 0, T0 + 10)
    kv = MemoryKV()
    changes = state.take_changes()
    first_written = {k: v for k, v in changes.items() if k != f"t:{jid(0)}"}
    kv.committed = {**state.initial_records(), **first_written,
                    f"t:{jid(0)}": changes[f"t:{jid(0)}"]}
    again = NodeState.restore(kv.stored_items(), 2)
    assert again is not None
    assert list(again.tickets) == [jid(0), jid(1), jid(2)]
    assert [j for j, _ in again.newest_tickets("all", 10)] == [jid(2), jid(1), jid(0)]


def test_a_ticket_tells_when_it_was_issued() -> None:
    before = time.time()
    ticket = new_job_id()
    issued = ticket_time(ticket)
    assert issued is not None and before - 0.01 <= issued <= time.time()
    assert ticket_time("not a ticket") is None
    raw = (1234567).to_bytes(TICKET_TIME_BYTES, "big") + bytes(10)
    assert ticket_time(base64.b32encode(raw).decode().lower()) == 12345.67


def test_an_old_unknown_ticket_is_said_to_have_expired() -> None:
    ticket = new_job_id()
    issued = ticket_time(ticket) or 0.0
    text = render_unknown(ticket, issued + 9 * DAY, 7 * DAY)
    assert text == (f"ERR unknown ticket '{ticket}': issued 9 d ago, and this node keeps "
                    "results 7 d after their job finished (RESULT_TTL): expired here, or "
                    "issued by another node")
    # young, kept forever, or not a ticket at all: the plain answer
    plain = f"ERR unknown ticket '{ticket}': this node never issued it"
    assert render_unknown(ticket, issued + DAY, 7 * DAY).startswith(plain)
    assert render_unknown(ticket, issued + 9 * DAY, 0.0).startswith(plain)
    assert render_unknown("zz", issued, 7 * DAY).startswith("ERR unknown ticket 'zz': this node")


def test_an_unknown_ticket_older_than_the_oldest_one_kept_may_have_been_dropped() -> None:
    ticket = new_job_id()
    issued = ticket_time(ticket) or 0.0
    text = render_unknown(ticket, issued + 3600, 7 * DAY, 1000, oldest_kept=issued + 60)
    assert text == (f"ERR unknown ticket '{ticket}': issued 60 min ago, and this node keeps "
                    "the newest 1000 results (MAX_RESULTS): expired here, or issued by "
                    "another node")
    plain = f"ERR unknown ticket '{ticket}': this node never issued it"
    # issued after the oldest ticket kept (so not dropped), or no bound, or nothing kept
    assert render_unknown(ticket, issued + 3600, 7 * DAY, 1000, issued - 1).startswith(plain)
    assert render_unknown(ticket, issued + 3600, 7 * DAY, 0, issued + 60).startswith(plain)
    assert render_unknown(ticket, issued + 3600, 7 * DAY, 1000, None).startswith(plain)
    # older than both: RESULT_TTL says why
    assert "(RESULT_TTL): expired" in render_unknown(ticket, issued + 8 * DAY, 7 * DAY, 1000,
                                                     issued + 60)


def test_past_max_results_the_oldest_results_go_first_and_pending_tickets_stay() -> None:
    state = fresh()
    for n in range(6):
        submitted(state, n, T0 + n)
        if n != 1:  # ticket 1 is still pending
            resolved(state, n, T0 + 100 + n)
    assert state.oldest_ticket_time == T0
    state.take_changes()
    # nothing is older than RESULT_TTL: only the bound of 3 results makes room
    assert state.expire_results(T0 - DAY, limit=100, keep=3) == 2  # 5 results - 3
    assert list(state.tickets) == [jid(1), jid(3), jid(4), jid(5)]
    assert state.oldest_ticket_time == T0 + 1
    assert state.expire_results(T0 - DAY, limit=100, keep=3) == 0
    assert state.expire_results(T0 - DAY, limit=1, keep=1) == 1  # a batch at a time
    assert state.expire_results(T0 - DAY, limit=100, keep=1) == 1
    assert list(state.tickets) == [jid(1), jid(5)]
    state.expire_results(T0 + 10 * DAY, limit=100, keep=1)  # RESULT_TTL as well
    assert list(state.tickets) == [jid(1)]


def test_span_reads_like_people_say_it() -> None:
    assert [span(s) for s in (0.4, 45, 119, 120, 3600, 7200, 86400, 2 * DAY, 7 * DAY)] == [
        "0 s", "45 s", "119 s", "2 min", "60 min", "2 h", "24 h", "2 d", "7 d"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 20), st.one_of(st.none(), st.floats(0, 20))),
                max_size=40),
       st.floats(0, 30), st.integers(0, 10), st.integers(1, 50))
def test_expiry_drops_only_results_and_honours_both_bounds(
        jobs: list[tuple[float, float | None]], cutoff_days: float, keep: int,
        limit: int) -> None:
    """Any tickets (submitted at some day, finished some days later or not at all), any
    cutoff, bound and batch size: pending tickets all stay; a forgotten ticket had a result;
    a kept result is either young enough or among the newest `keep`, unless the batch
    limit stopped the sweep; what is kept stays in submission order."""
    state = fresh()
    for n, (day, took) in enumerate(sorted(jobs, key=lambda j: j[0])):
        submitted(state, n, T0 + day * DAY)
        if took is not None:
            resolved(state, n, T0 + (day + took) * DAY)
    before = dict(state.tickets)
    cutoff = T0 + cutoff_days * DAY
    gone = state.expire_results(cutoff, limit, keep)
    kept = state.tickets
    assert gone == len(before) - len(kept) <= limit
    assert all(t.outcome is not None for j, t in before.items() if j not in kept)
    assert all(j in kept for j, t in before.items() if t.outcome is None)
    assert list(kept) == [j for j in before if j in kept]
    if gone < limit:  # the sweep ran to its end
        results = [t.outcome for t in kept.values() if t.outcome is not None]
        assert all(o.finished_at >= cutoff for o in results)
        assert not keep or len(results) <= keep


def test_a_ticket_older_than_the_node_itself_was_never_issued_here() -> None:
    """`wait aaaaaaaaaaaaaaaaaaaaaaaa` (a ticket of 1970) was said to have expired here."""
    now = time.time()
    created = now - 30 * DAY
    text = render_unknown("a" * 24, now, 7 * DAY, 1000, oldest_kept=now - DAY,
                          created=created)
    assert text.startswith("ERR unknown ticket 'aaaaaaaaaaaaaaaaaaaaaaaa': issued ")
    assert text.endswith("before this node's data directory began (30 d ago): this node "
                         "never issued it (ask the node you submitted it to)")
    ticket = new_job_id()
    issued = ticket_time(ticket) or 0.0
    # issued after the node began: it may have expired, as before
    assert "expired here" in render_unknown(ticket, issued + 9 * DAY, 7 * DAY,
                                            created=issued - DAY)
    # from the future: never issued
    assert "never issued" in render_unknown(ticket, issued - DAY, 7 * DAY)


def test_when_the_node_began_is_stored_and_restored() -> None:
    store = MemoryKV()
    store.apply(NodeState(NodeId("n1"), "inc", 1, created=1_764_000_000.5).initial_records())
    store.commit()
    restored = NodeState.restore(store.stored_items(), 1)
    assert restored is not None and restored.created == 1_764_000_000.5
    store = MemoryKV()  # a store of before: not known
    store.apply({"m:identity": {"node_id": "n1", "incarnation": "inc"}})
    store.commit()
    old = NodeState.restore(store.stored_items(), 1)
    assert old is not None and old.created is None
