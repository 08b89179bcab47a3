"""`TicketBook`: done tickets kept as their t: record's msgpack (the bytes the store writes,
nothing the cycle collector walks), given back equal whether settled here or restored;
pending ones kept as the objects the node updates; order kept."""

from __future__ import annotations

import gc
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_node.tickets import Ticket, TicketBook, ticket_record, wire_state
from common.errors import RemoteProtocolError
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import decode_record
from common.packer import pack
from tests.strategies import job_specs, outcomes

T0 = 1_700_000_000.0


def spec(n: int) -> JobSpec:
    return JobSpec(JobId(f"t{n:04d}"), "sleep", (str(n),), NodeId("node-a"), T0 + n)


def outcome(n: int) -> Outcome:
    return Outcome(JobId(f"t{n:04d}"), True, f"slept {n} ms", NodeId("node-b"), T0 + n,
                   T0 + n + 1, history=("node-c 12:00:00: boom",))


def restored_into(book: TicketBook, ticket: Ticket) -> None:
    """As a restore adds a done ticket: its record's bytes, and the same decoded."""
    record = pack(ticket_record(ticket))
    book.add_stored(ticket.spec.job_id, record, decode_record("t:", record))


@given(job_specs(), outcomes(), st.booleans())
def test_a_done_ticket_reads_the_same_settled_here_or_restored(
        s: JobSpec, o: Outcome, forwarded: bool) -> None:
    ticket = Ticket(s, forwarded, o._replace(job_id=s.job_id))
    live, restored, given_done = TicketBook(), TicketBook(), TicketBook([(s.job_id, ticket)])
    live[s.job_id] = Ticket(s, forwarded, None)
    live[s.job_id].outcome = ticket.outcome  # as NodeState records a result, then settles it
    assert live.settle(s.job_id) == pack(ticket_record(ticket))  # what the store writes
    restored_into(restored, ticket)
    for book in (live, restored, given_done):
        assert isinstance(book._by_id[s.job_id], bytes)
        assert book[s.job_id] == ticket
        assert book.state_of(s.job_id) == o.state
        assert book.submitted_at(s.job_id) == s.submitted_at
        assert book.times(s.job_id) == (s.submitted_at, o.finished_at)
    assert live._by_id == restored._by_id == given_done._by_id


@given(outcomes())
def test_the_state_on_the_wire_is_the_outcomes(o: Outcome) -> None:
    from common.messages import outcome_to_wire
    assert wire_state(decode_record("t:", pack(outcome_to_wire(o)))) == o.state


@pytest.mark.parametrize("outcome_wire", [
    None, "x", [], ["t0001", 1, "out", "n", T0, T0], ["t0001", True, "out", "n", T0, T0, []],
    ["t0001", True, "out", "n", T0, T0, {"cancelled": 1}], [0] * 8])
def test_an_outcome_of_another_shape_says_no_state(outcome_wire: object) -> None:
    assert wire_state(outcome_wire) is None


def test_done_tickets_are_bytes_the_collector_does_not_walk() -> None:
    book = TicketBook()
    for n in range(3):
        book[spec(n).job_id] = Ticket(spec(n), False, None)
    pending = book[JobId("t0001")]
    pending.outcome = outcome(1)
    book.settle(JobId("t0001"))
    assert book[JobId("t0001")] == Ticket(spec(1), False, outcome(1))
    assert book[JobId("t0001")] is not book[JobId("t0001")]  # a copy each time
    assert book[JobId("t0000")] is book[JobId("t0000")]  # pending: the object itself
    done = book._by_id[JobId("t0001")]
    assert isinstance(done, bytes) and not gc.is_tracked(done)
    assert list(book) == [JobId("t0000"), JobId("t0001"), JobId("t0002")]
    assert [book.state_of(j) for j in book] == ["pending", "done", "pending"]


def test_a_restored_ticket_the_cheap_look_cannot_read_is_checked_at_once() -> None:
    """A record whose state or submission time is not where the restore looks goes through
    the full checks: kept if they pass (an integer time), refused if not."""
    book = TicketBook()
    spec_wire: list[object] = ["t0001", "sleep", ["1"], "node-a", 1_700_000_001]
    wire = [spec_wire, True, ["t0001", True, "slept", "node-b", T0, T0]]
    book.add_stored(JobId("t0001"), pack(wire), wire)
    assert book.state_of(JobId("t0001")) == "done"
    assert book.submitted_at(JobId("t0001")) == T0 + 1
    spec_wire[4] = "yesterday"
    with pytest.raises(RemoteProtocolError, match="submitted_at"):
        book.add_stored(JobId("t0002"), pack(wire), wire)


def test_a_stored_ticket_whose_record_fails_its_checks_reads_as_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    """The checks a restore leaves for later (here: a node name over the limit) fail when
    the ticket is read: it reads as failed and says why; the other tickets are not
    touched."""
    good, bad = Ticket(spec(1), True, outcome(1)), Ticket(
        spec(2), True, outcome(2)._replace(node=NodeId("n" * 1000)))
    book = TicketBook()
    for ticket in (good, bad):
        restored_into(book, ticket)
    with caplog.at_level(logging.ERROR):
        read = book[bad.spec.job_id]
    assert read.outcome is not None and read.outcome.state == "failed"
    assert "its stored record cannot be read: malformed message: node" in read.outcome.output
    assert "store.record_unreadable ticket=t0002" in caplog.text
    assert book[good.spec.job_id] == good
    book._by_id[JobId("t0003")] = b"d\xc1"  # not even msgpack
    assert book[JobId("t0003")].outcome.output.startswith(  # type: ignore[union-attr]
        "its stored record cannot be read: cannot read the store: record t:t0003")
    assert book.times(JobId("t0003")) == (0.0, 0.0)  # as it reads: expired with the oldest
    book[spec(4).job_id] = Ticket(spec(4), False, None)
    assert book.times(spec(4).job_id) == (T0 + 4, None)


def test_a_book_filled_in_submission_order_is_not_sorted_again() -> None:
    """A restore sorts only a book whose tickets came out of order (a store written before
    rewritten records kept their place, or a clock set back)."""
    book = TicketBook((spec(n).job_id, Ticket(spec(n), False, None)) for n in (1, 2, 2, 5))
    before = book._by_id
    book.sort_by_submission()
    assert book._by_id is before
    restored_into(book, Ticket(spec(3), True, outcome(3)))  # submitted before the last one
    book[spec(4).job_id] = Ticket(spec(4), True, outcome(4))
    book.sort_by_submission()
    assert list(book) == [spec(n).job_id for n in (1, 2, 3, 4, 5)]
    assert book.submitted_at(spec(3).job_id) == T0 + 3
    book[spec(6).job_id] = Ticket(spec(6), False, None)
    before = book._by_id
    book.sort_by_submission()  # in order again since the sort
    assert book._by_id is before
    del book[spec(6).job_id]
    assert len(book) == 5 and next(reversed(book)) == spec(5).job_id
    assert spec(5).job_id in book and JobId("t0009") not in book
