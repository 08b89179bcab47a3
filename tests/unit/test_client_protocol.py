"""Unit tests for `cluster_node.client_protocol`: one line to one command (table tests), and
`LineSplitter` under every chunking, over-long lines and arbitrary bytes."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_node.client_protocol import (
    DEFAULT_WAIT_SECONDS,
    MAX_LINE_BYTES,
    MAX_WAIT_SECONDS,
    Command,
    Empty,
    GetAll,
    GetResult,
    Help,
    Invalid,
    LineSplitter,
    LineTooLong,
    Quit,
    ShowStats,
    Status,
    Submit,
    Wait,
    parse_command,
    render_error,
    render_result,
    render_ticket,
    render_unknown,
)
from cluster_node.jobtypes import BUILTIN_TYPES, MAX_SH_COMMAND_CHARS, JobContext
from common.errors import InvalidJob
from common.jobs import JobId, NodeId

FUZZ = settings(max_examples=150, deadline=None)

TICKET = "abcdefghijklmnopqrstuvwx"
T = JobId(TICKET)
JOB_TYPES = frozenset({"sleep", "fib", "sh"})


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes | LineTooLong]:
    out: list[bytes | LineTooLong] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


# ---------------------------------------------------------------------------- commands


@pytest.mark.parametrize("line, expected", [
    # the original's four commands, to the letter
    (b"1500", Submit("sleep", ("1500",))),
    (b"0", Submit("sleep", ("0",))),
    (b"  1500  ", Submit("sleep", ("1500",))),
    (b"r" + TICKET.encode(), GetResult(T, legacy=True)),
    (b"rx", GetResult(JobId("x"), legacy=True)),
    (b"r " + TICKET.encode(), GetResult(T, legacy=True)),
    (b"R" + TICKET.encode(), GetResult(T, legacy=True)),  # as SLEEP, SUBMIT, Exit
    (b"R " + TICKET.encode(), GetResult(T, legacy=True)),
    (b"getall", GetAll()),
    (b"GETALL", GetAll()),
    (b"GetAll", GetAll()),
    (b"exit", Quit()),
    (b"EXIT", Quit()),
    (b"quit", Quit()),
    # additions
    (b"result " + TICKET.encode(), GetResult(T, legacy=False)),
    (b"RESULT " + TICKET.encode(), GetResult(T, legacy=False)),
    (b"status " + TICKET.encode(), Status(T)),
    (b"wait " + TICKET.encode(), Wait(T, DEFAULT_WAIT_SECONDS)),
    (b"wait " + TICKET.encode() + b" 5", Wait(T, 5.0)),
    (b"wait " + TICKET.encode() + b" 2.5", Wait(T, 2.5)),
    (b"wait " + TICKET.encode() + b" 0", Wait(T, 0.0)),
    (b"wait " + TICKET.encode() + b" 3600", Wait(T, MAX_WAIT_SECONDS)),
    (b"help", Help()),
    (b"HELP", Help()),
    (b"stats", ShowStats()),
    (b"submit fib 90", Submit("fib", ("90",))),
    (b"SUBMIT FIB 90", Submit("fib", ("90",))),
    (b"submit sleep 100", Submit("sleep", ("100",))),
    (b"submit nosuchtype a b", Submit("nosuchtype", ("a", "b"))),
    (b"submit sh echo  hi", Submit("sh", ("echo  hi",))),
    (b"  submit   sh   echo  hi  ", Submit("sh", ("echo  hi",))),
    (b"submit sh", Submit("sh", ())),
    (b"", Empty()),
    (b"   ", Empty()),
    (b"\t \t", Empty()),
])
def test_parse_command(line: bytes, expected: Command) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize("line, expected", [
    (b"fib 90", Submit("fib", ("90",))),
    (b"FIB 90", Submit("fib", ("90",))),
    (b"sleep 100", Submit("sleep", ("100",))),
    (b"sh echo  hi", Submit("sh", ("echo  hi",))),
    (b"sh   echo \t hi  ", Submit("sh", ("echo \t hi",))),
    (b"sh ls -l | wc -l", Submit("sh", ("ls -l | wc -l",))),
    (b"sh", Submit("sh", ())),
    (b"fib", Submit("fib", ())),  # the validator, not the parser, rejects missing args
    (b"1500", Submit("sleep", ("1500",))),
    (b"getall", GetAll()),
    (b"submit fib 90", Submit("fib", ("90",))),
])
def test_job_type_as_command(line: bytes, expected: Command) -> None:
    assert parse_command(line, JOB_TYPES) == expected


def test_keywords_win_over_job_types_of_the_same_name() -> None:
    assert parse_command(b"status " + TICKET.encode(), frozenset({"status"})) == Status(T)
    assert parse_command(b"help", frozenset({"help"})) == Help()


@pytest.mark.parametrize("line, fragment", [
    (b"fib 90", "unknown command"),  # no job types given: not a submission
    (b"foo", "unknown command"),
    (b"1500 2", "unknown command"),
    (b"-5", "unknown command"),
    (b"1.5", "unknown command"),
    ("\u0661\u0662\u0663".encode(), "unknown command"),  # Arabic-Indic digits: not ms
    (b"r", "unknown command"),
    (b"r a b", "unknown command"),
    (b"result", "result takes one ticket"),
    (b"result a b", "result takes one ticket"),
    (b"status", "status takes one ticket"),
    (b"wait", "usage: wait"),
    (b"wait a 1 2", "usage: wait"),
    (b"wait a x", "seconds must be a number"),
    (b"wait a -1", "from 0 to 3600"),
    (b"wait a 3600.5", "from 0 to 3600"),
    (b"wait a nan", "from 0 to 3600"),
    (b"wait a inf", "from 0 to 3600"),
    (b"getall now", "getall takes no arguments"),
    (b"exit 1", "exit takes no arguments"),
    (b"help me", "help takes no arguments"),
    (b"stats x", "stats takes no arguments"),
    (b"submit", "usage: submit"),
    (b"SUBMIT", "usage: submit"),
    (b"\xff\xfe", "not UTF-8"),
    (b"getall\xc3", "not UTF-8"),
    (b"get\x00all", "NUL"),
    (b"\x00", "NUL"),
])
def test_invalid_lines(line: bytes, fragment: str) -> None:
    command = parse_command(line, frozenset())
    assert isinstance(command, Invalid)
    assert fragment in command.reason


def test_unknown_command_echo_is_bounded() -> None:
    command = parse_command(b"x" * 5000)
    assert isinstance(command, Invalid)
    assert len(command.reason) < 200


@given(st.binary(max_size=200))
@FUZZ
def test_parse_never_raises(raw: bytes) -> None:
    command = parse_command(raw, JOB_TYPES)
    assert command is not None


# ---------------------------------------------------------------------------- replies


def test_renderers() -> None:
    assert render_ticket(T) == f"Ticket ID: {TICKET}"
    assert render_result("55", ok=True) == "Result: 55"
    assert render_result("boom", ok=False) == "Result: FAILED: boom"
    assert render_error("nope") == "ERR nope"
    assert render_unknown("zz").startswith("ERR unknown ticket 'zz'")
    assert len(render_unknown("z" * 10_000)) < 200


# ---------------------------------------------------------------------------- splitter


@pytest.mark.parametrize("data, expected", [
    (b"a\n", [b"a"]),
    (b"a\r\n", [b"a"]),
    (b"a\nb\r\nc\n", [b"a", b"b", b"c"]),
    (b"\n\r\n", [b"", b""]),
    (b"a\rb\n", [b"a\rb"]),  # a lone CR is data
    (b"abc", []),  # not finished yet
])
def test_splitter_lines(data: bytes, expected: list[bytes]) -> None:
    assert LineSplitter().feed(data) == expected


@pytest.mark.parametrize("data", [b"1500\r\ngetall\nr" + TICKET.encode() + b"\r\n",
                                  b"x" * 40 + b"\nok\n"])
def test_splitter_byte_at_a_time_matches_whole(data: bytes) -> None:
    whole = LineSplitter(16).feed(data)
    one = LineSplitter(16)
    assert feed_all(one, [data[i:i + 1] for i in range(len(data))]) == whole


def test_line_of_exactly_the_limit_is_accepted() -> None:
    assert LineSplitter(8).feed(b"x" * 8 + b"\n") == [b"x" * 8]


@pytest.mark.parametrize("bytewise", [False, True])
def test_over_long_line_one_error_then_resync(bytewise: bool) -> None:
    data = b"y" * 100 + b"\r\nhelp\n"
    splitter = LineSplitter(8)
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    assert feed_all(splitter, chunks) == [LineTooLong(8), b"help"]
    assert splitter.feed(b"exit\n") == [b"exit"]


def test_over_long_line_across_many_feeds_gives_one_error() -> None:
    splitter = LineSplitter(8)
    out = feed_all(splitter, [b"z" * 20, b"z" * 20, b"z" * 20, b"\nok\n"])
    assert out == [LineTooLong(8), b"ok"]


def test_default_limit() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a" * MAX_LINE_BYTES + b"\n") == [b"a" * MAX_LINE_BYTES]
    assert splitter.feed(b"a" * (MAX_LINE_BYTES + 1) + b"\nok\n") == [
        LineTooLong(MAX_LINE_BYTES), b"ok"]


@pytest.mark.parametrize("data, expected", [
    (b"getall", [b"getall"]),
    (b"getall\r", [b"getall"]),
    (b"a\nlast", [b"a", b"last"]),
    (b"a\n", [b"a"]),
    (b"", []),
])
def test_finish_keeps_an_unterminated_last_line(data: bytes, expected: list[bytes]) -> None:
    splitter = LineSplitter()
    assert splitter.feed(data) + splitter.finish() == expected
    assert splitter.finish() == []


def test_finish_inside_an_over_long_line_gives_nothing_more() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"q" * 30) == [LineTooLong(8)]
    assert splitter.finish() == []
    assert splitter.feed(b"ok\n") == [b"ok"]  # finish() resets the splitter


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 1000), max_size=20),
       limit=st.integers(1, 32))
@FUZZ
def test_any_bytes_any_split(data: bytes, cuts: list[int], limit: int) -> None:
    whole_splitter = LineSplitter(limit)
    whole = whole_splitter.feed(data) + whole_splitter.finish()
    splitter = LineSplitter(limit)
    got = feed_all(splitter, split_at(data, cuts)) + splitter.finish()
    for item in got:
        assert isinstance(item, LineTooLong) or len(item) <= limit
    assert got == whole


@given(lines=st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), max_size=10),
       cuts=st.lists(st.integers(0, 1000), max_size=20))
@FUZZ
def test_short_lines_come_back_whole(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    got = feed_all(LineSplitter(64), split_at(data, cuts))
    assert got == [line[:-1] if line.endswith(b"\r") else line for line in lines]


def test_line_of_exactly_the_limit_is_accepted_with_crlf() -> None:
    assert LineSplitter(8).feed(b"x" * 8 + b"\r\n") == [b"x" * 8]


@pytest.mark.parametrize("arg, canonical, error", [
    ("0" * 40 + "1", "1", None),  # leading zeros: refused as "not a whole number" before
    ("0" * 5000, "0", None),
    ("9" * 13, None, "sleep argument must be from 0 to 86400000, got a number of 13 digits"),
    ("9" * 5000, None, "got a number of 5000 digits"),  # never given to int(): it raises
    ("1e3", None, "must be a whole number from 0 to 86400000, got '1e3'"),
    ("x" * 50, None, "got '" + "x" * 40 + "'…"),  # cut, and says so
])
def test_a_number_argument_is_read_whatever_its_length(arg: str, canonical: str | None,
                                                       error: str | None) -> None:
    ctx = JobContext(NodeId("n"), allow_shell=False, sh_timeout=1.0, sh_output_limit=100,
                     cpu_pool=None)
    sleep = {t.name: t for t in BUILTIN_TYPES}["sleep"]
    if error is None:
        assert sleep.validate((arg,), ctx) == (canonical,)
    else:
        with pytest.raises(InvalidJob) as refused:
            sleep.validate((arg,), ctx)
        assert error in str(refused.value)


def test_longest_valid_sh_command_fits_in_a_line() -> None:
    command = "\u00e9" * MAX_SH_COMMAND_CHARS  # two bytes each in UTF-8
    ctx = JobContext(NodeId("n"), allow_shell=True, sh_timeout=1.0, sh_output_limit=100,
                     cpu_pool=None)
    sh = {t.name: t for t in BUILTIN_TYPES}["sh"]
    assert sh.validate((command,), ctx) == (command,)
    line = ("submit sh " + command).encode()
    assert LineSplitter().feed(line + b"\n") == [line]
