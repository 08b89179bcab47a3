"""One process per data directory (`common.datadir.claim`), with real processes: the lock
is per process, so another process must hold it for a claim here to be refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.datadir import claim
from common.errors import DataDirInUse

ROOT = Path(__file__).resolve().parents[2]


def holder(data_dir: Path, fork_a_child: bool = False) -> subprocess.Popen[str]:
    """A process that claims `data_dir` (optionally forks a child that outlives it, as a
    node's worker processes may for a moment), says so, then sleeps."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from common.datadir import claim
        claim(Path({str(data_dir)!r}), "node")
        child = os.fork() if {fork_a_child} else -1
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print("held", child, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    said, child = proc.stdout.readline().split()
    assert said == "held"
    proc.child = int(child)  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_second_process_is_refused_and_told_who_holds_it(
        tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    first = holder(tmp_path / "node-1")
    procs.append(first)
    with pytest.raises(DataDirInUse, match=f"in use by another node \\(pid {first.pid}\\)"):
        claim(tmp_path / "node-1", "node")
    os.close(claim(tmp_path / "node-2", "node"))  # another directory is free
    os.close(claim(tmp_path / "node-1", "proxy"))  # and so is another name's lock


def test_kill_9_of_the_holder_frees_it_at_once_even_with_a_forked_child_alive(
        tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    first = holder(tmp_path, fork_a_child=True)
    procs.append(first)
    with pytest.raises(DataDirInUse):
        claim(tmp_path, "node")
    first.send_signal(signal.SIGKILL)
    first.wait()
    try:
        os.kill(first.child, 0)  # type: ignore[attr-defined]  # still alive: it sleeps
        os.close(claim(tmp_path, "node"))  # but it does not hold the lock
    finally:
        os.kill(first.child, signal.SIGKILL)  # type: ignore[attr-defined]
    assert (tmp_path / "node.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize(("holder", "newcomer"), [("proxy", "node"), ("node", "proxy")])
def test_a_directory_of_the_other_role_is_refused(tmp_path: Path, holder: str,
                                                  newcomer: str) -> None:
    """A node started on the proxy's directory (or the other way round) started beside it:
    each has its own store file and lock, so nothing stopped it."""
    (tmp_path / f"{holder}.sqlite").write_bytes(b"")
    with pytest.raises(DataDirInUse, match=f"holds a {holder}'s store"):
        claim(tmp_path, newcomer)
    os.close(claim(tmp_path, holder))
