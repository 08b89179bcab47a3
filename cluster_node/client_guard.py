"""Who may use a client connection, and for what. Pure: it screens lines before the line
protocol parses them.

With CLIENT_TOKEN set, a connection must send `auth <token>` before any other command (only
`exit` / `quit` pass without it); three wrong tokens close the connection. With ALLOW_LIST=0,
`getall` and `list` are refused: a client then sees only the tickets it holds.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

# Wrong tokens one connection may try before it is closed (guessing costs a reconnect).
MAX_AUTH_FAILURES = 3
LISTING_COMMANDS = frozenset({"getall", "list"})
OPEN_COMMANDS = frozenset({"exit", "quit"})


@dataclass(frozen=True, slots=True)
class Verdict:
    line: str  # the reply to the client: "OK ..." or "ERR ..."
    keep_open: bool = True

    @property
    def obj(self) -> dict[str, str]:
        """The same reply for a client in json mode."""
        word, _, rest = self.line.partition(" ")
        return {"error": rest} if word == "ERR" else {"ok": rest}


class ClientGuard:
    def __init__(self, token: str | None, allow_list: bool) -> None:
        self._token = token.encode() if token else None
        self._allow_list = allow_list
        self.authenticated = self._token is None
        self.failures = 0

    def screen(self, line: bytes) -> Verdict | None:
        """None: hand the line to the protocol. Else the answer, and the line goes no further."""
        words = line.split(None, 1)
        if not words:
            return None
        first = words[0].lower()
        if first == b"auth":
            return self._auth(words[1].strip() if len(words) > 1 else b"")
        if not self.authenticated and first.decode(errors="replace") not in OPEN_COMMANDS:
            return Verdict("ERR authenticate first: auth <token>")
        if not self._allow_list and first.decode(errors="replace") in LISTING_COMMANDS:
            return Verdict("ERR listing is disabled on this node (ALLOW_LIST=0)")
        return None

    def _auth(self, given: bytes) -> Verdict:
        if self._token is None:
            return Verdict("OK this node needs no authentication")
        if hmac.compare_digest(given, self._token):
            self.authenticated = True
            return Verdict("OK authenticated")
        self.failures += 1
        if self.failures >= MAX_AUTH_FAILURES:
            return Verdict("ERR authentication failed, closing", keep_open=False)
        return Verdict("ERR authentication failed")
