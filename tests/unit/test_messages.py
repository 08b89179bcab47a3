"""Unit tests for `common.messages` (and the small pure pieces of `common.jobs` and
`common.errors` it is built on): wire layout, round trips, and validation of what a peer sends.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import string
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import (
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SchedulerError,
)
from common.jobs import (
    TICKET_ALPHABET,
    TICKET_LENGTH,
    JobId,
    JobSpec,
    NodeId,
    Outcome,
    looks_like_ticket,
    new_job_id,
)
from common.messages import (
    MAX_ARGS,
    MAX_ID_CHARS,
    MAX_ITEMS,
    MAX_SECONDS,
    MAX_TEXT_CHARS,
    MAX_TIME,
    PROTOCOL_VERSION,
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
    _outcome_fields_checked,
    _spec_fields_checked,
    from_wire,
    outcome_fields,
    spec_fields,
    to_wire,
)
from tests.strategies import (
    MESSAGE_STRATEGIES,
    message_like_maps,
    messages,
    msgpack_values,
    wire_job_ids,
    wire_node_ids,
)

FUZZ = settings(max_examples=200, deadline=None)
# Nested arbitrary data is slower to draw; fewer examples keep the file fast.
FUZZ_NESTED = settings(max_examples=100, deadline=None)

# ---------------------------------------------------------------------------- examples

A, B, C = (JobId(c * TICKET_LENGTH) for c in "abc")
LONG = "x" * MAX_ID_CHARS
TOO_LONG = "x" * (MAX_ID_CHARS + 1)
NOW = 1_700_000_000.25

SPEC = JobSpec(A, "sleep", ("1500",), NodeId("node-a"), NOW)
SPEC_NO_ARGS = JobSpec(B, "fib", (), NodeId("node-b"), 0.0)
SPEC_MAX_ARGS = JobSpec(JobId(LONG), LONG, tuple(str(i) for i in range(MAX_ARGS)),
                        NodeId(LONG), 0.0)
SPEC_UNICODE = JobSpec(JobId(""), "sh", ("echo 'héllo ✓ 🚀'", "", "a\x00b\nc"), NodeId(""),
                       MAX_TIME)
OUTCOME = Outcome(A, True, "slept 1500 ms", NodeId("node-b"), NOW, NOW + 1.5)
FAILED = Outcome(B, False, "Traceback …\n", NodeId(LONG), 0.0, 0.0)
NODE = NodeStats(NodeId("node-a"), True, 4, 1, 2, 10, 1, 0)
DEAD_NODE = NodeStats(NodeId(LONG), False, 0, 0, 0, 2**53, 2**53, 2**53)
STATUS = JobStatus(A, "dispatched", "node-b", 2)
NOT_STORED = JobStatus(JobId(LONG), "unknown", "", 0)

EXAMPLES: list[Message] = [
    Hello(NodeId("node-a"), "inc-1", 4, PROTOCOL_VERSION, (A,), (B,), (C,)),
    Hello(NodeId("n"), "", 0, 0, (), (), ()),
    Hello(NodeId(LONG), LONG, 100_000, 2**53, (JobId(LONG), JobId("")), (A, A), (A, B, C)),
    Welcome("proxy-1"),
    Welcome("proxy-1", "ab" * 32),
    Hello(NodeId("node-a"), "inc-1", 4, PROTOCOL_VERSION, (A,), (B,), (C,), "n" * 32, "p" * 64),
    Challenge("00" * 16),
    Welcome(""),
    Welcome(LONG),
    Refused("node-a is already connected"),
    Refused(""),
    Refused("é" * 4096),
    Info(0, 0, 0, 0, 0),
    Info(1, 2, 4, 100, 3),
    Info(2**53, 2**53, 2**53, 2**53, 2**53),
    Job(()),
    Job((SPEC,)),
    Job((SPEC, SPEC_NO_ARGS, SPEC_MAX_ARGS, SPEC_UNICODE)),
    Ack(AckOf.JOB, ()),
    Ack(AckOf.JOB, (A, B)),
    Ack(AckOf.RESULT, (A,)),
    RequestOfRes(()),
    RequestOfRes((A, B, C)),
    Result(()),
    Result((OUTCOME, FAILED)),
    ResReq((), ()),
    ResReq((OUTCOME,), (B, C)),
    Revoke(()),
    Revoke((A,)),
    Abandon((A,)),
    Returned(()),
    Returned((A, B)),
    Unknown(()),
    Unknown((JobId("no-such-ticket"),)),
    Stats(0, ()),
    Stats(7, (NODE, DEAD_NODE)),
    StatusQuery(()),
    StatusQuery((A, B)),
    StatusReply(()),
    StatusReply((STATUS, NOT_STORED)),
    Cancel((A,)),
    Output(A, ("x",)),
    Leaving("store failing: database or disk is full"),
]


def _params(examples: list[Message]) -> list[Any]:
    return [pytest.param(m, id=f"{type(m).__name__}-{i}") for i, m in enumerate(examples)]


def _first_of_each_type() -> list[Message]:
    seen: dict[type, Message] = {}
    for m in EXAMPLES:
        seen.setdefault(type(m), m)
    return list(seen.values())


WIRE_NAMES: list[tuple[type, str]] = [
    (Hello, "HELLO"),
    (Welcome, "WELCOME"),
    (Challenge, "CHALLENGE"),
    (Refused, "REFUSED"),
    (Info, "INFO"),
    (Job, "JOB"),
    (Ack, "ACK"),
    (RequestOfRes, "REQUEST_OF_RES"),
    (Result, "RESULT"),
    (ResReq, "RES_REQ"),
    (Revoke, "REVOKE"),
    (Abandon, "ABANDON"),
    (Returned, "RETURNED"),
    (Unknown, "UNKNOWN"),
    (Stats, "STATS"),
    (StatusQuery, "STATUS_REQ"),
    (StatusReply, "STATUS"),
    (Cancel, "CANCEL"),
    (Output, "OUTPUT"),
    (Leaving, "LEAVING"),
]


def _walk(obj: object) -> Iterator[object]:
    yield obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _walk(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _walk(item)


# ---------------------------------------------------------------------------- round trips


def test_examples_cover_every_message_type() -> None:
    assert {to_wire(m)["type"] for m in EXAMPLES} == {str(t) for t in MessageType}


def test_strategies_cover_every_message_type() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MessageType)


@pytest.mark.parametrize("msg", _params(EXAMPLES))
def test_round_trip(msg: Message) -> None:
    decoded = from_wire(to_wire(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert hash(decoded) == hash(msg)  # tuples, not lists, all the way down


@pytest.mark.parametrize("msg", _params(EXAMPLES))
def test_round_trip_through_msgpack(msg: Message) -> None:
    packed = msgpack.packb(to_wire(msg), use_bin_type=True)
    assert from_wire(msgpack.unpackb(packed, raw=False, strict_map_key=True)) == msg


@pytest.mark.parametrize("msg", _params(EXAMPLES))
def test_wire_form_is_plain_data(msg: Message) -> None:
    wire = to_wire(msg)
    for node in _walk(wire):
        assert type(node) in (dict, list, str, int, float, bool), node
    assert all(type(key) is str for node in _walk(wire) if isinstance(node, dict) for key in node)


@pytest.mark.parametrize(("cls", "name"), WIRE_NAMES)
def test_wire_type_names(cls: type, name: str) -> None:
    (msg,) = (m for m in _first_of_each_type() if type(m) is cls)
    assert to_wire(msg)["type"] == name
    assert MessageType(name) == name


def test_wire_names_table_is_complete() -> None:
    assert sorted(name for _, name in WIRE_NAMES) == sorted(str(t) for t in MessageType)


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        pytest.param(
            Hello(NodeId("n"), "i", 2, 1, (A,), (), (B,)),
            {"type": "HELLO", "node_id": "n", "incarnation": "i", "slots": 2, "version": 1,
             "queued": [A], "running": [], "finished": [B]},
            id="HELLO",
        ),
        pytest.param(Welcome("p"), {"type": "WELCOME", "proxy_id": "p"}, id="WELCOME"),
        pytest.param(Refused("no"), {"type": "REFUSED", "reason": "no"}, id="REFUSED"),
        pytest.param(
            Info(1, 2, 3, 4, 5),
            {"type": "INFO", "queued": 1, "running": 2, "slots": 3, "done": 4, "failed": 5},
            id="INFO",
        ),
        pytest.param(
            Job((SPEC,)),
            {"type": "JOB", "jobs": [[A, "sleep", ["1500"], "node-a", NOW]]},
            id="JOB",
        ),
        pytest.param(Ack(AckOf.RESULT, (A,)), {"type": "ACK", "of": "RESULT", "ids": [A]},
                     id="ACK"),
        pytest.param(RequestOfRes((A,)), {"type": "REQUEST_OF_RES", "ids": [A]},
                     id="REQUEST_OF_RES"),
        pytest.param(
            Result((OUTCOME,)),
            {"type": "RESULT",
             "results": [[A, True, "slept 1500 ms", "node-b", NOW, NOW + 1.5]]},
            id="RESULT",
        ),
        pytest.param(
            ResReq((OUTCOME,), (B,)),
            {"type": "RES_REQ",
             "results": [[A, True, "slept 1500 ms", "node-b", NOW, NOW + 1.5]], "ids": [B]},
            id="RES_REQ",
        ),
        pytest.param(Revoke((A,)), {"type": "REVOKE", "ids": [A]}, id="REVOKE"),
        pytest.param(Abandon((A,)), {"type": "ABANDON", "ids": [A]}, id="ABANDON"),
        pytest.param(Leaving("stopping"), {"type": "LEAVING", "reason": "stopping"},
                     id="LEAVING"),
        pytest.param(Returned((A,)), {"type": "RETURNED", "ids": [A]}, id="RETURNED"),
        pytest.param(Unknown((A,)), {"type": "UNKNOWN", "ids": [A]}, id="UNKNOWN"),
        pytest.param(
            Stats(7, (NODE,)),
            {"type": "STATS", "queue_length": 7,
             "nodes": [["node-a", True, 4, 1, 2, 10, 1, 0]]},
            id="STATS",
        ),
        pytest.param(StatusQuery((A,)), {"type": "STATUS_REQ", "ids": [A]}, id="STATUS_REQ"),
        pytest.param(
            StatusReply((STATUS,)),
            {"type": "STATUS", "entries": [[A, "dispatched", "node-b", 2]]},
            id="STATUS",
        ),
    ],
)
def test_wire_layout(msg: Message, wire: dict[str, Any]) -> None:
    assert to_wire(msg) == wire
    assert from_wire(wire) == msg


@pytest.mark.parametrize(
    "not_a_message",
    [None, 1, "HELLO", {"type": "HELLO"}, ["HELLO"], SPEC, OUTCOME, NODE, STATUS, AckOf.JOB],
    ids=repr,
)
def test_to_wire_rejects_what_is_not_a_message(not_a_message: Any) -> None:
    with pytest.raises(LocalProtocolError):
        to_wire(not_a_message)


@FUZZ
@given(msg=messages())
def test_any_message_round_trips(msg: Message) -> None:
    decoded = from_wire(to_wire(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)


@FUZZ
@given(msg=messages(ids=wire_job_ids(), nodes=wire_node_ids(), max_items=6))
def test_any_message_with_any_ids_round_trips(msg: Message) -> None:
    packed = msgpack.packb(to_wire(msg), use_bin_type=True)
    assert from_wire(msgpack.unpackb(packed, raw=False, strict_map_key=True)) == msg


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        pytest.param({"type": "JOB", "jobs": [[A, "sleep", [], "n", 1_700_000_000]]},
                     Job((JobSpec(A, "sleep", (), NodeId("n"), 1.7e9),)), id="submitted_at"),
        pytest.param({"type": "RESULT", "results": [[A, True, "", "n", 0, 10**11]]},
                     Result((Outcome(A, True, "", NodeId("n"), 0.0, 1e11),)),
                     id="started_at-finished_at"),
    ],
)
def test_integer_timestamps_decode_as_floats(wire: dict[str, Any], expected: Message) -> None:
    decoded = from_wire(wire)
    assert decoded == expected
    records = [*getattr(decoded, "jobs", ()), *getattr(decoded, "outcomes", ())]
    for record in records:
        for name in ("submitted_at", "started_at", "finished_at"):
            if hasattr(record, name):
                assert type(getattr(record, name)) is float


# ---------------------------------------------------------------------------- invalid messages


def _wire(msg: Message, **changes: object) -> dict[str, Any]:
    wire = to_wire(msg)
    wire.update(changes)
    return wire


def _set(record: list[Any], index: int, value: object) -> list[Any]:
    changed = list(record)
    changed[index] = value
    return changed


SPEC_WIRE: list[Any] = to_wire(Job((SPEC,)))["jobs"][0]
OUTCOME_WIRE: list[Any] = to_wire(Result((OUTCOME,)))["results"][0]
NODE_WIRE: list[Any] = to_wire(Stats(0, (NODE,)))["nodes"][0]
STATUS_WIRE: list[Any] = to_wire(StatusReply((STATUS,)))["entries"][0]

HELLO = EXAMPLES[0]
INFO = Info(1, 2, 4, 100, 3)


def _job(spec: object) -> dict[str, Any]:
    return {"type": "JOB", "jobs": [SPEC_WIRE, spec]}


def _result(outcome: object) -> dict[str, Any]:
    return {"type": "RESULT", "results": [OUTCOME_WIRE, outcome]}


def _res_req(outcome: object) -> dict[str, Any]:
    return {"type": "RES_REQ", "results": [outcome], "ids": [A]}


def _stats(node: object) -> dict[str, Any]:
    return {"type": "STATS", "queue_length": 0, "nodes": [NODE_WIRE, node]}


def _status(entry: object) -> dict[str, Any]:
    return {"type": "STATUS", "entries": [STATUS_WIRE, entry]}


def _ack(**fields: object) -> dict[str, Any]:
    return {"type": "ACK", "ids": [A], **fields}


NAN = math.nan
BIG_TEXT = "x" * (MAX_TEXT_CHARS + 1)

INVALID: list[Any] = [
    # not a map
    pytest.param(None, id="none"),
    pytest.param(["WELCOME", "p"], id="list"),
    pytest.param("WELCOME", id="str"),
    pytest.param(1, id="int"),
    pytest.param(b"\x81\xa4type", id="bytes"),
    pytest.param((("type", "WELCOME"), ("proxy_id", "p")), id="tuple-of-pairs"),
    # unknown or missing type
    pytest.param({"type": "NOPE", "proxy_id": "p"}, id="type-unknown"),
    pytest.param({"type": "welcome", "proxy_id": "p"}, id="type-lowercase"),
    pytest.param({"type": "WELCOME ", "proxy_id": "p"}, id="type-trailing-space"),
    pytest.param({"type": "", "proxy_id": "p"}, id="type-empty"),
    pytest.param({"proxy_id": "p"}, id="type-missing"),
    pytest.param({}, id="empty-map"),
    pytest.param({"type": None, "proxy_id": "p"}, id="type-none"),
    pytest.param({"type": 4, "proxy_id": "p"}, id="type-int"),
    pytest.param({"type": b"WELCOME", "proxy_id": "p"}, id="type-bytes"),
    pytest.param({"type": ["WELCOME"], "proxy_id": "p"}, id="type-list"),
    pytest.param({"type": {"WELCOME": 1}, "proxy_id": "p"}, id="type-map"),
    pytest.param({"type": "X" * 100_000}, id="type-huge"),
    pytest.param({"TYPE": "WELCOME", "proxy_id": "p"}, id="type-key-uppercase"),
    pytest.param({b"type": "WELCOME", "proxy_id": "p"}, id="type-key-bytes"),
    # bool where an int is expected
    pytest.param(_wire(INFO, queued=True), id="info-queued-bool"),
    pytest.param(_wire(INFO, failed=False), id="info-failed-bool"),
    pytest.param(_wire(HELLO, slots=True), id="hello-slots-bool"),
    pytest.param(_wire(HELLO, version=False), id="hello-version-bool"),
    pytest.param({"type": "STATS", "queue_length": True, "nodes": []}, id="stats-qlen-bool"),
    pytest.param(_stats(_set(NODE_WIRE, 2, True)), id="node-slots-bool"),
    pytest.param(_status(_set(STATUS_WIRE, 3, True)), id="status-attempts-bool"),
    # other wrong types for ints
    pytest.param(_wire(INFO, slots=4.0), id="info-slots-float"),
    pytest.param(_wire(INFO, running="2"), id="info-running-str"),
    pytest.param(_wire(INFO, done=None), id="info-done-none"),
    pytest.param(_wire(HELLO, slots=[4]), id="hello-slots-list"),
    pytest.param(_stats(_set(NODE_WIRE, 7, 0.0)), id="node-duplicates-float"),
    pytest.param(_status(_set(STATUS_WIRE, 3, "2")), id="status-attempts-str"),
    # int (or bytes) where a str is expected
    pytest.param(_wire(HELLO, node_id=1), id="hello-node_id-int"),
    pytest.param(_wire(HELLO, incarnation=1), id="hello-incarnation-int"),
    pytest.param(_wire(HELLO, node_id=b"node-a"), id="hello-node_id-bytes"),
    pytest.param({"type": "WELCOME", "proxy_id": 7}, id="welcome-proxy_id-int"),
    pytest.param({"type": "REFUSED", "reason": 0}, id="refused-reason-int"),
    pytest.param({"type": "REVOKE", "ids": [1]}, id="revoke-id-int"),
    pytest.param({"type": "RETURNED", "ids": [A, 2]}, id="returned-second-id-int"),
    pytest.param({"type": "UNKNOWN", "ids": [b"aaaa"]}, id="unknown-id-bytes"),
    pytest.param({"type": "STATUS_REQ", "ids": [None]}, id="status_req-id-none"),
    pytest.param({"type": "REQUEST_OF_RES", "ids": [[A]]}, id="request_of_res-id-list"),
    pytest.param(_wire(HELLO, queued=[A, 3]), id="hello-queued-id-int"),
    pytest.param(_wire(HELLO, finished=[A, None]), id="hello-finished-id-none"),
    pytest.param(_job(_set(SPEC_WIRE, 0, 5)), id="spec-job_id-int"),
    pytest.param(_job(_set(SPEC_WIRE, 1, 3)), id="spec-job_type-int"),
    pytest.param(_job(_set(SPEC_WIRE, 2, ["1", 2])), id="spec-arg-int"),
    pytest.param(_job(_set(SPEC_WIRE, 3, 0)), id="spec-origin-int"),
    pytest.param(_result(_set(OUTCOME_WIRE, 0, 1)), id="outcome-job_id-int"),
    pytest.param(_result(_set(OUTCOME_WIRE, 2, 0)), id="outcome-output-int"),
    pytest.param(_result(_set(OUTCOME_WIRE, 2, b"out")), id="outcome-output-bytes"),
    pytest.param(_result(_set(OUTCOME_WIRE, 3, 1)), id="outcome-node-int"),
    pytest.param(_stats(_set(NODE_WIRE, 0, 1)), id="node-node_id-int"),
    pytest.param(_status(_set(STATUS_WIRE, 0, 1)), id="status-job_id-int"),
    pytest.param(_status(_set(STATUS_WIRE, 1, 1)), id="status-state-int"),
    pytest.param(_status(_set(STATUS_WIRE, 2, 0)), id="status-node-int"),
    # int (or str) where a bool is expected
    pytest.param(_result(_set(OUTCOME_WIRE, 1, 1)), id="outcome-ok-1"),
    pytest.param(_result(_set(OUTCOME_WIRE, 1, 0)), id="outcome-ok-0"),
    pytest.param(_result(_set(OUTCOME_WIRE, 1, "true")), id="outcome-ok-str"),
    pytest.param(_result(_set(OUTCOME_WIRE, 1, None)), id="outcome-ok-none"),
    pytest.param(_stats(_set(NODE_WIRE, 1, 1)), id="node-alive-1"),
    # negative counts
    *(pytest.param(_wire(INFO, **{name: -1}), id=f"info-{name}-negative")
      for name in ("queued", "running", "slots", "done", "failed")),
    pytest.param(_wire(HELLO, slots=-1), id="hello-slots-negative"),
    pytest.param(_wire(HELLO, version=-1), id="hello-version-negative"),
    pytest.param({"type": "STATS", "queue_length": -1, "nodes": []}, id="stats-qlen-negative"),
    *(pytest.param(_stats(_set(NODE_WIRE, i, -1)), id=f"node-field{i}-negative")
      for i in range(2, 8)),
    pytest.param(_status(_set(STATUS_WIRE, 3, -1)), id="status-attempts-negative"),
    pytest.param(_wire(INFO, queued=-(2**63)), id="info-queued-int64-min"),
    # counts too large
    pytest.param(_wire(HELLO, slots=100_001), id="hello-slots-too-many"),
    pytest.param(_wire(HELLO, version=2**53 + 1), id="hello-version-too-big"),
    pytest.param(_wire(INFO, queued=2**53 + 1), id="info-queued-too-big"),
    pytest.param(_wire(INFO, done=2**64 - 1), id="info-done-uint64-max"),
    pytest.param(_stats(_set(NODE_WIRE, 5, 2**53 + 1)), id="node-done-too-big"),
    # timestamps
    pytest.param(_job(_set(SPEC_WIRE, 4, NAN)), id="spec-submitted_at-nan"),
    # A node id goes into log lines and the one-line `stats` as it is: one with a line break
    # forged log lines.
    pytest.param(_wire(HELLO, node_id="evil\nnode.joined node=node-1"), id="hello-id-newline"),
    pytest.param(_wire(HELLO, node_id=""), id="hello-id-empty"),
    pytest.param(_wire(HELLO, node_id="two words"), id="hello-id-space"),
    pytest.param(_wire(HELLO, node_id="\u202eevil"), id="hello-id-unprintable"),
    # Times a frame may not carry (an infinite one broke the dashboard's JSON, a job not
    # before 1e300 waited for ever), nor a negative timeout ("timed out after -1 s").
    pytest.param(_job(_set(SPEC_WIRE, 4, float("inf"))), id="spec-submitted_at-inf"),
    pytest.param(_job(_set(SPEC_WIRE, 4, -1.0)), id="spec-submitted_at-negative"),
    pytest.param(_job(_set(SPEC_WIRE, 4, -1e308)), id="spec-submitted_at-huge-negative"),
    pytest.param(_job([*SPEC_WIRE, {"not_before": 1e300}]), id="spec-not_before-1e300"),
    pytest.param(_job([*SPEC_WIRE, {"timeout": -1.0}]), id="spec-timeout-negative"),
    pytest.param(_result(_set(OUTCOME_WIRE, 4, -1)), id="outcome-started_at-negative"),
    pytest.param(_result(_set(OUTCOME_WIRE, 5, float("-inf"))), id="outcome-finished_at-inf"),
    pytest.param(_result(_set(OUTCOME_WIRE, 4, NAN)), id="outcome-started_at-nan"),
    pytest.param(_result(_set(OUTCOME_WIRE, 5, NAN)), id="outcome-finished_at-nan"),
    pytest.param(_res_req(_set(OUTCOME_WIRE, 5, -NAN)), id="res_req-finished_at-neg-nan"),
    pytest.param(_job(_set(SPEC_WIRE, 4, "1.0")), id="spec-submitted_at-str"),
    pytest.param(_job(_set(SPEC_WIRE, 4, None)), id="spec-submitted_at-none"),
    pytest.param(_job(_set(SPEC_WIRE, 4, True)), id="spec-submitted_at-bool"),
    pytest.param(_result(_set(OUTCOME_WIRE, 4, [1.0])), id="outcome-started_at-list"),
    # over-long ids and texts
    pytest.param(_wire(HELLO, node_id=TOO_LONG), id="hello-node_id-too-long"),
    pytest.param(_wire(HELLO, incarnation=TOO_LONG), id="hello-incarnation-too-long"),
    pytest.param(_wire(HELLO, running=[A, TOO_LONG]), id="hello-running-id-too-long"),
    pytest.param({"type": "WELCOME", "proxy_id": TOO_LONG}, id="welcome-proxy_id-too-long"),
    pytest.param({"type": "REFUSED", "reason": "x" * 4097}, id="refused-reason-too-long"),
    pytest.param({"type": "ACK", "of": "JOB", "ids": [TOO_LONG]}, id="ack-id-too-long"),
    pytest.param({"type": "REVOKE", "ids": [TOO_LONG]}, id="revoke-id-too-long"),
    pytest.param({"type": "STATUS_REQ", "ids": [TOO_LONG]}, id="status_req-id-too-long"),
    pytest.param(_job(_set(SPEC_WIRE, 0, TOO_LONG)), id="spec-job_id-too-long"),
    pytest.param(_job(_set(SPEC_WIRE, 1, TOO_LONG)), id="spec-job_type-too-long"),
    pytest.param(_job(_set(SPEC_WIRE, 2, [BIG_TEXT])), id="spec-arg-too-long"),
    pytest.param(_job(_set(SPEC_WIRE, 3, TOO_LONG)), id="spec-origin-too-long"),
    pytest.param(_result(_set(OUTCOME_WIRE, 0, TOO_LONG)), id="outcome-job_id-too-long"),
    pytest.param(_result(_set(OUTCOME_WIRE, 2, BIG_TEXT)), id="outcome-output-too-long"),
    pytest.param(_result(_set(OUTCOME_WIRE, 3, TOO_LONG)), id="outcome-node-too-long"),
    pytest.param(_stats(_set(NODE_WIRE, 0, TOO_LONG)), id="node-node_id-too-long"),
    pytest.param(_status(_set(STATUS_WIRE, 0, TOO_LONG)), id="status-job_id-too-long"),
    pytest.param(_status(_set(STATUS_WIRE, 1, TOO_LONG)), id="status-state-too-long"),
    pytest.param(_status(_set(STATUS_WIRE, 2, TOO_LONG)), id="status-node-too-long"),
    # lists: wrong type or too long
    pytest.param({"type": "REVOKE", "ids": A}, id="ids-str"),
    pytest.param({"type": "REVOKE", "ids": (A,)}, id="ids-tuple"),
    pytest.param({"type": "REVOKE", "ids": {A: 1}}, id="ids-map"),
    pytest.param({"type": "REVOKE", "ids": None}, id="ids-none"),
    pytest.param({"type": "REVOKE", "ids": [""] * (MAX_ITEMS + 1)}, id="ids-too-many"),
    pytest.param(_wire(HELLO, queued=A), id="hello-queued-str"),
    pytest.param({"type": "JOB", "jobs": {"0": SPEC_WIRE}}, id="jobs-map"),
    pytest.param({"type": "JOB", "jobs": SPEC_WIRE}, id="jobs-flat-record"),
    pytest.param({"type": "RESULT", "results": None}, id="results-none"),
    pytest.param({"type": "STATS", "queue_length": 0, "nodes": [NODE_WIRE] * 10_001},
                 id="stats-too-many-nodes"),
    pytest.param({"type": "STATUS", "entries": "x"}, id="entries-str"),
    pytest.param(_job(_set(SPEC_WIRE, 2, "1500")), id="spec-args-str"),
    pytest.param(_job(_set(SPEC_WIRE, 2, None)), id="spec-args-none"),
    pytest.param(_job(_set(SPEC_WIRE, 2, ["1"] * (MAX_ARGS + 1))), id="spec-args-too-many"),
    # records with the wrong number of fields, or not lists at all
    pytest.param(_job(SPEC_WIRE[:4]), id="spec-4-fields"),
    pytest.param(_job([*SPEC_WIRE, "extra"]), id="spec-6-fields"),
    pytest.param(_job([]), id="spec-0-fields"),
    pytest.param(_job(tuple(SPEC_WIRE)), id="spec-tuple"),
    pytest.param(_job(dict(enumerate(SPEC_WIRE))), id="spec-map"),
    pytest.param(_job("abcde"), id="spec-str-of-5"),
    pytest.param(_job(None), id="spec-none"),
    pytest.param(_result(OUTCOME_WIRE[:5]), id="outcome-5-fields"),
    pytest.param(_result([*OUTCOME_WIRE, 0.0]), id="outcome-7-fields"),
    pytest.param(_res_req(OUTCOME_WIRE[:5]), id="res_req-outcome-5-fields"),
    pytest.param(_stats(NODE_WIRE[:7]), id="node-7-fields"),
    pytest.param(_stats([*NODE_WIRE, 0]), id="node-9-fields"),
    pytest.param(_status(STATUS_WIRE[:3]), id="status-3-fields"),
    pytest.param(_status([*STATUS_WIRE, 1]), id="status-5-fields"),
    # ACK that does not say (properly) what it acknowledges
    pytest.param(_ack(), id="ack-of-missing"),
    pytest.param(_ack(of=None), id="ack-of-none"),
    pytest.param(_ack(of="job"), id="ack-of-lowercase"),
    pytest.param(_ack(of="Result"), id="ack-of-capitalized"),
    pytest.param(_ack(of="ACK"), id="ack-of-ack"),
    pytest.param(_ack(of="JOBS"), id="ack-of-plural"),
    pytest.param(_ack(of="HELLO"), id="ack-of-other-type"),
    pytest.param(_ack(of=""), id="ack-of-empty"),
    pytest.param(_ack(of=1), id="ack-of-int"),
    pytest.param(_ack(of=True), id="ack-of-bool"),
    pytest.param(_ack(of=b"JOB"), id="ack-of-bytes"),
    pytest.param(_ack(of=["JOB"]), id="ack-of-list"),
    pytest.param(_ack(of={"JOB": 1}), id="ack-of-map"),
    pytest.param({"type": "ACK", "of": "JOB"}, id="ack-ids-missing"),
    pytest.param({"type": "ACK", "of": "RESULT", "ids": [A, 1]}, id="ack-id-int"),
    # a record of one type where another is expected
    pytest.param({"type": "JOB", "jobs": [OUTCOME_WIRE]}, id="job-holds-outcome"),
    pytest.param({"type": "RESULT", "results": [SPEC_WIRE]}, id="result-holds-spec"),
    pytest.param({"type": "STATS", "queue_length": 0, "nodes": [STATUS_WIRE]},
                 id="stats-holds-status"),
    pytest.param({"type": "STATUS", "entries": [NODE_WIRE]}, id="status-holds-node"),
]


@pytest.mark.parametrize("obj", INVALID)
def test_invalid_message_is_rejected(obj: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(obj)


def _missing_field_cases() -> Iterator[Any]:
    for msg in _first_of_each_type():
        for key in to_wire(msg):
            if key != "type":
                name = f"{to_wire(msg)['type']}-{key}"
                yield pytest.param({k: v for k, v in to_wire(msg).items() if k != key}, id=name)


@pytest.mark.parametrize("obj", list(_missing_field_cases()))
def test_missing_field_is_rejected(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(obj)


# None of these is valid for any top-level field: counts, ids, texts, lists or ACK's `of`.
NEVER_VALID_FIELD: list[Any] = [None, True, 1.5, b"bytes", {}, {"x": 1}, -1, NAN]


def _wrong_field_cases() -> Iterator[Any]:
    for msg in _first_of_each_type():
        for key in to_wire(msg):
            if key != "type":
                for i, value in enumerate(NEVER_VALID_FIELD):
                    wire = _wire(msg, **{key: value})
                    yield pytest.param(wire, id=f"{wire['type']}-{key}-{i}")


@pytest.mark.parametrize("obj", list(_wrong_field_cases()))
def test_field_of_wrong_kind_is_rejected(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(obj)


# None of these is valid in any position of a record (id, text, bool, count, args, time).
NEVER_VALID_IN_RECORD: list[Any] = [None, {}, b"x", NAN]

RECORD_WRAPPERS = [("spec", SPEC_WIRE, _job), ("outcome", OUTCOME_WIRE, _result),
                   ("outcome-res_req", OUTCOME_WIRE, _res_req), ("node", NODE_WIRE, _stats),
                   ("status", STATUS_WIRE, _status)]


def _wrong_record_field_cases() -> Iterator[Any]:
    for name, record, wrap in RECORD_WRAPPERS:
        for index in range(len(record)):
            for i, value in enumerate(NEVER_VALID_IN_RECORD):
                yield pytest.param(wrap(_set(record, index, value)), id=f"{name}-{index}-{i}")


@pytest.mark.parametrize("obj", list(_wrong_record_field_cases()))
def test_record_field_of_wrong_kind_is_rejected(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(obj)


def test_rejection_says_what_is_malformed() -> None:
    with pytest.raises(RemoteProtocolError, match="slots"):
        from_wire(_wire(HELLO, slots=-1))
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        from_wire({"type": "NOPE"})


def test_unknown_type_error_is_short() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        from_wire({"type": "X" * 100_000})
    assert len(str(info.value)) < 200


# ---------------------------------------------------------------------------- limits accepted

ACCEPTED: list[Any] = [
    pytest.param(_wire(HELLO, slots=100_000), id="hello-slots-max"),
    pytest.param(_wire(HELLO, slots=0, version=0), id="hello-zero"),
    pytest.param(_wire(HELLO, version=2**53), id="hello-version-max"),
    pytest.param(_wire(INFO, queued=2**53, failed=2**53), id="info-max"),
    pytest.param(_wire(HELLO, node_id=LONG, incarnation=LONG, queued=[LONG]), id="ids-max-len"),
    pytest.param({"type": "REFUSED", "reason": "x" * 4096}, id="reason-max-len"),
    pytest.param({"type": "REVOKE", "ids": [""] * MAX_ITEMS}, id="ids-max-count"),
    pytest.param({"type": "STATS", "queue_length": 2**53, "nodes": [NODE_WIRE] * 10_000},
                 id="stats-max-nodes"),
    pytest.param(_job(_set(SPEC_WIRE, 2, ["1"] * MAX_ARGS)), id="spec-max-args"),
    pytest.param(_job(_set(SPEC_WIRE, 2, ["x" * MAX_TEXT_CHARS])), id="spec-arg-max-len"),
    pytest.param(_result(_set(OUTCOME_WIRE, 2, "x" * MAX_TEXT_CHARS)), id="output-max-len"),
    pytest.param(_job(_set(SPEC_WIRE, 4, MAX_TIME)), id="spec-submitted_at-latest"),
    pytest.param(_result(_set(OUTCOME_WIRE, 4, 0)), id="outcome-started_at-int-zero"),
    pytest.param(_ack(of="JOB"), id="ack-of-job"),
    pytest.param(_ack(of="RESULT"), id="ack-of-result"),
    pytest.param(_ack(of=AckOf.RESULT), id="ack-of-enum"),
]


@pytest.mark.parametrize("obj", ACCEPTED)
def test_limits_are_inclusive(obj: dict[str, Any]) -> None:
    msg = from_wire(obj)
    assert from_wire(to_wire(msg)) == msg


@pytest.mark.parametrize("of", ["JOB", "RESULT"])
def test_ack_of_decodes_to_enum(of: str) -> None:
    msg = from_wire(_ack(of=of))
    assert isinstance(msg, Ack)
    assert msg.of is AckOf(of)


# ---------------------------------------------------------------------------- fuzzing


def _decode_or_reject(obj: object) -> Message | None:
    """`from_wire`, where the only acceptable failure is `RemoteProtocolError`."""
    try:
        msg = from_wire(obj)
    except RemoteProtocolError:
        return None
    assert from_wire(to_wire(msg)) == msg  # whatever is accepted is stable
    return msg


@FUZZ_NESTED
@given(obj=msgpack_values())
def test_arbitrary_data_decodes_or_is_rejected(obj: object) -> None:
    _decode_or_reject(obj)


@FUZZ_NESTED
@given(obj=message_like_maps())
def test_arbitrary_message_like_maps_decode_or_are_rejected(obj: dict[str, object]) -> None:
    _decode_or_reject(obj)


def _paths(obj: object, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every position inside a wire object (not the root itself)."""
    children: list[tuple[Any, object]] = []
    if isinstance(obj, dict):
        children = list(obj.items())
    elif isinstance(obj, list):
        children = list(enumerate(obj))
    for key, child in children:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _parent(wire: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        wire = wire[key]
    return wire


SMALL_MESSAGES = messages(max_items=2)
SMALL_VALUES = msgpack_values(5)


@st.composite
def mutated_wire(draw: st.DrawFn) -> object:
    """A valid message's wire form with one value replaced, deleted or inserted."""
    wire: Any = to_wire(draw(SMALL_MESSAGES))
    path = draw(st.sampled_from(list(_paths(wire))))
    parent, key = _parent(wire, path), path[-1]
    action = draw(st.sampled_from(["replace", "delete", "insert"]))
    if action == "replace":
        parent[key] = draw(SMALL_VALUES)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, draw(SMALL_VALUES))
    else:
        parent[draw(st.text(max_size=8))] = draw(SMALL_VALUES)
    return wire


