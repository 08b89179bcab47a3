"""`djs proxy` and `python -m reverse_proxy`: run the reverse proxy."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from common import aio
from common.auth import bind_refusal, dashboard_refusal, load_token
from common.errors import SchedulerError
from common.log import configure
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
from common.tls import server_context
from reverse_proxy.config import ProxyConfig

PANEL = "Dispatch (the original's settings)"


class Policy(StrEnum):
    balanced = "balanced"
    original = "original"


def proxy(
    port_arg: Annotated[int | None, typer.Argument(
        metavar="PORT", help="Port for nodes, as the original took it (same as --port).",
        show_default=False)] = None,
    port: Annotated[int, typer.Option(envvar="PROXY_PORT", help="Port nodes connect to.")
                    ] = 8080,
    host: Annotated[str, typer.Option(envvar="HOST", help="Address to bind.")] = "127.0.0.1",
    data_dir: Annotated[Path, typer.Option(envvar="DATA_DIR", help="Stable storage directory.")
                        ] = Path("data/proxy"),
    dispatch_period: Annotated[int, typer.Option(
        envvar="DISPATCH_PERIOD", min=1, rich_help_panel=PANEL,
        help="ms between dispatch rounds; dispatch also runs whenever a job arrives or a "
             "slot frees.")] = 100,
    max_num_jobs_dispatch: Annotated[int, typer.Option(
        envvar="MAX_NUM_JOBS_DISPATCH", min=1, rich_help_panel=PANEL,
        help="Most jobs handed out in one dispatch round.")] = 1000,
    request_result_period: Annotated[int, typer.Option(
        envvar="REQUEST_RESULT_PERIOD", min=1, rich_help_panel=PANEL,
        help="ms between RES_REQ syncs with each node (results are also pushed at once).")
    ] = 1000,
    max_num_nodes: Annotated[int, typer.Option(
        envvar="MAX_NUM_NODES", min=1, rich_help_panel=PANEL,
        help="Most nodes connected at once; one more is refused.")] = 64,
    node_timeout: Annotated[int, typer.Option(
        envvar="NODE_TIMEOUT", min=1,
        help="ms without INFO before a node is declared dead and its jobs run elsewhere.")
    ] = 5000,
    prefetch: Annotated[int, typer.Option(
        envvar="PREFETCH", min=0,
        help="Jobs per slot a node may hold beyond those it runs.")] = 1,
    policy: Annotated[Policy, typer.Option(
        envvar="POLICY", rich_help_panel=PANEL,
        help="balanced: least load per slot with rebalancing. original: the original's "
             "dispatch by reported queue length, timer only, no bound (for comparison in "
             "benchmarks).")] = Policy.balanced,
    retry_backoff: Annotated[int, typer.Option(
        envvar="RETRY_BACKOFF", min=0,
        help="ms before the first retry of a failed attempt; doubles on each retry.")
    ] = 1000,
    max_node_losses: Annotated[int, typer.Option(
        envvar="MAX_NODE_LOSSES", min=1,
        help="A job whose node was lost (dead or wiped) this many times fails.")] = 5,
    fsync: Fsync = False,
    cluster_token: Annotated[str | None, typer.Option(
        envvar="CLUSTER_TOKEN", rich_help_panel=SECURITY, show_default=False,
        help="Shared secret every node must prove it knows (HMAC handshake; never sent).")
    ] = None,
    cluster_token_file: ClusterTokenFile = None,
    insecure: Annotated[bool, typer.Option(
        envvar="INSECURE", rich_help_panel=SECURITY,
        help="Allow binding a non-loopback address without a cluster token: anyone who "
             "reaches the port can then join as a node.")] = False,
    max_violations: Annotated[int, typer.Option(
        envvar="MAX_VIOLATIONS", min=1, rich_help_panel=SECURITY,
        help="Protocol violations (forged results, floods) before a node is disconnected.")
    ] = 10,
    tls_cert: Annotated[Path | None, typer.Option(
        envvar="TLS_CERT", rich_help_panel=SECURITY, show_default=False,
        help="PEM certificate (chain) of the proxy: serve nodes over TLS.")] = None,
    tls_key: TlsKey = None,
    tls_ca: Annotated[Path | None, typer.Option(
        envvar="TLS_CA", rich_help_panel=SECURITY, show_default=False,
        help="PEM CA: require nodes to show a certificate it signed (mutual TLS).")] = None,
    dashboard_port: Annotated[int, typer.Option(
        envvar="DASHBOARD_PORT", min=0, max=65535,
        help="Port of the web dashboard, its JSON API and /metrics (0: off).")] = 8081,
    dashboard_host: Annotated[str, typer.Option(
        envvar="DASHBOARD_HOST", help="Address the dashboard binds; off loopback it needs "
        "DASHBOARD_TOKEN.")] = "127.0.0.1",
    dashboard_token: Annotated[str | None, typer.Option(
        envvar="DASHBOARD_TOKEN", rich_help_panel=SECURITY, show_default=False,
        help="Every dashboard request must carry it (Bearer, or Basic as the password).")
    ] = None,
    client_token: Annotated[str | None, typer.Option(
        envvar="CLIENT_TOKEN", rich_help_panel=SECURITY, show_default=False,
        help="The nodes' CLIENT_TOKEN: the dashboard sends it before a submission.")] = None,
    log_level: LogLevel = Level.INFO,
    log_format: LogFormat = Format.TEXT,
) -> None:
    """Run the reverse proxy: the global queue, balancing, and results back to their origin."""
    from reverse_proxy.proxy import run

    configure(log_level.value, log_format.value, "proxy")
    try:
        token = load_token(cluster_token, cluster_token_file)
        server_context(tls_cert, tls_key, tls_ca)  # refuse bad TLS files before binding
    except SchedulerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    refusal = bind_refusal(host, token, insecure) or (
        dashboard_refusal(dashboard_host, dashboard_token or None, insecure)
        if dashboard_port else None)
    if refusal is not None:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(2)
    if token is None:
        logging.getLogger("reverse_proxy").warning(
            "security.no_cluster_token: any process that reaches %s:%s can join as a node, "
            "receive jobs and report results; set CLUSTER_TOKEN (README: Security)", host,
            port_arg if port_arg is not None else port)
    cfg = ProxyConfig(
        host=host, port=port_arg if port_arg is not None else port, data_dir=data_dir,
        dispatch_period=dispatch_period / 1000, max_jobs_dispatch=max_num_jobs_dispatch,
        request_result_period=request_result_period / 1000, max_nodes=max_num_nodes,
        node_timeout=node_timeout / 1000, prefetch=prefetch, policy=policy.value, fsync=fsync,
        cluster_token=token, insecure=insecure, max_violations=max_violations,
        tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
        retry_backoff=retry_backoff / 1000, max_node_losses=max_node_losses,
        dashboard_port=dashboard_port, dashboard_host=dashboard_host,
        dashboard_token=dashboard_token or None, client_token=client_token or None)
    try:
        aio.run(run(cfg))
    except (SchedulerError, OSError) as exc:  # a store it cannot open, a port in use, ...
        logging.getLogger("reverse_proxy").error("proxy.cannot_start error=%s", exc)
        raise typer.Exit(3) from None


def main() -> None:
    typer.run(proxy)
