"""Command-line options (and their environment variables) the proxy and the node share, so
that one setting reads the same on both."""

from __future__ import annotations

from enum import StrEnum
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


class Level(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class Format(StrEnum):
    TEXT = "text"
    JSON = "json"


# Choices: a level logging does not know was a 48-line traceback at start, another format
# taken for text without a word.
LogLevel = Annotated[Level, typer.Option(envvar="LOG_LEVEL", case_sensitive=False)]
LogFormat = Annotated[Format, typer.Option(envvar="LOG_FORMAT", case_sensitive=False)]
