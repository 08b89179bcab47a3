"""The node-proxy protocol: one frozen dataclass per message, and the only code that
knows how each one is laid out on the wire.

`to_wire` turns a message into plain msgpack-able data; `from_wire` validates what a
peer sent, field by field, and raises `RemoteProtocolError` for anything off. The
framing (length prefix, size limits) lives in `common.framing`.

Conversation, in short (see the README for the full table):
    node  -> proxy  HELLO, then INFO every INFO_PERIOD
    proxy -> node   CHALLENGE (a fresh nonce), first on every connection
    proxy -> node   WELCOME or REFUSED
    node  -> proxy  JOB (new submissions)       proxy -> node  ACK(JOB)
    proxy -> node   JOB (dispatch)              node  -> proxy ACK(JOB)
    node  -> proxy  RESULT (jobs it ran)        proxy -> node  ACK(RESULT)
    proxy -> node   RESULT (for its tickets)    node  -> proxy ACK(RESULT)
    either way      REQUEST_OF_RES, RES_REQ (results wanted, and both at once)
    proxy -> node   REVOKE (give back unstarted jobs)  node -> proxy  RETURNED
    proxy -> node   UNKNOWN (tickets it never stored), STATS (the cluster as it sees it)
    node  -> proxy  STATUS_REQ (where are these jobs?)  proxy -> node  STATUS
    either way      CANCEL (origin -> proxy: cancel these; proxy -> runner: stop these)
    runner -> proxy -> origin  OUTPUT (live output lines of a running job, best effort)
    either way      LEAVING (why it closes the link: its last frame, best effort)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from common.errors import LocalProtocolError, RemoteProtocolError
from common.jobs import JobId, JobSpec, NodeId, Outcome

# 2: the proxy opens with CHALLENGE and HELLO carries nonce and proof (a node of version 1
# does neither, and is refused with a clear reason rather than a failed proof).
# 3: ABANDON (a node of version 2 would take it for a protocol error: refused at HELLO).
# 4: a STATUS entry of a running job says when it started, and INFO when each running job
# started (a version-3 node would take the STATUS field for a protocol error).
PROTOCOL_VERSION = 4

# Generous bounds on what one message may hold; the frame size limit bounds the total.
MAX_ITEMS = 200_000
MAX_ID_CHARS = 128
MAX_JOB_TYPES = 256  # job types one node may declare
MAX_TIME = 1e11  # the latest wall-clock time a frame may carry (the year 5138)
MAX_TEXT_CHARS = 4 * 1024 * 1024
MAX_ARGS = 64
# Longest duration a frame may state (a year): also rules out infinity.
MAX_SECONDS = 365 * 86400.0


class MessageType(StrEnum):
    """Values are the names on the wire."""

    HELLO = "HELLO"
    WELCOME = "WELCOME"
    REFUSED = "REFUSED"
    INFO = "INFO"
    JOB = "JOB"
    ACK = "ACK"
    REQUEST_OF_RES = "REQUEST_OF_RES"
    RESULT = "RESULT"
    RES_REQ = "RES_REQ"
    REVOKE = "REVOKE"
    RETURNED = "RETURNED"
    UNKNOWN = "UNKNOWN"
    STATS = "STATS"
    STATUS_REQ = "STATUS_REQ"
    STATUS = "STATUS"
    CHALLENGE = "CHALLENGE"
    CANCEL = "CANCEL"
    OUTPUT = "OUTPUT"
    ABANDON = "ABANDON"
    LEAVING = "LEAVING"


class AckOf(StrEnum):
    """What an ACK confirms was stored by the receiver."""

    JOB = "JOB"
    RESULT = "RESULT"


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a node's connection: who it is and what it already holds."""

    node_id: NodeId
    incarnation: str  # changes when a node starts on an empty data directory
    slots: int
    version: int
    queued: tuple[JobId, ...]  # dispatched to it, not started
    running: tuple[JobId, ...]
    finished: tuple[JobId, ...]  # ran here, result not yet acknowledged by the proxy
    # Optional (common.auth): the node's fresh nonce and its HMAC proof of the cluster token.
    nonce: str = ""
    proof: str = ""
    # Optional: where clients reach this node (HOST:PORT), "" if it does not say; the
    # proxy's dashboard forwards submissions there. Absent on the wire when empty.
    client_address: str = ""
    # Optional: the job types it runs (the proxy sends it no other); empty: it does not say
    # (any). And its INFO_PERIOD in seconds (0: it does not say), which NODE_TIMEOUT must
    # leave room for.
    job_types: tuple[str, ...] = ()
    info_period: float = 0.0


