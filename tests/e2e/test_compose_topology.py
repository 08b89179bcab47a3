"""docker-compose.yml run as processes, one network namespace per service.

Each service of the compose file becomes `python -m reverse_proxy` or `python -m
cluster_node` (its `command`) with its `environment`, started through `ip netns exec` in
its own namespace: a "container" with its own address in 10.231.0.0/24 on a bridge in the
root namespace, and an /etc/netns/<ns>/hosts that resolves service names, so
PROXY_HOST=reverse-proxy works as on compose's network. DATA_DIR is a directory per
service (the named volume), HOST the namespace's address (the image binds 0.0.0.0).

The test talks to the nodes' client ports from the root namespace, kills a node
"container" with -9 (its whole process group), starts it again on the same data, and
checks that every ticket gets its result. Needs root and `ip netns`; skips otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_node.client_protocol import NOT_YET

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
MODULES = {"proxy": "reverse_proxy", "node": "cluster_node"}
# The image's ENV that the compose file does not override (DATA_DIR and HOST are per run).
IMAGE_ENV = {"PYTHONUNBUFFERED": "1"}

# 10.231.0.0/24 holds only this test's namespaces: .1 is the bridge, .10 + i service i.
SUBNET = "10.231.0"
PREFIX = f"djs-t-{os.getpid()}"
# Interface names have at most 15 bytes: "djs" + pid (7 digits at most) + "br"/"v<i>".
BRIDGE = f"djs{os.getpid()}br"
STALE_NETNS = re.compile(r"^djs-t-(\d+)-")
STALE_LINK = re.compile(r"^djs(\d+)(?:br|v\d+)$")

# A process prints its readiness line within this, or the test fails.
START_SECONDS = 15.0
# One reply line; `wait` replies get WAIT_SECONDS more.
READ_SECONDS = 5.0
WAIT_SECONDS = 20
# The whole test, kept under pytest's 60 s timeout so that cleanup still runs.
TEST_SECONDS = 50.0
JOB_MS = 1500


# --------------------------------------------------------------- network namespaces


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                          check=check)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces and links of earlier runs whose pytest died before cleaning up."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if (m := STALE_NETNS.match(name)) and not pid_alive(int(m.group(1))):
            ip("netns", "delete", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if (m := STALE_LINK.match(name)) and not pid_alive(int(m.group(1))):
            ip("link", "delete", name, check=False)


@dataclass
class Host:
    """One service's "container": a namespace, its address, and the root end of its veth."""

    service: str
    netns: str
    address: str
    veth: str


@dataclass
class Topology:
    hosts: dict[str, Host] = field(default_factory=dict)
    made_etc_netns: bool = False

    def create(self, services: list[str]) -> None:
        self.made_etc_netns = not Path("/etc/netns").exists()
        for i, service in enumerate(services):
            self.hosts[service] = Host(service, f"{PREFIX}-{service}", f"{SUBNET}.{10 + i}",
                                       f"djs{os.getpid()}v{i}")
        ip("link", "add", "name", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{h.address} {h.service}\n" for h in self.hosts.values())
        for h in self.hosts.values():
            ip("netns", "add", h.netns)
            ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            ip("link", "set", h.veth, "master", BRIDGE)
            ip("link", "set", h.veth, "up")
            ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            ip("-n", h.netns, "link", "set", "eth0", "up")
            ip("-n", h.netns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / h.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)

    def destroy(self) -> None:
        for h in self.hosts.values():
            ip("netns", "delete", h.netns, check=False)
            ip("link", "delete", h.veth, check=False)
            shutil.rmtree(Path("/etc/netns") / h.netns, ignore_errors=True)
        ip("link", "delete", BRIDGE, check=False)
        if self.made_etc_netns:
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()


def skip_unless_netns_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    remove_stale()
    in_use = ip("-o", "-4", "addr", "show", "to", f"{SUBNET}.0/24", check=False).stdout
    if in_use.strip():
        pytest.skip(f"{SUBNET}.0/24 is already in use here (another run?): {in_use.split()[1]}")
    probe = f"{PREFIX}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` failed: {made.stderr.strip()}")
    ip("netns", "delete", probe, check=False)


# ------------------------------------------------------------------- compose file


def load_services() -> dict[str, dict[str, Any]]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert isinstance(services, dict)
    return services


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", ["node"])  # the image's CMD
    return command.split() if isinstance(command, str) else [str(w) for w in command]


# What the user exports before `docker compose up` (the file insists on both).
USER_ENV = {"CLUSTER_TOKEN": secrets.token_hex(32), "DASHBOARD_TOKEN": secrets.token_hex(16)}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def interpolate(value: str) -> str:
    """compose's `${NAME}`, `${NAME:?why}`, `${NAME:-default}`, from USER_ENV (a name it
    lacks fails the test, as compose would refuse to start)."""
    return INTERPOLATION.sub(lambda m: USER_ENV[m.group(1)], value)


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    """Dependencies first, as compose starts them."""
    order: list[str] = []
    while len(order) < len(services):
        ready = [name for name, s in services.items() if name not in order
                 and all(dep in order for dep in s.get("depends_on", {}))]
        assert ready, "depends_on has a cycle"
        order += ready[:1]
    return order


