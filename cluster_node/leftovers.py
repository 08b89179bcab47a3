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
reused in between is never hit. A process that dropped the variable (`env -i`) is out of
reach, as it would be of a timeout that left its process group.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

from cluster_node.shell_policy import JOB_DIR_VARIABLE

logger = logging.getLogger(__name__)

PROC = Path("/proc")
JOB_DIR_PREFIX = "sh-"  # tempfile.mkdtemp's prefix for each job's directory


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
        killed = sum(_kill_if_marked(int(entry.name), mark, mounts)
                     for entry in os.scandir(PROC)
                     if entry.name.isdigit() and int(entry.name) != os.getpid())
    removed = 0
    for workdir in work_root.glob(f"{JOB_DIR_PREFIX}*"):
        shutil.rmtree(workdir, ignore_errors=True)
        removed += 1
    if killed or removed:
        logger.warning("sh.leftovers_cleared processes_killed=%d directories_removed=%d "
                       "(sh jobs of this node's previous run, which ended without stopping "
                       "them; those jobs run again)", killed, removed)
    return killed, removed


def _kill_if_marked(pid: int, mark: bytes, mounts: str) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already (or another user's and out of reach anyway)
        return False
    try:
        if os.readlink(PROC / str(pid) / "ns" / "mnt") != mounts:
            return False  # another container's (a shared pid namespace): its /data is not ours
        environ = (PROC / str(pid) / "environ").read_bytes()
        if not any(entry.startswith(mark) for entry in environ.split(b"\0")):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:  # not ours to read, or it ended meanwhile
        return False
    finally:
        os.close(pidfd)
