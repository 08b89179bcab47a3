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
    fsync: bool = False
    stats_log_period: float = 10.0
    dashboard_port: int = 8081  # web dashboard, JSON API and /metrics; 0: off