@dataclass(frozen=True, slots=True)
class Welcome:
    proxy_id: str
    proof: str = ""  # optional (common.auth): the proxy's HMAC proof of the cluster token


@dataclass(frozen=True, slots=True)
class Challenge:
    """The proxy's first frame on every connection: a fresh nonce the node's proof covers."""

    nonce: str


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class Info:
    queued: int
    running: int
    slots: int
    done: int
    failed: int
    running_ids: tuple[JobId, ...] = ()  # which jobs run now (optional: for `status`)
    # Optional: of those, the ones running past the `overdue_after` their JOB gave them.
    overdue_ids: tuple[JobId, ...] = ()
    # Optional (protocol 4): when each running job started, by the node's clock; 0: unknown.
    running_started: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Job:
    """A batch of jobs: node -> proxy for new submissions, proxy -> node for dispatch."""

    jobs: tuple[JobSpec, ...]
    # Optional, dispatch only: for each job (same order), the seconds after its start at
    # which the proxy would call it overdue; 0 for a job it expects nothing of. Empty (and
    # absent on the wire) when it expects nothing of any.
    overdue_after: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    of: AckOf
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class RequestOfRes:
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Result:
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True, slots=True)
class ResReq:
    outcomes: tuple[Outcome, ...]
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Revoke:
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Abandon:
    """proxy -> node, after its HELLO: stop these running jobs and record nothing. The node
    was declared dead while it ran them: another node has them now, or their result is in."""

    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Leaving:
    """Either way, the last frame on a link its sender closes on purpose: why, for the
    operator. A node's (it stops, its store fails, the proxy's frame is malformed) is
    shown by the proxy until its next HELLO; the proxy's (it stops, its store fails, the
    node was silent past NODE_TIMEOUT, broke the protocol's rules or sent a malformed
    frame) is in the node's `proxy.link_lost` log line. Best effort, and it changes
    nothing else: a peer that stops saying anything is handled as one that vanished. Peers
    of protocol 3 before this frame close the link at it (a proxy) or ignore it (a node),
    as the link was closing anyway."""

    reason: str


def protocol_error(error: Exception) -> str:
    """The reason a LEAVING gives, either way, when the peer sent a malformed frame."""
    return f"protocol error: {str(error)[:300]}"


@dataclass(frozen=True, slots=True)
class Returned:
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Unknown:
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Cancel:
    """node -> proxy: the origin cancels these tickets; proxy -> node: stop these jobs."""

    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class Output:
    """runner -> proxy -> origin: new output lines of a running job, for `tail`. Best
    effort: not stored, not acknowledged (the result is what is durable)."""

    job_id: JobId
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeStats:
    node_id: NodeId
    alive: bool
    slots: int
    running: int
    queued: int
    done: int
    failed: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class Stats:
    queue_length: int
    nodes: tuple[NodeStats, ...]


@dataclass(frozen=True, slots=True)
class StatusQuery:
    ids: tuple[JobId, ...]


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: JobId
    state: str  # queued | dispatched | done | unknown, as the proxy sees it
    node: str  # the node it was last dispatched to, or ""
    attempts: int
    # A running job's start by its node's clock (or about: when the proxy first saw it
    # running, from a node that does not say); 0: not running.
    started: float = 0.0
    # Optional: its failed attempts so far, a job queued again for a retry (or after a lost
    # node): the origin's `status` showed none until the job ended.
    history: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusReply:
    entries: tuple[JobStatus, ...]


