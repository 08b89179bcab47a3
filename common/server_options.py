"""Command-line options (and their environment variables) the proxy and the node share, so
that one setting reads the same on both."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SECURITY = "Security (README: Security)"

Fsync = Annotated[bool, typer.Option(
    envvar="FSYNC", help="fsync every commit (survives power loss, not only kill -9).")]
ClusterTokenFile = Annotated[Path | None, typer.Option(
    envvar="CLUSTER_TOKEN_FILE", rich_help_panel=SECURITY, show_default=False,
    help="Read the cluster token from this file instead (e.g. a Docker secret).")]
TlsKey = Annotated[Path | None, typer.Option(
    envvar="TLS_KEY", rich_help_panel=SECURITY, show_default=False,
    help="PEM private key of TLS_CERT.")]
LogLevel = Annotated[str, typer.Option(envvar="LOG_LEVEL")]
LogFormat = Annotated[str, typer.Option(envvar="LOG_FORMAT", help="text or json")]
