"""Settings of the reverse proxy; every one has a flag and an environment variable (cli.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data/proxy")
    # The original's names, in milliseconds on the command line; seconds here.
    dispatch_period: float = 0.1  # a safety net: dispatch also runs on every event
    max_jobs_dispatch: int = 1000
    request_result_period: float = 1.0
    max_nodes: int = 64
    node_timeout: float = 5.0
    prefetch: int = 1
    policy: str = "balanced"  # "original": the original's dispatch, for comparison only
    max_node_losses: int = 5  # a job whose node was lost this often fails
    retry_backoff: float = 1.0  # seconds before the first retry; doubles on each retry
    fsync: bool = False
    stats_log_period: float = 10.0
    # Security (README "Security"): the shared node token, and TLS files for the node port.
    cluster_token: bytes | None = None
    insecure: bool = False  # allow a non-loopback bind without a token
    max_violations: int = 10
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    dashboard_port: int = 8081  # web dashboard, JSON API and /metrics; 0: off
    dashboard_host: str = "127.0.0.1"
    dashboard_token: str | None = None  # asked of every dashboard request when set
    client_token: str | None = None  # the nodes' CLIENT_TOKEN, for dashboard submissions
