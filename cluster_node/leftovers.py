"""What `sh` jobs leave running: the processes of a job that has ended (`end_session`), and
of the jobs of a node that died without stopping them (`clear_leftovers`).

A job's end kills its process group, and then every process still in its session: a
background child that moved to a group of its own (`setpgid`, a shell's job control) outlived
the job and its node, and held the output pipe, so that a job which had exited 0 was reported
as timed out.

A node that died without stopping its `sh` jobs (`kill -9`, the OOM killer) leaves them
running; they are cleared before the restarted node runs anything.

An `sh` job runs in a session of its own, so that a timeout can kill its whole process
group; nothing then kills it when the node dies, and Linux's "kill me when my parent dies"
(PR_SET_PDEATHSIG) would need a `preexec_fn`, unsafe in a threaded process, and reach only
the first process. Left alone, the old copy runs on while the restarted node runs the same
job again (at-least-once): two `backup.sh` at once. So at start a node kills every process
whose environment names a job directory under its `DATA_DIR/sh` (`DJS_JOB_DIR`, inherited
by the job's children) or that is in the session of one of its jobs, then removes those
directories.

A job's session is recorded as it starts (`record_session`: `DATA_DIR/sh/.sh-….session`),
so that a process which cleared its environment (`env -i`) is found too. Killing a stranger
is worse than missing a leftover, so the record says which session it means: its number, its
first process's start time, and the life of the pid namespace (the boot's id and the start
time of the namespace's process 1). Linux gives a pid number to no new process while any
process is still in the session of that number; once the whole session is gone, the number
may go to an unrelated process that starts a session of its own: that one has another start
time, and is left alone. After a reboot or in a new container (another life), the job's
processes are gone anyway and its record is ignored.

Each process is signalled through a pidfd opened before its environment is read, so a pid
reused in between is never hit, and the sweep waits on those pidfds until the processes have
ended: SIGKILL is only a request (a process with much memory to give back takes tens of ms to
die), and the rerun must not start beside a copy still running. A process that both cleared
its environment and left the session (`setsid env -i …`) is out of reach, as it would be of
a timeout that left its process group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from cluster_node.shell_policy import JOB_DIR_VARIABLE

logger = logging.getLogger(__name__)

PROC = Path("/proc")
JOB_DIR_PREFIX = "sh-"  # of each job's directory (tempfile.mkdtemp)
SESSION_SUFFIX = ".session"
SESSION_RECORDS = f".{JOB_DIR_PREFIX}*{SESSION_SUFFIX}"  # glob of what `session_file` names
# How long the sweep waits for killed processes to end. One stuck in the kernel (a hung
# NFS write) ends only when its call returns, but runs no more of its own code: past this
# the node starts anyway, and says so.
END_WAIT_SECONDS = 10.0
MAX_PASSES = 5


def session_file(workdir: Path) -> Path:
    """Where the session of the job running in `workdir` is recorded: beside its directory,
    out of the job's reach, and hidden from the glob of job directories."""
    return workdir.parent / f".{workdir.name}{SESSION_SUFFIX}"


def record_session(workdir: Path, pid: int) -> str | None:
    """The job in `workdir` was started in a session of its own, led by `pid`: its first
    process's start time, for `end_session`. None where the session cannot be told apart
    (/proc of another pid namespace). Best effort: without the record only the environment
    mark finds its processes after a `kill -9` of the node."""
    try:
        life = _life()  # first: it says whether /proc's pids are this process's
        started = _stat(pid)[STARTTIME]
    except OSError:
        return None
    with contextlib.suppress(OSError):
        session_file(workdir).write_text(f"{pid} {started} {life}\n")
    return started


def end_session(sid: int, started: str, wait: float) -> int:
    """Kill every process still in the session of an `sh` job that has ended (`sid`, its
    first process, started at `started`: `record_session`), and wait at most `wait`
    seconds for them to end; how many were killed. Nothing if the number
    now leads another process's session (its first process ended long ago and the number
    went to a stranger that started a session of its own: another start time). Blocks:
    one pass over /proc (~15 us a process)."""
    try:
        if _stat(sid)[STARTTIME] != started:
            return 0
    except (FileNotFoundError, ProcessLookupError):
        # Its first process has ended, or is ending (the kill of its group: reading its
        # /proc then fails with ESRCH): the number is the session's while it has any.
        pass
    except OSError:
        return 0
    pidfds = _kill_where(lambda pid: _live_session(pid) == sid)
    _wait_ended(pidfds, wait, "sh.job_processes_still_ending", "the job ends anyway")
    return len(pidfds)


def forget_session(workdir: Path) -> None:
    session_file(workdir).unlink(missing_ok=True)


