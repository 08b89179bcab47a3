"""The image's ENTRYPOINT (`tini -- djs node`) as processes, without Docker: a node as the
first process of a pid namespace of its own, as in a container. The background children
of `sh` jobs are orphaned when their job ends (its process group is killed) and become
children of that first process: djs, which waits only for its own children, leaves them
zombies for good; tini reaps them. And tini passes `docker stop`'s SIGTERM on to djs, which
stops cleanly (exit 0)."""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Cluster, LineConn, children_of, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="a pid namespace needs root"),
    pytest.mark.skipif(shutil.which("tini-static") is None or shutil.which("unshare") is None,
                       reason="needs tini and unshare (apt-get install tini util-linux)"),
]
# What docker/Dockerfile copies into the image as /usr/bin/tini (Debian's `tini` package).
TINI = "tini-static"
DJS = str(Path(sys.executable).parent / "djs")
BACKGROUND_JOBS = 3


def first_process(launcher: subprocess.Popen[bytes]) -> int:
    """The host pid of the namespace's PID 1: `unshare --fork`'s child."""
    deadline = time.monotonic() + 10
    while not (found := children_of(launcher.pid)):
        assert time.monotonic() < deadline, "unshare started nothing"
        time.sleep(0.01)
    return next(iter(found))


@pytest.fixture
def node_in_pid_namespace(cluster: Cluster, request: pytest.FixtureRequest
                          ) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """(the launcher, PID 1's host pid, the node's client port) for `request.param`: the
    command before `djs`, as the ENTRYPOINT has it."""
    assert cluster.proxy is not None
    port = free_port()
    launcher = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *request.param, DJS, "node",
         "--proxy", f"127.0.0.1:{cluster.proxy.port}", "--port", str(port), "--node-id",
         "n1", "--data-dir", str(cluster.tmp / "n1")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,  # see below
        env={**os.environ, "ALLOW_SHELL": "1", "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_listening(launcher)
        yield launcher, first_process(launcher), port
    finally:
        for pid in children_of(launcher.pid):  # the namespace ends with its first process
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=20)
        assert launcher.stdout is not None
        launcher.stdout.close()


def wait_for_listening(proc: subprocess.Popen[bytes]) -> None:
    """Read the node's output (its log and stdout, one pipe) up to its `listening` line.
    The pipe is unbuffered: a buffered readline took the log line and `listening` in one
    read, then select() waited 30 s for what was already read (a clean-clone CI run)."""
    assert proc.stdout is not None
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
            line = proc.stdout.readline().decode()
            seen.append(line)
            if not line or line.startswith("listening "):
                break
    assert seen and seen[-1].startswith("listening "), "".join(seen)


def leave_orphans(port: int) -> None:
    """Jobs whose background child outlives them: killed with the job's group, orphaned."""
    with LineConn(port) as conn:
        tickets = [conn.ask("sh sleep 31.4159 & echo started").removeprefix("Ticket ID: ")
                   for _ in range(BACKGROUND_JOBS)]
        for ticket in tickets:
            assert conn.ask(f"wait {ticket} 20", timeout=25) == "Result: exit 0: started"


@pytest.fixture(autouse=True)
def proxy(cluster: Cluster) -> None:
    cluster.start_proxy()


@pytest.mark.parametrize("node_in_pid_namespace", [[TINI, "--"]], indirect=True)
def test_under_tini_orphans_are_reaped_and_sigterm_stops_the_node_cleanly(
        node_in_pid_namespace: tuple[subprocess.Popen[bytes], int, int]) -> None:
    launcher, tini, port = node_in_pid_namespace
    leave_orphans(port)
    time.sleep(0.5)  # time to reap
    states = children_of(tini)
    assert "Z" not in states.values(), states
    assert len(states) == 1  # djs alone
    os.kill(tini, signal.SIGTERM)  # what `docker stop` sends to PID 1
    assert launcher.wait(timeout=20) == 0


@pytest.mark.parametrize("node_in_pid_namespace", [[]], indirect=True)
def test_djs_as_the_first_process_leaves_zombies_which_is_why_the_image_has_tini(
        node_in_pid_namespace: tuple[subprocess.Popen[bytes], int, int]) -> None:
    _, djs, port = node_in_pid_namespace
    leave_orphans(port)
    time.sleep(0.5)
    zombies = [pid for pid, state in children_of(djs).items() if state == "Z"]
    assert len(zombies) == BACKGROUND_JOBS, children_of(djs)
