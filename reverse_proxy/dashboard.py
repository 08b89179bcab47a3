"""The web dashboard and `/metrics`, served by aiohttp in the proxy's own event loop.

It only reads the proxy (`ProxyServer.state`, the links and the observer's history). A job
submitted from the page enters the cluster the way every job does: the dashboard opens the
line protocol to a live node's client port (the address the node gave in HELLO) and sends
`submit <type> <args>`; that node is the job's origin and keeps its result.

JSON API (documented in the README, section "Dashboard"):
    GET  /api/cluster          nodes, queue, throughput samples
    GET  /api/jobs             recent jobs, newest first (?state=&q=&limit=)
    GET  /api/jobs/{ticket}    one job with its attempts and its last live output lines
    POST /api/jobs             {"type", "args", "priority"?, "node"?} -> {"ticket", "node"}
    GET  /api/events           server-sent events: {"cluster", "jobs", "counts"} on change
    GET  /metrics              Prometheus text format

With a token (DASHBOARD_TOKEN) every path asks for it: `Authorization: Bearer <token>`, or
HTTP Basic with the token as the password, which is what the browser's prompt sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import auth
from common.jobs import NodeId
from common.store_metrics import StoreCollector
from reverse_proxy.history import JOB_STATES, JobEntry
from reverse_proxy.node_server import ProxyServer
from reverse_proxy.observer import ProxyObserver
from reverse_proxy.records import QUEUED

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
# Seconds between throughput samples, and the longest an SSE client waits for an update
# (node ages change even when nothing else does).
SAMPLE_PERIOD = 1.0
PUSH_PERIOD = 1.0
# How often the SSE loop looks for a change to push.
PUSH_POLL = 0.2
# Jobs in one SSE push and the most one /api/jobs call returns.
PUSH_JOBS = 50
MAX_LIMIT = 1000
# A submission is one protocol line; the node caps lines at 40 KiB.
MAX_SUBMIT_CHARS = 8192
SUBMIT_TIMEOUT = 5.0
# The nodes' bound on `submit --priority N`.
MAX_PRIORITY = 1_000_000
JOB_TYPE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    def __init__(self, proxy: ProxyServer, token: str | None = None,
                 client_token: str | None = None) -> None:
        self.proxy = proxy
        self.token = token
        self.client_token = client_token  # sent as `auth` to nodes that want CLIENT_TOKEN
        self.observer = ProxyObserver(lambda: self.proxy.state, StoreCollector(
            "djs_store", proxy.store_health, lambda: self.proxy.store.stats,
            lambda: len(self.proxy.state.set_aside)))
        proxy.hooks.append(self.observer)
        self._runner: web.AppRunner | None = None
        self._stopping = False  # ends the event streams, so shutdown does not wait on them

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._require_token])
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", WEB_DIR)
        app.router.add_get("/api/cluster", self.api_cluster)
        app.router.add_get("/api/jobs", self.api_jobs)
        app.router.add_post("/api/jobs", self.api_submit)
        app.router.add_get("/api/jobs/{ticket}", self.api_job)
        app.router.add_get("/api/events", self.api_events)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _require_token(self, request: web.Request, handler: Handler
                             ) -> web.StreamResponse:
        if self.token is None or auth.bearer_allowed(
                self.token, request.headers.get("Authorization", "")):
            return await handler(request)
        return web.json_response({"error": "this dashboard needs its token (DASHBOARD_TOKEN)"},
                                 status=401,
                                 headers={"WWW-Authenticate": 'Basic realm="djs dashboard"'})

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port; returns the bound port."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.25,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound: int = self._runner.addresses[0][1]
        logger.info("dashboard.listening host=%s port=%d", host, bound)
        return bound

    async def stop(self) -> None:
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()

    async def sample_loop(self) -> None:
        while True:
            self.observer.sample()
            await asyncio.sleep(SAMPLE_PERIOD)

    # ------------------------------------------------------------------ views

    def cluster(self) -> dict[str, Any]:
        state = self.proxy.state
        now = time.monotonic()
        timeout = state.settings.node_timeout
        nodes = []
        for n in sorted(state.nodes.values(), key=lambda e: e.node_id):
            age = max(0.0, now - n.last_seen)
            if not n.alive:
                health = "dead"
            elif not n.connected or age > timeout / 2:
                health = "suspected"
            else:
                health = "alive"
            gone = health == "dead"  # its jobs went back to the queue; its INFO is stale
            # since its last INFO (or HELLO): last_seen moves on at a disconnect, so a node
            # declared dead showed "0.1 s"
            info_age = max(0.0, now - (n.info_at or n.last_seen))
            nodes.append({
                "node_id": n.node_id, "state": health, "connected": n.connected,
                "slots": n.slots, "running": 0 if gone else n.running,
                "queued": 0 if gone else n.queued,
                "assigned": len(n.assigned), "done": n.done, "failed": n.failed,
                "duplicates": n.duplicates, "last_info_age": round(info_age, 3),
                "client_address": self._client_address(n.node_id),
                "mean_job_seconds": _seconds(n.job_seconds),
                "leaving": n.leaving or None,
            })
        return {
            "proxy_id": state.proxy_id, "time": time.time(), "queue_length": state.queued,
            "jobs_tracked": len(state.jobs), "completed": self.observer.completed,
            "duplicates": state.duplicates, "node_timeout": timeout, "nodes": nodes,
            "typical_job_seconds": _seconds(state.typical.trusted()),
            "store_error": None if self.proxy.store_health.healthy
            else self.proxy.store_health.error,
            "throughput": [{"t": s.t, "completed": s.completed, "queue": s.queue,
                            "rate": round(s.rate, 3)}
                           for s in self.observer.throughput.samples],
        }

    def job(self, entry: JobEntry, with_output: bool = False) -> dict[str, Any]:
        body = entry.to_json(with_output)
        rec = self.proxy.state.jobs.get(entry.ticket)
        if rec is not None and rec.state == QUEUED and entry.state == "dispatched":
            body["state"], body["node"] = "queued", None  # its node died: back in the queue
        return body

    def _client_address(self, node: NodeId) -> str | None:
        address, peer = self.proxy.client_addresses.get(node, ("", ""))
        if not address:
            return None
        host, _, port = address.rpartition(":")
        if host in ("", "0.0.0.0", "::", "[::]") and peer:
            host = peer  # bound to every interface: reach it where it came from
        return f"{host}:{port}"

    # ------------------------------------------------------------------ handlers

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def api_cluster(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.cluster())

    async def api_jobs(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state") or None
        if state is not None and state not in JOB_STATES:
            return _error(400, f"state must be one of {', '.join(JOB_STATES)}")
        try:
            limit = min(MAX_LIMIT, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return _error(400, "limit must be a whole number")
        history = self.observer.history
        search = request.query.get("q", "").strip().lower()
        jobs = history.recent(state, search, limit)
        return web.json_response({"jobs": [self.job(e) for e in jobs],
                                  "matched": history.matching(state, search),
                                  "counts": history.counts()})

    async def api_job(self, request: web.Request) -> web.StreamResponse:
        entry = self.observer.history.get(request.match_info["ticket"])
        if entry is None:
            return _error(404, "no such ticket in the dashboard's recent history")
        return web.json_response(self.job(entry, with_output=True))

    async def api_submit(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            line, node = self._submission(body)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        except RecursionError:  # JSON nested deeper than the parser goes (was a 500)
            return _error(400, "the body is JSON nested too deep")
        address = self._client_address(node) if node else None
        if address is None:
            return _error(503, "no live node that accepts submissions is connected")
        try:
            reply = await _ask(address, line, self.client_token)
        except (OSError, TimeoutError) as exc:
            return _error(502, f"node {node} at {address} did not answer: {exc}")
        if not reply.startswith("Ticket ID: "):
            return _error(400, f"node {node} refused the job: {reply}")
        ticket = reply.removeprefix("Ticket ID: ").strip()
        logger.info("dashboard.submitted job_id=%s node=%s", ticket, node)
        return web.json_response({"ticket": ticket, "node": node}, status=201)

    def _submission(self, body: Any) -> tuple[str, NodeId | None]:
        """Validate a submission: the protocol line to send and the node to send it to."""
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object {type, args, priority, node}")
        job_type = body.get("type")
        if not isinstance(job_type, str) or not JOB_TYPE.match(job_type):
            raise ValueError("type must be a job type name such as sleep, fib or sh")
        args = body.get("args", "")
        if isinstance(args, list) and all(isinstance(a, str) for a in args):
            args = " ".join(args)
        if not isinstance(args, str) or any(c in args for c in "\r\n\0"):
            raise ValueError("args must be a string (or list of strings) on one line")
        priority = body.get("priority", 0)
        if type(priority) is not int or abs(priority) > MAX_PRIORITY:
            raise ValueError(f"priority must be a whole number from -{MAX_PRIORITY} to "
                             f"{MAX_PRIORITY}")
        option = f"--priority {priority} " if priority else ""
        line = f"submit {option}{job_type} {args.strip()}".strip()
        if len(line) > MAX_SUBMIT_CHARS:
            raise ValueError(f"a submission is at most {MAX_SUBMIT_CHARS} characters")
        wanted = body.get("node")
        if wanted is not None and not isinstance(wanted, str):
            raise ValueError("node must be a node id")
        return line, self._pick_node(NodeId(wanted) if wanted else None)

    def _pick_node(self, wanted: NodeId | None) -> NodeId | None:
        """The wanted node if it is up, else the least-loaded live node with an address."""
        state = self.proxy.state
        live = [n for n in state.nodes.values()
                if n.connected and n.alive and self._client_address(n.node_id)]
        if wanted is not None:
            if not any(n.node_id == wanted for n in live):
                raise ValueError(f"node {wanted!r} is not connected or gave no client address")
            return wanted
        if not live:
            return None
        best = min(live, key=lambda n: (len(n.assigned) / max(1, n.slots), n.node_id))
        return best.node_id

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        seen, pushed = -1, 0.0
        with contextlib.suppress(ConnectionResetError):
            while not self._stopping:
                version = self.observer.history.version
                now = time.monotonic()
                if version != seen or now - pushed >= PUSH_PERIOD:
                    seen, pushed = version, now
                    await resp.write(f"data: {json.dumps(self.snapshot())}\n\n".encode())
                await asyncio.sleep(PUSH_POLL)
        return resp

    def snapshot(self) -> dict[str, Any]:
        history = self.observer.history
        return {"cluster": self.cluster(), "counts": history.counts(),
                "jobs": [self.job(e) for e in history.recent(limit=PUSH_JOBS)]}

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.observer.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _ask(address: str, line: str, client_token: str | None = None) -> str:
    """One line to a node's client port, one line back (the netcat protocol); `auth` first
    when the node wants a client token."""
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(SUBMIT_TIMEOUT):
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        try:
            if client_token:
                writer.write(f"auth {client_token}\n".encode())
            writer.write(line.encode() + b"\n")
            await writer.drain()
            reply = await reader.readline()
            if client_token and reply.startswith(b"OK"):
                reply = await reader.readline()
            writer.write(b"exit\n")
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return reply.decode(errors="replace").rstrip("\r\n")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
