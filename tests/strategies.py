"""Hypothesis strategies for the plain data in `common.jobs` and every message in
`common.messages`.

Everything drawn here is valid: `from_wire(to_wire(m)) == m` holds for each message, and each
one fits in a frame. Lists are kept short so that tests stay fast; ask for longer ones with
the `max_items` arguments.

`job_ids()` and `node_ids()` draw realistic values (tickets as `new_job_id` makes them, short
node names). `wire_job_ids()` and `wire_node_ids()` draw anything the protocol accepts
(any text of at most `MAX_ID_CHARS` characters); pass them to `messages(ids=..., nodes=...)`
to stress the protocol rather than the domain.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import replace

from hypothesis import strategies as st

from common.jobs import TICKET_BYTES, JobId, JobSpec, NodeId, Outcome
from common.messages import (
    MAX_ARGS,
    MAX_ID_CHARS,
    MAX_SECONDS,
    MAX_TIME,
    Abandon,
    Ack,
    AckOf,
    Cancel,
    Challenge,
    Hello,
    Info,
    Job,
    JobStatus,
    Leaving,
    Message,
    MessageType,
    NodeStats,
    Output,
    Refused,
    RequestOfRes,
    ResReq,
    Result,
    Returned,
    Revoke,
    Stats,
    StatusQuery,
    StatusReply,
    Unknown,
    Welcome,
    node_id_problem,
)

__all__ = [
    "MESSAGE_STRATEGIES",
    "WIRE_FIELD_NAMES",
    "counts",
    "id_texts",
    "job_ids",
    "job_specs",
    "job_statuses",
    "message_like_maps",
    "messages",
    "msgpack_scalars",
    "msgpack_values",
    "node_ids",
    "node_stats",
    "outcomes",
    "texts",
    "timestamps",
    "wire_job_ids",
    "wire_node_ids",
]

# The largest integer a count field accepts on the wire.
MAX_COUNT = 2**53
# The largest `slots` a HELLO may announce.
MAX_HELLO_SLOTS = 100_000
# The longest REFUSED reason.
MAX_REASON_CHARS = 4096

JOB_STATES = ("queued", "dispatched", "done", "unknown")
JOB_TYPES = ("sleep", "fib", "sh")
_NODE_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."

IdStrategy = st.SearchStrategy[JobId]
NodeStrategy = st.SearchStrategy[NodeId]


# ---------------------------------------------------------------------------- scalars


def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Any text (no lone surrogates, which UTF-8 and so msgpack cannot carry)."""
    return st.text(max_size=max_size)


def id_texts() -> st.SearchStrategy[str]:
    """Any text that fits in an id-sized field (at most `MAX_ID_CHARS` characters)."""
    return st.one_of(
        st.text(max_size=16),
        st.text(min_size=MAX_ID_CHARS - 2, max_size=MAX_ID_CHARS),
    )


def job_ids() -> st.SearchStrategy[JobId]:
    """Tickets shaped as `new_job_id()` makes them: 15 bytes in lowercase base32 (24
    characters), so that shrinking gives `aaaaaaaaaaaaaaaaaaaaaaaa`."""
    return st.binary(min_size=TICKET_BYTES, max_size=TICKET_BYTES).map(
        lambda raw: JobId(base64.b32encode(raw).decode("ascii").lower()))


def wire_job_ids() -> st.SearchStrategy[JobId]:
    """Any job id the protocol accepts, realistic or not."""
    return st.one_of(job_ids(), id_texts().map(JobId))


def node_ids() -> st.SearchStrategy[NodeId]:
    """Short printable node names."""
    return st.text(alphabet=_NODE_NAME_CHARS, min_size=1, max_size=24).map(NodeId)


def wire_node_ids() -> st.SearchStrategy[NodeId]:
    """Any node id the protocol accepts, realistic or not."""
    return st.one_of(node_ids(), id_texts().map(NodeId))


def timestamps() -> st.SearchStrategy[float]:
    """Wall-clock times: mostly around now, sometimes anywhere a frame may carry one."""
    return st.one_of(
        st.floats(min_value=1.6e9, max_value=2.2e9),
        st.floats(min_value=0.0, max_value=MAX_TIME),
    )


def counts(max_value: int = MAX_COUNT) -> st.SearchStrategy[int]:
    """Non-negative integers as count fields accept them, biased towards small ones."""
    return st.one_of(st.integers(0, 10), st.integers(0, max_value))


def _id_tuples(ids: IdStrategy, max_items: int) -> st.SearchStrategy[tuple[JobId, ...]]:
    return st.lists(ids, max_size=max_items).map(tuple)


# ---------------------------------------------------------------------------- records


