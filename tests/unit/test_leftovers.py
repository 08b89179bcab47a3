"""`clear_leftovers` with real processes: it kills exactly those whose environment names a
job directory under the node's `DATA_DIR/sh`, children included, and removes those
directories. `end_session`: what a job that ended left in its session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster_node import leftovers
from cluster_node.jobtypes import JobContext, load_job_types
from cluster_node.leftovers import (
    _life,
    _wait_ended,
    clear_leftovers,
    end_session,
    record_session,
    session_file,
)
from cluster_node.shell_policy import clean_env
from common.jobs import NodeId
from tests.procs import processes_with, running


def gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not running(pid)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # each leads a process group of its own: kill the whole group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def job(procs: list[subprocess.Popen[bytes]], workdir: Path,
        command: str = "sleep 60") -> subprocess.Popen[bytes]:
    """Started as the node starts an `sh` job: own session, clean environment."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=workdir,
                            env=clean_env(str(workdir)), start_new_session=True)
    procs.append(proc)
    return proc


def test_only_the_jobs_of_this_data_directory_are_killed(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    work_root = tmp_path / "node-1" / "sh"
    mine = job(procs, work_root / "sh-aaaa")
    # a background grandchild that left the job's shell behind: it carries the variable too
    grandchild_pid_file = tmp_path / "grandchild.pid"
    parent = job(procs, work_root / "sh-bbbb", f"sleep 60 & echo $! > {grandchild_pid_file}; "
                                               "wait")
    other_node = job(procs, tmp_path / "node-2" / "sh" / "sh-cccc")
    other_root_with_same_start = job(procs, tmp_path / "node-1" / "shx" / "sh-dddd")
    unmarked = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin",
                                                      "HOME": str(work_root / "sh-eeee")},
                                start_new_session=True)
    procs.append(unmarked)
    (work_root / "notes.txt").write_text("not a job directory")
    deadline = time.monotonic() + 5
    while not grandchild_pid_file.exists() or not grandchild_pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = int(grandchild_pid_file.read_text())

    killed, removed = clear_leftovers(work_root)

    # three processes: sh of job aaaa, sh of job bbbb and its background sleep; maybe one
    # more if sh -c exec'd its last command (then there are fewer shells, not more)
    assert killed >= 3
    for pid in (mine.pid, parent.pid, grandchild):
        assert gone(pid), f"{pid} survived"
    for proc in (other_node, other_root_with_same_start, unmarked):
        assert running(proc.pid)
    assert removed == 2
    assert sorted(p.name for p in work_root.iterdir()) == ["notes.txt"]
    assert (tmp_path / "node-2" / "sh" / "sh-cccc").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace of its own needs root")
