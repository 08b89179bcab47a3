"""Optional TLS for the node-proxy link, with the standard library's `ssl`.

The proxy serves TLS when it has TLS_CERT and TLS_KEY; with TLS_CA too it requires every node
to show a certificate signed by that CA (mutual TLS). A node uses TLS when it has TLS_CA: it
checks the proxy's certificate against that CA and the proxy's host name (or
TLS_SERVER_NAME), and shows its own TLS_CERT / TLS_KEY when it has them.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from common.errors import SchedulerError


class TLSConfigError(SchedulerError):
    """The TLS settings are incomplete or the files are unusable."""


def server_context(cert: Path | None, key: Path | None, ca: Path | None
                   ) -> ssl.SSLContext | None:
    """The proxy's context, or None when TLS is off (no certificate given)."""
    if cert is None and key is None:
        if ca is not None:
            raise TLSConfigError("TLS_CA is set on the proxy but TLS_CERT / TLS_KEY are not")
        return None
    if cert is None or key is None:
        raise TLSConfigError("the proxy needs both TLS_CERT and TLS_KEY for TLS")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the proxy's TLS files: {exc}") from exc
    return ctx


def client_context(ca: Path | None, cert: Path | None, key: Path | None
                   ) -> ssl.SSLContext | None:
    """A node's context, or None when TLS is off (no CA given)."""
    if ca is None:
        if cert is not None or key is not None:
            raise TLSConfigError("a node needs TLS_CA (to check the proxy) to use TLS")
        return None
    if (cert is None) != (key is None):
        raise TLSConfigError("a node's client certificate needs both TLS_CERT and TLS_KEY")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the node's TLS files: {exc}") from exc
    return ctx
