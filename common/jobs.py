"""Plain data that travels through the whole system: ids, job specs and outcomes."""

from __future__ import annotations

import base64
import os
import time
from typing import NamedTuple, NewType

JobId = NewType("JobId", str)
NodeId = NewType("NodeId", str)

# A ticket is 15 bytes, exactly 24 base32 characters (no padding): 5 bytes of the time in
# 10 ms units, then 10 random bytes. The 80 random bits make it unguessable; the time first
# keeps the tickets of the last moments together in the stores' key index, so new keys
# fill a few pages instead of landing on random pages of a large index: with random
# tickets a node's cost per ticket grew with the tickets it kept (the index outgrew
# sqlite's page cache). Base32's letters sort before its digits in ASCII, so tickets as
# strings are not quite in time order; decoded, they are.
TICKET_TIME_BYTES = 5  # 2**40 x 10 ms: the prefix wraps in the year 2318
TICKET_RANDOM_BYTES = 10
TICKET_BYTES = TICKET_TIME_BYTES + TICKET_RANDOM_BYTES
TICKET_LENGTH = 24
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648's alphabet, in lower case
TICKET_ALPHABET = frozenset(BASE32)
# Every pair of base32 characters, by the ten bits it stands for (RFC 4648 order).
_BASE32_PAIRS = [a + b for a in BASE32 for b in BASE32]


def new_job_id() -> JobId:
    """A fresh ticket: unique across the cluster and across restarts, printable, no spaces,
    in submission order to 10 ms (a clock set back only costs the order, never uniqueness)."""
    return _tickets.next()


class _TicketMaker:
    """`ticket_of(now, os.urandom(10))` in a quarter of the time (0.4 us, not 1.8; a tenth of
    a node's CPU per pipelined submission went to tickets): the time prefix is made once per
    10 ms, and the random characters come from a pool of them read from `os.urandom` 4 KB at
    a time (a system call per ticket was a quarter of the cost). Each random byte gives one
    base32 character from its low 5 bits (256 is a multiple of 32: uniform), so 16 of them
    are the base32 of 80 random bits, as before. For one thread (a node's event loop): two
    threads could take the same characters."""

    POOL_BYTES = 4096
    RANDOM_CHARS = 8 * TICKET_RANDOM_BYTES // 5  # 16: the base32 of the random bytes
    PREFIX_CHARS = TICKET_LENGTH - RANDOM_CHARS  # 8: the base32 of the time
    _TO_BASE32 = bytes.maketrans(bytes(range(256)), BASE32.encode() * 8)

    def __init__(self) -> None:
        self._ticks = -1
        self._prefix = ""
        self._pool = ""
        self._at = 0
        # A forked child (a job's worker process) must not repeat its parent's characters.
        os.register_at_fork(after_in_child=self._forget_pool)

    def _forget_pool(self) -> None:
        self._pool, self._at = "", 0

    def next(self) -> JobId:
        ticks = time.time_ns() // 10_000_000
        if ticks != self._ticks:
            self._ticks = ticks
            self._prefix = ticket_of(ticks, bytes(TICKET_RANDOM_BYTES))[:self.PREFIX_CHARS]
        chars = self.RANDOM_CHARS
        at = self._at
        if at + chars > len(self._pool):
            self._pool = os.urandom(self.POOL_BYTES).translate(self._TO_BASE32).decode()
            at = 0
        self._at = at + chars
        return JobId(self._prefix + self._pool[at:at + chars])


_tickets = _TicketMaker()


def ticket_of(ticks: int, random: bytes) -> JobId:
    """The base32 (lower case) of `ticks` in TICKET_TIME_BYTES, then the random bytes, written
    out ten bits at a time from a table: `base64.b32encode` took 60 % longer, a few % of a
    node's CPU when clients pipe submissions."""
    n = (ticks % (1 << 8 * TICKET_TIME_BYTES)) << 8 * TICKET_RANDOM_BYTES
    n |= int.from_bytes(random, "big")
    p = _BASE32_PAIRS
    return JobId(p[n >> 110] + p[n >> 100 & 1023] + p[n >> 90 & 1023] + p[n >> 80 & 1023]
                 + p[n >> 70 & 1023] + p[n >> 60 & 1023] + p[n >> 50 & 1023]
                 + p[n >> 40 & 1023] + p[n >> 30 & 1023] + p[n >> 20 & 1023]
                 + p[n >> 10 & 1023] + p[n & 1023])


def looks_like_ticket(text: str) -> bool:
    return len(text) == TICKET_LENGTH and set(text) <= TICKET_ALPHABET


def ticket_time(text: str) -> float | None:
    """When a ticket was issued (wall clock, to 10 ms), read from its first 8 characters;
    None for text that is not a ticket."""
    if not looks_like_ticket(text):
        return None
    raw = base64.b32decode(text.upper())
    return int.from_bytes(raw[:TICKET_TIME_BYTES], "big") / 100


# JobSpec and Outcome are named tuples, not frozen dataclasses: as immutable, and built in a
# quarter of the time (0.25 vs 0.97 us for a JobSpec; a frozen dataclass sets each field
# through object.__setattr__). Several are built per ticket on its way through a node and
# the proxy: submitted, decoded by the proxy, dispatched, its outcome made and decoded twice.
class JobSpec(NamedTuple):
    """What a client asked for. Immutable from submission to result."""

    job_id: JobId
    job_type: str
    args: tuple[str, ...]
    origin: NodeId
    submitted_at: float  # wall clock, seconds since the epoch
    # Lifecycle options (issue 6); the defaults are what a plain submission gets.
    priority: int = 0  # higher is dispatched first; FIFO within one priority
    not_before: float = 0.0  # wall clock: not dispatched before this (0: at once)
    timeout: float = 0.0  # seconds an attempt may run before it is killed (0: type default)
    retries: int = 0  # failed attempts retried this many times, with backoff

    def describe(self) -> str:
        return " ".join((self.job_type, *self.args))


# The node of an outcome the proxy made itself (a job cancelled while queued there, or
# whose nodes were lost too often): no run of its own.
PROXY_NODE = NodeId("proxy")


class Outcome(NamedTuple):
    """How one execution of a job ended: the text a client reads, and where and when."""

    job_id: JobId
    ok: bool
    output: str
    node: NodeId
    started_at: float
    finished_at: float
    cancelled: bool = False  # stopped by a `cancel`, not failed on its own
    # the earlier failed attempts, oldest first: "<node> <iso time>: <reason>"
    history: tuple[str, ...] = ()

    @property
    def never_ran(self) -> bool:
        """Ended without a run of its own: made by the proxy, or cancelled before it started
        (those are stamped with one time, the cancel's, as started and finished)."""
        return self.node == PROXY_NODE or (self.cancelled and
                                           self.started_at == self.finished_at)

    @property
    def attempts(self) -> int:
        """Runs on nodes: the failed ones before it, and its own if it ran."""
        return len(self.history) + (0 if self.never_ran else 1)

    @property
    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "done" if self.ok else "failed"
