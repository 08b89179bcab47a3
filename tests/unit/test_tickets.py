"""`TicketBook`: done tickets kept frozen (a flat tuple the cycle collector does not walk),
given back equal; pending ones kept as the objects the node updates; order kept."""

from __future__ import annotations

import gc

from hypothesis import given
from hypothesis import strategies as st

from cluster_node.tickets import Ticket, TicketBook, freeze, thaw
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import (
    outcome_fields,
    outcome_from_wire,
    outcome_to_wire,
    spec_fields,
    spec_from_wire,
    spec_to_wire,
)
from tests.strategies import job_specs, outcomes

T0 = 1_700_000_000.0


def spec(n: int) -> JobSpec:
    return JobSpec(JobId(f"t{n:04d}"), "sleep", (str(n),), NodeId("node-a"), T0 + n)


def outcome(n: int) -> Outcome:
    return Outcome(JobId(f"t{n:04d}"), True, f"slept {n} ms", NodeId("node-b"), T0 + n,
                   T0 + n + 1, history=("node-c 12:00:00: boom",))


@given(job_specs(), outcomes(), st.booleans())
def test_a_frozen_ticket_thaws_equal(s: JobSpec, o: Outcome, forwarded: bool) -> None:
    o = o._replace(job_id=s.job_id)
    ticket = Ticket(s, forwarded, o)
    assert thaw(s.job_id, freeze(ticket)) == ticket


@given(job_specs(), outcomes(), st.booleans())
def test_a_restored_done_ticket_is_frozen_as_a_live_one(s: JobSpec, o: Outcome,
                                                        forwarded: bool) -> None:
    """`add_done` (a restore: validated wire fields, no objects) keeps what `settle` (a
    ticket that got its result here) keeps."""
    o = o._replace(job_id=s.job_id)
    spec_wire, outcome_wire = spec_to_wire(s), outcome_to_wire(o)
    restored, live = TicketBook(), TicketBook()
    restored.add_done(s.job_id, spec_fields(spec_wire), forwarded, outcome_fields(outcome_wire))
    live[s.job_id] = Ticket(spec_from_wire(spec_wire), forwarded, None)
    live[s.job_id].outcome = outcome_from_wire(outcome_wire)
    live.settle(s.job_id)
    assert restored._by_id == live._by_id
    assert restored[s.job_id] == Ticket(s, forwarded, o)


def test_freeze_knows_every_field() -> None:
    """A frozen ticket keeps the fields in this order (SUBMITTED_AT, OK and CANCELLED say
    where): a field added to JobSpec or Outcome moves them."""
    assert list(JobSpec._fields) == [
        "job_id", "job_type", "args", "origin", "submitted_at", "priority", "not_before",
        "timeout", "retries"]
    assert list(Outcome._fields) == [
        "job_id", "ok", "output", "node", "started_at", "finished_at", "cancelled", "history"]


def test_done_tickets_are_frozen_and_nothing_the_collector_walks() -> None:
    book = TicketBook()
    for n in range(3):
        book[spec(n).job_id] = Ticket(spec(n), False, None)
    pending = book[JobId("t0001")]
    pending.outcome = outcome(1)  # as NodeState records a result, then settles it
    book.settle(JobId("t0001"))
    assert book[JobId("t0001")] == Ticket(spec(1), False, outcome(1))
    assert book[JobId("t0001")] is not book[JobId("t0001")]  # a copy each time
    assert book[JobId("t0000")] is book[JobId("t0000")]  # pending: the object itself
    gc.collect()
    gc.collect()  # the first may look at the tuple before at the tuples in it
    frozen = book._by_id[JobId("t0001")]
    assert isinstance(frozen, tuple) and not gc.is_tracked(frozen)
    assert list(book) == [JobId("t0000"), JobId("t0001"), JobId("t0002")]
    assert [book.state_of(j) for j in book] == ["pending", "done", "pending"]


@given(job_specs(), outcomes())
def test_the_state_of_a_frozen_ticket_is_its_outcomes(s: JobSpec, o: Outcome) -> None:
    book = TicketBook([(s.job_id, Ticket(s, True, o._replace(job_id=s.job_id)))])
    assert book.state_of(s.job_id) == o.state


def test_a_restored_book_freezes_the_done_and_sorts_by_submission() -> None:
    book = TicketBook([(spec(2).job_id, Ticket(spec(2), True, outcome(2))),
                       (spec(1).job_id, Ticket(spec(1), True, None))])
    book.sort_by_submission()
    assert list(book) == [JobId("t0001"), JobId("t0002")]
    assert isinstance(book._by_id[JobId("t0002")], tuple)
    assert book.submitted_at(JobId("t0002")) == T0 + 2
    assert JobId("t0002") in book and JobId("t0009") not in book
    del book[JobId("t0002")]
    assert len(book) == 1 and list(reversed(book)) == [JobId("t0001")]