def job_specs(
    ids: IdStrategy | None = None, nodes: NodeStrategy | None = None, max_args: int = 4,
) -> st.SearchStrategy[JobSpec]:
    return st.builds(
        JobSpec,
        job_id=ids if ids is not None else job_ids(),
        job_type=st.one_of(st.sampled_from(JOB_TYPES), id_texts()),
        args=st.lists(texts(), max_size=min(max_args, MAX_ARGS)).map(tuple),
        origin=nodes if nodes is not None else node_ids(),
        submitted_at=timestamps(),
        priority=st.one_of(st.just(0), st.integers(-(2**31), 2**31)),
        not_before=st.one_of(st.just(0.0), timestamps()),
        timeout=st.one_of(st.just(0.0), st.floats(0, 1e6)),
        retries=st.one_of(st.just(0), st.integers(0, 1000)),
    )


def outcomes(
    ids: IdStrategy | None = None, nodes: NodeStrategy | None = None,
) -> st.SearchStrategy[Outcome]:
    return st.builds(
        Outcome,
        job_id=ids if ids is not None else job_ids(),
        ok=st.booleans(),
        output=texts(200),
        node=nodes if nodes is not None else node_ids(),
        started_at=timestamps(),
        finished_at=timestamps(),
        cancelled=st.booleans(),
        history=st.lists(texts(100), max_size=3).map(tuple),
    )


def node_stats(nodes: NodeStrategy | None = None) -> st.SearchStrategy[NodeStats]:
    return st.builds(
        NodeStats,
        node_id=nodes if nodes is not None else node_ids(),
        alive=st.booleans(),
        slots=counts(),
        running=counts(),
        queued=counts(),
        done=counts(),
        failed=counts(),
        duplicates=counts(),
    )


def job_statuses(
    ids: IdStrategy | None = None, nodes: NodeStrategy | None = None,
) -> st.SearchStrategy[JobStatus]:
    node_names: st.SearchStrategy[str] = nodes if nodes is not None else node_ids()
    return st.builds(
        JobStatus,
        job_id=ids if ids is not None else job_ids(),
        state=st.one_of(st.sampled_from(JOB_STATES), id_texts()),
        node=st.one_of(st.just(""), node_names),
        attempts=counts(),
        started=st.one_of(st.just(0.0), timestamps()),
    )


# ---------------------------------------------------------------------------- messages

MessageStrategyFactory = Callable[[IdStrategy, NodeStrategy, int], st.SearchStrategy[Message]]


