"""Shared by the node and the proxy: ids and job data, the node-proxy messages and their
framing, stable storage, logging, the `djs` command line, and the link's security: the
HMAC handshake (`auth`) and TLS contexts (`tls`).

Path of one job: client line -> node (stored, ticket) -> proxy (global queue) -> a node
(runs it) -> proxy -> the origin node (stored) -> client asks `r<ticket>`.
"""

from common.jobs import JobId, NodeId

__all__ = ["JobId", "NodeId"]
