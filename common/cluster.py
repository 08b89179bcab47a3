"""`djs cluster`: a proxy and N nodes as child processes on this machine, each with its
own data directory, their log lines prefixed by process, stopped cleanly on Ctrl-C.

A child that dies (a crash, `kill -9`) is started again on its data directory and its port,
as Docker's `restart: always` does for the containers: a node killed with `kill -9` took
the whole cluster down with it. Also one that cannot run when started again (exit 3: its
port held for a moment by another process, say; its log says why), with a growing delay.
One stopped with SIGTERM (exit 0) is left stopped; the cluster ends when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

READY_PREFIX = "listening "
START_TIMEOUT = 30.0
# How long a child that closed its output gets to exit before it is sent SIGTERM.
EXITING_SECONDS = 2.0
# The exit code of a child stopped on purpose (SIGTERM): not started again.
STOPPED = 0
# A child that died is started again after this long, twice as long after each death
# within a minute of its start (a crash loop), at most MAX_RESTART_SECONDS.
RESTART_SECONDS = 1.0
MAX_RESTART_SECONDS = 30.0
STABLE_SECONDS = 60.0


class Child:
    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str]) -> None:
        self.name, self.module, self.args, self.env = name, module, args, env
        self.restart_delay = RESTART_SECONDS
        self.pump_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, *self.args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.env},
            start_new_session=True)  # Ctrl-C reaches us only; we stop the children in order
        self.started = asyncio.get_running_loop().time()
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.output_closed = False  # it closed its output: it is exiting, or gone
        self.pump_task = asyncio.create_task(self.pump())

    async def bound(self) -> int:
        """Its port once it listens; from then on it is started again on that one (with
        `--port 0` it would get another)."""
        port = await self.ready
        self.args[self.args.index("--port") + 1] = str(port)
        return port

    async def pump(self) -> None:
        """Copy the child's output, prefixed; resolve `ready` with its port."""
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(READY_PREFIX) and not self.ready.done():
                port = int(line.rsplit("port=", 1)[1])
                self.ready.set_result(port)
            print(f"[{self.name}] {line}", flush=True)
        self.output_closed = True
        if not self.ready.done():
            await self.exited()
            code = self.proc.returncode
            how = "closed its output" if code is None else f"exited with code {code}"
            self.ready.set_exception(RuntimeError(f"{self.name} {how} before it was ready "
                                                  "(its log lines above say why)"))


    async def exited(self) -> None:
        """Give a child that closed its output EXITING_SECONDS to exit, reaped by asyncio's
        child watcher. A signal first would reap it itself (Popen.send_signal polls), and
        the watcher would log "Unknown child process" and report 255, not the exit code."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXITING_SECONDS):
                await self.proc.wait()


async def _spawn(name: str, module: str, args: list[str], env: dict[str, str]) -> Child:
    child = Child(name, module, args, env)
    await child.start()
    return child


async def run_cluster(nodes: int, proxy_port: int, first_client_port: int, data: Path,
                      slots: int, host: str, extra_env: dict[str, str],
                      dashboard_port: int = 8081) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    env = {"PYTHONUNBUFFERED": "1", **extra_env}
    try:
        proxy = await _spawn("proxy", "reverse_proxy",
                             ["--host", host, "--port", str(proxy_port),
                              "--data-dir", str(data / "proxy"),
                              "--dashboard-port", str(dashboard_port)], env)
        children.append(proxy)
        async with asyncio.timeout(START_TIMEOUT):
            bound_proxy = await proxy.bound()
        for i in range(1, nodes + 1):
            name = f"node-{i}"
            child = await _spawn(name, "cluster_node", [
                "--proxy", f"127.0.0.1:{bound_proxy}", "--host", host,
                "--port", str(first_client_port + i - 1 if first_client_port else 0),
                "--node-id", name, "--slots", str(slots),
                "--data-dir", str(data / name)], env)
            children.append(child)
        async with asyncio.timeout(START_TIMEOUT):
            ports = [await c.bound() for c in children[1:]]
        print(f"cluster ready: proxy port {bound_proxy}, nodes on ports "
              f"{', '.join(map(str, ports))}; try: nc {host} {ports[0]}  (Ctrl-C stops)",
              flush=True)
        if dashboard_port:
            where = f"{os.environ.get('DASHBOARD_HOST', '127.0.0.1')}:{dashboard_port}"
            print(f"dashboard: http://{where}/  (djs status --dashboard {where})", flush=True)
        supervising = asyncio.create_task(_supervise(children))
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait([supervising, waiting], return_when=asyncio.FIRST_COMPLETED)
        code = 0 if stop.is_set() else 1
        for task in (supervising, waiting):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervising
        return code
    finally:
        await _stop_all(children)
        # Their last lines: a pipe left unread until the loop closes fails at exit.
        pumps = [c.pump_task for c in children if c.pump_task is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXITING_SECONDS):
                await asyncio.gather(*pumps, return_exceptions=True)
        for task in pumps:
            task.cancel()


async def _supervise(children: list[Child]) -> None:
    """Start again each child that dies, for as long as any is left running."""
    await asyncio.gather(*(_life(c) for c in children))
    print("[cluster] no process left running; stopping", flush=True)


async def _life(child: Child) -> None:
    loop = asyncio.get_running_loop()
    while True:
        code = await child.proc.wait()
        if code == STOPPED:
            print(f"[cluster] {child.name} exited with code {code}; not started again",
                  flush=True)
            return
        if loop.time() - child.started > STABLE_SECONDS:
            child.restart_delay = RESTART_SECONDS
        print(f"[cluster] {child.name} exited with code {code}; starting it again in "
              f"{child.restart_delay:g} s", flush=True)
        await asyncio.sleep(child.restart_delay)
        child.restart_delay = min(2 * child.restart_delay, MAX_RESTART_SECONDS)
        if child.pump_task is not None:
            await child.pump_task  # its last lines, before the new process's
        await child.start()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                port = await child.bound()
            print(f"[cluster] {child.name} is back on port {port}", flush=True)
        except (RuntimeError, TimeoutError):
            pass  # it exited again (its lines above say why), or is slow: the loop sees


async def _stop_all(children: list[Child]) -> None:
    for child in reversed(children):  # nodes first, the proxy last
        if child.output_closed:  # exiting by itself (say, it could not start)
            await child.exited()
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            async with asyncio.timeout(10):
                await child.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