Message = (
    Hello | Welcome | Refused | Info | Job | Ack | RequestOfRes | Result | ResReq
    | Revoke | Returned | Unknown | Stats | StatusQuery | StatusReply | Challenge
    | Cancel | Output | Abandon | Leaving
)


# ---------------------------------------------------------------------------- encoding


def spec_to_wire(spec: JobSpec) -> list[Any]:
    # Unpacked at once: a third faster than nine attribute reads (2-3 times per ticket).
    job_id, job_type, args, origin, submitted_at, priority, not_before, timeout, retries = spec
    wire: list[Any] = [job_id, job_type, list(args), origin, submitted_at]
    if priority or not_before or timeout or retries:
        # an optional sixth field: older peers' 5-field form stays valid
        wire.append({"priority": priority, "not_before": not_before, "timeout": timeout,
                     "retries": retries})
    return wire


def spec_size(spec: JobSpec) -> int:
    """About how many bytes a spec takes in a frame (to keep frames near their soft limit)."""
    return 96 + sum(map(len, spec.args))


def outcome_size(outcome: Outcome) -> int:
    """About how many bytes an outcome takes in a frame."""
    return 96 + len(outcome.output)


def outcome_to_wire(o: Outcome) -> list[Any]:
    wire: list[Any] = [o.job_id, o.ok, o.output, o.node, o.started_at, o.finished_at]
    if o.cancelled or o.history:  # an optional seventh field
        wire.append({"cancelled": o.cancelled, "history": list(o.history)})
    return wire


def _node_stats_to_wire(n: NodeStats) -> list[Any]:
    return [n.node_id, n.alive, n.slots, n.running, n.queued, n.done, n.failed, n.duplicates]


def to_wire(msg: Message) -> dict[str, Any]:  # noqa: C901 - one flat case per message type
    """The msgpack-able form of `msg`."""
    match msg:
        case Hello():
            body: dict[str, Any] = {
                "node_id": msg.node_id, "incarnation": msg.incarnation, "slots": msg.slots,
                "version": msg.version, "queued": list(msg.queued),
                "running": list(msg.running), "finished": list(msg.finished),
            }
            if msg.nonce:
                body["nonce"] = msg.nonce
            if msg.proof:
                body["proof"] = msg.proof
            if msg.client_address:
                body["client_address"] = msg.client_address
            if msg.job_types:
                body["job_types"] = list(msg.job_types)
            if msg.info_period:
                body["info_period"] = msg.info_period
            kind = MessageType.HELLO
        case Welcome():
            body, kind = {"proxy_id": msg.proxy_id}, MessageType.WELCOME
            if msg.proof:
                body["proof"] = msg.proof
        case Challenge():
            body, kind = {"nonce": msg.nonce}, MessageType.CHALLENGE
        case Refused():
            body, kind = {"reason": msg.reason}, MessageType.REFUSED
        case Info():
            body = {"queued": msg.queued, "running": msg.running, "slots": msg.slots,
                    "done": msg.done, "failed": msg.failed}
            if msg.running_ids:
                body["running_ids"] = list(msg.running_ids)
            if msg.overdue_ids:
                body["overdue_ids"] = list(msg.overdue_ids)
            if msg.running_started:
                if len(msg.running_started) != len(msg.running_ids):
                    raise LocalProtocolError("INFO needs one start per running id")
                body["running_started"] = list(msg.running_started)
            kind = MessageType.INFO
        case Job():
            body, kind = {"jobs": [spec_to_wire(s) for s in msg.jobs]}, MessageType.JOB
            if any(msg.overdue_after):
                if len(msg.overdue_after) != len(msg.jobs):
                    raise LocalProtocolError("JOB needs one overdue_after per job")
                body["overdue_after"] = list(msg.overdue_after)
        case Ack():
            body, kind = {"of": str(msg.of), "ids": list(msg.ids)}, MessageType.ACK
        case RequestOfRes():
            body, kind = {"ids": list(msg.ids)}, MessageType.REQUEST_OF_RES
        case Result():
            body = {"results": [outcome_to_wire(o) for o in msg.outcomes]}
            kind = MessageType.RESULT
        case ResReq():
            body = {"results": [outcome_to_wire(o) for o in msg.outcomes],
                    "ids": list(msg.ids)}
            kind = MessageType.RES_REQ
        case Revoke():
            body, kind = {"ids": list(msg.ids)}, MessageType.REVOKE
        case Returned():
            body, kind = {"ids": list(msg.ids)}, MessageType.RETURNED
        case Abandon():
            body, kind = {"ids": list(msg.ids)}, MessageType.ABANDON
        case Unknown():
            body, kind = {"ids": list(msg.ids)}, MessageType.UNKNOWN
        case Stats():
            body = {"queue_length": msg.queue_length,
                    "nodes": [_node_stats_to_wire(n) for n in msg.nodes]}
            kind = MessageType.STATS
        case StatusQuery():
            body, kind = {"ids": list(msg.ids)}, MessageType.STATUS_REQ
        case StatusReply():
            body = {"entries": [_job_status_to_wire(e) for e in msg.entries]}
            kind = MessageType.STATUS
        case Cancel():
            body, kind = {"ids": list(msg.ids)}, MessageType.CANCEL
        case Output():
            body = {"job_id": msg.job_id, "lines": list(msg.lines)}
            kind = MessageType.OUTPUT
        case Leaving():
            body, kind = {"reason": msg.reason}, MessageType.LEAVING
        case _:
            raise LocalProtocolError(f"not a message: {msg!r}")
    body["type"] = str(kind)
    return body


