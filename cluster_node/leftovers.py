"""What a node that died without stopping its `sh` jobs (`kill -9`, the OOM killer) leaves
of them, cleared before the restarted node runs anything.

An `sh` job runs in a session of its own, so that a timeout can kill its whole process
group; nothing then kills it when the node dies, and Linux's "kill me when my parent dies"
(PR_SET_PDEATHSIG) would need a `preexec_fn`, unsafe in a threaded process, and reach only
the first process. Left alone, the old copy runs on while the restarted node runs the same
job again (at-least-once): two `backup.sh` at once. So at start a node kills every process
whose environment names a job directory under its `DATA_DIR/sh` (`DJS_JOB_DIR`, inherited
by the job's children), then removes those directories.

Each process is signalled through a pidfd opened before its environment is read, so a pid
reused in between is never hit, and the sweep waits on those pidfds until the processes have
ended: SIGKILL is only a request (a process with much memory to give back takes tens of ms to
die), and the rerun must not start beside a copy still running. A process that dropped the
variable (`env -i`) is out of reach, as it would be of a timeout that left its process group.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import time
from pathlib import Path

from cluster_node.shell_policy import JOB_DIR_VARIABLE

logger = logging.getLogger(__name__)

PROC = Path("/proc")
JOB_DIR_PREFIX = "sh-"  # tempfile.mkdtemp's prefix for each job's directory
# How long the sweep waits for killed processes to end. One stuck in the kernel (a hung
# NFS write) ends only when its call returns, but runs no more of its own code: past this
# the node starts anyway, and says so.
END_WAIT_SECONDS = 10.0
MAX_PASSES = 5


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
    if mounts and hasattr(os, "pidfd_open"):  # Linux 5.3 on
        mark = f"{JOB_DIR_VARIABLE}={work_root}{os.sep}{JOB_DIR_PREFIX}".encode()
        # Again until a pass finds none: a child forked just before its parent's kill may
        # have a pid the pass had gone past (pids wrap around).
        for _ in range(MAX_PASSES):
            pidfds = [pidfd for entry in os.scandir(PROC)
                      if entry.name.isdigit() and int(entry.name) != os.getpid()
                      if (pidfd := _kill_if_marked(int(entry.name), mark, mounts)) is not None]
            if not pidfds:
                break
            killed += len(pidfds)
            _wait_ended(pidfds, END_WAIT_SECONDS)
    removed = 0
    for workdir in work_root.glob(f"{JOB_DIR_PREFIX}*"):
        shutil.rmtree(workdir, ignore_errors=True)
        removed += 1
    if killed or removed:
        logger.warning("sh.leftovers_cleared processes_killed=%d directories_removed=%d "
                       "(sh jobs of this node's previous run, which ended without stopping "
                       "them; those jobs run again)", killed, removed)
    return killed, removed


def _kill_if_marked(pid: int, mark: bytes, mounts: str) -> int | None:
    """The pidfd of the process, open, if it was one of ours and got SIGKILL; else None."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already (or another user's and out of reach anyway)
        return None
    try:
        if os.readlink(PROC / str(pid) / "ns" / "mnt") != mounts:
            pass  # another container's (a shared pid namespace): its /data is not ours
        elif any(entry.startswith(mark)
                 for entry in (PROC / str(pid) / "environ").read_bytes().split(b"\0")):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return pidfd
    except OSError:  # not ours to read, or it ended meanwhile
        pass
    os.close(pidfd)
    return None


def _wait_ended(pidfds: list[int], seconds: float) -> None:
    """Wait until the processes behind `pidfds` have ended (a pidfd turns readable then),
    at most `seconds`; close the pidfds."""
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
        logger.warning("sh.leftovers_still_ending processes=%d after=%.0fs (killed, but not "
                       "ended yet: stuck in a system call; the node starts anyway)",
                       len(waiting), seconds)
    for pidfd in pidfds:
        os.close(pidfd)