@FUZZ_NESTED
@given(obj=mutated_wire())
def test_mutated_messages_decode_or_are_rejected(obj: object) -> None:
    _decode_or_reject(obj)


# ---------------------------------------------------------------------------- jobs and errors


def test_ticket_alphabet_is_lowercase_base32() -> None:
    assert frozenset(string.ascii_lowercase + "234567") == TICKET_ALPHABET
    assert TICKET_LENGTH == 24


def test_new_job_id_shape() -> None:
    for _ in range(100):
        ticket = new_job_id()
        assert type(ticket) is str
        assert len(ticket) == TICKET_LENGTH
        assert set(ticket) <= TICKET_ALPHABET
        assert looks_like_ticket(ticket)
        assert len(base64.b32decode(ticket.upper())) == 15


def test_new_job_ids_are_unique() -> None:
    tickets = [new_job_id() for _ in range(10_000)]
    assert len(set(tickets)) == len(tickets)
    assert all(looks_like_ticket(t) for t in tickets)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a" * 24, True),
        ("abcdefghijklmnopqrstuvwx", True),
        ("234567234567234567234567", True),
        ("", False),
        ("a" * 23, False),
        ("a" * 25, False),
        ("A" * 24, False),
        ("a" * 23 + "0", False),
        ("a" * 23 + "1", False),
        ("a" * 23 + "8", False),
        ("a" * 23 + "9", False),
        ("a" * 23 + "=", False),
        ("a" * 23 + " ", False),
        (" " + "a" * 23, False),
        ("a" * 23 + "\n", False),
        ("a" * 23 + "é", False),
    ],
)
def test_looks_like_ticket(text: str, expected: bool) -> None:
    assert looks_like_ticket(text) is expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (SPEC, "sleep 1500"),
        (SPEC_NO_ARGS, "fib"),
        (JobSpec(A, "sh", ("echo", "hi there"), NodeId("n"), 0.0), "sh echo hi there"),
    ],
)
def test_job_spec_describe(spec: JobSpec, expected: str) -> None:
    assert spec.describe() == expected


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (FrameTooLarge, (RemoteProtocolError, ProtocolError, SchedulerError)),
        (RemoteProtocolError, (ProtocolError, SchedulerError)),
        (LocalProtocolError, (ProtocolError, SchedulerError)),
    ],
)
def test_error_hierarchy(error: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    for base in bases:
        assert issubclass(error, base)


def test_local_errors_are_not_remote_errors() -> None:
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_a_hello_nonce_and_proof_travel_each_on_its_own() -> None:
    # Found by the mutation test above: a nonce without a proof was dropped on encoding.
    base = Hello(NodeId("n"), "inc", 1, PROTOCOL_VERSION, (), (), ())
    for msg in (dataclasses.replace(base, nonce="abc"), dataclasses.replace(base, proof="p"),
                dataclasses.replace(base, nonce="abc", proof="p"), base):
        assert from_wire(to_wire(msg)) == msg


def test_a_hello_says_the_job_types_and_info_period_of_its_node_when_it_knows_them() -> None:
    base = Hello(NodeId("n"), "inc", 1, PROTOCOL_VERSION, (), (), ())
    said = dataclasses.replace(base, job_types=("fib", "sleep"), info_period=0.5)
    assert from_wire(to_wire(said)) == said
    assert "job_types" not in to_wire(base) and "info_period" not in to_wire(base)
    assert from_wire(to_wire(base)) == base  # an older node's: any type, period unknown
    for bad in ({"job_types": "fib"}, {"job_types": [1]}, {"job_types": ["x"] * 300},
                {"info_period": "soon"}):
        with pytest.raises(ProtocolError):
            from_wire({**to_wire(base), **bad})


# ------------------------------------------------ overdue_after (JOB) and overdue_ids (INFO)


def test_overdue_fields_travel_only_when_set() -> None:
    assert "overdue_ids" not in to_wire(Info(1, 2, 3, 4, 5, (A,)))
    assert to_wire(Info(1, 2, 3, 4, 5, (A, B), (B,)))["overdue_ids"] == [B]
    assert "overdue_after" not in to_wire(Job((SPEC, SPEC)))
    assert "overdue_after" not in to_wire(Job((SPEC, SPEC), (0.0, 0.0)))  # nothing known
    assert to_wire(Job((SPEC, SPEC), (0.0, 0.075)))["overdue_after"] == [0.0, 0.075]


def test_frames_without_the_overdue_fields_still_decode() -> None:  # older peers
    info = {"type": "INFO", "queued": 1, "running": 1, "slots": 2, "done": 0, "failed": 0,
            "running_ids": [A]}
    assert from_wire(info) == Info(1, 1, 2, 0, 0, (A,), ())
    assert from_wire({"type": "JOB", "jobs": [SPEC_WIRE]}) == Job((SPEC,), ())


def test_overdue_fields_round_trip() -> None:
    for msg in (Info(1, 2, 3, 4, 5, (A, B), (B,)), Job((SPEC, SPEC), (0.0, 0.075)),
                Job((SPEC,), (3600,))):
        assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(msg)))) == msg