# ---------------------------------------------------------------------------- decoding


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed message: {what}")


def _int(value: object, name: str, low: int = 0, high: int = 2**53) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer in [{low}, {high}]")
    return value


def _float(value: object, name: str) -> float:
    if type(value) is int:
        return float(value)
    if type(value) is not float or not math.isfinite(value):  # never a valid time or length
        raise _bad(f"{name} must be a finite number")
    return value


def _time(value: object, name: str) -> float:
    """A wall-clock time (0: none). An infinite one broke the dashboard's JSON, and a job
    not before 1e300 waited for ever."""
    when = _float(value, name)
    if not 0.0 <= when <= MAX_TIME:
        raise _bad(f"{name} must be a time from 0 to {MAX_TIME:g}")
    return when


def _seconds(value: object, name: str) -> float:
    """A duration: finite and not negative."""
    seconds = _float(value, name)
    if not 0.0 <= seconds <= MAX_SECONDS:
        raise _bad(f"{name} must be from 0 to {MAX_SECONDS:g} seconds")
    return seconds


def _bool(value: object, name: str) -> bool:
    if type(value) is not bool:
        raise _bad(f"{name} must be a boolean")
    return value


def _str(value: object, name: str, limit: int = MAX_ID_CHARS) -> str:
    if type(value) is not str or len(value) > limit:
        raise _bad(f"{name} must be a string of at most {limit} characters")
    return value


def _list(value: object, name: str, limit: int = MAX_ITEMS) -> list[Any]:
    if type(value) is not list or len(value) > limit:
        raise _bad(f"{name} must be a list of at most {limit} items")
    return value


def _ids(value: object, name: str) -> tuple[JobId, ...]:
    return tuple(JobId(_str(v, name)) for v in _list(value, name))


def _record(value: object, name: str, size: int) -> list[Any]:
    items = _list(value, name, size)
    if len(items) != size:
        raise _bad(f"{name} must have {size} fields")
    return items


def _record_opt(value: object, name: str, size: int) -> tuple[list[Any], dict[Any, Any]]:
    """A record of `size` fields and an optional map of additions after them."""
    items = _list(value, name, size + 1)
    if len(items) == size:
        return items, {}
    if len(items) != size + 1 or type(items[size]) is not dict:
        raise _bad(f"{name} must have {size} fields and an optional map")
    return items[:size], items[size]


def _job_id(value: object, stored_as: JobId | None) -> JobId:
    return _same_id(_str(value, "job id"), stored_as)


