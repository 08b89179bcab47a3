"""A tiny blocking client of the line protocol, for the `djs submit/result/wait` commands."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence


class LineClient:
    def __init__(self, host: str, port: int, timeout: float = 10.0,
                 token: str | None = None) -> None:
        """`token` (default: the CLIENT_TOKEN environment variable) is sent as `auth` first."""
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rwb")
        token = token if token is not None else os.environ.get("CLIENT_TOKEN")
        if token:
            reply = self.ask(f"auth {token}")
            if not reply.startswith("OK"):
                self.close()
                raise ConnectionError(f"the node refused CLIENT_TOKEN: {reply}")

    def ask(self, line: str) -> str:
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        return self.read_line()

    def send_lines(self, lines: Sequence[str]) -> None:
        self._file.write("".join(f"{line}\n" for line in lines).encode())
        self._file.flush()

    def read_line(self) -> str:
        raw = self._file.readline()
        if not raw:
            raise ConnectionError("the node closed the connection")
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def settimeout(self, seconds: float) -> None:
        self._sock.settimeout(seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # its flush fails when the node went away
            self._file.close()
        self._sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
