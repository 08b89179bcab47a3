"""Unit tests for `common.framing`: the length prefix, `FrameDecoder` under every chunking,
garbage from a peer, and the frame size limits."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from common.framing import (
    HEADER,
    MAX_FRAME_BYTES,
    SOFT_FRAME_BYTES,
    FrameDecoder,
    decode_body,
    encode_frame,
)
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import (
    MAX_TEXT_CHARS,
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
    to_wire,
)
from tests.strategies import messages, msgpack_values

FUZZ = settings(max_examples=200, deadline=None)
# Nested arbitrary data is slower to draw; fewer examples keep the file fast.
FUZZ_NESTED = settings(max_examples=100, deadline=None)

A, B = JobId("a" * 24), JobId("b" * 24)
SPEC = JobSpec(A, "sleep", ("1500",), NodeId("node-a"), 1_700_000_000.5)
OUTCOME = Outcome(A, True, "slept 1500 ms ✓", NodeId("node-b"), 1_700_000_000.5, 1.7e9 + 2)

EXAMPLES: list[Message] = [
    Hello(NodeId("node-a"), "inc-1", 4, 1, (A,), (), (B,)),
    Welcome("proxy-1"),
    Challenge("00" * 16),
    Refused("node-a is already connected"),
    Info(1, 2, 4, 100, 3),
    Job((SPEC, SPEC)),
    Ack(AckOf.JOB, (A, B)),
    RequestOfRes((A,)),
    Result((OUTCOME,)),
    ResReq((OUTCOME,), (B,)),
    Revoke((A, B)),
    Abandon((A, B)),
    Returned(()),
    Unknown((JobId("no-such-ticket"),)),
    Stats(3, (NodeStats(NodeId("node-a"), True, 4, 1, 2, 10, 1, 0),)),
    StatusQuery((A,)),
    StatusReply((JobStatus(A, "done", "node-b", 1),)),
    Cancel((A, B)),
    Output(A, ("line 1", "")),
    Leaving("stopping"),
]
PARAMS = [pytest.param(m, id=type(m).__name__) for m in EXAMPLES]
STREAM = b"".join(encode_frame(m) for m in EXAMPLES)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at every position in `cuts` (taken modulo `len(data) + 1`)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in pairwise([0, *points, len(data)])]


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def packb(obj: object, **options: Any) -> bytes:
    packed = msgpack.packb(obj, **{"use_bin_type": True, **options})
    assert isinstance(packed, bytes)
    return packed


def decode_chunks(chunks: list[bytes], decoder: FrameDecoder | None = None) -> list[Message]:
    dec = decoder if decoder is not None else FrameDecoder()
    got: list[Message] = []
    for chunk in chunks:
        got += dec.feed(chunk)
    return got


def decode_or_reject(data: bytes) -> list[Message] | None:
    """Feed `data`; the only acceptable failure is `RemoteProtocolError`."""
    try:
        return FrameDecoder().feed(data)
    except RemoteProtocolError:
        return None


# ---------------------------------------------------------------------------- layout


def test_split_at() -> None:
    assert split_at(b"abcdef", [2, 4]) == [b"ab", b"cd", b"ef"]
    assert split_at(b"abc", []) == [b"abc"]
    assert split_at(b"abc", [0, 3, 7]) == [b"", b"abc", b""]  # 7 % 4 == 3
    assert b"".join(split_at(STREAM, [5, 99, 3, 5, 10_000])) == STREAM


def test_header_is_four_bytes_big_endian() -> None:
    assert HEADER.size == 4
    assert HEADER.pack(0x01020304) == b"\x01\x02\x03\x04"


def test_limits_are_consistent() -> None:
    assert 0 < SOFT_FRAME_BYTES < MAX_FRAME_BYTES < 2**32


@pytest.mark.parametrize("msg", PARAMS)
def test_frame_layout(msg: Message) -> None:
    encoded = encode_frame(msg)
    body = encoded[HEADER.size:]
    assert encoded[:HEADER.size] == len(body).to_bytes(4, "big")
    assert body == packb(to_wire(msg))
    assert decode_body(body) == msg


def test_message_types_covered() -> None:
    assert {to_wire(m)["type"] for m in EXAMPLES} == {str(t) for t in MessageType}


@pytest.mark.parametrize("not_a_message", [None, b"", {"type": "WELCOME", "proxy_id": "p"}, SPEC])
def test_encode_frame_rejects_what_is_not_a_message(not_a_message: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(not_a_message)


def test_encode_frame_refuses_oversized_frames() -> None:
    big = "x" * MAX_TEXT_CHARS
    huge = Result(tuple(Outcome(A, True, big, NodeId("n"), 0.0, 0.0) for _ in range(5)))
    with pytest.raises(LocalProtocolError):
        encode_frame(huge)


# ---------------------------------------------------------------------------- valid streams


@pytest.mark.parametrize("msg", PARAMS)
def test_round_trip(msg: Message) -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(msg)) == [msg]
    assert dec.buffered == 0


def test_whole_stream_at_once() -> None:
    dec = FrameDecoder()
    assert dec.feed(STREAM) == EXAMPLES
    assert dec.buffered == 0


def test_one_byte_at_a_time() -> None:
    frame_ends: set[int] = set()
    end = 0
    for msg in EXAMPLES:
        end += len(encode_frame(msg))
        frame_ends.add(end)
    dec, got = FrameDecoder(), list[Message]()
    for i in range(len(STREAM)):
        out = dec.feed(STREAM[i:i + 1])
        # A message comes out exactly when the last byte of its frame goes in.
        assert len(out) == (1 if i + 1 in frame_ends else 0)
        got += out
    assert got == EXAMPLES
    assert dec.buffered == 0


def test_trailing_partial_frame_is_kept() -> None:
    complete = STREAM
    last_msg = Job((SPEC,))
    last = encode_frame(last_msg)
    for size in range(1, len(last)):
        dec = FrameDecoder()
        assert dec.feed(complete + last[:size]) == EXAMPLES
        assert dec.buffered == size
        assert dec.feed(last[size:]) == [last_msg]
        assert dec.buffered == 0


def test_partial_header_waits() -> None:
    dec, encoded = FrameDecoder(), encode_frame(EXAMPLES[0])
    for i in range(HEADER.size):
        assert dec.feed(encoded[i:i + 1]) == []
        assert dec.buffered == i + 1
    assert dec.feed(encoded[HEADER.size:]) == [EXAMPLES[0]]


def test_empty_feeds_change_nothing() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0
    encoded = encode_frame(EXAMPLES[0])
    assert dec.feed(encoded[:7]) == []
    assert dec.feed(b"") == []
    assert dec.buffered == 7
    assert dec.feed(encoded[7:]) == [EXAMPLES[0]]
    assert dec.feed(b"") == []


def test_decoders_do_not_share_buffers() -> None:
    first, second = FrameDecoder(), FrameDecoder()
    first.feed(STREAM[:10])
    assert second.buffered == 0
    assert second.feed(STREAM) == EXAMPLES
    assert first.buffered == 10


@FUZZ
@given(msg=messages())
def test_any_message_round_trips_through_a_frame(msg: Message) -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(msg)) == [msg]
    assert dec.buffered == 0


@FUZZ
@given(msgs=st.lists(messages(), max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_decodes_the_same(msgs: list[Message], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    assert decode_chunks(split_at(wire, cuts), dec) == msgs
    assert dec.buffered == 0


@FUZZ
@given(msgs=st.lists(messages(), max_size=4), last=messages(), data=st.data())
def test_any_split_with_trailing_partial_frame(
    msgs: list[Message], last: Message, data: st.DataObject,
) -> None:
    tail = encode_frame(last)
    size = data.draw(st.integers(1, len(tail) - 1), label="partial bytes")
    wire = b"".join(encode_frame(m) for m in msgs) + tail[:size]
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=10), label="cuts")
    dec = FrameDecoder()
    assert decode_chunks(split_at(wire, cuts), dec) == msgs
    assert dec.buffered == size
    assert dec.feed(tail[size:]) == [last]
    assert dec.buffered == 0


# ---------------------------------------------------------------------------- garbage from a peer


@FUZZ
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_are_rejected(data: bytes) -> None:
    decode_or_reject(data)


@FUZZ
@given(body=st.binary(max_size=200), extra=st.binary(max_size=8))
def test_arbitrary_body_with_a_correct_prefix_decodes_or_is_rejected(
    body: bytes, extra: bytes,
) -> None:
    # A correct prefix gets the bytes past the size check and into msgpack.
    decode_or_reject(frame(body) + extra)


def _odd_keyed_maps() -> st.SearchStrategy[dict[Any, object]]:
    keys = st.one_of(st.integers(-3, 3), st.binary(max_size=4), st.none(), st.floats())
    return st.dictionaries(keys, msgpack_values(5), min_size=1, max_size=3)


@FUZZ_NESTED
@given(obj=st.one_of(msgpack_values(), _odd_keyed_maps()), use_bin_type=st.booleans())
def test_arbitrary_msgpack_decodes_or_is_rejected(obj: object, use_bin_type: bool) -> None:
    # Without use_bin_type, str and bytes both go out as the old raw type.
    decode_or_reject(frame(packb(obj, use_bin_type=use_bin_type)))


SMALL_MESSAGES = messages(max_items=2)
MUTATIONS = st.sampled_from(["flip", "insert", "delete"])


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """The body of a valid frame with a few bytes flipped, inserted or deleted."""
    body = bytearray(encode_frame(draw(SMALL_MESSAGES))[HEADER.size:])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(MUTATIONS)
        at = draw(st.integers(0, len(body)))
        if action == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(body) and action == "delete":
            del body[at:at + draw(st.integers(1, 4))]
        elif at < len(body):
            body[at] ^= draw(st.integers(1, 255))
    return bytes(body)


@FUZZ
@given(body=mutated_bodies(), after=SMALL_MESSAGES)
def test_mutated_frames_decode_or_are_rejected(body: bytes, after: Message) -> None:
    # The prefix is correct for the mutated body, so a frame that decodes leaves the
    # stream in sync: the next frame must come out whole.
    got = decode_or_reject(frame(body) + encode_frame(after))
    if got is not None:
        assert len(got) == 2
        assert got[1] == after


INVALID_BODIES: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc1", id="never-used-byte"),
    pytest.param(packb(to_wire(EXAMPLES[0]))[:-1], id="truncated"),
    pytest.param(packb(to_wire(EXAMPLES[1])) * 2, id="two-objects"),
    pytest.param(packb(to_wire(EXAMPLES[1])) + b"\x00", id="trailing-byte"),
    pytest.param(b"\x82\xa4type\xa7WELCOME\xa8proxy_id\xa2\xff\xfe", id="invalid-utf8"),
    pytest.param(packb({1: "WELCOME"}), id="int-key"),
    pytest.param(packb({None: "WELCOME"}), id="nil-key"),
    pytest.param(packb({b"type": "WELCOME", b"proxy_id": "p"}), id="bin-keys"),
    pytest.param(packb({"type": b"WELCOME", "proxy_id": "p"}), id="bin-type"),
    pytest.param(packb({"type": "WELCOME", "proxy_id": b"p"}), id="bin-field"),
    pytest.param(packb(["WELCOME", "p"]), id="array"),
    pytest.param(packb("WELCOME"), id="str"),
    pytest.param(packb(None), id="nil"),
    pytest.param(packb({"type": "WELCOME", "proxy_id": msgpack.ExtType(1, b"p")}), id="ext"),
    pytest.param(
        packb({"type": "JOB", "jobs": [[A, "sleep", [], "n", msgpack.Timestamp(1, 0)]]}),
        id="timestamp-ext",
    ),
    pytest.param(b"\xd4\xff\x00", id="bad-timestamp-ext"),
    pytest.param(packb({"type": "JOB", "jobs": [[A, "sleep", [], "n", math.nan]]}), id="nan"),
    pytest.param(packb({"type": "INFO", "queued": 2**64 - 1, "running": 0, "slots": 0,
                        "done": 0, "failed": 0}), id="uint64"),
    pytest.param(b"\x91" * 100_000 + b"\xc0", id="deeply-nested"),
    pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-huge-count"),
    pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-huge-count"),
    pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-huge-length"),
    pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-huge-length"),
    pytest.param(packb({"type": "NOPE"}), id="unknown-type"),
    pytest.param(packb({"type": "ACK", "of": "job", "ids": []}), id="ack-of-lowercase"),
]


@pytest.mark.parametrize("body", INVALID_BODIES)
def test_invalid_body_is_rejected(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(body)
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(frame(body))


@pytest.mark.parametrize("body", INVALID_BODIES)
def test_invalid_body_is_rejected_byte_by_byte(body: bytes) -> None:
    dec, data = FrameDecoder(), frame(body)
    for i in range(len(data) - 1):
        assert dec.feed(data[i:i + 1]) == []
    with pytest.raises(RemoteProtocolError):
        dec.feed(data[-1:])


def test_invalid_body_after_valid_frames_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(STREAM + frame(b"\xc1"))


def test_undecodable_body_error_names_the_cause() -> None:
    with pytest.raises(RemoteProtocolError, match="undecodable") as info:
        decode_body(b"\xc1")
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------- size limits


@pytest.mark.parametrize("length", [MAX_FRAME_BYTES + 1, 2 * MAX_FRAME_BYTES, 2**32 - 1])
def test_oversized_prefix_is_rejected_before_the_body(length: int) -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(HEADER.pack(length))  # the header alone: no body is awaited


@pytest.mark.parametrize("length", [MAX_FRAME_BYTES + 1, 2**32 - 1])
def test_oversized_prefix_is_rejected_on_its_last_byte(length: int) -> None:
    dec, header = FrameDecoder(), HEADER.pack(length)
    for i in range(HEADER.size - 1):
        assert dec.feed(header[i:i + 1]) == []
    with pytest.raises(FrameTooLarge):
        dec.feed(header[-1:])


def test_oversized_prefix_after_valid_frames_is_rejected() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(STREAM + HEADER.pack(MAX_FRAME_BYTES + 1))


def test_frame_too_large_is_a_remote_protocol_error() -> None:
    assert issubclass(FrameTooLarge, RemoteProtocolError)
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(HEADER.pack(2**32 - 1))


def test_prefix_at_the_default_limit_waits_for_the_body() -> None:
    dec = FrameDecoder()
    assert dec.feed(HEADER.pack(MAX_FRAME_BYTES)) == []
    assert dec.buffered == HEADER.size


@pytest.mark.parametrize("msg", PARAMS)
def test_frame_exactly_at_a_custom_limit_decodes(msg: Message) -> None:
    encoded = encode_frame(msg)
    limit = len(encoded) - HEADER.size
    dec = FrameDecoder(max_frame_bytes=limit)
    assert dec.feed(encoded) == [msg]
    assert dec.feed(encoded + encoded) == [msg, msg]
    assert dec.buffered == 0


@pytest.mark.parametrize("msg", PARAMS)
def test_frame_one_byte_over_a_custom_limit_is_rejected(msg: Message) -> None:
    encoded = encode_frame(msg)
    dec = FrameDecoder(max_frame_bytes=len(encoded) - HEADER.size - 1)
    with pytest.raises(FrameTooLarge):
        dec.feed(encoded[:HEADER.size])


def test_custom_limit_applies_to_every_frame() -> None:
    small, large = encode_frame(Welcome("p")), encode_frame(Job((SPEC,)))
    dec = FrameDecoder(max_frame_bytes=len(small) - HEADER.size)
    assert dec.feed(small) == [Welcome("p")]
    with pytest.raises(FrameTooLarge):
        dec.feed(large)


@FUZZ
@given(msg=messages(), slack=st.integers(0, 3))
def test_any_frame_within_a_custom_limit_decodes(msg: Message, slack: int) -> None:
    encoded = encode_frame(msg)
    dec = FrameDecoder(max_frame_bytes=len(encoded) - HEADER.size + slack)
    assert dec.feed(encoded) == [msg]
