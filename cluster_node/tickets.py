"""A node's tickets, in submission order: `TicketBook`, a mapping of ticket id -> `Ticket`.

A ticket still without its result is a `Ticket` object the node updates in place. Once it
has its result it never changes again, and the book keeps it as its t: record's msgpack,
the very bytes the store writes (`Stored`), checked and decoded when it is read:

- memory: 250 bytes a done ticket, against 500 as a flat tuple of its fields and three
  times that as objects; a node keeps up to MAX_RESULTS (1,000,000) of them;
- nothing for the cycle collector to walk (with a million results held as objects, one
  full collection took ~1 s, a stall of the whole node);
- a restart: a done ticket is kept as the store gives it, where checking and building a
  million of them took half of a node's restart, which must end before the proxy's
  `NODE_TIMEOUT`.

Reading a done ticket costs a decode and the checks (~3 us) and builds a fresh `Ticket`:
a copy, not to be changed. Its state, asked of every ticket that `list` walks past, is in
its first byte.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from common.errors import ProtocolError, StoreError
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import Encoded, decode_record
from common.messages import (
    outcome_from_wire,
    outcome_to_wire,
    spec_fields,
    spec_from_wire,
    spec_to_wire,
)
from common.packer import pack

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Ticket:
    spec: JobSpec
    forwarded: bool  # the proxy has acknowledged storing it
    outcome: Outcome | None
    mark: int = 0  # while pending: the a: record that says it was forwarded (0: none)


def ticket_record(t: Ticket) -> list[Any]:
    """The ticket's t: record, as the store keeps it."""
    outcome = None if t.outcome is None else outcome_to_wire(t.outcome)
    return [spec_to_wire(t.spec), t.forwarded, outcome]


def encoded_record(t: Ticket) -> Encoded:
    """The same in msgpack: what the store writes, and what the book keeps of a done one."""
    return Encoded(pack(ticket_record(t)))


# A done ticket: its state's first letter (done, failed, cancelled), then its t: record's
# msgpack, `[spec, forwarded, outcome]`.
Stored = bytes
STATES = {ord(state[0]): state for state in ("done", "failed", "cancelled")}
SUBMITTED_AT, FINISHED_AT = 4, 5  # in a spec, and in an outcome, on the wire
UNKNOWN_JOB = "?"  # the job of a ticket whose record could not be read


def stored(record: bytes, state: str) -> Stored:
    return state[0].encode() + record


def wire_state(outcome: Any) -> str | None:
    """done, failed or cancelled: the state an outcome on the wire says, if it is of a shape
    to say it (a list with `ok` a bool, and `cancelled` one if its options say it); None
    otherwise. The rest of the checks wait until the ticket is read."""
    if type(outcome) is not list or len(outcome) < 6 or type(ok := outcome[1]) is not bool:
        return None
    if len(outcome) == 7:  # options: cancelled, earlier attempts
        if type(options := outcome[6]) is not dict:
            return None
        cancelled = options.get("cancelled", False)
        if type(cancelled) is not bool:
            return None
        if cancelled:
            return "cancelled"
    elif len(outcome) != 6:
        return None
    return "done" if ok else "failed"


def read_stored(job_id: JobId, s: Stored) -> Ticket:
    """The ticket a `Stored` holds. A record that fails the checks a restore left for now
    (a string too long, a NaN time) reads as a failed ticket that says so (`state_of`
    still gives its stored state): one damaged record costs its own ticket, not the
    node's start."""
    try:
        spec, forwarded, outcome = decode_record(f"t:{job_id}", s[1:])
        return Ticket(spec_from_wire(spec, job_id), forwarded, outcome_from_wire(outcome, job_id))
    except (ProtocolError, StoreError, ValueError, TypeError) as exc:
        logger.error("store.record_unreadable ticket=%s error=%s", job_id, exc)
        unknown = NodeId("?")
        return Ticket(JobSpec(job_id, UNKNOWN_JOB, (), unknown, 0.0), True,
                      Outcome(job_id, False, f"its stored record cannot be read: {exc}",
                              unknown, 0.0, 0.0))


