"""Unit tests for `cluster_node.state.NodeState`: tickets and their forwarding, dispatched
jobs, results both ways, revokes, and rebuilding the state from its committed records."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cluster_node.state import NodeState
from cluster_node.tickets import Ticket
from common.errors import StoreError
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import MemoryKV, decode_record
from common.messages import (
    PROTOCOL_VERSION,
    Abandon,
    Ack,
    AckOf,
    Hello,
    Info,
    Job,
    NodeStats,
    RequestOfRes,
    ResReq,
    Result,
    Returned,
    Revoke,
    Stats,
    Unknown,
    outcome_to_wire,
    spec_to_wire,
)
from common.packer import pack

FUZZ = settings(max_examples=100, deadline=None)

ME, OTHER = NodeId("node-a"), NodeId("node-b")
T0 = 1_700_000_000.0


def jid(n: int) -> JobId:
    return JobId(f"job{n:04d}")


def spec(n: int, origin: NodeId = ME) -> JobSpec:
    return JobSpec(jid(n), "fib", (str(n),), origin, T0 + n)


def outcome(n: int, node: NodeId = ME, output: str = "ok", ok: bool = True) -> Outcome:
    return Outcome(jid(n), ok, output, node, T0 + n, T0 + n + 1)


def fresh(slots: int = 2) -> NodeState:
    state = NodeState(ME, "inc-1", slots)
    state.take_changes()
    return state


def forwarded(state: NodeState, *ns: int) -> None:
    """Submit tickets here and have the proxy acknowledge storing them."""
    for n in ns:
        state.submit(spec(n))
    state.take_submissions(1000)
    state.on_message(Ack(AckOf.JOB, tuple(jid(n) for n in ns)))


def decoded(changes: dict[str, Any]) -> dict[str, Any]:
    """A done ticket's record comes encoded already (its book keeps the bytes)."""
    return {k: decode_record(k, v) if isinstance(v, bytes) else v for k, v in changes.items()}


def persisted(state: NodeState, kv: MemoryKV | None = None) -> MemoryKV:
    kv = kv if kv is not None else MemoryKV()
    kv.apply(state.take_changes())
    kv.commit()
    return kv


def restored(kv: MemoryKV, slots: int = 2) -> NodeState:
    state = NodeState.restore(kv.stored_items(), slots)
    assert state is not None
    return state


# ---------------------------------------------------------------------------- submissions


def test_initial_records_name_the_node() -> None:
    state = NodeState(ME, "inc-1", 4)
    assert state.initial_records() == {"m:identity": {"node_id": ME, "incarnation": "inc-1"}}
    assert NodeState.restore(iter([]), 4) is None


def test_submit_records_an_unforwarded_ticket() -> None:
    state = fresh()
    state.submit(spec(1))
    assert state.take_changes() == {"t:job0001": [spec_to_wire(spec(1)), False, None]}
    assert state.pending_tickets == 1
    assert state.tickets[jid(1)].forwarded is False
    assert state.awaited(10) == []


def test_submissions_are_sent_once_per_connection_until_acked() -> None:
    state = fresh()
    for n in range(5):
        state.submit(spec(n))
    assert state.take_submissions(3) == [spec(0), spec(1), spec(2)]
    assert state.take_submissions(10) == [spec(3), spec(4)]
    assert state.take_submissions(10) == []
    state.on_connect()  # a new connection: whatever was unacked goes again
    assert state.take_submissions(10) == [spec(n) for n in range(5)]


def test_ack_of_submissions_makes_them_awaited() -> None:
    state = fresh()
    state.submit(spec(1))
    state.submit(spec(2))
    state.take_submissions(10)
    state.take_changes()
    assert state.on_message(Ack(AckOf.JOB, (jid(1), JobId("never-issued")))) == []
    assert state.tickets[jid(1)].forwarded is True
    assert state.take_changes() == {"a:1": [jid(1)]}  # a list of ids, not the ticket again
    assert state.awaited(10) == [jid(1)]
    assert state.pending_tickets == 2
    state.on_connect()
    assert state.take_submissions(10) == [spec(2)]
    # a repeated ACK changes nothing
    state.on_message(Ack(AckOf.JOB, (jid(1),)))
    assert state.take_changes() == {}


def test_an_ack_record_goes_with_the_result_of_its_last_ticket() -> None:
    state = fresh()
    forwarded(state, 1, 2)
    forwarded(state, 3)
    state.take_changes()
    state.on_message(Result((outcome(1, OTHER),)))
    assert "a:1" not in state.take_changes()  # ticket 2 is still pending
    state.on_message(Result((outcome(2, OTHER),)))
    changes = decoded(state.take_changes())
    assert changes["a:1"] is None
    assert changes["t:job0002"][1] is True  # its own record says forwarded now
    assert "a:2" not in changes


def test_unknown_takes_a_ticket_out_of_its_ack_record() -> None:
    state = fresh()
    forwarded(state, 1, 2)
    state.take_changes()
    state.on_message(Unknown((jid(1),)))
    changes = state.take_changes()
    assert changes["a:1"] == [jid(2)]
    assert changes["t:job0001"][1] is False
    state.on_message(Unknown((jid(2),)))
    assert state.take_changes()["a:1"] is None


