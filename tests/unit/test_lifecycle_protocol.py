"""Parsing of the lifecycle commands (issue 6): submit options, cancel, list, json/text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_node.client_protocol import (
    Cancel,
    Invalid,
    List,
    SetMode,
    Submit,
    parse_command,
)
from common.jobs import JobId

TYPES = frozenset({"sleep", "fib", "sh"})


@pytest.mark.parametrize(("line", "expected"), [
    (b"submit --priority 5 fib 90", Submit("fib", ("90",), priority=5)),
    (b"submit --priority=-3 fib 90", Submit("fib", ("90",), priority=-3)),
    (b"submit --delay 2.5 sleep 10", Submit("sleep", ("10",), delay=2.5)),
    (b"submit --timeout 30 --retries 2 sh  sleep 1;  echo --x",
     Submit("sh", ("sleep 1;  echo --x",), timeout=30.0, retries=2)),
    (b"SUBMIT --retries 0 fib 1", Submit("fib", ("1",), retries=0)),
    (b"submit fib 90", Submit("fib", ("90",))),
    (b"cancel abc", Cancel(JobId("abc"))),
    (b"list", List("all", 100)),
    (b"list done", List("done", 100)),
    (b"list 5", List("all", 5)),
    (b"list FAILED 7", List("failed", 7)),
    (b"json", SetMode(True)),
    (b"TEXT", SetMode(False)),
])
def test_parses(line: bytes, expected: object) -> None:
    assert parse_command(line, TYPES) == expected


@pytest.mark.parametrize(("line", "says"), [
    (b"submit --priority x fib 1", "--priority takes a whole number"),
    (b"submit --priority 1000001 fib 1",
     "--priority must be from -1000000 to 1000000, got '1000001'"),  # not 1e+06
    (b"submit --delay -1 fib 1", "--delay must be from 0 to 2592000, got '-1'"),
    (b"submit --delay nan fib 1", "--delay must be from 0"),
    (b"submit --timeout 0 fib 1", "--timeout must be from 0.001 to 604800, got '0'"),
    (b"submit --retries 101 fib 1", "--retries must be from 0 to 100"),
    (b"submit --retries", "--retries needs a value"),
    (b"submit --bogus 1 fib 1", "unknown option '--bogus'"),
    (b"submit --priority 1", "usage: submit [options]"),
    (b"cancel", "cancel takes one ticket"),
    (b"cancel a b", "cancel takes one ticket"),
    (b"list nope", "usage: list [state] [limit]"),
    (b"list 0", "limit from 1 to 10000"),
    (b"list done 5 6", "usage: list"),
    (b"list 1 2", "usage: list"),  # it listed 2
    (b"list done failed", "usage: list"),
    (b"json please", "json takes no arguments"),
])
def test_refuses_with_a_reason(line: bytes, says: str) -> None:
    cmd = parse_command(line, TYPES)
    assert isinstance(cmd, Invalid), cmd
    assert says in cmd.reason, cmd.reason


WORDS = st.sampled_from(["submit", "--priority", "--delay", "--timeout", "--retries",
                         "--priority=", "1", "-1", "1e400", "nan", "inf", "0", "fib", "sh",
                         "sleep", "cancel", "list", "tail", "json", "text", "done", "99999"])


@given(st.lists(st.one_of(WORDS, st.text(max_size=8)), max_size=8))
def test_any_mix_of_options_parses_to_a_command_or_a_reason(words: list[str]) -> None:
    cmd = parse_command(" ".join(words).encode(), TYPES)
    if isinstance(cmd, Submit):
        assert -1_000_000 <= cmd.priority <= 1_000_000
        assert 0 <= cmd.delay <= 30 * 86_400 and 0 <= cmd.timeout <= 7 * 86_400
        assert cmd.retries is None or 0 <= cmd.retries <= 100
    elif isinstance(cmd, Invalid):
        assert cmd.reason
