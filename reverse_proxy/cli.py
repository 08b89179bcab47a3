"""`djs proxy` and `python -m reverse_proxy`: run the reverse proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common import aio
from common.log import configure
from reverse_proxy.config import ProxyConfig

PANEL = "Dispatch (the original's settings)"


def proxy(
    port_arg: Annotated[int | None, typer.Argument(
        metavar="[PORT]", help="Port for nodes, as the original took it (same as --port).",
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
    fsync: Annotated[bool, typer.Option(
        envvar="FSYNC", help="fsync every commit (survives power loss, not only kill -9).")
    ] = False,
    log_level: Annotated[str, typer.Option(envvar="LOG_LEVEL")] = "INFO",
    log_format: Annotated[str, typer.Option(envvar="LOG_FORMAT", help="text or json")
                          ] = "text",
) -> None:
    """Run the reverse proxy: the global queue, balancing, and results back to their origin."""
    from reverse_proxy.proxy import run

    configure(log_level, log_format, "proxy")
    cfg = ProxyConfig(
        host=host, port=port_arg if port_arg is not None else port, data_dir=data_dir,
        dispatch_period=dispatch_period / 1000, max_jobs_dispatch=max_num_jobs_dispatch,
        request_result_period=request_result_period / 1000, max_nodes=max_num_nodes,
        node_timeout=node_timeout / 1000, prefetch=prefetch, fsync=fsync)
    aio.run(run(cfg))


def main() -> None:
    typer.run(proxy)