def test_a_restore_keeps_ack_records_of_pending_tickets_only() -> None:
    state = fresh()
    kv = MemoryKV()
    kv.apply(state.initial_records())
    forwarded(state, 1)
    forwarded(state, 2, 3)
    persisted(state, kv)
    # The result of 1 is committed, but not the deletion of its a: record (a crash between
    # two commits cannot do that, but an older store may hold such a record).
    state.on_message(Result((outcome(1, OTHER),)))
    kv.apply({k: v for k, v in state.take_changes().items() if k != "a:1"})
    kv.commit()
    again = restored(kv)
    assert again.take_changes() == {"a:1": None}
    assert again.awaited(10) == [jid(2), jid(3)]
    assert again.tickets[jid(2)].forwarded and again.tickets[jid(3)].forwarded
    forwarded(again, 4)
    assert "a:3" in again.take_changes()  # numbers go on after the highest on disk


def test_awaited_respects_the_limit() -> None:
    state = fresh()
    forwarded(state, 1, 2, 3)
    assert state.awaited(2) == [jid(1), jid(2)]


# ---------------------------------------------------------------------------- dispatch


def test_dispatch_is_held_recorded_and_acked() -> None:
    state = fresh()
    reply = state.on_message(Job((spec(1, OTHER), spec(2, OTHER))))
    assert reply == [Ack(AckOf.JOB, (jid(1), jid(2)))]
    assert state.take_changes() == {"q:job0001": spec_to_wire(spec(1, OTHER)),
                                    "q:job0002": spec_to_wire(spec(2, OTHER))}
    assert state.queued == 2
    assert state.info() == Info(queued=2, running=0, slots=2, done=0, failed=0)


def test_dispatch_is_idempotent() -> None:
    state = fresh(slots=4)
    state.on_message(Job((spec(1, OTHER),)))
    state.take_changes()
    assert state.on_message(Job((spec(1, OTHER), spec(1, OTHER)))) == [
        Ack(AckOf.JOB, (jid(1), jid(1)))]
    assert state.take_changes() == {}
    assert state.next_job() == spec(1, OTHER)
    assert state.next_job() is None  # queued once only
    # while it runs, and after it finished (result not acked), a re-send is ignored too
    state.on_message(Job((spec(1, OTHER),)))
    assert state.next_job() is None
    state.finish(outcome(1))
    state.take_changes()
    state.on_message(Job((spec(1, OTHER),)))
    assert state.take_changes() == {}
    assert state.held == {}
    assert state.next_job() is None


def test_next_job_is_fifo_and_marks_running() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER), spec(3, OTHER))))
    assert state.next_job() == spec(1, OTHER)
    assert state.next_job() == spec(2, OTHER)
    assert state.running == {jid(1), jid(2)}
    assert state.queued == 1
    hello = state.on_connect()
    assert hello == Hello(ME, "inc-1", 2, PROTOCOL_VERSION, queued=(jid(3),),
                          running=hello.running, finished=())
    assert set(hello.running) == {jid(1), jid(2)}


def test_revoke_returns_only_jobs_not_started() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER), spec(3, OTHER))))
    state.take_changes()
    assert state.next_job() == spec(1, OTHER)
    reply = state.on_message(Revoke((jid(1), jid(2), JobId("not-here"))))
    assert reply == [Returned((jid(2),))]
    assert state.take_changes() == {"q:job0002": None}
    assert set(state.held) == {jid(1), jid(3)}
    assert state.next_job() == spec(3, OTHER)  # the revoked one is skipped
    assert state.next_job() is None


def test_abandon_stops_a_running_job_and_records_nothing_even_at_its_origin() -> None:
    state = fresh()
    forwarded(state, 1)  # our own ticket, dispatched back to us
    state.on_message(Job((spec(1), spec(2, OTHER), spec(3, OTHER))))
    state.next_job()
    state.next_job()
    state.take_changes()
    # 1 and 2 run, 3 waits (not running: left to the proxy's REVOKE), 4 is not here
    assert state.on_message(Abandon((jid(1), jid(3), JobId("job0004")))) == []
    assert state.kill_requests == [jid(1)] and state.abandoning == {jid(1)}
    state.abandon(jid(1))  # the shell stopped it
    assert state.take_changes() == {"q:job0001": None, "m:counters": [0, 0, 0, 1]}
    assert (state.done, state.failed, state.abandoned) == (0, 0, 1)
    assert jid(1) not in state.held and state.running == {jid(2)}
    assert state.finished == {} and state.take_results(10) == []
    assert state.tickets[jid(1)].outcome is None  # the run the proxy recorded gives it
    assert state.awaited(10) == [jid(1)]
    assert state.on_connect().running == (jid(2),)


def test_an_abandoned_job_that_ends_before_the_shell_stops_it_keeps_its_outcome() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER),)))
    state.next_job()
    state.on_message(Abandon((jid(1),)))
    state.finish(outcome(1))  # it ended in the same turn, before the shell's kill
    assert state.abandoning == set()
    assert state.take_results(10) == [outcome(1)]  # a second run, counted as such


