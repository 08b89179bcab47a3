r"""A job's output as one line of text, safe to print: what `sh` results and `tail` lines
show of the bytes a command wrote.

Backslashes, newlines, CRs and tabs are escaped as `\\`, `\n`, `\r`, `\t`; the other
ASCII controls (and DEL) as `\xNN`, each byte that is not UTF-8 as `\xNN` too (NN from 80:
no character is written so), the C1 controls and the Unicode line and paragraph separators
as `\uNNNN`. So a result is one line for any reader (Python's
`splitlines()` also splits at FF, FS, NEL and U+2028), an escape sequence cannot clear an
`nc` user's screen, and binary output can be read back byte for byte.
"""

from __future__ import annotations

import re

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Lone surrogates U+DC80..U+DCFF: the bytes that were not UTF-8 (surrogateescape).
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code >= 0xDC80:
        return f"\\x{code - 0xDC00:02x}"  # the byte itself
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def output_text(raw: bytes) -> str:
    """`raw` bytes of output as one printable line."""
    return _UNSAFE.sub(_escaped, raw.decode("utf-8", errors="surrogateescape"))


_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Text a peer sent (a result, a live output line) as the one line a client is promised:
    its controls escaped as `output_text` escapes them; its backslashes are left as they
    are (a runner's text has them escaped already). Only a faulty or hostile runner sends
    a line break: one sent a `Ticket ID: …` line into other clients' answers."""
    return text if _BREAKING.search(text) is None else _BREAKING.sub(_escaped, text)
