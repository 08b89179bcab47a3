"""Job types: a registered function per type, looked up by name at submission and at run.

A job type validates its arguments at submission (so a bad job never gets a ticket) and
runs them on whichever node the proxy picks. Built-in: `sleep`, `fib`, `sh`. More come
from the entry-point group `djs.jobs`: each entry point names a `JobType` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path

from cluster_node.leftovers import JOB_DIR_PREFIX, end_session, forget_session, record_session
from cluster_node.output_text import output_text
from cluster_node.shell_policy import allowed_argv, clean_env
from common.errors import InvalidJob
from common.jobs import NodeId

logger = logging.getLogger(__name__)

# A day: longer sleeps are almost surely a typo (the original took milliseconds).
MAX_SLEEP_MS = 86_400_000
# fib(100_000) has 20,899 digits and takes well under a second; beyond that it is abuse.
MAX_FIB_N = 100_000
# A shell command longer than this is not typed into netcat.
MAX_SH_COMMAND_CHARS = 8192
ENTRY_POINT_GROUP = "djs.jobs"
# Default attempt timeout of fib: the largest allowed n takes well under a second.
FIB_TIMEOUT = 60.0


class JobFailed(Exception):
    """A job's own failure; its text is the whole reason (no exception type prefixed)."""


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a running job may use on its node."""

    node_id: NodeId
    allow_shell: bool
    sh_timeout: float
    sh_output_limit: int
    cpu_pool: Executor | None  # runs CPU-bound work off the event loop
    shell_allow: tuple[str, ...] = ()  # SHELL_ALLOW prefixes; empty: any command, via /bin/sh
    work_root: Path | None = None  # where each sh job gets its own directory
    # Test and benchmark knob: sleep jobs started at or after `slow_from` (time.monotonic())
    # take `slow_factor` times their duration, to play a node that suddenly slows down.
    slow_factor: float = 1.0
    slow_from: float = 0.0
    output_sink: Callable[[bytes], None] | None = None  # live output of this job (`tail`)


Validator = Callable[[tuple[str, ...], "JobContext"], tuple[str, ...]]
Runner = Callable[[tuple[str, ...], "JobContext"], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class JobType:
    name: str
    usage: str
    validate: Validator  # returns normalised args or raises InvalidJob
    run: Runner  # returns the result text; raising marks the attempt failed
    default_timeout: float = 0.0  # seconds an attempt may run unless the job says (0: none)
    # Streams output while it runs (`tail`): its context gets an `output_sink`.
    live_output: bool = False


def iso(ts: float) -> str:
    """UTC, to the millisecond, as `datetime` rounds it: 2026-11-24T17:22:03.123Z."""
    second = math.floor(ts)
    micros = round((ts - second) * 1e6)
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_iso_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    # Every sleep result formats two times; formatting the second once saves most of it.
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _one_int(args: tuple[str, ...], name: str, low: int, high: int) -> int:
    if len(args) != 1:
        raise InvalidJob(f"{name} takes exactly one integer argument")
    text = args[0]
    if not (text.isascii() and text.isdigit()):
        raise InvalidJob(f"{name} argument must be a whole number from {low} to {high}, "
                         f"got {text[:40]!r}{'…' if len(text) > 40 else ''}")
    digits = text.lstrip("0") or "0"  # `sleep 0…01` is 1 ms, however many zeros
    if len(digits) > 12:  # (and int() of over 4,300 digits raises)
        raise InvalidJob(f"{name} argument must be from {low} to {high}, got a number of "
                         f"{len(digits)} digits")
    value = int(digits)
    if not low <= value <= high:
        raise InvalidJob(f"{name} argument must be from {low} to {high}, got {value}")
    return value


# ---------------------------------------------------------------------------- sleep


def _validate_sleep(args: tuple[str, ...], ctx: JobContext) -> tuple[str, ...]:
    return (str(_one_int(args, "sleep", 0, MAX_SLEEP_MS)),)


async def _run_sleep(args: tuple[str, ...], ctx: JobContext) -> str:
    ms = int(args[0])
    started = time.time()
    factor = ctx.slow_factor if time.monotonic() >= ctx.slow_from else 1.0
    await asyncio.sleep(ms * factor / 1000)
    return f"slept {ms} ms on {ctx.node_id} (started {iso(started)}, finished {iso(time.time())})"


# ---------------------------------------------------------------------------- fib


def fibonacci(n: int) -> int:
    """Exact F(n) by fast doubling: O(log n) big-integer multiplications."""
    a, b = 0, 1
    for bit in bin(n)[2:]:
        c = a * (2 * b - a)
        d = a * a + b * b
        a, b = (d, c + d) if bit == "1" else (c, d)
    return a


def _fib_text(n: int) -> str:
    return decimal_text(fibonacci(n))


# Python refuses `str()` of an int of more than 4,300 digits (sys.get_int_max_str_digits:
# the conversion is quadratic); fib(MAX_FIB_N) has 20,899. Converted in pieces of fewer.
_PIECE_DIGITS = 4000
_PIECE = 10 ** _PIECE_DIGITS


def decimal_text(value: int) -> str:
    """`str(value)` of a non-negative int of any length, without changing the process's
    limit on conversions (global, and a guard for the rest of the node)."""
    pieces: list[str] = []
    while value >= _PIECE:
        value, low = divmod(value, _PIECE)
        pieces.append(f"{low:0{_PIECE_DIGITS}d}")
    pieces.append(str(value))
    return "".join(reversed(pieces))


def _validate_fib(args: tuple[str, ...], ctx: JobContext) -> tuple[str, ...]:
    return (str(_one_int(args, "fib", 0, MAX_FIB_N)),)


async def _run_fib(args: tuple[str, ...], ctx: JobContext) -> str:
    n = int(args[0])
    if n < 10_000 or ctx.cpu_pool is None:  # small n: cheaper than a process hop
        return _fib_text(n)
    return await asyncio.get_running_loop().run_in_executor(ctx.cpu_pool, _fib_text, n)


# ---------------------------------------------------------------------------- sh


def _validate_sh(args: tuple[str, ...], ctx: JobContext) -> tuple[str, ...]:
    if not ctx.allow_shell:
        raise InvalidJob("sh jobs are disabled on this node (start it with ALLOW_SHELL=1)")
    command = " ".join(args).strip()
    if not command:
        raise InvalidJob("sh needs a command, e.g. 'submit sh echo hi'")
    if len(command) > MAX_SH_COMMAND_CHARS:
        raise InvalidJob(f"sh command longer than {MAX_SH_COMMAND_CHARS} characters")
    if ctx.shell_allow:
        allowed_argv(command, ctx.shell_allow)
    return (command,)


async def _run_sh(args: tuple[str, ...], ctx: JobContext) -> str:
    if not ctx.allow_shell:  # the executing node decides too, not only the origin
        raise InvalidJob(f"sh jobs are disabled on {ctx.node_id}")
    argv = allowed_argv(args[0], ctx.shell_allow) if ctx.shell_allow else None
    if ctx.work_root is not None:
        ctx.work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=JOB_DIR_PREFIX, dir=ctx.work_root)
    try:
        return await _run_in(args[0], argv, workdir, ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        forget_session(Path(workdir))


async def _run_in(command: str, argv: list[str] | None, workdir: str, ctx: JobContext) -> str:
    common = {"stdin": asyncio.subprocess.DEVNULL, "stdout": asyncio.subprocess.PIPE,
              "stderr": asyncio.subprocess.STDOUT, "start_new_session": True,
              "cwd": workdir, "env": clean_env(workdir)}
    if argv is None:
        proc = await asyncio.create_subprocess_shell(command, **common)  # type: ignore[arg-type]
    else:
        proc = await asyncio.create_subprocess_exec(*argv, **common)  # type: ignore[arg-type]
    # Found by a restart after a kill -9 of the node, also what cleared its environment.
    started = record_session(Path(workdir), proc.pid)
    assert proc.stdout is not None
    output = bytearray()
    reader = asyncio.ensure_future(
        _collect(proc.stdout, ctx.sh_output_limit + 1, ctx.output_sink, output))
    try:
        async with asyncio.timeout(ctx.sh_timeout):
            code = await _exited(proc)
        # Whatever it left running in the background dies with it; that also closes their
        # ends of the pipe, so the reader sees EOF after the last byte written.
        await _end(proc.pid, started)
        # Unless a process that left the session holds it (`setsid`): what it wrote by then.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), READ_AFTER_END_SECONDS)
    except TimeoutError:
        await _end(proc.pid, started)
        await _exited(proc)  # not wait(): a descendant that left the group may hold stdout
        raise TimeoutError(f"timed out after {ctx.sh_timeout:g} s") from None
    except asyncio.CancelledError:  # a cancel, the executor's time limit, a shutdown
        await _end(proc.pid, started)
        raise
    finally:
        reader.cancel()
    text = output_text(bytes(output[: ctx.sh_output_limit]).rstrip(b"\n"))
    if len(output) > ctx.sh_output_limit:
        text += f" [output truncated at {ctx.sh_output_limit} bytes]"
    if code != 0:  # a failed attempt (retried if the job has retries), its code the reason
        raise JobFailed(f"exit {code}: {text}")
    return f"exit {code}: {text}"


# How often a running `sh` job is checked for having exited (see `_exited`).
EXIT_POLL_SECONDS = 0.02
# How long the output is read after a job's processes were killed: the pipe then holds what
# they wrote and its end, unless a process that left the session holds it open.
READ_AFTER_END_SECONDS = 1.0
# How long a job's end waits for the processes it killed to be gone (they die within
# milliseconds; one stuck in a system call runs no more of its code anyway).
END_WAIT_SECONDS = 2.0


async def _end(sid: int, started: str | None) -> None:
    """Kill the job's process group, then every process left in its session (a background
    child that moved to a group of its own), and wait for them to end. The pass over /proc
    runs in a thread (~1 ms here, more on a host with thousands of processes), shielded: a
    cancel of this task meanwhile (the executor's time limit, which falls due with the
    job's own) must not cancel the pass before a worker thread has begun it (seen under
    load: a child in a group of its own outlived its job)."""
    _kill_group(sid)
    if started is not None:
        await asyncio.shield(asyncio.to_thread(end_session, sid, started, END_WAIT_SECONDS))


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The exit code once the process itself has exited. `Process.wait()` also waits for its
    pipes to close, which a background child holding stdout would delay until the timeout."""
    while proc.returncode is None:  # noqa: ASYNC110 - no event exists for "exited"
        await asyncio.sleep(EXIT_POLL_SECONDS)
    return proc.returncode