@pytest.mark.parametrize("limits", [
    pytest.param([0.1], id="fewer-than-jobs"),
    pytest.param([0.1, 0.1, 0.1], id="more-than-jobs"),
    pytest.param([0.1, -0.1], id="negative"),
    pytest.param([0.1, float("nan")], id="nan"),
    pytest.param([0.1, float("inf")], id="infinite"),
    pytest.param([0.1, MAX_SECONDS * 2], id="over-a-year"),
    pytest.param([0.1, "0.1"], id="text"),
    pytest.param([0.1, True], id="bool"),
    pytest.param({"a": 0.1}, id="map"),
    pytest.param(0.1, id="number"),
])
def test_bad_overdue_after_is_rejected(limits: object) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire({"type": "JOB", "jobs": [SPEC_WIRE, SPEC_WIRE], "overdue_after": limits})


@pytest.mark.parametrize("ids", [[A, 1], "a", [None]])
def test_bad_overdue_ids_are_rejected(ids: object) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire({"type": "INFO", "queued": 0, "running": 0, "slots": 0, "done": 0,
                   "failed": 0, "overdue_ids": ids})


def test_a_job_frame_with_limits_that_do_not_match_is_a_local_bug() -> None:
    with pytest.raises(LocalProtocolError):
        to_wire(Job((SPEC, SPEC), (0.1,)))
    with pytest.raises(LocalProtocolError):
        to_wire(Info(1, 2, 3, 4, 5, (A, B), running_started=(1.0,)))