def _same_id(job_id: str, stored_as: JobId | None) -> JobId:
    """The very string `stored_as` (the id a store keeps the record under) when it is the
    same text, so that a restored ticket holds one copy of its id, not three."""
    return stored_as if stored_as is not None and job_id == stored_as else JobId(job_id)


# Decoded job types and node ids are interned: a proxy holding 100,000 queued jobs, or a node
# restoring its tickets, otherwise keeps a copy of "sleep" and "node-2" in every one (scale
# benchmark: 152 -> 139 MB; a restored node ticket 990 -> 826 bytes). Interned strings
# are freed with their last reference: a peer sending many names grows nothing for good.
def spec_from_wire(value: object, stored_as: JobId | None = None) -> JobSpec:
    return JobSpec(*spec_fields(value, stored_as))


def spec_fields(value: object, stored_as: JobId | None = None) -> tuple[Any, ...]:
    """A job's fields from the wire, validated, in JobSpec's order.

    The usual record (no options, a float time) is checked in one expression: the same
    rules as `_spec_fields_checked`, which everything else goes through (for its message,
    when something is off). 2.6 -> 1.05 us for a spec and an outcome: a node reads every
    done ticket it is asked for through these (`cluster_node.tickets`)."""
    if type(value) is list and len(value) == 5:
        job_id, job_type, args, origin, submitted_at = value
        if (type(job_id) is str and type(job_type) is str and type(args) is list
                and type(origin) is str and type(submitted_at) is float
                and 0.0 <= submitted_at <= MAX_TIME  # (not NaN either)
                and len(job_id) <= MAX_ID_CHARS and len(job_type) <= MAX_ID_CHARS
                and len(origin) <= MAX_ID_CHARS and len(args) <= MAX_ARGS
                and all(type(a) is str and len(a) <= MAX_TEXT_CHARS for a in args)):
            return (_same_id(job_id, stored_as), sys.intern(job_type), tuple(args),
                    NodeId(sys.intern(origin)), submitted_at, 0, 0.0, 0.0, 0)
    return _spec_fields_checked(value, stored_as)


def _spec_fields_checked(value: object, stored_as: JobId | None) -> tuple[Any, ...]:
    (job_id, job_type, args, origin, submitted_at), opts = _record_opt(value, "job", 5)
    return (
        _job_id(job_id, stored_as),
        sys.intern(_str(job_type, "job type")),
        tuple(_str(a, "job argument", MAX_TEXT_CHARS) for a in _list(args, "args", MAX_ARGS)),
        NodeId(sys.intern(_str(origin, "origin"))),
        _time(submitted_at, "submitted_at"),
        _int(opts.get("priority", 0), "priority", -(2**31), 2**31),
        _time(opts.get("not_before", 0.0), "not_before"),
        _seconds(opts.get("timeout", 0.0), "timeout"),
        _int(opts.get("retries", 0), "retries", 0, 1000),
    )


def outcome_from_wire(value: object, stored_as: JobId | None = None) -> Outcome:
    return Outcome(*outcome_fields(value, stored_as))


def outcome_fields(value: object, stored_as: JobId | None = None) -> tuple[Any, ...]:
    """An outcome's fields from the wire, validated, in Outcome's order; the usual record
    (no options, float times) checked at once, as in `spec_fields`."""
    if type(value) is list and len(value) == 6:
        job_id, ok, output, node, started_at, finished_at = value
        if (type(job_id) is str and type(ok) is bool and type(output) is str
                and type(node) is str and type(started_at) is float
                and type(finished_at) is float
                and 0.0 <= started_at <= MAX_TIME and 0.0 <= finished_at <= MAX_TIME
                and len(job_id) <= MAX_ID_CHARS and len(output) <= MAX_TEXT_CHARS
                and len(node) <= MAX_ID_CHARS):
            return (_same_id(job_id, stored_as), ok, output, NodeId(sys.intern(node)),
                    started_at, finished_at, False, ())
    return _outcome_fields_checked(value, stored_as)


