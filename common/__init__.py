"""Shared by the node and the proxy: ids and job data, the node-proxy messages and their
framing, stable storage, logging, and the `djs` command line.

Path of one job: client line -> node (stored, ticket) -> proxy (global queue) -> a node
(runs it) -> proxy -> the origin node (stored) -> client asks `r<ticket>`.
"""

from common.jobs import JobId, NodeId

__all__ = ["JobId", "NodeId"]
