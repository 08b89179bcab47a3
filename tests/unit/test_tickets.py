"""`TicketBook`: done tickets kept frozen (a flat tuple the cycle collector does not walk),
or as stored when a restore found them, given back equal; pending ones kept as the objects
the node updates; order kept."""

from __future__ import annotations

import gc
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_node.tickets import Ticket, TicketBook, freeze, thaw, usual_record
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import (
    outcome_fields,
    outcome_from_wire,
    outcome_to_wire,
    spec_fields,
    spec_from_wire,
    spec_to_wire,
)
from common.packer import pack
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


def stored_record(ticket: Ticket) -> tuple[bytes, list[object]]:
    """A done ticket's t: record as a node writes it: msgpack, and the same decoded."""
    assert ticket.outcome is not None
    value = [spec_to_wire(ticket.spec), ticket.forwarded, outcome_to_wire(ticket.outcome)]
    return pack(value), [spec_to_wire(ticket.spec), ticket.forwarded,
                         list(outcome_to_wire(ticket.outcome))]


@given(job_specs(), outcomes(), st.booleans())
def test_a_done_ticket_kept_as_stored_reads_as_a_live_one(s: JobSpec, o: Outcome,
                                                          forwarded: bool) -> None:
    """A restore keeps a done ticket of the usual shape (no options) as its stored bytes;
    what the book then gives for it is what it gives for the same ticket settled here."""
    ticket = Ticket(s, forwarded, o._replace(job_id=s.job_id))
    record, value = stored_record(ticket)
    usual = not o.cancelled and not o.history and s == JobSpec(*s[:5])
    assert usual_record(value) == usual
    if not usual:
        return
    restored, live = TicketBook(), TicketBook([(s.job_id, ticket)])
    restored.add_stored(s.job_id, record, value)
    assert isinstance(restored._by_id[s.job_id], bytes)
    assert restored[s.job_id] == live[s.job_id] == ticket
    assert restored.state_of(s.job_id) == live.state_of(s.job_id)
    assert restored.submitted_at(s.job_id) == live.submitted_at(s.job_id)


def test_a_stored_ticket_whose_record_fails_its_checks_reads_as_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    """The checks a restore leaves for later (here: a node name over the limit) fail when the
    ticket is read: it reads as failed and says why; the other tickets are not touched."""
    good, bad = Ticket(spec(1), True, outcome(1)._replace(history=())), Ticket(
        spec(2), True, outcome(2)._replace(history=(), node=NodeId("n" * 1000)))
    book = TicketBook()
    for ticket in (good, bad):
        record, value = stored_record(ticket)
        book.add_stored(ticket.spec.job_id, record, value)
    with caplog.at_level(logging.ERROR):
        read = book[bad.spec.job_id]
    assert read.outcome is not None and read.outcome.state == "failed"
    assert "its stored record cannot be read: malformed message: node" in read.outcome.output
    assert "store.record_unreadable ticket=t0002" in caplog.text
    assert book[good.spec.job_id] == good


def test_a_book_filled_in_submission_order_is_not_sorted_again() -> None:
    """A restore sorts only a book whose tickets came out of order (a store written before
    rewritten records kept their place, or a clock set back)."""
    book = TicketBook((spec(n).job_id, Ticket(spec(n), False, None)) for n in (1, 2, 2, 5))
    before = book._by_id
    book.sort_by_submission()
    assert book._by_id is before
    record, value = stored_record(Ticket(spec(3), True, outcome(3)._replace(history=())))
    book.add_stored(spec(3).job_id, record, value)  # submitted before the last one
    book.add_done(spec(4).job_id, spec_fields(spec_to_wire(spec(4))), True,
                  outcome_fields(outcome_to_wire(outcome(4))))
    book.sort_by_submission()
    assert list(book) == [spec(n).job_id for n in (1, 2, 3, 4, 5)]
    book[spec(6).job_id] = Ticket(spec(6), False, None)
    before = book._by_id
    book.sort_by_submission()  # in order again since the sort
    assert book._by_id is before
