"""Real processes for end-to-end tests: start `python -m reverse_proxy` / `cluster_node`
on port 0, wait for their readiness line, talk to them over real sockets, kill and reap."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT = 20.0
READ_TIMEOUT = 5.0


class Proc:
    """One server process; its log (stderr) goes to a file kept for failure reports."""

    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str],
                 log_dir: Path) -> None:
        self.name, self.module, self.args, self.env = name, module, args, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> Proc:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args], stdout=subprocess.PIPE,
            stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        log.close()
        try:
            self.port = self._wait_ready()
        except RuntimeError:
            self.kill()  # and close its pipe: it will not serve
            raise
        return self

    def _wait_ready(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=deadline - time.monotonic()):
                    break
                line = self.proc.stdout.readline().decode()
                if not line:
                    break
                if line.startswith("listening "):
                    return int(line.rsplit("port=", 1)[1])
        finally:
            sel.close()
        raise RuntimeError(f"{self.name} not ready; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def restart(self) -> Proc:
        """Same command, same data directory, same port (so clients find it again)."""
        self.kill()
        if "--port" in self.args:
            self.args[self.args.index("--port") + 1] = str(self.port)
        for _ in range(50):
            try:
                return self.start()
            except RuntimeError:
                if "address already in use" not in self.log():
                    raise
                time.sleep(0.1)
        return self.start()


@dataclass
class Cluster:
    tmp: Path
    proxy_env: dict[str, str] = field(default_factory=dict)
    proxy: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    proxy_dir: Path | None = None  # the proxy's data directory; tmp/proxy unless set

    def start_proxy(self, **env: str) -> Proc:
        self.proxy = Proc("proxy", "reverse_proxy",
                          ["--port", "0", "--data-dir", str(self.proxy_dir or self.tmp / "proxy")],
                          {"DISPATCH_PERIOD": "50", "NODE_TIMEOUT": "3000",
                           "DASHBOARD_PORT": "0", **env},
                          self.tmp).start()
        return self.proxy

    def start_node(self, name: str, slots: int = 4, data_dir: Path | None = None,
                   **env: str) -> Proc:
        assert self.proxy is not None
        node = Proc(name, "cluster_node",
                    ["--proxy", f"127.0.0.1:{self.proxy.port}", "--port", "0",
                     "--node-id", name, "--slots", str(slots),
                     "--data-dir", str(data_dir or self.tmp / name)],
                    {"INFO_PERIOD": "200", **env}, self.tmp).start()
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()
        if self.proxy is not None:
            self.proxy.kill()

    def logs(self) -> str:
        procs = [p for p in (self.proxy, *self.nodes.values()) if p is not None]
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in procs)


def free_port() -> int:
    """A port free right now, for servers whose port 0 means "off" (DASHBOARD_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LineConn:
    """A netcat-like client: one line out, one line back."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=READ_TIMEOUT)
        self.file = self.sock.makefile("rwb")

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        self.file.write(data + b"\n")
        self.file.flush()

    def expect_line(self, timeout: float = READ_TIMEOUT) -> str:
        self.sock.settimeout(timeout)
        raw = self.file.readline()
        if not raw:
            raise ConnectionError("closed by the node")
        return raw.decode(errors="replace").rstrip("\r\n")

    def ask(self, line: str, timeout: float = READ_TIMEOUT) -> str:
        self.send(line)
        return self.expect_line(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()  # flushes what is buffered: fails if the node was killed
        self.sock.close()  # whatever that did (else a ResourceWarning, an error in tests)

    def __enter__(self) -> LineConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def submit_many(port: int, jobs: list[str]) -> list[str]:
    """Pipeline jobs over one connection; return their tickets in order."""
    with LineConn(port) as conn:
        conn.file.write(("\n".join(jobs) + "\n").encode())
        conn.file.flush()
        lines = [conn.expect_line(30) for _ in jobs]
    tickets = []
    for job, line in zip(jobs, lines, strict=True):
        assert line.startswith("Ticket ID: "), f"{job!r} -> {line!r}"
        tickets.append(line.removeprefix("Ticket ID: "))
    return tickets


def wait_results(port: int, tickets: list[str], deadline_s: float) -> dict[str, str]:
    """Poll `r<ticket>` (the original's form) until every ticket has its Result line."""
    done: dict[str, str] = {}
    deadline = time.monotonic() + deadline_s
    while len(done) < len(tickets) and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ConnectionError), LineConn(port) as conn:
            pending = [t for t in tickets if t not in done]
            conn.file.write("".join(f"r{t}\n" for t in pending).encode())
            conn.file.flush()
            for t in pending:
                line = conn.expect_line(10)
                if line.startswith("Result: "):
                    done[t] = line.removeprefix("Result: ")
                else:
                    assert line.startswith("Result has not been executed yet"), line
        if len(done) < len(tickets):
            time.sleep(0.2)
    return done


def nc(port: int, text: str, timeout: float = 20) -> list[str]:
    """Run the real `nc -N` with `text` on its stdin; its output lines."""
    out = subprocess.run(["nc", "-N", "127.0.0.1", str(port)], input=text.encode(),
                         capture_output=True, timeout=timeout, check=True)
    return out.stdout.decode().splitlines()


@contextlib.contextmanager
def cluster_at(tmp: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp)
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


# ---------------------------------------------------------------- processes on this machine


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, ... (OSError once gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> dict[int, str]:
    """pid -> state letter of the children of `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                fields = _stat_fields(entry.name)
                if int(fields[1]) == pid:
                    found[int(entry.name)] = fields[0]
    return found


def processes_with(marker: str) -> list[int]:
    """Processes whose command line has `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def metrics(port: int) -> dict[str, float]:
    """Samples by name (and labels), parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
