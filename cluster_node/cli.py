"""`djs node` and `python -m cluster_node`: run a cluster node."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from cluster_node.config import NodeConfig
from cluster_node.shell_policy import parse_prefixes
from common import aio
from common.auth import is_loopback, load_token
from common.errors import SchedulerError
from common.log import configure
from common.messages import node_id_problem
from common.server_options import (
    SECURITY,
    ClusterTokenFile,
    Format,
    Fsync,
    Level,
    LogFormat,
    LogLevel,
    TlsKey,
)
from common.tls import client_context

JOBS = "Jobs"


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    if not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def node(
    proxy_host_arg: Annotated[str | None, typer.Argument(
        metavar="PROXY_HOST", help="The proxy's host, as the original took it.",
        show_default=False)] = None,
    proxy_port_arg: Annotated[int | None, typer.Argument(
        metavar="PROXY_PORT", help="The proxy's port, as the original took it.",
        show_default=False)] = None,
    proxy: Annotated[str | None, typer.Option(
        help="The proxy as HOST:PORT (overrides PROXY_HOST and PROXY_PORT).")] = None,
    proxy_host: Annotated[str, typer.Option(envvar="PROXY_HOST")] = "127.0.0.1",
    proxy_port: Annotated[int, typer.Option(envvar="PROXY_PORT")] = 8080,
    host: Annotated[str, typer.Option(
        envvar="HOST", help="Address to bind (clients connect to it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="CLIENT_PORT", help="Port for netcat clients.")
                    ] = 9000,
    node_id: Annotated[str | None, typer.Option(
        envvar="NODE_ID", help="This node's name (default: the one kept in the data "
        "directory, else the host name).", show_default=False)] = None,
    slots: Annotated[int, typer.Option(envvar="SLOTS", min=1, max=10_000,
                                       help="Jobs this node runs at once.")] = 4,
    data_dir: Annotated[Path, typer.Option(envvar="DATA_DIR", help="Stable storage directory.")
                        ] = Path("data/node"),
    info_period: Annotated[int, typer.Option(
        envvar="INFO_PERIOD", min=10, help="ms between INFO frames to the proxy.")] = 500,
    request_result_period: Annotated[int, typer.Option(
        envvar="REQUEST_RESULT_PERIOD", min=10,
        help="ms between REQUEST_OF_RES for results still awaited.")] = 1000,
    allow_shell: Annotated[bool, typer.Option(
        envvar="ALLOW_SHELL", rich_help_panel=JOBS,
        help="Accept and run `sh` jobs (remote code execution: trusted clients only).")
    ] = False,
    sh_timeout: Annotated[float, typer.Option(
        envvar="SH_TIMEOUT", min=0.1, rich_help_panel=JOBS,
        help="Seconds before an `sh` job is killed.")] = 60.0,
    sh_output_limit: Annotated[int, typer.Option(
        envvar="SH_OUTPUT_LIMIT", min=1, rich_help_panel=JOBS,
        help="Bytes of an `sh` job's output kept in its result.")] = 64 * 1024,
    max_pending: Annotated[int, typer.Option(
        envvar="MAX_PENDING", min=1, help="Tickets without a result before submissions "
        "are refused.")] = 1_000_000,
    slow_factor: Annotated[float, typer.Option(
        envvar="SLOW_FACTOR", min=0.0, rich_help_panel="Test and benchmark knobs",
        help="Sleep jobs take this many times their duration (plays a slow node).")] = 1.0,
    slow_after: Annotated[int, typer.Option(
        envvar="SLOW_AFTER", min=0, rich_help_panel="Test and benchmark knobs",
        help="ms after start before SLOW_FACTOR applies (a node that suddenly slows).")] = 0,
    job_retries: Annotated[int, typer.Option(
        envvar="JOB_RETRIES", min=0, max=100, rich_help_panel=JOBS,
        help="Retries of a failed attempt unless `submit --retries N` says.")] = 0,
    result_ttl: Annotated[float, typer.Option(
        envvar="RESULT_TTL", min=0, help="Seconds a ticket and its result are kept after the "
        "job finished (0: forever).")] = 7 * 86400.0,
    max_results: Annotated[int, typer.Option(
        envvar="MAX_RESULTS", min=0, help="Tickets with a result kept at most; past it the "
        "oldest are forgotten first (~600 bytes of memory each; 0: no bound).")] = 1_000_000,
    max_clients: Annotated[int, typer.Option(
        envvar="MAX_CLIENTS", min=1, help="Client connections at once; one more gets ERR.")
    ] = 4096,
    client_idle_timeout: Annotated[float, typer.Option(
        envvar="CLIENT_IDLE_TIMEOUT", min=0.1,
        help="Seconds a client may send nothing (or leave replies unread) before it is "
        "closed.")] = 300.0,
    max_line_bytes: Annotated[int, typer.Option(
        envvar="MAX_LINE_BYTES", min=1024, help="Longest client line; longer gets ERR.")
    ] = 40 * 1024,
    metrics_port: Annotated[int, typer.Option(
        envvar="METRICS_PORT", min=0, max=65535,
        help="Port of this node's Prometheus /metrics (0: off).")] = 0,
    metrics_token: Annotated[str | None, typer.Option(
        envvar="METRICS_TOKEN", rich_help_panel=SECURITY, show_default=False,
        help="Scrapes of /metrics must send `Authorization: Bearer <token>`.")] = None,
    fsync: Fsync = False,
    shell_allow: Annotated[str, typer.Option(
        envvar="SHELL_ALLOW", rich_help_panel=JOBS, show_default=False,
        help="Comma-separated command prefixes `sh` jobs may start with, e.g. "
             "'echo,ls -l'; when set, commands run without a shell (no ; | $ etc.).")] = "",
    cluster_token: Annotated[str | None, typer.Option(
        envvar="CLUSTER_TOKEN", rich_help_panel=SECURITY, show_default=False,
        help="Shared secret proven to the proxy (HMAC handshake; never sent).")] = None,
    cluster_token_file: ClusterTokenFile = None,
    tls_ca: Annotated[Path | None, typer.Option(
        envvar="TLS_CA", rich_help_panel=SECURITY, show_default=False,
        help="PEM CA that signed the proxy's certificate: connect over TLS.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        envvar="TLS_CERT", rich_help_panel=SECURITY, show_default=False,
        help="PEM client certificate, for a proxy that requires one.")] = None,
    tls_key: TlsKey = None,
    tls_server_name: Annotated[str | None, typer.Option(
        envvar="TLS_SERVER_NAME", rich_help_panel=SECURITY, show_default=False,
        help="Name to check in the proxy's certificate (default: the proxy's host).")
    ] = None,
    client_token: Annotated[str | None, typer.Option(
        envvar="CLIENT_TOKEN", rich_help_panel=SECURITY, show_default=False,
        help="Clients must send `auth <token>` before any other command.")] = None,
    allow_list: Annotated[bool, typer.Option(
        envvar="ALLOW_LIST", rich_help_panel=SECURITY,
        help="Allow `getall` and `list` (every ticket of this node); off for shared "
             "deployments.")] = True,
    log_level: LogLevel = Level.INFO,
    log_format: LogFormat = Format.TEXT,
) -> None:
    """Run a cluster node: clients submit jobs here with netcat and fetch results by ticket."""
    from cluster_node.node import run

    if proxy is not None:
        proxy_host, proxy_port = parse_address(proxy, proxy_port)
    if proxy_host_arg is not None:
        proxy_host = proxy_host_arg
    if proxy_port_arg is not None:
        proxy_port = proxy_port_arg
    if node_id is not None and (why := node_id_problem(node_id)):
        typer.echo(f"error: NODE_ID: {why}", err=True)
        raise typer.Exit(2)
    try:
        token = load_token(cluster_token, cluster_token_file)
        client_context(tls_ca, tls_cert, tls_key)  # refuse bad TLS files before starting
    except SchedulerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    cfg = NodeConfig(
        proxy_host=proxy_host, proxy_port=proxy_port, host=host, port=port, node_id=node_id,
        slots=slots, data_dir=data_dir, info_period=info_period / 1000,
        request_result_period=request_result_period / 1000, allow_shell=allow_shell,
        sh_timeout=sh_timeout, sh_output_limit=sh_output_limit, max_pending=max_pending,
        fsync=fsync, cluster_token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
        tls_server_name=tls_server_name, client_token=client_token or None,
        allow_list=allow_list, shell_allow=parse_prefixes(shell_allow),
        slow_factor=slow_factor, slow_after=slow_after / 1000, job_retries=job_retries,
        max_clients=max_clients, client_idle_timeout=client_idle_timeout,
        max_line_bytes=max_line_bytes, metrics_port=metrics_port,
        metrics_token=metrics_token or None, result_ttl=result_ttl, max_results=max_results)
    configure(log_level.value, log_format.value, node_id or "node")
    if token is None:
        logging.getLogger("cluster_node").warning(
            "security.no_cluster_token: this node does not authenticate the proxy at %s:%d, "
            "nor the proxy it; set CLUSTER_TOKEN (README: Security)", proxy_host, proxy_port)
    if metrics_port and not metrics_token and not is_loopback(host):
        logging.getLogger("cluster_node").warning(
            "security.open_metrics: anyone reaching %s:%d may read this node's counts; set "
            "METRICS_TOKEN (README: Security)", host, metrics_port)
    if client_token is None and not is_loopback(host):
        logging.getLogger("cluster_node").warning(
            "security.open_client_port: anyone reaching %s:%d may submit jobs and read results "
            "by ticket; set CLIENT_TOKEN (README: Security)", host, port)
    try:
        aio.run(run(cfg))
    except (SchedulerError, OSError) as exc:  # a store it cannot open, a port in use, ...
        logging.getLogger("cluster_node").error("node.cannot_start error=%s", exc)
        raise typer.Exit(3) from None


def main() -> None:
    typer.run(node)