def test_finish_of_a_foreign_job_waits_for_the_proxy() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER),)))
    state.next_job()
    state.take_changes()
    state.finish(outcome(1))
    assert state.take_changes() == {"q:job0001": None, "f:job0001": outcome_to_wire(outcome(1)),
                                    "m:counters": [1, 0, 0, 0]}
    assert state.held == {} and state.running == set()
    assert state.take_results(10) == [outcome(1)]
    assert state.take_results(10) == []  # in flight
    assert state.on_connect().finished == (jid(1),)
    assert state.take_results(10) == [outcome(1)]
    assert state.on_message(Ack(AckOf.RESULT, (jid(1),))) == []
    assert state.take_changes() == {"f:job0001": None}
    assert state.finished == {}
    assert state.take_resolved() == []


def test_failed_outcome_counts_as_failed() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER),)))
    state.next_job()
    state.finish(outcome(1, ok=False, output="boom"))
    assert (state.done, state.failed) == (0, 1)


def test_finish_of_an_own_job_records_the_outcome() -> None:
    state = fresh()
    forwarded(state, 1)
    state.on_message(Job((spec(1),)))
    state.next_job()
    state.take_changes()
    state.finish(outcome(1))
    changes = decoded(state.take_changes())
    assert changes["t:job0001"] == [spec_to_wire(spec(1)), True, outcome_to_wire(outcome(1))]
    assert state.tickets[jid(1)].outcome == outcome(1)
    assert state.take_resolved() == [jid(1)]
    assert state.awaited(10) == []
    assert state.pending_tickets == 0
    assert state.take_results(10) == [outcome(1)]  # the proxy still has to hear of it


def test_take_results_respects_the_limit() -> None:
    state = fresh(slots=3)
    state.on_message(Job(tuple(spec(n, OTHER) for n in range(3))))
    for _ in range(3):
        state.next_job()
    for n in range(3):
        state.finish(outcome(n))
    assert state.take_results(2) == [outcome(0), outcome(1)]
    assert state.take_results(2) == [outcome(2)]


# ---------------------------------------------------------------------------- results


def test_result_from_the_proxy_resolves_the_ticket() -> None:
    state = fresh()
    forwarded(state, 1)
    state.take_changes()
    assert state.on_message(Result((outcome(1, OTHER),))) == [Ack(AckOf.RESULT, (jid(1),))]
    assert state.tickets[jid(1)].outcome == outcome(1, OTHER)
    assert state.take_resolved() == [jid(1)]
    assert decoded(state.take_changes()) == {
        "t:job0001": [spec_to_wire(spec(1)), True, outcome_to_wire(outcome(1, OTHER))],
        "a:1": None}


def test_result_before_the_submission_ack_still_counts() -> None:
    state = fresh()
    state.submit(spec(1))
    state.take_submissions(10)
    state.on_message(Result((outcome(1, OTHER),)))
    assert state.tickets[jid(1)].outcome == outcome(1, OTHER)
    assert state.pending_tickets == 0
    state.on_message(Ack(AckOf.JOB, (jid(1),)))
    assert state.awaited(10) == []
    assert state.pending_tickets == 0


def test_first_result_wins_and_only_different_ones_are_duplicates() -> None:
    state = fresh()
    forwarded(state, 1)
    first, second = outcome(1, OTHER, "55"), outcome(1, NodeId("node-c"), "55")
    state.on_message(Result((first,)))
    state.take_changes()
    assert state.on_message(Result((first,))) == [Ack(AckOf.RESULT, (jid(1),))]
    assert state.duplicates == 0
    assert state.take_changes() == {}
    assert state.on_message(Result((second,))) == [Ack(AckOf.RESULT, (jid(1),))]
    assert state.duplicates == 1
    assert state.take_changes() == {"m:counters": [0, 0, 1, 0]}
    assert state.tickets[jid(1)].outcome == first
    assert state.take_resolved() == [jid(1)]


def test_own_run_then_proxy_result_is_a_duplicate() -> None:
    state = fresh()
    forwarded(state, 1)
    state.on_message(Job((spec(1),)))
    state.next_job()
    state.finish(outcome(1, ME))
    state.on_message(Result((outcome(1, OTHER),)))
    assert state.tickets[jid(1)].outcome == outcome(1, ME)
    assert state.duplicates == 1


def test_result_for_a_ticket_never_issued_is_acked_and_dropped() -> None:
    state = fresh()
    assert state.on_message(Result((outcome(9, OTHER),))) == [Ack(AckOf.RESULT, (jid(9),))]
    assert state.tickets == {}
    assert state.take_changes() == {}
    assert state.take_resolved() == []


# ---------------------------------------------------------------------------- requests


