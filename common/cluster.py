"""`djs cluster`: a proxy and N nodes as child processes on this machine, each with its
own data directory, their log lines prefixed by process, stopped cleanly on Ctrl-C."""

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


class Child:
    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.output_closed = False  # it closed its output: it is exiting, or gone

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
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **env},
        start_new_session=True)  # Ctrl-C reaches us only; we stop the children in order
    return Child(name, proc)


async def run_cluster(nodes: int, proxy_port: int, first_client_port: int, data: Path,
                      slots: int, host: str, extra_env: dict[str, str],
                      dashboard_port: int = 8081) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    pumps: list[asyncio.Task[None]] = []
    env = {"PYTHONUNBUFFERED": "1", **extra_env}
    try:
        proxy = await _spawn("proxy", "reverse_proxy",
                             ["--host", host, "--port", str(proxy_port),
                              "--data-dir", str(data / "proxy"),
                              "--dashboard-port", str(dashboard_port)], env)
        children.append(proxy)
        pumps.append(asyncio.create_task(proxy.pump()))
        async with asyncio.timeout(START_TIMEOUT):
            bound_proxy = await proxy.ready
        for i in range(1, nodes + 1):
            name = f"node-{i}"
            child = await _spawn(name, "cluster_node", [
                "--proxy", f"127.0.0.1:{bound_proxy}", "--host", host,
                "--port", str(first_client_port + i - 1 if first_client_port else 0),
                "--node-id", name, "--slots", str(slots),
                "--data-dir", str(data / name)], env)
            children.append(child)
            pumps.append(asyncio.create_task(child.pump()))
        async with asyncio.timeout(START_TIMEOUT):
            ports = [await c.ready for c in children[1:]]
        print(f"cluster ready: proxy port {bound_proxy}, nodes on ports "
              f"{', '.join(map(str, ports))}; try: nc {host} {ports[0]}  (Ctrl-C stops)",
              flush=True)
        if dashboard_port:
            where = f"{os.environ.get('DASHBOARD_HOST', '127.0.0.1')}:{dashboard_port}"
            print(f"dashboard: http://{where}/  (djs status --dashboard {where})", flush=True)
        exited = asyncio.create_task(_first_exit(children))
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait([exited, waiting], return_when=asyncio.FIRST_COMPLETED)
        code = 0 if stop.is_set() else 1
        for task in (exited, waiting):
            task.cancel()
        return code
    finally:
        await _stop_all(children)
        for task in pumps:
            task.cancel()


async def _first_exit(children: list[Child]) -> None:
    await asyncio.wait([asyncio.create_task(c.proc.wait()) for c in children],
                       return_when=asyncio.FIRST_COMPLETED)
    for c in children:
        if c.proc.returncode is not None:
            print(f"[cluster] {c.name} exited with code {c.proc.returncode}; stopping",
                  flush=True)


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