def _hello(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(
        Hello,
        node_id=nodes.filter(lambda n: not node_id_problem(n)),  # (others are refused)
        incarnation=id_texts(),
        slots=counts(MAX_HELLO_SLOTS),
        version=counts(),
        queued=_id_tuples(ids, n),
        running=_id_tuples(ids, n),
        finished=_id_tuples(ids, n),
    ).flatmap(lambda h: st.one_of(st.just(h), st.builds(
        lambda nonce, proof: replace(h, nonce=nonce, proof=proof),
        id_texts(), id_texts().filter(bool))))


def _welcome(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Welcome, proxy_id=id_texts(), proof=id_texts())


def _challenge(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Challenge, nonce=id_texts())


def _refused(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Refused, reason=st.one_of(
        texts(), st.text(min_size=MAX_REASON_CHARS - 1, max_size=MAX_REASON_CHARS)))


def _leaving(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Leaving, reason=st.one_of(
        texts(), st.text(min_size=MAX_REASON_CHARS - 1, max_size=MAX_REASON_CHARS)))


def _info(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return _id_tuples(ids, n).flatmap(lambda running: st.builds(
        Info, queued=counts(), running=counts(), slots=counts(), done=counts(),
        failed=counts(), running_ids=st.just(running), overdue_ids=_id_tuples(ids, n),
        running_started=st.one_of(st.just(()), st.lists(
            st.one_of(st.just(0.0), timestamps()), min_size=len(running),
            max_size=len(running)).map(tuple))))


def _overdue_after(count: int) -> st.SearchStrategy[tuple[float, ...]]:
    """None, or one limit per job with at least one set (all 0 is sent as none)."""
    seconds = st.one_of(st.just(0.0), st.floats(0.0, MAX_SECONDS))
    some = st.lists(seconds, min_size=count, max_size=count).map(tuple).filter(any)
    return st.just(()) if count == 0 else st.one_of(st.just(()), some)


def _job(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    specs = st.lists(job_specs(ids, nodes), max_size=n).map(tuple)
    return specs.flatmap(lambda jobs: st.builds(Job, jobs=st.just(jobs),
                                                overdue_after=_overdue_after(len(jobs))))


def _ack(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Ack, of=st.sampled_from(AckOf), ids=_id_tuples(ids, n))


def _request_of_res(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(RequestOfRes, ids=_id_tuples(ids, n))


def _result(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Result, outcomes=st.lists(outcomes(ids, nodes), max_size=n).map(tuple))


def _res_req(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(ResReq, outcomes=st.lists(outcomes(ids, nodes), max_size=n).map(tuple),
                     ids=_id_tuples(ids, n))


def _revoke(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Revoke, ids=_id_tuples(ids, n))


def _abandon(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Abandon, ids=_id_tuples(ids, n))


def _returned(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Returned, ids=_id_tuples(ids, n))


def _unknown(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Unknown, ids=_id_tuples(ids, n))


def _stats(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Stats, queue_length=counts(),
                     nodes=st.lists(node_stats(nodes), max_size=n).map(tuple))


def _status_query(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(StatusQuery, ids=_id_tuples(ids, n))


def _status_reply(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(StatusReply,
                     entries=st.lists(job_statuses(ids, nodes), max_size=n).map(tuple))


def _cancel(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Cancel, ids=_id_tuples(ids, n))


def _output(ids: IdStrategy, nodes: NodeStrategy, n: int) -> st.SearchStrategy[Message]:
    return st.builds(Output, job_id=ids, lines=st.lists(texts(80), max_size=n).map(tuple))


# One factory per wire type; a test checks that every `MessageType` is here.
MESSAGE_STRATEGIES: dict[MessageType, MessageStrategyFactory] = {
    MessageType.HELLO: _hello,
    MessageType.WELCOME: _welcome,
    MessageType.REFUSED: _refused,
    MessageType.INFO: _info,
    MessageType.JOB: _job,
    MessageType.ACK: _ack,
    MessageType.REQUEST_OF_RES: _request_of_res,
    MessageType.RESULT: _result,
    MessageType.RES_REQ: _res_req,
    MessageType.REVOKE: _revoke,
    MessageType.RETURNED: _returned,
    MessageType.UNKNOWN: _unknown,
    MessageType.STATS: _stats,
    MessageType.STATUS_REQ: _status_query,
    MessageType.STATUS: _status_reply,
    MessageType.CHALLENGE: _challenge,
    MessageType.CANCEL: _cancel,
    MessageType.OUTPUT: _output,
    MessageType.ABANDON: _abandon,
    MessageType.LEAVING: _leaving,
}


def messages(
    *types: MessageType,
    ids: IdStrategy | None = None,
    nodes: NodeStrategy | None = None,
    max_items: int = 4,
) -> st.SearchStrategy[Message]:
    """Valid messages of the given wire types (all of them if none are given).

    `ids` and `nodes` default to `job_ids()` and `node_ids()`; `max_items` bounds every list
    inside a message (ids, jobs, outcomes, nodes, entries).
    """
    id_strategy = ids if ids is not None else job_ids()
    node_strategy = nodes if nodes is not None else node_ids()
    chosen = types or tuple(MessageType)
    return st.one_of(
        [MESSAGE_STRATEGIES[t](id_strategy, node_strategy, max_items) for t in chosen]
    )


# ---------------------------------------------------------------------------- raw wire data

# Every top-level key any message uses on the wire, so that fuzzed maps often look close to
# a real message.
WIRE_FIELD_NAMES = (
    "type", "node_id", "incarnation", "slots", "version", "queued", "running", "finished",
    "proxy_id", "reason", "done", "failed", "jobs", "of", "ids", "results", "queue_length",
    "nodes", "entries",
)


def msgpack_scalars() -> st.SearchStrategy[object]:
    """Anything msgpack packs as a single value, including wire names and NaN."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.integers(-3, 3),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.sampled_from([str(t) for t in MessageType]),
        st.sampled_from([str(a) for a in AckOf]),
    )


def msgpack_values(max_leaves: int = 25) -> st.SearchStrategy[object]:
    """Arbitrary msgpack-able data: scalars, lists and string-keyed maps, nested."""
    keys = st.one_of(st.sampled_from(WIRE_FIELD_NAMES), st.text(max_size=12))
    return st.recursive(
        msgpack_scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=9),
            st.dictionaries(keys, children, max_size=6),
        ),
        max_leaves=max_leaves,
    )


def message_like_maps() -> st.SearchStrategy[dict[str, object]]:
    """Maps with a real (or nearly real) `type` and a random subset of real field names."""
    kinds = st.one_of(st.sampled_from([str(t) for t in MessageType]), msgpack_scalars())
    values = msgpack_values(4)
    return st.fixed_dictionaries(
        {"type": kinds},
        optional={name: values for name in WIRE_FIELD_NAMES if name != "type"},
    )