def test_a_process_of_another_mount_namespace_is_left_alone(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Another container that shares this pid namespace (`pid: host`) may use the same
    path for its data directory: its jobs are not ours."""
    work_root = tmp_path / "sh"
    (work_root / "sh-aaaa").mkdir(parents=True)
    other = subprocess.Popen(["unshare", "--mount", "sleep", "60"],
                             env=clean_env(str(work_root / "sh-aaaa")), start_new_session=True)
    procs.append(other)
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{other.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
        assert time.monotonic() < deadline, "unshare did not take effect"
        time.sleep(0.01)
    assert clear_leftovers(work_root) == (0, 1)
    assert running(other.pid)


def test_the_killed_processes_have_ended_when_the_sweep_returns(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL only asks: a process with 500 MB to give back takes ~45 ms to end here, and
    the node must not start the rerun beside it (it once did, in CI)."""
    work_root = tmp_path / "sh"
    ready = tmp_path / "ready"
    big = job(procs, work_root / "sh-aaaa",
              f"exec python3 -c \"b = b'1' * (500 << 20); open('{ready}', 'w').close(); "
              f"import time; time.sleep(60)\"")
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "the job did not fill its memory"
        time.sleep(0.02)
    assert clear_leftovers(work_root) == (1, 1)
    assert not running(big.pid), "clear_leftovers returned while the job still ran"


def test_a_process_that_does_not_end_holds_the_sweep_no_longer_than_its_limit(
        procs: list[subprocess.Popen[bytes]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    alive = job(procs, tmp_path / "sh-aaaa")  # not signalled: stands for one stuck in a call
    started = time.monotonic()
    _wait_ended([os.pidfd_open(alive.pid)], 0.3, "sh.leftovers_still_ending", "it goes on")
    assert time.monotonic() - started >= 0.3
    assert running(alive.pid)
    assert "sh.leftovers_still_ending processes=1 after=0.3s" in caplog.text


def background_sleep(pid_file: Path) -> int:
    """The pid the job wrote, once that process runs `sleep` (forked, it is the shell's
    copy with the shell's environment until `env -i` has run)."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                return pid
        assert time.monotonic() < deadline, "the job did not start its background sleep"
        time.sleep(0.02)


@pytest.mark.parametrize("leader", ["waits", "has ended"])
def test_a_process_that_cleared_its_environment_is_found_by_its_session(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], leader: str) -> None:
    """`env -i` drops DJS_JOB_DIR; the job's session, recorded as it started, still finds
    the process, also once the session's first process has ended."""
    work_root = tmp_path / "sh"
    workdir = work_root / "sh-aaaa"
    pid_file = tmp_path / "escaped.pid"
    end = "wait" if leader == "waits" else "exit 0"
    job_proc = job(procs, workdir, f"env -i sleep 60 & echo $! > {pid_file}; {end}")
    record_session(workdir, job_proc.pid)
    escaped = background_sleep(pid_file)
    if leader == "has ended":
        job_proc.wait()
    assert b"DJS_JOB_DIR" not in Path(f"/proc/{escaped}/environ").read_bytes()
    killed, removed = clear_leftovers(work_root)
    assert not running(escaped), "the process that cleared its environment survived"
    assert killed >= 1 and removed == 1
    assert not session_file(workdir).exists()


def test_a_session_number_now_of_another_process_is_left_alone(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Once a job's whole session has ended, its number may lead another session: that
    one's first process started at another time, and nothing of it is touched."""
    work_root = tmp_path / "sh"
    workdir = work_root / "sh-aaaa"
    workdir.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # not a job of ours
    procs.append(other)
    # the job's session had this number, but its first process started at tick 1
    session_file(workdir).write_text(f"{other.pid} 1 {_life()}\n")
    (work_root / ".sh-bbbb.session").write_text("not a record")
    assert clear_leftovers(work_root) == (0, 1)
    assert running(other.pid)
    assert not list(work_root.iterdir())


def test_a_record_of_another_boot_or_container_is_ignored(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A session whose first process has ended is taken for the job's only in the life of
    the pid namespace that recorded it: after a reboot or in a new container the number
    may be anyone's (a daemon's session, after its double fork)."""
    pid_file = tmp_path / "daemon.pid"
    starter = subprocess.Popen(["/bin/sh", "-c", f"sleep 60 & echo $! > {pid_file}"],
                               start_new_session=True)
    procs.append(starter)
    starter.wait()  # the session's first process has ended; its sleep runs on
    daemon = background_sleep(pid_file)
    work_root = tmp_path / "sh"
    work_root.mkdir()
    (work_root / ".sh-aaaa.session").write_text(f"{starter.pid} 1 another-boot/1\n")
    assert clear_leftovers(work_root) == (0, 0)
    assert running(daemon)
    (work_root / ".sh-aaaa.session").write_text(f"{starter.pid} 1 {_life()}\n")
    assert clear_leftovers(work_root) == (1, 0)  # of this life: the session is the job's
    assert not running(daemon)


RECORD_A_SESSION = """
import logging, subprocess, sys
from pathlib import Path
from cluster_node.leftovers import clear_leftovers, record_session, session_file
logging.basicConfig()
job = subprocess.Popen(["sleep", "5"], start_new_session=True)
workdir = Path(sys.argv[1])
workdir.mkdir(parents=True)
record_session(workdir, job.pid)
job.kill()
job.wait()
print(session_file(workdir).exists(), *clear_leftovers(workdir.parent))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a pid namespace of its own needs root and unshare(1)")
def test_no_session_is_recorded_where_proc_shows_another_namespaces_pids(
        tmp_path: Path) -> None:
    """In a pid namespace of its own without a /proc of its own, a pid the node knows
    names another process in /proc: no session is recorded, and no process is looked for
    (the sweep's pidfds would open other processes than those it read), only the job
    directories are removed."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def run(*prefix: str, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, sys.executable, "-c", RECORD_A_SESSION,
                               str(tmp_path / name / "sh-aaaa")], capture_output=True,
                              text=True, env=env, timeout=30, check=True)

    assert run(name="here").stdout.split() == ["True", "0", "1"]
    there = run("unshare", "--pid", "--fork", name="there")
    assert there.stdout.split() == ["False", "0", "1"]
    assert "sh.leftovers_not_looked_for" in there.stderr


def test_a_data_directory_where_no_sh_job_ever_ran(tmp_path: Path) -> None:
    assert clear_leftovers(tmp_path / "sh") == (0, 0)


# A child that leaves the job's process group for one of its own (as a shell's job control
# does), then runs `sleep`: out of reach of a kill of the group.
OWN_GROUP = (f"{sys.executable} -c 'import os; os.setpgid(0, 0); "
             "os.execvp(\"sleep\", [\"sleep\", \"60\"])'")


@pytest.mark.parametrize("leader", ["reaped", "ending"])
def test_a_job_that_ended_leaves_nothing_in_its_session(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], leader: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its group killed, a child in a group of its own still runs; the session finds it,
    and it has ended when `end_session` returns. Also while the session's first process
    is still ending from the kill of its group: reading its /proc then fails with ESRCH
    (seen under load: the pass was skipped, and the child outlived its job)."""
    workdir = tmp_path / "sh" / "sh-aaaa"
    pid_file = tmp_path / "escaped.pid"
    job_proc = job(procs, workdir, f"{OWN_GROUP} & echo $! > {pid_file}")
    started = record_session(workdir, job_proc.pid)
    assert started is not None
    escaped = background_sleep(pid_file)
    assert job_proc.wait() == 0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job_proc.pid, signal.SIGKILL)  # what a job's end did until now
    assert running(escaped) and os.getpgid(escaped) != job_proc.pid
    if leader == "ending":
        real_stat = leftovers._stat

        def ending(pid: int) -> list[str]:
            if pid == job_proc.pid:
                raise ProcessLookupError(3, "No such process")
            return real_stat(pid)

        monkeypatch.setattr(leftovers, "_stat", ending)
    assert end_session(job_proc.pid, started, 5) == 1
    assert not running(escaped)
    assert end_session(job_proc.pid, started, 5) == 0


def test_a_session_that_now_leads_another_process_is_not_ended(
        procs: list[subprocess.Popen[bytes]]) -> None:
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # not a job of ours
    procs.append(other)
    assert end_session(other.pid, "1", 5) == 0  # the job's first process started at tick 1
    assert running(other.pid)


async def test_an_sh_job_cut_by_two_time_limits_at_once_still_ends_its_session(
        tmp_path: Path) -> None:
    """The job's own time limit and the executor's fall due together. The first starts the
    pass over /proc in a thread; when the second cancels the task before a worker thread
    has begun that pass (all busy: under load), the pass must still run (seen: a child in
    a group of its own outlived its job)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    ctx = JobContext(NodeId("n1"), True, 0.5, 1024, None, work_root=tmp_path / "sh")
    marker = f"{time.time_ns() % 10**9}.5"  # a sleep of its own, found by its command line
    child = (f"{sys.executable} -c 'import os; os.setpgid(0, 0); open(\"moved\", \"w\"); "
             f'os.execvp("sleep", ["sleep", "{marker}"])\' & '
             f"while [ ! -e moved ]; do sleep 0.01; done; sleep 60")
    sh = load_job_types()["sh"]
    loop.call_later(0.45, pool.submit, time.sleep, 0.6)  # the one worker busy at 0.5 s
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.55):  # the executor's limit, just after the job's
                await sh.run((child,), ctx)
        for _ in range(300):  # the worker frees at ~1.05 s, then the pass runs
            if not processes_with(marker):
                break
            await asyncio.sleep(0.01)
        assert not processes_with(marker), "the child outlived its job"
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        pool.shutdown(wait=False)