def test_request_of_res_answers_what_it_can() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER))))
    state.next_job()
    state.finish(outcome(1))
    reply = state.on_message(RequestOfRes((jid(1), jid(2), jid(3))))
    # 1 finished: its result; 2 held: nothing; 3 neither held nor finished: returned
    assert reply == [Result((outcome(1),)), Returned((jid(3),))]
    assert state.on_message(RequestOfRes((jid(2),))) == []
    assert state.on_message(RequestOfRes((jid(7),))) == [Returned((jid(7),))]


def test_returned_for_jobs_lost_after_a_revoke() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER),)))
    state.on_message(Revoke((jid(1),)))
    assert state.on_message(RequestOfRes((jid(1),))) == [Returned((jid(1),))]


def test_res_req_records_results_then_answers() -> None:
    state = fresh()
    forwarded(state, 1)
    state.on_message(Job((spec(2, OTHER),)))
    state.next_job()
    state.finish(outcome(2))
    reply = state.on_message(ResReq((outcome(1, OTHER),), (jid(2), jid(3))))
    assert reply == [Ack(AckOf.RESULT, (jid(1),)), Result((outcome(2),)), Returned((jid(3),))]
    assert state.tickets[jid(1)].outcome == outcome(1, OTHER)
    assert state.on_message(ResReq((), ())) == [Ack(AckOf.RESULT, ())]


def test_unknown_makes_tickets_unforwarded_again() -> None:
    state = fresh()
    forwarded(state, 1, 2)
    state.on_message(Result((outcome(2, OTHER),)))
    state.take_changes()
    state.on_message(Unknown((jid(1), jid(2), JobId("never-issued"))))
    assert state.take_changes() == {"t:job0001": [spec_to_wire(spec(1)), False, None],
                                    "a:1": None}  # 2 is done, 1 out: nothing left in it
    assert state.tickets[jid(1)].forwarded is False
    assert state.tickets[jid(2)].outcome == outcome(2, OTHER)  # answered: left alone
    assert state.awaited(10) == []
    assert state.pending_tickets == 1
    assert state.take_submissions(10) == [spec(1)]


def test_stats_are_kept() -> None:
    state = fresh()
    stats = Stats(3, (NodeStats(OTHER, True, 4, 1, 2, 3, 0, 0),))
    assert state.on_message(stats) == []
    assert state.cluster == stats


# ---------------------------------------------------------------------------- restore


def view(state: NodeState) -> dict[str, Any]:
    """Everything a restore must bring back (running jobs are not recorded: they are held
    again, to be run again)."""
    state.on_connect()
    return {
        "identity": (state.node_id, state.incarnation, state.slots),
        "tickets": {j: (t.spec, t.forwarded, t.outcome) for j, t in state.tickets.items()},
        "held": dict(state.held),
        "finished": dict(state.finished),
        "counters": (state.done, state.failed, state.duplicates, state.abandoned),
        "awaited": sorted(state.awaited(10_000)),
        "unforwarded": sorted(s.job_id for s in state.take_submissions(10_000)),
        "pending": state.pending_tickets,
    }


def test_restore_takes_records_before_the_identity_too() -> None:
    state = NodeState(ME, "inc-7", 2)
    kv = MemoryKV()
    forwarded(state, 1, 2)
    state.on_message(Result((outcome(2, OTHER, "x"),)))
    persisted(state, kv)
    kv.apply(state.initial_records())  # the identity last
    kv.commit()
    assert view(restored(kv)) == view(state)


def test_restore_equals_the_state_before() -> None:
    state = NodeState(ME, "inc-7", 2)
    kv = MemoryKV()
    kv.apply(state.initial_records())
    kv.commit()
    forwarded(state, 1, 2, 3)
    state.submit(spec(4))
    state.on_message(Result((outcome(2, OTHER, "x"),)))
    state.on_message(Result((outcome(2, OTHER, "y"),)))  # a duplicate
    state.on_message(Job((spec(10, OTHER), spec(11, OTHER), spec(12, OTHER), spec(1))))
    state.next_job()
    state.finish(outcome(10))
    state.next_job()
    state.finish(outcome(11, ok=False, output="boom"))
    state.on_message(Ack(AckOf.RESULT, (jid(10),)))
    state.next_job()  # 12 is running at the "crash"
    persisted(state, kv)
    again = restored(kv)
    assert view(again) == view(state)
    assert again.running == set()
    assert again.queued == 2  # 12 and 1 are held again, to run again
    assert {again.next_job(), again.next_job()} == {spec(12, OTHER), spec(1)}


def test_a_damaged_done_record_costs_its_ticket_not_the_restore() -> None:
    """A done ticket is checked when it is read, not at the restore: a record that fails
    the checks (here: an over-long node name) reads as a failed ticket that says
    so, and the node starts with every other ticket as it was."""
    state = NodeState(ME, "inc-7", 2)
    kv = MemoryKV()
    kv.apply(state.initial_records())
    forwarded(state, 1, 2, 3)
    state.on_message(Result((outcome(1), outcome(2), outcome(3, ok=False, output="boom"))))
    persisted(state, kv)
    damaged_outcome = outcome_to_wire(outcome(2, NodeId("n" * 1000)))
    kv.apply({"t:job0002": [spec_to_wire(spec(2)), True, damaged_outcome]})
    kv.commit()
    again = restored(kv)
    damaged = again.tickets[jid(2)].outcome
    assert damaged is not None and not damaged.ok
    assert "its stored record cannot be read" in damaged.output
    assert "malformed message: node" in damaged.output
    assert again.tickets[jid(1)] == state.tickets[jid(1)]
    assert again.tickets[jid(3)] == state.tickets[jid(3)]
    assert again.tickets.state_of(jid(3)) == "failed"


