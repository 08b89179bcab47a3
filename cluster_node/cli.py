"""`djs node` and `python -m cluster_node`: run a cluster node."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster_node.config import NodeConfig
from common import aio
from common.log import configure

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
        metavar="[PROXY_HOST]", help="The proxy's host, as the original took it.",
        show_default=False)] = None,
    proxy_port_arg: Annotated[int | None, typer.Argument(
        metavar="[PROXY_PORT]", help="The proxy's port, as the original took it.",
        show_default=False)] = None,
    proxy: Annotated[str | None, typer.Option(
        help="The proxy as HOST:PORT (overrides PROXY_HOST and PROXY_PORT).")] = None,
    proxy_host: Annotated[str, typer.Option(envvar="PROXY_HOST")] = "127.0.0.1",
    proxy_port: Annotated[int, typer.Option(envvar="PROXY_PORT")] = 8080,
    host: Annotated[str, typer.Option(envvar="HOST", help="Address clients connect to.")
                    ] = "127.0.0.1",
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
    fsync: Annotated[bool, typer.Option(
        envvar="FSYNC", help="fsync every commit (survives power loss, not only kill -9).")
    ] = False,
    log_level: Annotated[str, typer.Option(envvar="LOG_LEVEL")] = "INFO",
    log_format: Annotated[str, typer.Option(envvar="LOG_FORMAT", help="text or json")
                          ] = "text",
) -> None:
    """Run a cluster node: clients submit jobs here with netcat and fetch results by ticket."""
    from cluster_node.node import run

    if proxy is not None:
        proxy_host, proxy_port = parse_address(proxy, proxy_port)
    if proxy_host_arg is not None:
        proxy_host = proxy_host_arg
    if proxy_port_arg is not None:
        proxy_port = proxy_port_arg
    cfg = NodeConfig(
        proxy_host=proxy_host, proxy_port=proxy_port, host=host, port=port, node_id=node_id,
        slots=slots, data_dir=data_dir, info_period=info_period / 1000,
        request_result_period=request_result_period / 1000, allow_shell=allow_shell,
        sh_timeout=sh_timeout, sh_output_limit=sh_output_limit, max_pending=max_pending,
        fsync=fsync)
    configure(log_level, log_format, node_id or "node")
    aio.run(run(cfg))


def main() -> None:
    typer.run(node)
