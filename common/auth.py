"""Mutual HMAC challenge-response for the node-proxy handshake. Pure: no I/O, no clock.

How it works. On every new connection the proxy sends CHALLENGE with a fresh random nonce.
The node answers with HELLO carrying its own fresh nonce and
    proof = HMAC-SHA256(token, ["djs-node-v1", proxy nonce, node nonce, node id, incarnation])
and the proxy answers WELCOME carrying
    proof = HMAC-SHA256(token, ["djs-proxy-v1", proxy nonce, node nonce, node id, proxy id]).
Each side checks the other's proof with `hmac.compare_digest`. The token never crosses the
wire; a proof is bound to both nonces, so a HELLO recorded on one connection is worthless on
another (the proxy's nonce differs), and a WELCOME recorded earlier is worthless to a node
(its own nonce differs). The fields are packed with msgpack so no two field lists collide.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path

import msgpack

from common.errors import SchedulerError

# 128 bits: a nonce never repeats in practice, so a proof is never valid twice.
NONCE_BYTES = 16
# A shorter shared secret is guessable offline from one recorded handshake.
MIN_TOKEN_BYTES = 16
# A token file bigger than this is surely the wrong file.
MAX_TOKEN_FILE_BYTES = 4096
NODE_LABEL = "djs-node-v1"
PROXY_LABEL = "djs-proxy-v1"


class TokenError(SchedulerError):
    """CLUSTER_TOKEN / CLUSTER_TOKEN_FILE is unusable (too short, unreadable)."""


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def load_token(value: str | None, path: Path | None) -> bytes | None:
    """The cluster token from its value or from a file (surrounding whitespace stripped);
    None when neither is set. Both set is a mistake, refused rather than guessed."""
    if value and path is not None:
        raise TokenError("set CLUSTER_TOKEN or CLUSTER_TOKEN_FILE, not both")
    if path is not None:
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise TokenError(f"cannot read CLUSTER_TOKEN_FILE {path}: {exc.strerror}") from exc
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            raise TokenError(f"CLUSTER_TOKEN_FILE {path} is over {MAX_TOKEN_FILE_BYTES} bytes")
        token = raw.strip()
    elif value:
        token = value.strip().encode()
    else:
        return None
    if len(token) < MIN_TOKEN_BYTES:
        raise TokenError(f"the cluster token must be at least {MIN_TOKEN_BYTES} bytes "
                         f"(try: python -c 'import secrets; print(secrets.token_hex(32))')")
    return token


def _mac(token: bytes, fields: list[str]) -> str:
    return hmac.new(token, msgpack.packb(fields), hashlib.sha256).hexdigest()


def node_proof(token: bytes, challenge: str, node_nonce: str, node_id: str,
               incarnation: str) -> str:
    return _mac(token, [NODE_LABEL, challenge, node_nonce, node_id, incarnation])


def proxy_proof(token: bytes, challenge: str, node_nonce: str, node_id: str,
                proxy_id: str) -> str:
    return _mac(token, [PROXY_LABEL, challenge, node_nonce, node_id, proxy_id])


def check_node(token: bytes, challenge: str, node_nonce: str, node_id: str,
               incarnation: str, proof: str) -> str | None:
    """None when the node's proof is right, else the reason to log (never sent back)."""
    if not proof or not node_nonce:
        return "no proof in HELLO (is CLUSTER_TOKEN set on the node?)"
    expected = node_proof(token, challenge, node_nonce, node_id, incarnation)
    if not hmac.compare_digest(expected.encode(), proof.encode()):
        return "wrong proof in HELLO (different CLUSTER_TOKEN, or a replayed handshake)"
    return None


def check_proxy(token: bytes, challenge: str, node_nonce: str, node_id: str,
                proxy_id: str, proof: str) -> str | None:
    """None when the proxy's proof is right, else why the node must not trust it."""
    if not proof:
        return "the proxy sent no proof (is CLUSTER_TOKEN set on the proxy?)"
    expected = proxy_proof(token, challenge, node_nonce, node_id, proxy_id)
    if not hmac.compare_digest(expected.encode(), proof.encode()):
        return "the proxy's proof is wrong (different CLUSTER_TOKEN?)"
    return None


def bind_refusal(host: str, token: bytes | None, insecure: bool) -> str | None:
    """Why the proxy must not bind `host`, or None: without a token only loopback is safe."""
    if token is not None or insecure or is_loopback(host):
        return None
    return (f"refusing to bind {host} without a cluster token: anyone reaching it could "
            f"join as a node. Set CLUSTER_TOKEN (or CLUSTER_TOKEN_FILE), or pass --insecure "
            f"(INSECURE=1) on a network you trust")


def dashboard_refusal(host: str, token: str | None, insecure: bool) -> str | None:
    """Why the dashboard must not bind `host`, or None. It lists every recent ticket (a
    ticket is what lets a client read a result) and accepts submissions: off this machine
    only behind DASHBOARD_TOKEN."""
    if token is not None or insecure or is_loopback(host):
        return None
    return (f"refusing to serve the dashboard on {host} without DASHBOARD_TOKEN: anyone "
            f"reaching it could read every recent result and submit jobs. Set "
            f"DASHBOARD_TOKEN, keep DASHBOARD_HOST on loopback, or pass --insecure")


def bearer_allowed(token: str, authorization: str) -> bool:
    """Whether an HTTP Authorization header carries `token`: `Bearer <token>`, or Basic
    with it as the password (any user name; what a browser's login prompt sends)."""
    scheme, _, value = authorization.strip().partition(" ")
    given = value.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