def test_an_info_says_when_its_running_jobs_started_only_when_it_can() -> None:
    assert "running_started" not in to_wire(Info(1, 2, 3, 4, 5, (A,)))
    info = Info(1, 2, 3, 4, 5, (A, B), running_started=(1.7e9, 0.0))
    assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(info)))) == info


@pytest.mark.parametrize("started", [[1.7e9], [1.7e9, "x"], [1.7e9, float("nan")], 1.7e9])
def test_bad_running_started_is_rejected(started: object) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire({"type": "INFO", "queued": 0, "running": 2, "slots": 2, "done": 0,
                   "failed": 0, "running_ids": [A, B], "running_started": started})


# -------------------------------------------------- the usual records' shortcut, against the rules

def _field_values() -> st.SearchStrategy[Any]:
    """Values near the edges of what a spec's or an outcome's fields take."""
    return st.one_of(
        st.text(max_size=4), st.sampled_from(["x" * MAX_ID_CHARS, "x" * (MAX_ID_CHARS + 1)]),
        st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(),
        st.sampled_from([math.nan, math.inf, -0.0, 1.5]),
        st.none(), st.lists(st.one_of(st.text(max_size=3), st.integers(0, 1)), max_size=3),
        st.sampled_from([["a"] * MAX_ARGS, ["a"] * (MAX_ARGS + 1), ["x" * (MAX_TEXT_CHARS + 1)],
                         "x" * (MAX_TEXT_CHARS + 1), {"priority": 1}]))


