"""One process per data directory. Two nodes (or two proxies) on one directory would both
write its store, each from a state the other does not know: the second is refused at start.

The lock is a POSIX record lock (`lockf`) on `<data_dir>/<name>.lock`, which holds the
holder's pid for the error message. The kernel lets go of it when the process ends, by
`kill -9` too, so a restart never finds a stale lock; and it belongs to the process, not to
the file descriptor, so worker processes forked from a node (its pool) do not keep it after
the node is gone, as they would an `flock`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from common.errors import DataDirInUse, StoreError


def unwritable_hint(data_dir: Path) -> str:
    """Said after an error to open a file there, when the reason is likely this."""
    if os.access(data_dir, os.W_OK):
        return ""
    return " (the data directory is not writable: read-only?)"


def claim(data_dir: Path, name: str) -> int:
    """Lock `data_dir` for this process (for `name`: "node", "proxy"); the descriptor to
    close when done. Raises DataDirInUse if another process holds it."""
    path = data_dir / f"{name}.lock"
    for other in ("node", "proxy"):
        if other != name and (data_dir / f"{other}.sqlite").exists():
            # Each has its own store file, so nothing stopped it: a node started on the
            # proxy's directory joined the cluster under the host's name.
            raise DataDirInUse(f"data directory {data_dir} holds a {other}'s store "
                               f"({other}.sqlite): give this {name} a DATA_DIR of its own")
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc}{unwritable_hint(data_dir)}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):  # say, a file system without locks
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc}") from exc
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(f"data directory {data_dir} is in use by another {name} (pid "
                           f"{holder}): stop that one first, or give this one another "
                           "DATA_DIR") from None
    with contextlib.suppress(OSError):  # only for the message above: a full disk may refuse
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claimed(data_dir: Path, name: str) -> Iterator[None]:
    """`claim` for the length of a block."""
    fd = claim(data_dir, name)
    try:
        yield
    finally:
        os.close(fd)
