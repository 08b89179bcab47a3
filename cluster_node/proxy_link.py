"""The node's link to the reverse proxy: connect (with backoff), say HELLO, then run a
receive loop, a send loop and the INFO / REQUEST_OF_RES tickers until the link drops.

Nothing is lost when it drops: submissions and results stay in the store until the proxy
acknowledges them, and on every new connection the state re-sends whatever is unacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential_jitter

from cluster_node.service import NodeService
from common import auth
from common.errors import ProtocolError, ProxyUnavailable, RemoteProtocolError, StoreError
from common.messages import (
    Ack,
    AckOf,
    Challenge,
    Hello,
    Job,
    Leaving,
    Message,
    Output,
    Refused,
    RequestOfRes,
    Result,
    StatusReply,
    Welcome,
    outcome_size,
    protocol_error,
    spec_size,
)
from common.tls import client_context
from common.transport import FramedStream, chunk_by_size

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
# Items taken per send round; frames are further split by size.
SEND_BATCH = 5000
# How many awaited tickets one REQUEST_OF_RES names (a safety net, not the main path).
REQUEST_BATCH = 500
# Nagle's rule for the link (NodeState.worth_gathering): while submissions or results we
# sent await the proxy's ACK, the next ones gather, for at most this long after the last
# send. Under load a frame then carries what came in one round trip to the proxy, not one
# ticket that the proxy must decode, commit and answer on its own.
LINK_GATHER_SECONDS = 0.002


def _log_retry(state: RetryCallState) -> None:
    """A WARNING at attempts 1, 2, 4, 8, … (DEBUG between): a proxy down for 15 minutes
    was 472 lines of each node's log."""
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0
    attempt = state.attempt_number
    logger.log(logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG,
               "proxy.unreachable attempt=%d retry_in=%.2fs error=%s", attempt, wait, exc)


async def run_proxy_link(service: NodeService) -> None:
    cfg = service.cfg
    tls = client_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    while True:
        stream: FramedStream | None = None
        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.05, max=cfg.reconnect_max, jitter=0.2),
            retry=retry_if_exception_type((OSError, ProtocolError, ProxyUnavailable,
                                           TimeoutError, StoreError)),
            before_sleep=_log_retry,
        ):
            with attempt:
                stream = await _connect(service, tls)
        assert stream is not None
        left: list[str] = []  # what the proxy's LEAVING said, if it sent one
        broke = ""  # how the proxy broke the protocol, if it did
        try:
            await _serve(service, stream, left)
        except* (OSError, ProtocolError, TimeoutError, StoreError) as group:
            error = group.exceptions[0]
            if isinstance(error, RemoteProtocolError):  # a proxy of another version?
                broke = protocol_error(error)
            # Last: free text, and a log field runs until the next " key=".
            # (INFO when the proxy said it was stopping: a clean stop is no trouble)
            logger.log(logging.INFO if left == ["stopping"] else logging.WARNING,
                       "proxy.link_lost error=%s%s", error,
                       f" leaving={left[-1][:500]}" if left else "")
        finally:
            service.proxy_connected = False
            reason = _leaving_reason(service) or broke
            if reason:  # the proxy shows why (a node gone silent could be anything)
                stream.send_last(Leaving(reason))
            await stream.aclose()
        if service.stopping:
            # The node is stopping, and this task was cancelled: but Python 3.11 loses a
            # cancel that reaches it while one of _serve's tasks fails (CPython gh-116720;
            # the errors above come out instead), and the node would connect again rather
            # than stop. (`cancelling()` cannot tell: 3.11 also leaves it raised after a
            # link lost on its own.)
            raise asyncio.CancelledError


def _leaving_reason(service: NodeService) -> str:
    """Why this node closes a link on purpose; "" when it does not (the link broke)."""
    if service.stopping:
        return "stopping"
    if not service.store_health.healthy:
        return f"store failing: {service.store_health.error}"
    return ""


def signed_hello(hello: Hello, token: bytes | None, challenge: str) -> Hello:
    """The HELLO with this connection's nonce and proof (unchanged without a token)."""
    if token is None:
        return hello
    nonce = auth.new_nonce()
    return dataclasses.replace(hello, nonce=nonce, proof=auth.node_proof(
        token, challenge, nonce, hello.node_id, hello.incarnation))