class TicketBook(MutableMapping[JobId, Ticket]):
    """Tickets by id, in the order they were added. A ticket given a result is kept as
    stored from `settle` on; a done ticket added (a restore) at once."""

    def __init__(self, tickets: Iterable[tuple[JobId, Ticket]] = ()) -> None:
        self._by_id: dict[JobId, Ticket | Stored] = {}
        # Whether the tickets were added in the order of their submission times: a store
        # gives them so, unless it was written before rewritten records kept their place
        # (2026-11-25) or a clock was set back.
        self._in_order = True
        self._last_submitted = float("-inf")
        for job_id, ticket in tickets:
            self[job_id] = ticket

    def __getitem__(self, job_id: JobId) -> Ticket:
        t = self._by_id[job_id]
        return t if isinstance(t, Ticket) else read_stored(job_id, t)

    def __setitem__(self, job_id: JobId, ticket: Ticket) -> None:
        if job_id not in self._by_id:
            self._added(ticket.spec.submitted_at)
        if ticket.outcome is None:
            self._by_id[job_id] = ticket
        else:
            self._by_id[job_id] = stored(encoded_record(ticket), ticket.outcome.state)

    def _added(self, submitted_at: float) -> None:
        if submitted_at < self._last_submitted:
            self._in_order = False
        else:
            self._last_submitted = submitted_at

    def __delitem__(self, job_id: JobId) -> None:
        del self._by_id[job_id]

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_id

    def __iter__(self) -> Iterator[JobId]:
        return iter(self._by_id)

    def __reversed__(self) -> Iterator[JobId]:
        return reversed(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def add_stored(self, job_id: JobId, record: bytes, value: list[Any]) -> None:
        """Add a done ticket as the store gave it (a restore): `record` is its t: record's
        msgpack, `value` the same decoded. What its state and submission time cannot be
        read from cheaply goes through the full checks now, which say what is wrong."""
        spec, _, outcome = value
        state = wire_state(outcome)
        if (state is None or type(spec) is not list or len(spec) <= SUBMITTED_AT
                or type(spec[SUBMITTED_AT]) is not float):
            spec = spec_fields(spec, job_id)
            state = outcome_from_wire(outcome, job_id).state
        self._added(spec[SUBMITTED_AT])
        self._by_id[job_id] = stored(record, state)

    def add_unknown(self, job_id: JobId, origin: NodeId) -> None:
        """A ticket whose t: record a restore could not read, pending until the proxy says
        whether it has its result: its job's name and arguments unknown (`?`), its
        submission too (0). It keeps its place (a sort of the book is not worth it)."""
        self._by_id[job_id] = Ticket(JobSpec(job_id, UNKNOWN_JOB, (), origin, 0.0), True,
                                     None)

    def add_unreadable(self, job_id: JobId, record: bytes) -> None:
        """Such a ticket, its result nowhere: it reads as failed and says why
        (`read_stored`)."""
        self._by_id[job_id] = stored(record, "failed")

    def settle(self, job_id: JobId) -> Encoded:
        """The ticket got its result: from now on it is kept as its t: record's msgpack,
        which this gives for the store to write (encoded once)."""
        t = self._by_id[job_id]
        assert isinstance(t, Ticket) and t.outcome is not None, "settled twice, or no result"
        record = encoded_record(t)
        self._by_id[job_id] = stored(record, t.outcome.state)
        return record

    def state_of(self, job_id: JobId) -> str:
        """pending, done, failed or cancelled, without reading a done ticket."""
        t = self._by_id[job_id]
        if isinstance(t, Ticket):
            return "pending" if t.outcome is None else t.outcome.state
        return STATES[t[0]]

    def submitted_at(self, job_id: JobId) -> float:
        return self.times(job_id)[0]

    def times(self, job_id: JobId) -> tuple[float, float | None]:
        """When it was submitted, and when its job finished (None: pending), without the
        checks of reading a done ticket (0.7 us, not 2.8: expiry walks many of them). A
        record that cannot be read has the times it reads with (`read_stored`): 0."""
        t = self._by_id[job_id]
        if isinstance(t, Ticket):
            return t.spec.submitted_at, None if t.outcome is None else t.outcome.finished_at
        try:
            spec, _, outcome = decode_record(f"t:{job_id}", t[1:])
            return float(spec[SUBMITTED_AT]), float(outcome[FINISHED_AT])
        except (StoreError, ValueError, TypeError, IndexError, KeyError):
            return 0.0, 0.0

    def sort_by_submission(self) -> None:
        """In the order of submission times, unless they were added so (a store of
        `stored_items` order: a sort of a million took 0.7 s of a restart)."""
        if self._in_order:
            return
        self._by_id = dict(sorted(self._by_id.items(),
                                  key=lambda item: self.submitted_at(item[0])))
        self._in_order = True
        if self._by_id:
            self._last_submitted = self.submitted_at(next(reversed(self._by_id)))
