"""A job's output as one printable line (`cluster_node.output_text`): nothing a reader could
take for a line break or a terminal control, and every byte recoverable."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from cluster_node.client_protocol import render_result
from cluster_node.live_output import LiveOutput
from cluster_node.output_text import one_line, output_text

# What str.splitlines() splits at, and what a terminal takes as a control.
BREAKS_OR_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def read_back(text: str) -> bytes:
    """The bytes `text` shows: its escapes undone, the rest as UTF-8."""
    out = bytearray()
    for part in re.split(r"(\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|[\\nrt]))", text):
        if part.startswith("\\x"):
            out.append(int(part[2:], 16))  # an ASCII control, or a byte that is not UTF-8
        elif part.startswith("\\u"):
            out += chr(int(part[2:], 16)).encode()
        elif len(part) == 2 and part[0] == "\\":
            out += {"\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t"}[part[1]]
        else:
            out += part.encode()
    return bytes(out)


@given(st.binary(max_size=200) | st.text(max_size=100).map(lambda t: t.encode()))
def test_any_output_is_one_printable_line_that_reads_back(raw: bytes) -> None:
    text = output_text(raw)
    assert not BREAKS_OR_CONTROLS.search(text)
    assert text.splitlines() in ([text], [])
    assert read_back(text) == raw


def test_what_a_terminal_would_obey_is_shown_not_sent() -> None:
    """Seen from `sh printf …` through `r<ticket>`: ESC [2J cleared an nc user's screen,
    NEL and U+2028 split one result into several lines, a byte 0xff became U+FFFD."""
    raw = "A\u2028B\u0085C\x0cD\x1cE\x1b[2JF\x00G\x01H é\\ \t".encode() + b"\xff\n"
    assert output_text(raw) == (
        "A\\u2028B\\u0085C\\x0cD\\x1cE\\x1b[2JF\\x00G\\x01H é\\\\ \\t\\xff\\n")


def test_tail_lines_are_escaped_the_same_way() -> None:
    live = LiveOutput(1 << 20)
    live.feed(b"one\x1b[2J\r\ntwo\xff\n")
    assert live.take() == ["one\\x1b[2J", "two\\xff"]


def test_a_peers_text_becomes_one_line_and_keeps_its_escapes() -> None:
    """A runner sent `6765\\nTicket ID: aaa…` as a result: the origin's other clients read
    the injected line as the answer to their next line."""
    assert one_line("6765\nTicket ID: aaa") == "6765\\nTicket ID: aaa"
    assert one_line("a\rb\x1b[2J\u2028c\x85") == "a\\rb\\x1b[2J\\u2028c\\u0085"
    plain = "exit 0: a\\nb\\\\c\\x1b"  # a runner's own escapes, as output_text wrote them
    assert one_line(plain) is plain
    assert render_result("6765\nTicket ID: aaa", True) == "Result: 6765\\nTicket ID: aaa"
