"""Composition root of the reverse proxy: load the store into ProxyState, serve nodes, and
run the tickers in one TaskGroup until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time

from common import datadir
from common.aio import settle_heap
from common.kvstore import SqliteKV
from common.tls import server_context
from reverse_proxy.config import ProxyConfig
from reverse_proxy.dashboard import Dashboard
from reverse_proxy.node_server import HANDSHAKE_TIMEOUT, ProxyServer
from reverse_proxy.records import ProxySettings
from reverse_proxy.state import ProxyState

logger = logging.getLogger(__name__)


class Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every task on a stop signal."""


def settings_of(cfg: ProxyConfig) -> ProxySettings:
    return ProxySettings(max_nodes=cfg.max_nodes, max_jobs_dispatch=cfg.max_jobs_dispatch,
                         prefetch=cfg.prefetch, node_timeout=cfg.node_timeout,
                         max_violations=cfg.max_violations, policy=cfg.policy,
                         retry_backoff=cfg.retry_backoff, max_node_losses=cfg.max_node_losses)


def open_state(cfg: ProxyConfig, store: SqliteKV) -> ProxyState:
    started = time.perf_counter()
    state = ProxyState.restore(store.stored_items(), settings_of(cfg), time.monotonic())
    if state is None:
        state = ProxyState(secrets.token_hex(8), settings_of(cfg))
        store.apply(state.initial_records())
        store.commit()
    elif state.set_aside.now:  # damaged records moved aside: once, not at every start
        store.apply(state.take_changes())
        store.commit()
    logger.info("proxy.restored jobs=%d queued=%d nodes=%d seconds=%.3f", len(state.jobs),
                state.queued, len(state.nodes), time.perf_counter() - started)
    return state


async def run(cfg: ProxyConfig) -> None:
    with datadir.claimed(cfg.data_dir, "proxy"):
        await _run(cfg)


async def _run(cfg: ProxyConfig) -> None:
    store = SqliteKV(cfg.data_dir, "proxy", fsync=cfg.fsync)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM matters: PID 1 in Docker
        loop.add_signal_handler(sig, stop.set)
    proxy: ProxyServer | None = None
    dashboard: Dashboard | None = None
    try:
        proxy = ProxyServer(cfg, store, open_state(cfg, store))
        settle_heap()  # before any task or connection exists: nothing that could leak
        if cfg.dashboard_port:
            dashboard = Dashboard(proxy, cfg.dashboard_token, cfg.client_token)
            try:
                await dashboard.start(cfg.dashboard_host, cfg.dashboard_port)
            except OSError as exc:
                logger.error("dashboard.bind_failed host=%s port=%d error=%s", cfg.dashboard_host,
                             cfg.dashboard_port, exc)
                raise SystemExit(3) from exc  # as every failure to start
        tls = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        server = await asyncio.start_server(
            proxy.handle, cfg.host, cfg.port, ssl=tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls is not None else None)
        port = server.sockets[0].getsockname()[1]
        print(f"listening host={cfg.host} port={port}", flush=True)
        async with server, asyncio.TaskGroup() as tg:
            tg.create_task(proxy.tick_loop())
            tg.create_task(proxy.sync_loop())
            tg.create_task(proxy.stats_loop())
            if dashboard is not None:
                tg.create_task(dashboard.sample_loop())
            await stop.wait()
            server.close()  # no new node first: then every node is told `stopping`
            await proxy.close_connections()
            raise Shutdown
    except* Shutdown:
        if proxy is not None and proxy.store_health.healthy:
            proxy.state.save_times()
            proxy.persist_or_log()  # what was waiting for a lazy commit, the job times
        logger.info("proxy.stopped")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if dashboard is not None:
            await dashboard.stop()
        if proxy is not None:
            proxy.store_health.close()
        with contextlib.suppress(Exception):
            (proxy.store if proxy is not None else store).close()
