"""Issue 9, point 3: TLS on the node-proxy link with a throwaway CA made in the test (the
`openssl` command line), against real processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_security_auth import wait_for_log
from tests.e2e.wire import TOKEN, WireNode
from tests.procs import Cluster, LineConn

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("openssl") is None,
                                                  reason="needs the openssl command")]
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl(d, "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def issue(d: Path, ca: str, name: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(d, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
            f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    issue(d, "ca", "proxy", "DNS:localhost,IP:127.0.0.1")
    issue(d, "ca", "node", "DNS:node-1")
    make_ca(d, "other-ca")  # a CA nobody trusts
    issue(d, "other-ca", "rogue", "DNS:localhost,IP:127.0.0.1")
    return d


def test_nodes_and_proxy_talk_over_mutual_tls(cluster: Cluster, pki: Path) -> None:
    proxy = cluster.start_proxy(CLUSTER_TOKEN=TOKEN, TLS_CERT=str(pki / "proxy.pem"),
                                TLS_KEY=str(pki / "proxy.key"), TLS_CA=str(pki / "ca.pem"))
    node = cluster.start_node("node-1", CLUSTER_TOKEN=TOKEN, TLS_CA=str(pki / "ca.pem"),
                              TLS_CERT=str(pki / "node.pem"), TLS_KEY=str(pki / "node.key"))
    with LineConn(node.port) as conn:
        ticket = conn.ask("fib 90").removeprefix("Ticket ID: ")
        assert conn.ask(f"wait {ticket} 20", timeout=25) == "Result: 2880067194370816120"
    # plain TCP gets no CHALLENGE, only a closed connection
    with WireNode(proxy.port) as plain:
        plain.send_raw(b"\x00\x00\x00\x10" + b"x" * 16)
        assert plain.wait_closed()
    # a node without a client certificate, and one whose certificate another CA signed
    bare = cluster.start_node("node-2", CLUSTER_TOKEN=TOKEN, TLS_CA=str(pki / "ca.pem"))
    rogue = cluster.start_node("node-3", CLUSTER_TOKEN=TOKEN, TLS_CA=str(pki / "ca.pem"),
                               TLS_CERT=str(pki / "rogue.pem"), TLS_KEY=str(pki / "rogue.key"))
    for refused in (bare, rogue):
        wait_for_log(refused, "proxy.unreachable attempt=2")
        assert "proxy.connected" not in refused.log()
    with LineConn(node.port) as conn:  # the proxy kept serving its node all along
        ticket = conn.ask("fib 10").removeprefix("Ticket ID: ")
        assert conn.ask(f"wait {ticket} 20", timeout=25) == "Result: 55"
    assert "node.joined node=node-2" not in proxy.log()
    assert "node.joined node=node-3" not in proxy.log()


def test_a_node_does_not_trust_a_proxy_certificate_from_another_ca(
        cluster: Cluster, pki: Path) -> None:
    cluster.start_proxy(TLS_CERT=str(pki / "rogue.pem"), TLS_KEY=str(pki / "rogue.key"))
    node = cluster.start_node("node-1", TLS_CA=str(pki / "ca.pem"))
    log = wait_for_log(node, "proxy.unreachable attempt=2")
    assert "CERTIFICATE_VERIFY_FAILED" in log
    time.sleep(0.2)
    assert "proxy.connected" not in node.log()


def test_incomplete_tls_settings_are_refused_at_start(cluster: Cluster, pki: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "reverse_proxy", "--port", "0", "--data-dir", str(cluster.tmp / "p"),
         "--tls-cert", str(pki / "proxy.pem")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "needs both TLS_CERT and TLS_KEY" in out.stderr