async def _collect(stream: asyncio.StreamReader, keep: int,
                   sink: Callable[[bytes], None] | None, kept: bytearray) -> None:
    """Read to the end; keep the first `keep` bytes in `kept`; show every chunk to `sink`.
    The rest is read and dropped, so a chatty job never blocks on a full pipe."""
    while chunk := await stream.read(65536):
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        if sink is not None:
            sink(chunk)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- registry

BUILTIN_TYPES = (
    JobType("sleep", "sleep <ms>  (or a bare number)", _validate_sleep, _run_sleep),
    JobType("fib", "fib <n>  (exact Fibonacci number, n <= 100000)", _validate_fib, _run_fib,
            default_timeout=FIB_TIMEOUT),
    JobType("sh", "sh <command>  (only with ALLOW_SHELL=1)", _validate_sh, _run_sh,
            live_output=True),
)


def load_job_types() -> dict[str, JobType]:
    """Built-in types plus those registered under the `djs.jobs` entry-point group."""
    types = {t.name: t for t in BUILTIN_TYPES}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
        except Exception:
            logger.exception("jobtype.load_failed entry_point=%s", ep.name)
            continue
        if isinstance(plugin, JobType):
            types[plugin.name] = plugin
        else:
            logger.error("jobtype.not_a_jobtype entry_point=%s", ep.name)
    return types


def runnable_types(types: dict[str, JobType], ctx: JobContext) -> tuple[str, ...]:
    """The types this node runs, for its HELLO (the proxy sends it no other): all it has,
    but `sh` without ALLOW_SHELL, or when its jobs' directory cannot be written (said in the
    log). In a cluster whose nodes differ, a node that could not run `sh` failed every `sh`
    job it was given, and, failing them at once, was given half of them."""
    names = set(types)
    if "sh" in names and not ctx.allow_shell:
        names.discard("sh")
    elif "sh" in names and (why := _unwritable(ctx.work_root)):
        logger.error("sh.unavailable node=%s error=%s: this node takes no sh job",
                     ctx.node_id, why)
        names.discard("sh")
    return tuple(sorted(names))


def _unwritable(root: Path | None) -> str:
    """Why an sh job's directory could not be made under `root` ("" if it can)."""
    if root is None:
        return ""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=JOB_DIR_PREFIX, dir=root))
    except OSError as exc:
        return str(exc)
    return ""
