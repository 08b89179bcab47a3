"""A node's tickets, in submission order: `TicketBook`, a mapping of ticket id -> `Ticket`.

A ticket still without its result is a `Ticket` object the node updates in place. Once it
has its result it never changes again, and the book keeps it as one flat tuple of plain
values (`freeze`): about half the memory, and nothing for the cycle collector to walk, since
a tuple of strings and numbers is untracked. With a million results held as objects (three
per ticket), one full collection took ~1 s, a stall of the whole node; frozen, they cost it
nothing. Reading a frozen ticket builds a fresh `Ticket` (about a microsecond): what the book
gives for a done ticket is a copy, not to be changed.

A restore keeps a done ticket of the usual shape as its record's stored bytes (`Stored`),
checked and decoded only when it is read: checking and freezing a million of them took
half of a node's restart, which must end before the proxy's `NODE_TIMEOUT`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from common.errors import ProtocolError, StoreError
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.kvstore import decode_record
from common.messages import outcome_fields, spec_fields

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Ticket:
    spec: JobSpec
    forwarded: bool  # the proxy has acknowledged storing it
    outcome: Outcome | None
    mark: int = 0  # while pending: the a: record that says it was forwarded (0: none)


# A done ticket: the spec's fields but its id, whether it was forwarded, the outcome's
# fields but its id. Every item is a str, a number, a bool or a tuple of str.
Frozen = tuple[Any, ...]
SUBMITTED_AT, OK, CANCELLED = 3, 9, 14  # where a frozen ticket keeps these


def frozen(spec: tuple[Any, ...], forwarded: bool, outcome: tuple[Any, ...]) -> Frozen:
    """A done ticket from its spec's and outcome's fields (a JobSpec and an Outcome are such
    tuples; so are what `messages.spec_fields` / `outcome_fields` give), ids left out."""
    return (*spec[1:], forwarded, *outcome[1:])


def freeze(ticket: Ticket) -> Frozen:
    assert ticket.outcome is not None
    return frozen(ticket.spec, ticket.forwarded, ticket.outcome)


def thaw(job_id: JobId, f: Frozen) -> Ticket:
    return Ticket(JobSpec(job_id, *f[:8]), f[8], Outcome(job_id, *f[9:]))


# A done ticket as a restore found it: b"d" (done) or b"f" (failed), then its record's
# msgpack, `[spec, forwarded, outcome]`, as `NodeState` writes it.
Stored = bytes
DONE = ord("d")


def stored(record: bytes, ok: bool) -> Stored:
    return (b"d" if ok else b"f") + record


def usual_record(value: Any) -> bool:
    """Whether a decoded t: record is a done ticket of the usual shape, one a restore may
    keep as it is stored: a job without options, a result without options (not cancelled,
    no earlier attempts). What else `spec_fields` / `outcome_fields` check waits until the
    ticket is read."""
    if type(value) is not list or len(value) != 3:
        return False
    spec, forwarded, outcome = value
    return (type(spec) is list and len(spec) == 5 and type(spec[4]) is float
            and type(forwarded) is bool
            and type(outcome) is list and len(outcome) == 6 and type(outcome[1]) is bool)


def read_stored(job_id: JobId, s: Stored) -> Ticket:
    """The ticket a `Stored` holds. A record that fails the checks a restore left for now
    (a string too long, a NaN time) reads as a failed ticket that says so (`state_of`
    still gives its stored state): one damaged record costs its own ticket, not the
    node's start."""
    try:
        spec, forwarded, outcome = decode_record(f"t:{job_id}", s[1:])
        return Ticket(JobSpec(*spec_fields(spec, job_id)), forwarded,
                      Outcome(*outcome_fields(outcome, job_id)))
    except (ProtocolError, StoreError, ValueError, TypeError) as exc:
        logger.error("store.record_unreadable ticket=%s error=%s", job_id, exc)
        unknown = NodeId("?")
        return Ticket(JobSpec(job_id, "?", (), unknown, 0.0), True,
                      Outcome(job_id, False, f"its stored record cannot be read: {exc}",
                              unknown, 0.0, 0.0))


class TicketBook(MutableMapping[JobId, Ticket]):
    """Tickets by id, in the order they were added. A ticket given a result is frozen by
    `settle`; a done ticket added (a restore) is kept as stored or frozen at once."""

    def __init__(self, tickets: Iterable[tuple[JobId, Ticket]] = ()) -> None:
        self._by_id: dict[JobId, Ticket | Frozen | Stored] = {}
        # Whether the tickets were added in the order of their submission times: a store
        # gives them so, unless it was written before rewritten records kept their place
        # (2026-11-25) or a clock was set back.
        self._in_order = True
        self._last_submitted = float("-inf")
        for job_id, ticket in tickets:
            self[job_id] = ticket

    def __getitem__(self, job_id: JobId) -> Ticket:
        t = self._by_id[job_id]
        if isinstance(t, Ticket):
            return t
        return thaw(job_id, t) if isinstance(t, tuple) else read_stored(job_id, t)

    def __setitem__(self, job_id: JobId, ticket: Ticket) -> None:
        if job_id not in self._by_id:
            self._added(ticket.spec.submitted_at)
        self._by_id[job_id] = ticket if ticket.outcome is None else freeze(ticket)

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

    def add_done(self, job_id: JobId, spec: tuple[Any, ...], forwarded: bool,
                 outcome: tuple[Any, ...]) -> None:
        """Add a done ticket from the fields of its spec and outcome (in their dataclasses'
        order, as `messages.spec_fields` / `outcome_fields` give them): a restore builds no
        objects only to freeze them (a third of the time a restart took)."""
        self._added(spec[4])
        self._by_id[job_id] = frozen(spec, forwarded, outcome)

    def add_stored(self, job_id: JobId, record: bytes, value: Any) -> None:
        """Add a done ticket as stored: `record` is its t: record's msgpack, `value` the
        same decoded, of the `usual_record` shape."""
        spec, _, outcome = value
        self._added(spec[4])
        self._by_id[job_id] = stored(record, outcome[1])

    def settle(self, job_id: JobId) -> None:
        """The ticket got its result: from now on it is kept frozen."""
        t = self._by_id[job_id]
        if isinstance(t, Ticket) and t.outcome is not None:
            self._by_id[job_id] = freeze(t)

    def state_of(self, job_id: JobId) -> str:
        """pending, done, failed or cancelled, without thawing a done ticket."""
        t = self._by_id[job_id]
        if isinstance(t, Ticket):
            return "pending" if t.outcome is None else t.outcome.state
        if isinstance(t, bytes):
            return "done" if t[0] == DONE else "failed"
        return "cancelled" if t[CANCELLED] else "done" if t[OK] else "failed"

    def submitted_at(self, job_id: JobId) -> float:
        t = self._by_id[job_id]
        if isinstance(t, Ticket):
            return t.spec.submitted_at
        if isinstance(t, bytes):
            return float(decode_record(f"t:{job_id}", t[1:])[0][4])
        return float(t[SUBMITTED_AT])

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