def _outcome_fields_checked(value: object, stored_as: JobId | None) -> tuple[Any, ...]:
    (job_id, ok, output, node, started_at, finished_at), opts = _record_opt(value, "result", 6)
    return (
        _job_id(job_id, stored_as),
        _bool(ok, "ok"),
        _str(output, "output", MAX_TEXT_CHARS),
        NodeId(sys.intern(_str(node, "node"))),
        _time(started_at, "started_at"),
        _time(finished_at, "finished_at"),
        _bool(opts.get("cancelled", False), "cancelled"),
        tuple(_str(h, "history", 4096) for h in _list(opts.get("history", []), "history", 1001)),
    )


def _node_stats(value: object) -> NodeStats:
    node_id, alive, slots, running, queued, done, failed, duplicates = _record(value, "node", 8)
    return NodeStats(
        node_id=NodeId(_str(node_id, "node id")), alive=_bool(alive, "alive"),
        slots=_int(slots, "slots"), running=_int(running, "running"),
        queued=_int(queued, "queued"), done=_int(done, "done"), failed=_int(failed, "failed"),
        duplicates=_int(duplicates, "duplicates"),
    )


def _job_status_to_wire(e: JobStatus) -> list[Any]:
    more: dict[str, Any] = {}
    if e.started:
        more["started"] = e.started
    if e.history:
        more["history"] = list(e.history)
    return [e.job_id, e.state, e.node, e.attempts, *([more] if more else [])]


def _job_status(value: object) -> JobStatus:
    (job_id, state, node, attempts), more = _record_opt(value, "status", 4)
    return JobStatus(job_id=JobId(_str(job_id, "job id")), state=_str(state, "state"),
                     node=_str(node, "node"), attempts=_int(attempts, "attempts"),
                     started=_time(more.get("started", 0.0), "started"),
                     history=tuple(_str(h, "history", 4096)
                                   for h in _list(more.get("history", []), "history", 1001)))


def node_id_problem(node_id: str) -> str:
    """Why `node_id` cannot name a node ("" if it can): it goes into log lines and the
    one-line `stats` answer as it is (one with a line break forged log lines)."""
    if not node_id:
        return "a node id cannot be empty"
    if len(node_id) > MAX_ID_CHARS:
        return f"a node id has at most {MAX_ID_CHARS} characters"
    if not node_id.isprintable() or any(c.isspace() for c in node_id):
        return f"a node id is printable characters without spaces, not {node_id[:40]!r}"
    return ""


def _node_id(value: object) -> NodeId:
    node_id = _str(value, "node_id")
    if why := node_id_problem(node_id):
        raise _bad(why)
    return NodeId(node_id)


def _decode_hello(b: dict[Any, Any]) -> Hello:
    return Hello(
        node_id=_node_id(b.get("node_id")),
        incarnation=_str(b.get("incarnation"), "incarnation"),
        slots=_int(b.get("slots"), "slots", 0, 100_000),
        version=_int(b.get("version"), "version"),
        queued=_ids(b.get("queued"), "queued"),
        running=_ids(b.get("running"), "running"),
        finished=_ids(b.get("finished"), "finished"),
        nonce=_str(b.get("nonce", ""), "nonce"),
        proof=_str(b.get("proof", ""), "proof"),
        client_address=_str(b.get("client_address", ""), "client_address", 300),
        job_types=tuple(_str(t, "job type") for t in _list(b.get("job_types", []),
                                                             "job_types", MAX_JOB_TYPES)),
        info_period=_seconds(b.get("info_period", 0.0), "info_period"),
    )


def _decode_info(b: dict[Any, Any]) -> Info:
    running_ids = _ids(b.get("running_ids", []), "running_ids")
    started = tuple(_time(t, "running_started")
                    for t in _list(b.get("running_started", []), "running_started"))
    if started and len(started) != len(running_ids):
        raise _bad("running_started must have one time per running id")
    return Info(queued=_int(b.get("queued"), "queued"), running=_int(b.get("running"), "running"),
                slots=_int(b.get("slots"), "slots"), done=_int(b.get("done"), "done"),
                failed=_int(b.get("failed"), "failed"), running_ids=running_ids,
                overdue_ids=_ids(b.get("overdue_ids", []), "overdue_ids"),
                running_started=started)