def damaged_store(state: NodeState, damage: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The node's committed records as stored, some of them replaced by `damage`."""
    kv = MemoryKV()
    kv.apply(state.initial_records())
    kv = persisted(state, kv)
    return [(k, damage.get(k, v)) for k, v in kv.stored_items()] + [
        (k, v) for k, v in damage.items() if k not in kv.committed]


def node_with_every_record() -> NodeState:
    """Tickets 1-3 forwarded (1 done), 4 not; job 7 of another node held here, 8 finished
    here and not acknowledged; a cancel of 3 to send."""
    state = NodeState(ME, "inc-7", 2)
    forwarded(state, 1, 2, 3)
    state.submit(spec(4))
    state.on_message(Result((outcome(1),)))
    state.on_message(Job((spec(7, OTHER), spec(8, OTHER))))
    state.next_job()
    state.next_job()
    state.finish(outcome(8))
    state.cancel(jid(3), T0)
    return state


NOT_MSGPACK = b"\xc1\xc1"


@pytest.mark.parametrize(("key", "record"), [
    ("t:job0002", pack([["job0002", "fib", ["2"], "node-a", "yesterday"], True, None])),
    ("t:job0002", pack([["job0002", "fib", ["2"], "node-a", T0], True])),  # two fields
    ("t:job0002", pack({"spec": "?"})),
    ("t:job0002", NOT_MSGPACK),
    ("q:job0007", pack(["job0007", "fib"])),
    ("f:job0008", NOT_MSGPACK),
    ("c:job0003", NOT_MSGPACK),
    ("a:1", pack([1, 2])),
    ("m:counters", pack(["five", 2, 1])),
])
def test_a_damaged_record_is_set_aside_and_costs_only_what_it_held(
        key: str, record: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A record the node could not have written used to stop its start (every ticket out
    of reach for one record's sake): it is set aside under x:<key> (the bytes as they
    were), logged, and the node starts with everything else."""
    state = node_with_every_record()
    with caplog.at_level(logging.ERROR):
        again = NodeState.restore(damaged_store(state, {key: record}), 2)
    assert again is not None
    assert f"store.record_damaged store=node key={key}" in caplog.text
    changes = again.take_changes()
    assert changes[f"x:{key}"] == record
    assert len(again.set_aside) == 1
    if key.startswith("t:"):  # the ticket keeps its key, pending: the proxy is asked
        assert key not in changes
        assert again.tickets[jid(2)] == Ticket(JobSpec(jid(2), "?", (), ME, 0.0), True, None)
        assert jid(2) in again.awaited(10)
    else:
        assert changes[key] is None
    for job_id in {jid(1), jid(3), jid(4)} - {JobId(key[2:])}:  # (forwarded again: a:1)
        ticket, was = again.tickets[job_id], state.tickets[job_id]
        assert (ticket.spec, ticket.outcome) == (was.spec, was.outcome)


def test_what_a_set_aside_record_held_comes_back_from_the_proxy() -> None:
    """A held job set aside is re-sent by the proxy on HELLO (it is not declared), an
    unacknowledged result set aside is reported missing (the job runs again), a forward
    mark set aside sends its tickets again (the proxy knows them: a duplicate it drops)."""
    state = node_with_every_record()
    records = damaged_store(state, {"q:job0007": NOT_MSGPACK, "f:job0008": NOT_MSGPACK,
                                    "a:1": NOT_MSGPACK})
    again = NodeState.restore(records, 2)
    assert again is not None
    hello = again.on_connect()
    assert jid(7) not in hello.queued + hello.running and jid(8) not in hello.finished
    assert again.on_message(RequestOfRes((jid(8),))) == [Returned((jid(8),))]
    assert [s.job_id for s in again.take_submissions(10)] == [jid(2), jid(3), jid(4)]


def test_a_ticket_set_aside_is_read_again_from_the_proxys_copy_of_its_result() -> None:
    state = node_with_every_record()
    again = NodeState.restore(damaged_store(state, {"t:job0002": NOT_MSGPACK}), 2)
    assert again is not None
    again.take_changes()
    assert jid(2) in again.awaited(10)  # asked for with the tickets awaiting a result
    assert again.tickets.state_of(jid(2)) == "pending" and again.pending_tickets == 3
    assert again.expire_results(cutoff=T0 + 1e9, limit=100) == 1  # ticket 1 only
    result = Outcome(jid(2), True, "1", OTHER, T0 + 5, T0 + 6)
    assert again.on_message(Result((result,))) == [Ack(AckOf.RESULT, (jid(2),))]
    assert again.tickets[jid(2)] == Ticket(JobSpec(jid(2), "?", (), ME, T0 + 5), True, result)
    assert again.take_resolved() == [jid(2)] and again.repaired == 1
    assert again.duplicates == state.duplicates and jid(2) not in again.awaited(10)
    kv = MemoryKV()
    kv.committed = {k: decode_record(k, v) for k, v in damaged_store(state, {}) }
    kv.apply(again.take_changes())
    kv.commit()
    later = restored(kv)
    assert later.tickets[jid(2)].outcome == result and jid(2) not in later.awaited(10)


def test_a_ticket_set_aside_that_the_proxy_does_not_know_stays_as_it_reads() -> None:
    state = node_with_every_record()
    again = NodeState.restore(damaged_store(state, {"t:job0002": NOT_MSGPACK}), 2)
    assert again is not None
    again.take_submissions(10)
    again.on_message(Unknown((jid(2),)))
    assert jid(2) not in again.awaited(10) and again.take_submissions(10) == []
    assert again.take_resolved() == [jid(2)]  # a `wait` for it is answered now
    damaged = again.tickets[jid(2)].outcome
    assert damaged is not None and not damaged.ok
    assert damaged.output.startswith("its stored record cannot be read")
    assert again.expire_results(cutoff=T0 + 1e9, limit=100) == 2  # now it may go


def test_records_set_aside_before_are_counted_not_read(
        caplog: pytest.LogCaptureFixture) -> None:
    state = node_with_every_record()
    records = damaged_store(state, {"x:q:job0099": NOT_MSGPACK, "x:t:job0098": b"?"})
    with caplog.at_level(logging.ERROR):
        again = NodeState.restore(records, 2)
    assert again is not None and len(again.set_aside) == 2 and again.set_aside.now == 0
    assert again.take_changes() == {} and "store.record_damaged" not in caplog.text


DAMAGED_IDENTITIES = [NOT_MSGPACK, pack({"node_id": 7, "incarnation": "i"}), pack(["node-a"])]


@pytest.mark.parametrize("identity", DAMAGED_IDENTITIES)
def test_a_damaged_identity_stops_a_restore_told_nothing_else(identity: bytes) -> None:
    records = damaged_store(node_with_every_record(), {"m:identity": identity})
    with pytest.raises(StoreError, match=r"m:identity: .*cannot tell which node it was"):
        NodeState.restore(records, 2)


@pytest.mark.parametrize("identity", [*DAMAGED_IDENTITIES, None])  # None: no record at all
def test_a_damaged_identity_is_rebuilt_from_the_tickets_in_a_new_incarnation(
        identity: bytes | None, caplog: pytest.LogCaptureFixture) -> None:
    """Who the node was is in its tickets (their origin): it goes on as that node, in a
    new incarnation (the proxy runs again what the old one held and this one does not
    declare), whatever id the caller guessed (a container's host name changes)."""
    state = node_with_every_record()
    damage = {"t:job0002": NOT_MSGPACK} | ({} if identity is None else {"m:identity": identity})
    records = [(k, v) for k, v in damaged_store(state, damage)
               if identity is not None or k != "m:identity"]
    with caplog.at_level(logging.WARNING):
        again = NodeState.restore(records, 2, rebuild=(NodeId("guessed-host"), "inc-new"))
    assert again is not None and (again.node_id, again.incarnation) == (ME, "inc-new")
    assert "store.identity_rebuilt node=node-a incarnation=inc-new" in caplog.text
    changes = again.take_changes()
    assert changes["m:identity"] == {"node_id": ME, "incarnation": "inc-new"}
    assert ("x:m:identity" in changes) == (identity is not None)
    assert again.tickets[jid(2)].spec.origin == ME  # the one unreadable: pending here
    assert {j: again.tickets[j].spec for j in (jid(1), jid(3), jid(4))} == {
        j: state.tickets[j].spec for j in (jid(1), jid(3), jid(4))}
    hello = again.on_connect()
    assert (hello.node_id, hello.incarnation) == (ME, "inc-new")
    assert (hello.queued, hello.finished) == ((jid(7),), (jid(8),))  # still declared


def test_a_rebuilt_node_without_tickets_takes_the_id_it_is_given() -> None:
    kv = MemoryKV()
    kv.apply({"m:counters": [1, 2, 3, 0]})
    kv.commit()
    again = NodeState.restore(kv.stored_items(), 2, rebuild=(NodeId("node-z"), "inc-9"))
    assert again is not None and (again.node_id, again.done) == ("node-z", 1)


def test_counters_come_back_from_a_store_written_before_abandoned_was_counted() -> None:
    kv = MemoryKV()
    kv.apply({**NodeState(ME, "inc-7", 2).initial_records(), "m:counters": [5, 2, 1]})
    kv.commit()
    old = restored(kv)
    assert (old.done, old.failed, old.duplicates, old.abandoned) == (5, 2, 1, 0)
    old.on_message(Job((spec(1, OTHER),)))
    old.next_job()
    old.on_message(Abandon((jid(1),)))
    old.abandon(jid(1))
    persisted(old, kv)
    again = restored(kv)
    assert (again.done, again.failed, again.duplicates, again.abandoned) == (5, 2, 1, 1)


def test_jobs_still_running_after_a_rollback_are_not_started_again() -> None:
    """A failed commit: the state is rebuilt from the disk while two attempts run on, one
    held there (its dispatch was committed), one not (its dispatch was in the failed commit)."""
    state = fresh()
    kv = MemoryKV()
    kv.apply(state.initial_records())
    state.on_message(Job((spec(1, OTHER),)))
    persisted(state, kv)
    state.on_message(Job((spec(2, OTHER),)))  # not committed
    assert {state.next_job(), state.next_job()} == {spec(1, OTHER), spec(2, OTHER)}
    again = restored(kv)
    assert set(again.held) == {jid(1)} and again.running == set()
    again.keep_running([spec(1, OTHER), spec(2, OTHER)])
    assert again.running == {jid(1), jid(2)} and set(again.held) == {jid(1), jid(2)}
    assert again.take_changes() == {"q:job0002": spec_to_wire(spec(2, OTHER))}
    assert again.next_job() is None  # both run already
    assert set(again.on_connect().running) == {jid(1), jid(2)}  # what HELLO tells the proxy


def test_uncommitted_changes_are_lost_in_a_crash() -> None:
    state = fresh()
    kv = MemoryKV()
    kv.apply(state.initial_records())
    kv.commit()
    state.on_message(Job((spec(1, OTHER),)))
    persisted(state, kv)
    state.next_job()
    state.finish(outcome(1))  # not committed
    again = restored(kv)
    assert again.finished == {}
    assert again.next_job() == spec(1, OTHER)


OPS = st.lists(st.tuples(st.sampled_from(["submit", "ack-sub", "dispatch", "start", "finish",
                                          "ack-res", "result", "revoke", "unknown",
                                          "reconnect", "request"]),
                         st.integers(0, 7)), max_size=40)


def apply_op(state: NodeState, op: str, n: int) -> None:  # noqa: C901 - one case per op
    origin = ME if n % 2 else OTHER
    match op:
        case "submit":
            if jid(n) not in state.tickets:
                state.submit(spec(n))
        case "ack-sub":  # one ACK for several: its a: record outlives some of them
            state.on_message(Ack(AckOf.JOB, (jid(n), jid((n + 3) % 8), jid((n + 5) % 8))))
        case "dispatch":
            state.on_message(Job((spec(n, origin),)))
        case "start":
            state.next_job()
        case "finish":
            if jid(n) in state.running:
                state.finish(outcome(n, output=f"run{state.done + state.failed}"))
        case "ack-res":
            state.on_message(Ack(AckOf.RESULT, (jid(n),)))
        case "result":
            state.on_message(Result((outcome(n, OTHER, output=str(n % 3)),)))
        case "revoke":
            state.on_message(Revoke((jid(n),)))
        case "unknown":
            state.on_message(Unknown((jid(n),)))
        case "reconnect":
            state.on_connect()
        case "request":
            state.on_message(RequestOfRes((jid(n),)))


@given(ops=OPS, slots=st.integers(0, 3))
# An ACK of two, then the proxy lost one: its a: record must no longer list it.
@example(ops=[("submit", 1), ("submit", 4), ("ack-sub", 1), ("unknown", 1)], slots=2)
@FUZZ
def test_restore_after_any_history_equals_the_state(ops: list[tuple[str, int]],
                                                    slots: int) -> None:
    state = NodeState(ME, "inc-1", slots)
    kv = MemoryKV()
    kv.apply(state.initial_records())
    kv.commit()
    for op, n in ops:
        apply_op(state, op, n)
        persisted(state, kv)
        assert state.pending_tickets == sum(1 for t in state.tickets.values()
                                            if t.outcome is None)
    assert view(restored(kv, slots)) == view(state)


@given(ops=OPS, commits=st.lists(st.booleans(), min_size=40, max_size=40))
@FUZZ
def test_a_crash_between_commits_restores_the_last_commit(ops: list[tuple[str, int]],
                                                         commits: list[bool]) -> None:
    """Changes are committed after some events only; a crash then brings back the state as
    it was at the last commit (a: records written, rewritten and deleted in between)."""
    state = NodeState(ME, "inc-1", 2)
    kv = persisted(state, MemoryKV())
    kv.apply(state.initial_records())
    kv.commit()
    at_commit = copy.deepcopy(state)
    for (op, n), commit in zip(ops, commits, strict=False):
        apply_op(state, op, n)
        if commit:
            persisted(state, kv)
            at_commit = copy.deepcopy(state)
    assert view(restored(kv)) == view(at_commit)


# ---------------------------------------------------------------------------- running jobs


def test_an_info_says_when_each_running_job_began_and_forgets_it_when_it_ends() -> None:
    state = fresh(slots=2)
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER), spec(3, OTHER))))
    state.began(jid(1), 1000.5)  # not running yet: nothing to say
    assert state.started_at == {}
    state.next_job()
    state.next_job()
    state.began(jid(1), 1000.5)
    info = state.info()
    assert dict(zip(info.running_ids, info.running_started, strict=True)) == {
        jid(1): 1000.5, jid(2): 0.0}  # job 2's attempt has not begun yet
    state.finish(outcome(1))
    assert state.started_at == {} and state.info().running_ids == (jid(2),)