# ---------------------------------------------------------------------- processes


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    host: Host
    data_dir: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def role(self) -> str:
        return command_of(self.spec)[0]

    @property
    def port(self) -> int:
        env = environment_of(self.spec)
        return int(env["PROXY_PORT"] if self.role == "proxy" else env["CLIENT_PORT"])


class ComposeCluster:
    def __init__(self, topology: Topology, services: dict[str, dict[str, Any]],
                 tmp: Path) -> None:
        self.order = start_order(services)
        self.services = {name: Service(name, spec, topology.hosts[name], tmp / name,
                                       tmp / f"{name}.log")
                         for name, spec in services.items()}

    def address(self, name: str) -> tuple[str, int]:
        service = self.services[name]
        return service.host.address, service.port

    async def start(self, name: str) -> None:
        """Start a service's process in its namespace; return once it is listening."""
        s = self.services[name]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **IMAGE_ENV,
               **environment_of(s.spec), "DATA_DIR": str(s.data_dir), "HOST": s.host.address}
        with s.log.open("ab") as log:
            s.proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", s.host.netns, sys.executable, "-m", MODULES[s.role],
                *command_of(s.spec)[1:], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True)
        assert s.proc.stdout is not None
        try:
            async with asyncio.timeout(START_SECONDS):
                line = (await s.proc.stdout.readline()).decode().strip()
        except TimeoutError:
            line = "(nothing)"
        expected = f"listening host={s.host.address} port={s.port}"
        assert line == expected, f"{name} printed {line!r}\n{self.log_tail(name)}"

    async def wait_healthy(self, name: str) -> None:
        """compose's `condition: service_healthy`: `djs health`, run in the service's
        namespace against its name, until it passes."""
        s = self.services[name]
        script = Path(sys.executable).with_name("djs")
        djs = [str(script)] if script.exists() else [
            sys.executable, "-c", "from common.cli import app; app()"]
        proxy_flag = ["--proxy"] if s.role == "proxy" else []
        async with asyncio.timeout(START_SECONDS):
            while True:
                check = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", s.host.netns, *djs, "health", *proxy_flag,
                    f"{name}:{s.port}", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                if await check.wait() == 0:
                    return
                await asyncio.sleep(0.2)

    async def kill(self, name: str) -> None:
        """kill -9 the "container": the process and its job workers (its group)."""
        proc = self.kill_now(name)
        if proc is not None:
            await self.reap(proc)

    def kill_now(self, name: str) -> asyncio.subprocess.Process | None:
        proc = self.services[name].proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(proc.pid, signal.SIGKILL)
        return proc

    async def stop(self, name: str) -> int:
        """`docker stop`: SIGTERM to the process, which must exit cleanly and quickly."""
        proc = self.services[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await proc.wait()
        await self.kill(name)  # job workers it left, if any
        return code

    @staticmethod
    async def reap(proc: asyncio.subprocess.Process) -> None:
        async with asyncio.timeout(10):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.read()  # to EOF, so the pipe transport closes

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.services[name].log
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} log\n" + "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def topology() -> Iterator[Topology]:
    skip_unless_netns_possible()
    topo = Topology()
    try:
        try:
            topo.create(list(load_services()))
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the namespaces: {' '.join(exc.cmd)}: {exc.stderr}")
        yield topo
    finally:
        topo.destroy()


@pytest.fixture
async def compose_cluster(topology: Topology,
                          tmp_path: Path) -> AsyncIterator[ComposeCluster]:
    c = ComposeCluster(topology, load_services(), tmp_path)
    try:
        yield c
    finally:
        procs = [c.kill_now(name) for name in c.services]  # every one first, then reap
        for proc in procs:
            if proc is not None:
                with contextlib.suppress(TimeoutError):
                    await ComposeCluster.reap(proc)


# ------------------------------------------------------------------ line protocol


