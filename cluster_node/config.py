"""Settings of a cluster node; every one has a flag and an environment variable (cli.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class NodeConfig:
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    host: str = "127.0.0.1"
    port: int = 9000
    node_id: str | None = None  # None: the id kept in the data dir, else the host name
    slots: int = 4
    data_dir: Path = Path("data/node")
    info_period: float = 0.5  # seconds between INFO frames (also the proxy's liveness signal)
    request_result_period: float = 1.0  # seconds between REQUEST_OF_RES safety-net syncs
    allow_shell: bool = False
    sh_timeout: float = 60.0
    sh_output_limit: int = 64 * 1024
    fsync: bool = False
    reconnect_max: float = 2.0  # cap of the exponential backoff towards the proxy
    metrics_port: int = 0  # Prometheus /metrics; 0: off
    metrics_token: str | None = None  # required by /metrics when set
    max_pending: int = 1_000_000  # tickets without a result before submissions are refused
    # Security (README "Security"): the shared node token, TLS towards the proxy, client
    # auth and listing, and the sh allowlist.
    cluster_token: bytes | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    client_token: str | None = None
    allow_list: bool = True
    shell_allow: tuple[str, ...] = ()
    slow_factor: float = 1.0  # test/benchmark knob: sleep jobs take this many times longer
    slow_after: float = 0.0  # ... from this many seconds after the node started
    # Client port limits (issue 6): see the README's "Limits" table.
    max_clients: int = 4096  # netcat connections at once; one more gets ERR and is closed
    client_idle_timeout: float = 300.0  # seconds without a line (or unread replies): closed
    max_line_bytes: int = 40 * 1024  # a longer line gets one ERR and is skipped
    job_retries: int = 0  # retries of a failed attempt unless `submit --retries N` says
    result_ttl: float = 7 * 86400.0  # seconds a ticket is kept after its result; 0: forever
    max_results: int = 1_000_000  # tickets with a result kept at most, oldest out; 0: no bound