# ---------------------------------------------------------------------------- overdue jobs


def test_a_dispatch_keeps_each_jobs_overdue_after_but_does_not_store_it() -> None:
    state = fresh(slots=4)
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER), spec(3, OTHER)), (0.5, 0.0, 2.0)))
    assert state.overdue_after == {jid(1): 0.5, jid(3): 2.0}  # 0: nothing expected
    assert state.take_changes() == {f"q:{j}": spec_to_wire(spec(n, OTHER))
                                    for n, j in ((1, jid(1)), (2, jid(2)), (3, jid(3)))}
    state.on_message(Job((spec(1, OTHER),), (0.7,)))  # a re-send brings the newer limit
    assert state.overdue_after[jid(1)] == 0.7


def test_only_a_running_job_can_be_marked_overdue_and_only_once() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER)), (0.5, 0.5)))
    assert not state.mark_overdue(jid(1))  # not started
    assert state.next_job() == spec(1, OTHER)
    assert state.mark_overdue(jid(1))
    assert not state.mark_overdue(jid(1))  # news once
    assert not state.mark_overdue(JobId("not-here"))
    info = state.info()
    assert info.overdue_ids == (jid(1),) and info.running_ids == (jid(1),)


def test_a_finished_or_revoked_job_is_forgotten_as_overdue() -> None:
    state = fresh()
    state.on_message(Job((spec(1, OTHER), spec(2, OTHER), spec(3, OTHER)), (0.5, 0.5, 0.5)))
    state.next_job()
    state.mark_overdue(jid(1))
    state.finish(outcome(1))
    assert state.info().overdue_ids == () and jid(1) not in state.overdue_after
    state.on_message(Revoke((jid(3),)))
    assert state.overdue_after == {jid(2): 0.5}
    assert state.next_job() == spec(2, OTHER)
    assert not state.mark_overdue(jid(1))  # it ended: a late timer is no news


