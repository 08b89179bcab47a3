"""A hand-driven node for security tests: a real socket speaking the real framing, so a test
can say exactly what a hostile or broken peer would say to a real proxy."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgpack

from common import auth
from common.framing import FrameDecoder, encode_frame
from common.jobs import JobId, NodeId
from common.messages import PROTOCOL_VERSION, Challenge, Hello, Message, Refused, Welcome

TOKEN = "correct-horse-battery-staple-0123456789"


class WireNode:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.decoder = FrameDecoder()
        self.pending: list[Message] = []

    def send(self, *msgs: Message) -> None:
        self.sock.sendall(b"".join(encode_frame(m) for m in msgs))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 10) -> Message:
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def recv_until(self, kind: type, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg

    def wait_closed(self, timeout: float = 15) -> bool:
        """True when the proxy closes the connection (whatever it sent before)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.close()
        return False

    def __enter__(self) -> WireNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def received_until_closed(self, timeout: float = 15) -> list[Message]:
        """Everything the proxy sends until it closes; AssertionError if it never does."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                got.append(self.recv(max(0.01, deadline - time.monotonic())))
        except (ConnectionError, OSError):
            self.close()
            return got
        self.close()
        raise AssertionError(f"the proxy kept the connection open; it sent {got!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def hello(node_id: str, held: tuple[str, ...] = ()) -> Hello:
    """A HELLO with no slots: the proxy never gives this node a job."""
    return Hello(NodeId(node_id), "inc-" + node_id, 0, PROTOCOL_VERSION, (),
                 tuple(JobId(j) for j in held), ())


def join(port: int, node_id: str, token: str | None = TOKEN) -> tuple[WireNode, Message]:
    """Connect, answer the challenge (with a proof when `token` is given); the reply."""
    node = WireNode(port)
    challenge = node.recv()
    assert isinstance(challenge, Challenge)
    h = hello(node_id)
    if token is not None:
        nonce = auth.new_nonce()
        h = Hello(h.node_id, h.incarnation, h.slots, h.version, h.queued, h.running,
                  h.finished, nonce, auth.node_proof(token.encode(), challenge.nonce, nonce,
                                                     h.node_id, h.incarnation))
    node.send(h)
    reply = node.recv()
    assert isinstance(reply, Welcome | Refused), reply
    return node, reply


def proxy_records(data_dir: Path) -> dict[str, Any]:
    """Every record of a proxy's store, read from its sqlite file without touching it."""
    uri = f"file:{data_dir / 'proxy.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT key, value FROM records").fetchall()
    return {k: msgpack.unpackb(v, raw=False, strict_map_key=False) for k, v in rows}
