"""The node's worker processes, for CPU-bound work of its jobs (`fib` of a large n).

They are started fresh (`spawn`), not forked from the node: a forked worker held a copy
of every descriptor the node had open when it started, among them client connections,
which then stayed open after the node closed them (a client saw the goodbye line but
never the end of the connection), the listening socket and the store's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # prctl(2)
# The pool's resource tracker (a process of its own) unlinks the pool's semaphores when the
# node goes, and after a kill -9 it also warned, in the node's log, of "5 leaked semaphore
# objects to clean up" (nothing leaks: that is its cleaning up). It runs with this
# interpreter's -W options (multiprocessing passes sys.warnoptions on).
QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


def start_cpu_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes, each started when first needed."""
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def die_with_parent(parent: int) -> None:
    """Initializer of each worker: a node killed with `kill -9` left them behind for good
    (~40 MB each, waiting on a pipe they hold both ends of). Linux now kills a worker when
    the node goes; elsewhere this does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the node went before the line above ran
        os._exit(0)