# ---------------------------------------------------------------------------- gathering (Nagle)


def test_nothing_in_flight_sends_at_once() -> None:
    state = fresh()
    assert not state.worth_gathering()
    state.submit(spec(1))
    assert not state.worth_gathering()  # idle: a submission never waits


def test_submissions_gather_behind_an_unacked_submission() -> None:
    state = fresh()
    state.submit(spec(1))
    state.take_submissions(10)
    state.submit(spec(2))
    assert state.worth_gathering()
    state.on_message(Ack(AckOf.JOB, (jid(1),)))
    assert not state.worth_gathering()  # the ACK came: spec(2) goes now
    assert state.take_submissions(10) == [spec(2)]


def test_a_kind_with_nothing_in_flight_does_not_wait_for_the_other() -> None:
    state = fresh()
    forwarded(state, 1)
    state.on_message(Job((spec(1),)))
    state.next_job()
    state.finish(outcome(1))
    assert state.take_results(10) == [outcome(1)]  # its RESULT is on the way to the proxy
    state.submit(spec(2))  # the client read its result and sends the next job
    assert not state.worth_gathering()
    state.take_submissions(10)
    state.on_message(Job((spec(3, OTHER),)))
    state.next_job()
    state.finish(outcome(3))  # a result while a RESULT and a JOB are unacked
    assert state.worth_gathering()
    state.on_message(Ack(AckOf.RESULT, (jid(1),)))
    assert not state.worth_gathering()


