"""Composition root of a cluster node: open the store, replay it, and run the client
server, the proxy link and the executor in one TaskGroup until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import signal
import socket
import sys
import time

from aiohttp import web

from cluster_node.client_server import start_client_server
from cluster_node.config import NodeConfig
from cluster_node.cpu_pool import start_cpu_pool
from cluster_node.executor import executor_loop
from cluster_node.jobtypes import JobContext, load_job_types, runnable_types
from cluster_node.leftovers import clear_leftovers
from cluster_node.metrics import NodeMetrics
from cluster_node.proxy_link import run_proxy_link
from cluster_node.service import NodeService
from cluster_node.state import NodeState
from common import datadir
from common.aio import settle_heap
from common.errors import SchedulerError, StoreError
from common.jobs import NodeId
from common.kvstore import KVStore, SqliteKV

logger = logging.getLogger(__name__)


class Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a stop signal."""


def open_state(cfg: NodeConfig, store: KVStore) -> NodeState:
    """Replay the store; on an empty data directory start a new incarnation."""
    node_id = NodeId(cfg.node_id or socket.gethostname())
    # (who it is if its identity record cannot be read: see NodeState.restore)
    state = NodeState.restore(store.stored_items(), cfg.slots,
                              rebuild=(node_id, secrets.token_hex(8)))
    if state is None:
        state = NodeState(node_id, incarnation=secrets.token_hex(8), slots=cfg.slots,
                          created=time.time())
        store.apply(state.initial_records())
        store.commit()
        logger.info("node.new_incarnation node=%s incarnation=%s", node_id, state.incarnation)
    elif cfg.node_id and cfg.node_id != state.node_id:
        raise SchedulerError(f"data directory {cfg.data_dir} belongs to node "
                             f"{state.node_id!r}, not {cfg.node_id!r}; use another directory")
    elif state.set_aside.now or state.rebuilt:  # once, not at every start
        store.apply(state.take_changes())
        store.commit()
    return state


def raise_fd_limit(wanted: int) -> None:
    """MAX_CLIENTS connections need as many descriptors: raise the soft limit towards the
    hard one (the usual soft default, 1024, is below the default MAX_CLIENTS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run(cfg: NodeConfig, ready: asyncio.Event | None = None) -> None:
    raise_fd_limit(cfg.max_clients + 256)  # + the store, the pool, the proxy link
    with datadir.claimed(cfg.data_dir, "node"):
        await _run(cfg, ready)


async def _run(cfg: NodeConfig, ready: asyncio.Event | None) -> None:
    store = SqliteKV(cfg.data_dir, "node", fsync=cfg.fsync)
    metrics: web.AppRunner | None = None
    pool = start_cpu_pool(max(1, min(cfg.slots, os.cpu_count() or 1)))
    service: NodeService | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM matters: PID 1 in Docker
        loop.add_signal_handler(sig, stop.set)
    try:
        state = open_state(cfg, store)
        settle_heap()  # before any task or connection exists: nothing that could leak
        # Absolute: what the sh jobs get as HOME and DJS_JOB_DIR, wherever they cd.
        work_root = (cfg.data_dir / "sh").absolute()
        clear_leftovers(work_root)  # before any job of this run starts
        ctx = JobContext(state.node_id, cfg.allow_shell, cfg.sh_timeout, cfg.sh_output_limit,
                         pool, shell_allow=cfg.shell_allow, work_root=work_root,
                         slow_factor=cfg.slow_factor, slow_from=loop.time() + cfg.slow_after)
        job_types = load_job_types()
        service = NodeService(cfg, store, state, job_types, ctx)
        service.runnable = runnable_types(job_types, ctx)
        server, port = await start_client_server(service, cfg.host, cfg.port)
        service.client_address = f"{cfg.host}:{port}"
        if cfg.metrics_port:
            try:
                metrics = await NodeMetrics(service, cfg.metrics_token).start(
                    cfg.host, cfg.metrics_port)
            except OSError as exc:
                logger.error("metrics.bind_failed host=%s port=%d error=%s", cfg.host,
                             cfg.metrics_port, exc)
                raise SystemExit(3) from exc  # as every failure to start
        logger.info("node.started node=%s slots=%d tickets=%d held=%d proxy=%s:%d",
                    state.node_id, cfg.slots, len(state.tickets), len(state.held),
                    cfg.proxy_host, cfg.proxy_port)
        print(f"listening host={cfg.host} port={port}", flush=True)
        if ready is not None:
            ready.set()
        async with server, asyncio.TaskGroup() as tg:
            tg.create_task(executor_loop(service))
            tg.create_task(run_proxy_link(service))
            tg.create_task(service.expire_loop())
            service.executor_wake.set()
            await stop.wait()
            service.stopping = True
            service.close_clients()
            raise Shutdown
    except* Shutdown:
        with contextlib.suppress(StoreError):
            if service is not None and service.store_health.healthy:
                service.persist()  # what was waiting for a lazy commit
        logger.info("node.stopped")
    except* StoreError as group:
        logger.error("node.storage_failed error=%s", group.exceptions[0])
        sys.exit(3)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        pool.shutdown(wait=False, cancel_futures=True)
        if metrics is not None:
            await metrics.cleanup()
        # The store in use: a failed commit reopens it as another object.
        in_use: KVStore = store if service is None else service.close()
        with contextlib.suppress(Exception):
            in_use.close()