def clear_leftovers(work_root: Path) -> tuple[int, int]:
    """Kill the processes of `sh` jobs under `work_root` and remove their directories:
    (processes killed, directories removed). Call before any job of this node starts."""
    if not work_root.is_dir():
        return 0, 0  # no sh job ever ran here
    killed = 0
    try:
        mounts = os.readlink(PROC / "self" / "ns" / "mnt")
    except OSError:
        mounts = ""  # no /proc (not Linux): not looked for
    if mounts and not _proc_is_ours():
        logger.warning("sh.leftovers_not_looked_for: /proc shows the pids of another pid "
                       "namespace (a pid namespace without a /proc of its own?)")
    elif mounts and hasattr(os, "pidfd_open"):  # Linux 5.3 on
        mark = f"{JOB_DIR_VARIABLE}={work_root}{os.sep}{JOB_DIR_PREFIX}".encode()
        sessions = _job_sessions(work_root)
        # Again until a pass finds none: a child forked just before its parent's kill may
        # have a pid the pass had gone past (pids wrap around).
        for _ in range(MAX_PASSES):
            pidfds = _kill_where(functools.partial(_ours, mark=mark, sessions=sessions,
                                                   mounts=mounts))
            if not pidfds:
                break
            killed += len(pidfds)
            _wait_ended(pidfds, END_WAIT_SECONDS, "sh.leftovers_still_ending",
                        "the node starts anyway")
    removed = 0
    for workdir in work_root.glob(f"{JOB_DIR_PREFIX}*"):
        shutil.rmtree(workdir, ignore_errors=True)
        removed += 1
    for record in work_root.glob(SESSION_RECORDS):
        record.unlink(missing_ok=True)
    if killed or removed:
        logger.warning("sh.leftovers_cleared processes_killed=%d directories_removed=%d "
                       "(sh jobs of this node's previous run, which ended without stopping "
                       "them; those jobs run again)", killed, removed)
    return killed, removed


def _job_sessions(work_root: Path) -> set[int]:
    """The sessions of the recorded jobs that may still have processes: those of this life
    of the pid namespace whose first process has ended (its number is then still theirs
    while any process is in the session) or is still the one recorded (same start time)."""
    sessions: set[int] = set()
    try:
        life = _life()
    except OSError:
        return sessions  # no way to tell a record of this life: the environment mark only
    for record in work_root.glob(SESSION_RECORDS):
        try:
            number, started, recorded_life = record.read_text().split()
            sid = int(number)
        except (OSError, ValueError):
            continue  # unreadable or half written: the environment mark still finds them
        if recorded_life != life:
            continue  # another boot or container: its processes went with it
        try:
            if _stat(sid)[STARTTIME] == started:
                sessions.add(sid)  # its first process still runs
        except (FileNotFoundError, ProcessLookupError):
            sessions.add(sid)  # its first process has ended (or is ending)
        except OSError:
            pass
    return sessions


def _kill_where(match: Callable[[int], bool]) -> list[int]:
    """SIGKILL every process (but this one) for which `match(pid)` holds; their pidfds,
    open. `match` is asked again once a pidfd holds the process, and the signal goes
    through that pidfd: a pid reused in between is never hit (it would go to the process
    that ended). Asked first without one: most processes are not ours (~15 us each here)."""
    pidfds = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit() or (pid := int(entry.name)) == os.getpid():
            continue
        try:
            if not match(pid):
                continue
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already, or not ours to read
            continue
        try:
            if match(pid):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                pidfds.append(pidfd)
                continue
        except OSError:  # it ended meanwhile
            pass
        os.close(pidfd)
    return pidfds


def _ours(pid: int, mark: bytes, sessions: set[int], mounts: str) -> bool:
    """Whether the process is of one of this node's jobs: in a recorded session, or with
    the job directories' mark in its environment, and in this node's mount namespace
    (another container's, in a shared pid namespace, has a /data that is not ours)."""
    if os.readlink(PROC / str(pid) / "ns" / "mnt") != mounts:
        return False
    if sessions and _live_session(pid) in sessions:
        return True
    return any(entry.startswith(mark)
               for entry in (PROC / str(pid) / "environ").read_bytes().split(b"\0"))


# Fields of /proc/<pid>/stat after the command's closing parenthesis (proc(5), from 0).
STATE, SESSION, STARTTIME = 0, 3, 19


def _live_session(pid: int) -> int | None:
    """The process's session, None once it has ended (a zombie waiting for its parent to
    read its status: dead, nothing to kill)."""
    fields = _stat(pid)
    return None if fields[STATE] in ("Z", "X") else int(fields[SESSION])


@functools.cache  # neither changes while this process lives
def _life() -> str:
    """This life of the pid namespace: the boot, and when its process 1 started. OSError
    when /proc shows the pids of another namespace (a pid namespace of its own without a
    /proc of its own, `unshare --pid` without `--mount-proc`): a pid the node knows would
    name another process there, so no session is recorded or looked for."""
    if not _proc_is_ours():
        raise OSError("/proc is not of this process's pid namespace")
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}/{_stat(1)[STARTTIME]}"


def _proc_is_ours() -> bool:
    """Whether /proc shows this process's pid namespace: its pids are those a pidfd opens
    and a child gets. (`unshare --pid` without `--mount-proc` shows another's.)"""
    try:
        return os.readlink(PROC / "self") == str(os.getpid())
    except OSError:
        return False  # no /proc


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command (which may hold spaces and parentheses)."""
    with open(f"{PROC}/{pid}/stat") as stat:  # not Path.read_text: twice as fast
        return stat.read().rpartition(")")[2].split()


def _wait_ended(pidfds: list[int], seconds: float, event: str, then: str) -> None:
    """Wait until the processes behind `pidfds` have ended (a pidfd turns readable then),
    at most `seconds` (then log `event`, saying what happens `then`); close the pidfds."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    waiting = set(pidfds)
    deadline = time.monotonic() + seconds
    while waiting and (left := deadline - time.monotonic()) > 0:
        for pidfd, _ in poller.poll(left * 1000):
            poller.unregister(pidfd)
            waiting.discard(pidfd)
    if waiting:
        logger.warning("%s processes=%d after=%gs (killed, but not ended yet: stuck in a "
                       "system call; %s)", event, len(waiting), seconds, then)
    for pidfd in pidfds:
        os.close(pidfd)