def exact_gathering(state: NodeState) -> bool:
    """The rule by its definition, over the sets (worth_gathering counts instead)."""
    jobs, results = state._inflight_jobs, state._inflight_results
    new_jobs = any(j not in jobs for j in state._unforwarded)
    new_results = any(j not in results for j in state.finished)
    return bool(jobs or results) and not (new_jobs and not jobs) \
        and not (new_results and not results)


@given(ops=st.lists(st.tuples(st.sampled_from(["submit", "ack-sub", "dispatch", "start",
                                               "finish", "ack-res", "result", "revoke",
                                               "unknown", "reconnect", "request", "cancel",
                                               "take-subs", "take-res"]),
                              st.integers(0, 7)), max_size=60))
@FUZZ
def test_gathering_counts_agree_with_the_sets(ops: list[tuple[str, int]]) -> None:
    state = fresh(slots=3)
    for op, n in ops:
        if op == "cancel":
            if jid(n) in state.tickets:
                state.cancel(jid(n), T0)
        elif op == "take-subs":
            state.take_submissions(n)
        elif op == "take-res":
            state.take_results(n)
        else:
            apply_op(state, op, n)
        assert state.worth_gathering() == exact_gathering(state), (op, n)
        # what is left to send: the unforwarded tickets not in flight, in submission order
        assert list(state._to_send) == [j for j in state._unforwarded
                                        if j not in state._inflight_jobs], (op, n)
