"""A node's tickets, in submission order: `TicketBook`, a mapping of ticket id -> `Ticket`.

A ticket still without its result is a `Ticket` object the node updates in place. Once it
has its result it never changes again, and the book keeps it as one flat tuple of plain
values (`freeze`): about half the memory, and nothing for the cycle collector to walk, since
a tuple of strings and numbers is untracked. With a million results held as objects (three
per ticket), one full collection took ~1 s, a stall of the whole node; frozen, they cost it
nothing. Reading a frozen ticket builds a fresh `Ticket` (about a microsecond): what the book
gives for a done ticket is a copy, not to be changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from common.jobs import JobId, JobSpec, Outcome


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


class TicketBook(MutableMapping[JobId, Ticket]):
    """Tickets by id, in the order they were added. A ticket given a result is frozen by
    `settle`; a done ticket added (a restore) is frozen at once."""

    def __init__(self, tickets: Iterable[tuple[JobId, Ticket]] = ()) -> None:
        self._by_id: dict[JobId, Ticket | Frozen] = {}
        for job_id, ticket in tickets:
            self[job_id] = ticket

    def __getitem__(self, job_id: JobId) -> Ticket:
        t = self._by_id[job_id]
        return t if isinstance(t, Ticket) else thaw(job_id, t)

    def __setitem__(self, job_id: JobId, ticket: Ticket) -> None:
        self._by_id[job_id] = ticket if ticket.outcome is None else freeze(ticket)

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
        self._by_id[job_id] = frozen(spec, forwarded, outcome)

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
        return "cancelled" if t[CANCELLED] else "done" if t[OK] else "failed"

    def submitted_at(self, job_id: JobId) -> float:
        t = self._by_id[job_id]
        return t.spec.submitted_at if isinstance(t, Ticket) else float(t[SUBMITTED_AT])

    def sort_by_submission(self) -> None:
        self._by_id = dict(sorted(self._by_id.items(),
                                  key=lambda item: self.submitted_at(item[0])))