def _checked_or_error(check: Any, value: object, stored_as: JobId | None) -> object:
    try:
        return check(value, stored_as)
    except RemoteProtocolError as exc:
        return str(exc)


@settings(max_examples=1000)
@given(changes=st.lists(st.tuples(st.integers(0, 5), _field_values()), max_size=2),
       extra=st.sampled_from([(), ({},), ({"priority": 1},), (1,)]),
       stored=st.sampled_from([None, A]))
def test_the_shortcut_takes_and_refuses_what_the_full_checks_do(
        changes: list[tuple[int, Any]], extra: tuple[Any, ...], stored: JobId | None) -> None:
    """`spec_fields` and `outcome_fields` check the usual record at once: for a usual
    record with a field or two changed, and maybe one more, the same fields as the full
    checks, or the same error."""
    for shortcut, checked, usual in ((spec_fields, _spec_fields_checked, SPEC_WIRE),
                                     (outcome_fields, _outcome_fields_checked, OUTCOME_WIRE)):
        value = [*usual, *extra]
        for index, new in changes:
            value[index % len(usual)] = new
        assert (_checked_or_error(shortcut, value, stored)
                == _checked_or_error(checked, value, stored)), value


def test_the_shortcut_keeps_the_stored_id_and_the_usual_records() -> None:
    for shortcut, checked, usual in ((spec_fields, _spec_fields_checked, SPEC_WIRE),
                                     (outcome_fields, _outcome_fields_checked, OUTCOME_WIRE)):
        stored = JobId("".join(A))  # equal text, another string
        fields = shortcut(list(usual), stored)
        assert fields == checked(list(usual), stored) and fields[0] is stored