@contextlib.asynccontextmanager
async def connect(address: tuple[str, int]
                  ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(READ_SECONDS):
        reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send_line(writer: asyncio.StreamWriter, line: str) -> None:
    writer.write(line.encode() + b"\n")
    await writer.drain()


async def expect_line(reader: asyncio.StreamReader, seconds: float = READ_SECONDS) -> str:
    async with asyncio.timeout(seconds):
        raw = await reader.readline()
    assert raw, "the node closed the connection"
    return raw.decode().rstrip("\r\n")


async def ask(address: tuple[str, int], line: str) -> str:
    async with connect(address) as (reader, writer):
        await send_line(writer, line)
        return await expect_line(reader)


async def submit(address: tuple[str, int], count: int) -> list[str]:
    tickets = []
    async with connect(address) as (reader, writer):
        for _ in range(count):
            await send_line(writer, str(JOB_MS))
            reply = await expect_line(reader)
            assert reply.startswith("Ticket ID: "), reply
            tickets.append(reply.removeprefix("Ticket ID: "))
    return tickets


async def wait_joined(address: tuple[str, int]) -> None:
    """Until the node says, in `stats`, that it is connected to the proxy."""
    while True:
        if "proxy=connected" in await ask(address, "stats"):
            return
        await asyncio.sleep(0.1)


async def collect_results(address: tuple[str, int], tickets: list[str]) -> list[str]:
    """Every ticket's `Result:` line, by `wait`, and `r<ticket>` answering the same."""
    results = []
    async with connect(address) as (reader, writer):
        for ticket in tickets:
            await send_line(writer, f"wait {ticket} {WAIT_SECONDS}")
            result = await expect_line(reader, WAIT_SECONDS + READ_SECONDS)
            assert result.startswith("Result: "), f"{ticket}: {result}"
            await send_line(writer, f"r{ticket}")
            assert await expect_line(reader) == result
            results.append(result)
    return results


# --------------------------------------------------------------------------- test


async def start_all(cluster: ComposeCluster) -> None:
    """As `docker compose up`: each service after the ones it depends on are healthy."""
    for name in cluster.order:
        await cluster.start(name)
        if any(name in s.spec.get("depends_on", {}) for s in cluster.services.values()):
            await cluster.wait_healthy(name)
    async with asyncio.timeout(START_SECONDS):
        await asyncio.gather(*(wait_joined(cluster.address(name))
                               for name, s in cluster.services.items() if s.role == "node"))


async def test_every_ticket_survives_a_killed_node_container(
    compose_cluster: ComposeCluster,
) -> None:
    cluster = compose_cluster
    try:
        async with asyncio.timeout(TEST_SECONDS):
            await start_all(cluster)
            node_1, node_2 = cluster.address("node-1"), cluster.address("node-2")
            tickets = {"node-1": await submit(node_1, 8)}
            assert await ask(node_1, f"r{tickets['node-1'][-1]}") == NOT_YET
            tickets["node-2"] = await submit(node_2, 3)

            await cluster.kill("node-1")
            await cluster.start("node-1")  # same namespace, address, environment and data

            results = [line for name, ids in tickets.items()
                       for line in await collect_results(cluster.address(name), ids)]
            assert len(results) == 11
            ran_on = set(re.findall(r" on (node-\d+)", " ".join(results)))
            assert len(ran_on) >= 2, f"jobs were not spread over the nodes: {ran_on}"
            await asyncio.to_thread(check_dashboard, cluster)

            for name in reversed(cluster.order):  # `docker compose stop`
                assert await cluster.stop(name) == 0, cluster.log_tail(name)
    except BaseException:
        for name in cluster.services:
            sys.stderr.write(cluster.log_tail(name) + "\n")
        raise


def check_dashboard(cluster: ComposeCluster) -> None:
    """The proxy's dashboard, as published: refuses without DASHBOARD_TOKEN, shows the three
    nodes with it."""
    host, _ = cluster.address("reverse-proxy")
    url = f"http://{host}:8081/api/cluster"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=READ_SECONDS)
    refused.value.close()
    assert refused.value.code == 401
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {USER_ENV['DASHBOARD_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=READ_SECONDS) as resp:
        body = json.load(resp)
    assert sorted(n["node_id"] for n in body["nodes"]) == ["node-1", "node-2", "node-3"]


def stats_field(stats_line: str, name: str) -> int:
    """A number of this node's own part of a `stats` line (before the cluster's)."""
    own = stats_line.split("|", 1)[0]
    match = re.search(rf"\b{name}=(\d+)", own)
    assert match, f"no {name}= in {stats_line!r}"
    return int(match.group(1))


async def test_a_node_cut_off_past_node_timeout_has_its_jobs_run_elsewhere_then_rejoins(
    compose_cluster: ComposeCluster,
) -> None:
    """node-1's cable is pulled (its veth down) while it runs jobs submitted at node-2.
    The proxy hears nothing for NODE_TIMEOUT, declares it dead and runs its jobs on the
    other nodes: node-2's clients get every result while node-1 is still cut off. Then the
    cable is back: node-1 reconnects, says what it holds, and its own tickets (submitted
    before the cut) get their results; what it ran meanwhile counts as duplicates."""
    cluster = compose_cluster
    veth = cluster.services["node-1"].host.veth
    try:
        async with asyncio.timeout(TEST_SECONDS):
            await start_all(cluster)
            node_1, node_2 = cluster.address("node-1"), cluster.address("node-2")
            own_tickets = await submit(node_1, 2)
            tickets = await submit(node_2, 12)  # 12 slots: every node runs some
            await asyncio.sleep(0.3)  # dispatched
            ip("link", "set", veth, "down")
            try:
                # node-2's jobs all finish while node-1 is unreachable: those it held ran
                # elsewhere once the proxy gave up on it.
                results = await collect_results(node_2, tickets)
                assert len(results) == 12
                assert all(" on node-1 " not in r for r in results), results
            finally:
                ip("link", "set", veth, "up")
            await wait_joined(node_1)
            own_results = await collect_results(node_1, own_tickets)
            assert len(own_results) == 2
            # node-2 still answers each ticket with the first result recorded.
            assert await collect_results(node_2, tickets) == results
    except BaseException:
        for name in cluster.services:
            sys.stderr.write(cluster.log_tail(name) + "\n")
        raise