def _decode_job(b: dict[Any, Any]) -> Job:
    jobs = tuple(spec_from_wire(j) for j in _list(b.get("jobs"), "jobs"))
    limits = tuple(_seconds(x, "overdue_after")
                   for x in _list(b.get("overdue_after", []), "overdue_after"))
    if limits and len(limits) != len(jobs):
        raise _bad("overdue_after must have one entry per job")
    return Job(jobs=jobs, overdue_after=limits)


def _decode_ack(b: dict[Any, Any]) -> Ack:
    of = b.get("of")
    if of not in (AckOf.JOB, AckOf.RESULT):
        raise _bad("ACK must say what it acknowledges (JOB or RESULT)")
    return Ack(of=AckOf(of), ids=_ids(b.get("ids"), "ids"))


def _outcomes(b: dict[Any, Any]) -> tuple[Outcome, ...]:
    return tuple(outcome_from_wire(o) for o in _list(b.get("results"), "results"))


_DECODERS: dict[str, Any] = {
    MessageType.HELLO: _decode_hello,
    MessageType.WELCOME: lambda b: Welcome(proxy_id=_str(b.get("proxy_id"), "proxy_id"),
                                           proof=_str(b.get("proof", ""), "proof")),
    MessageType.CHALLENGE: lambda b: Challenge(nonce=_str(b.get("nonce"), "nonce")),
    MessageType.REFUSED: lambda b: Refused(reason=_str(b.get("reason"), "reason", 4096)),
    MessageType.LEAVING: lambda b: Leaving(reason=_str(b.get("reason"), "reason", 4096)),
    MessageType.INFO: _decode_info,
    MessageType.JOB: _decode_job,
    MessageType.ACK: _decode_ack,
    MessageType.REQUEST_OF_RES: lambda b: RequestOfRes(ids=_ids(b.get("ids"), "ids")),
    MessageType.RESULT: lambda b: Result(outcomes=_outcomes(b)),
    MessageType.RES_REQ: lambda b: ResReq(outcomes=_outcomes(b), ids=_ids(b.get("ids"), "ids")),
    MessageType.REVOKE: lambda b: Revoke(ids=_ids(b.get("ids"), "ids")),
    MessageType.RETURNED: lambda b: Returned(ids=_ids(b.get("ids"), "ids")),
    MessageType.ABANDON: lambda b: Abandon(ids=_ids(b.get("ids"), "ids")),
    MessageType.UNKNOWN: lambda b: Unknown(ids=_ids(b.get("ids"), "ids")),
    MessageType.STATS: lambda b: Stats(
        queue_length=_int(b.get("queue_length"), "queue_length"),
        nodes=tuple(_node_stats(n) for n in _list(b.get("nodes"), "nodes", 10_000)),
    ),
    MessageType.STATUS_REQ: lambda b: StatusQuery(ids=_ids(b.get("ids"), "ids")),
    MessageType.STATUS: lambda b: StatusReply(
        entries=tuple(_job_status(e) for e in _list(b.get("entries"), "entries"))),
    MessageType.CANCEL: lambda b: Cancel(ids=_ids(b.get("ids"), "ids")),
    MessageType.OUTPUT: lambda b: Output(
        job_id=JobId(_str(b.get("job_id"), "job_id")),
        lines=tuple(_str(x, "line", MAX_TEXT_CHARS) for x in _list(b.get("lines"), "lines"))),
}


def from_wire(obj: object) -> Message:
    """Validate what a peer sent; anything off raises `RemoteProtocolError`."""
    if type(obj) is not dict:
        raise _bad("a message must be a map")
    kind = obj.get("type")
    decoder = _DECODERS.get(kind) if type(kind) is str else None
    if decoder is None:
        raise _bad(f"unknown message type {str(kind)[:40]!r}")
    message: Message = decoder(obj)
    return message