async def _connect(service: NodeService, tls: ssl.SSLContext | None) -> FramedStream:
    cfg = service.cfg
    await service.store_health.back.wait()  # a node whose store fails takes no work
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            cfg.proxy_host, cfg.proxy_port, ssl=tls,
            server_hostname=(cfg.tls_server_name or cfg.proxy_host) if tls else None)
    stream = FramedStream(reader, writer)
    try:
        challenge = await stream.recv(HANDSHAKE_TIMEOUT)
        if not isinstance(challenge, Challenge):
            raise RemoteProtocolError(f"expected CHALLENGE, got {type(challenge).__name__}")
        service.persist()  # HELLO must describe what is on disk
        # Where its clients reach it (the proxy's dashboard submits jobs there), the job
        # types it runs, how often it sends INFO.
        hello = dataclasses.replace(
            service.state.on_connect(), client_address=service.client_address,
            job_types=service.runnable, info_period=cfg.info_period)
        hello = signed_hello(hello, cfg.cluster_token, challenge.nonce)
        await stream.send([hello])
        reply = await stream.recv(HANDSHAKE_TIMEOUT)
        if isinstance(reply, Welcome) and cfg.cluster_token is not None:
            why = auth.check_proxy(cfg.cluster_token, challenge.nonce, hello.nonce,
                                   hello.node_id, reply.proxy_id, reply.proof)
            if why is not None:
                raise ProxyUnavailable(f"not trusting {cfg.proxy_host}:{cfg.proxy_port}: {why}")
    except BaseException:
        await stream.aclose()
        raise
    if isinstance(reply, Welcome):
        logger.info("proxy.connected proxy=%s:%d proxy_id=%s", cfg.proxy_host, cfg.proxy_port,
                    reply.proxy_id)
        if service.proxy_id and reply.proxy_id != service.proxy_id:
            # Its jobs ran again without a word when a proxy was moved to an empty data
            # directory, or back to an old one.
            logger.warning("proxy.changed was=%s now=%s: a proxy on another (or an emptied) "
                           "data directory: what it does not know is submitted again, and "
                           "jobs it holds from before may run again", service.proxy_id,
                           reply.proxy_id)
        service.proxy_id = reply.proxy_id
        service.proxy_connected = True
        return stream
    await stream.aclose()
    reason = reply.reason if isinstance(reply, Refused) else f"unexpected {type(reply).__name__}"
    raise ProxyUnavailable(f"proxy refused this node: {reason}")


async def _serve(service: NodeService, stream: FramedStream, left: list[str]) -> None:
    service.outbox.clear()
    service.link_wake.set()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_recv_loop(service, stream, left))
        tg.create_task(_send_loop(service, stream))
        tg.create_task(_tick(service, service.cfg.info_period, _queue_info))
        tg.create_task(_tick(service, service.cfg.request_result_period, _queue_request))


async def _recv_loop(service: NodeService, stream: FramedStream, left: list[str]) -> None:
    """Apply what the proxy sends; `left` gets the reason of its LEAVING (why it closes the
    link: stopping, its store failing, this node silent or misbehaving)."""
    # The proxy answers every INFO with STATS, so silence this long means it is gone.
    silence = max(5.0, 6 * service.cfg.info_period)
    while True:
        batch = await stream.recv_batch(silence)
        service.store_health.check()  # failing: the link goes; the proxy re-sends what it lacks
        for msg in batch:
            if isinstance(msg, Leaving):
                left.append(msg.reason)
                continue
            if isinstance(msg, StatusReply):
                service.on_status_reply(msg)
                continue
            if isinstance(msg, Output):
                service.on_output(msg)
                continue
            service.outbox.extend(service.state.on_message(msg, time.time()))
        service.stop_killed_jobs()
        service.link_acked.set()  # an ACK may end a gathering (see _send_loop)
        if not all(_acks_dispatch(m) for m in service.outbox):
            service.persist()  # before the ACKs in the outbox can leave
            service.link_wake.set()
        else:
            # Nothing waits on these changes: the proxy's ACKs of what we sent, or jobs it
            # dispatched (it does not wait for their ACK: on HELLO it re-sends what a node
            # lacks). They ride the next commit, the ACKs the next frame after it; the jobs
            # start now (a job running here is not stored anyway).
            service.persist_later()
            service.executor_wake.set()


async def _send_loop(service: NodeService, stream: FramedStream) -> None:
    loop = asyncio.get_running_loop()
    sent_at = float("-inf")
    while True:
        await service.link_wake.wait()
        service.store_health.check()
        while (service.state.worth_gathering()
               and loop.time() < sent_at + LINK_GATHER_SECONDS):
            service.link_acked.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(sent_at + LINK_GATHER_SECONDS):
                    await service.link_acked.wait()
        service.link_wake.clear()
        service.persist()
        out: list[Message] = list(service.outbox)
        service.outbox.clear()
        state = service.state
        for specs in chunk_by_size(state.take_submissions(SEND_BATCH), spec_size):
            out.append(Job(tuple(specs)))
        for outcomes in chunk_by_size(state.take_results(SEND_BATCH), outcome_size):
            out.append(Result(tuple(outcomes)))
        cancels = state.take_cancels()
        if cancels is not None:
            out.append(cancels)
        if out:
            sent_at = loop.time()
            await stream.send(out)


async def _tick(service: NodeService, period: float,
                action: Callable[[NodeService], None]) -> None:
    while True:
        await asyncio.sleep(period)
        action(service)
        service.link_wake.set()


def _acks_dispatch(msg: Message) -> bool:
    return isinstance(msg, Ack) and msg.of == AckOf.JOB


def _queue_info(service: NodeService) -> None:
    service.outbox.append(service.state.info())
    service.flush_live()


def _queue_request(service: NodeService) -> None:
    wanted = service.state.awaited(REQUEST_BATCH)
    if wanted:
        service.outbox.append(RequestOfRes(tuple(wanted)))
