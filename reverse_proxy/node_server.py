"""asyncio shell of the proxy: accept nodes, and for each one read, feed `ProxyState`,
commit, and route what it returns to the nodes' outboxes. Tickers drive dispatch, the
periodic RES_REQ sync and dead-node detection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from common import auth
from common.aio import Deferred
from common.errors import ProtocolError, RemoteProtocolError, StoreError
from common.framing import MAX_FRAME_BYTES
from common.jobs import NodeId
from common.kvstore import LAZY_COMMIT_SECONDS, KVStore, SqliteKV
from common.log import Throttled
from common.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Job,
    Leaving,
    Message,
    Refused,
    Result,
    Welcome,
    outcome_size,
    protocol_error,
    spec_size,
)
from common.store_health import StoreHealth
from common.transport import FramedStream, chunk_by_size
from reverse_proxy.config import ProxyConfig
from reverse_proxy.records import Outgoing
from reverse_proxy.state import ProxyState

logger = logging.getLogger(__name__)
throttled = Throttled(logger)  # what anyone who reaches the port can cause

HANDSHAKE_TIMEOUT = 5.0
# Before a peer has proven it knows the token, it may not make us buffer or decode much: a
# real HELLO lists the few jobs a node holds (slots x prefetch), far below this.
HANDSHAKE_MAX_FRAME = 4 * 1024 * 1024
# Connections still in their handshake at once; more are closed at once (a connect flood
# costs a socket each, not a buffer each).
MAX_HANDSHAKES = 256
# Sent to a peer that failed authentication: nothing about why (that goes to the log).
AUTH_FAILED = "authentication failed"
# A node's outbox beyond this many frames means it stopped reading: drop it, it resyncs.
MAX_OUTBOX = 10_000
# At shutdown, how long node handlers get to end once their connections are closed.
SHUTDOWN_SECONDS = 5.0
# How often delayed jobs and retries are released and silent nodes judged, whatever
# DISPATCH_PERIOD is (when it is shorter: as often as it).
TICK_SECONDS = 0.1


class NodeLink:
    def __init__(self, node_id: NodeId, stream: FramedStream) -> None:
        self.node_id = node_id
        self.stream = stream
        self.outbox: deque[Message] = deque()
        self.wake = asyncio.Event()
        self.closing = ""  # why the proxy closes it ("": it does not)

    def put(self, msg: Message) -> None:
        if len(self.outbox) >= MAX_OUTBOX:
            logger.warning("node.outbox_full node=%s action=close_link", self.node_id)
            self.close(f"more than {MAX_OUTBOX} frames waiting for it to read")
        self.outbox.append(msg)
        self.wake.set()

    def close(self, reason: str) -> None:
        """Close it, the node told why (a LEAVING, its last frame): the first reason."""
        self.closing = self.closing or reason
        self.wake.set()


class ProxyHook(Protocol):
    """Watches traffic (the dashboard and metrics): `received` before the state handles a
    message and `handled` after, `sent` for each message routed to a node. Must not change
    anything."""

    def received(self, node: NodeId, msg: Message) -> None: ...
    def handled(self, node: NodeId, msg: Message) -> None: ...
    def sent(self, node: NodeId, msg: Message) -> None: ...


class ProxyServer:
    def __init__(self, cfg: ProxyConfig, store: KVStore, state: ProxyState) -> None:
        self.cfg = cfg
        self.store = store
        self.state = state
        self.links: dict[NodeId, NodeLink] = {}
        self.handshakes = 0
        self.auth_failures = 0
        self._connections: dict[asyncio.Task[None], FramedStream] = {}  # handler -> stream
        self.hooks: list[ProxyHook] = []
        self.stopping = False  # no connection is taken any more
        # node -> (HOST:PORT it says clients reach it at, the host it connected from)
        self.client_addresses: dict[NodeId, tuple[str, str]] = {}
        # changes nothing waits on: committed with the next commit, or a moment later
        self._persist_later = Deferred(LAZY_COMMIT_SECONDS, self.persist_or_log).request
        self.store_health = StoreHealth("proxy")

    # ------------------------------------------------------------------ durability

    def persist(self) -> None:
        changes = self.state.take_changes()
        if not changes:
            return
        try:
            self.store.apply(changes)
            self.store.commit()
        except StoreError as exc:
            self._recover(str(exc))
            raise

    def persist_or_log(self) -> bool:
        try:
            self.persist()
        except StoreError as exc:
            logger.error("store.commit_failed error=%s", exc)
            return False
        return True

    def _recover(self, error: str) -> None:
        """Roll back to the last commit (reload the state), once: every node is dropped and
        refused until the store takes a probe (`StoreHealth`), when each gets a full
        NODE_TIMEOUT to come back. Each failed commit used to cost a restore, and the nodes'
        reconnections brought the next one."""
        logger.error("store.failed action=rollback_and_resync_nodes error=%s", error)
        self.store_health.failed(error, self)
        for link in self.links.values():
            link.close(f"store failing: {error}")

    def roll_back(self) -> bool:
        if not isinstance(self.store, SqliteKV):
            return True
        try:
            self.store = self.store.reopen()
            restored = ProxyState.restore(self.store.stored_items(), self.state.settings,
                                          time.monotonic())
        except StoreError as exc:
            logger.error("store.reopen_failed error=%s", exc)
            return False
        if restored is not None:
            self.state = restored
        return True

    def on_store_back(self) -> None:
        # refused meanwhile, not dead: a full NODE_TIMEOUT from now
        self.state.excuse_silence(time.monotonic())

    def route(self, outgoing: Iterable[Outgoing]) -> None:
        """Commit first, then send: an ACK or a dispatch always describes stored state.
        With nothing to send (say, an origin's ACK of a result: the job is forgotten), the
        changes ride the next commit, or are committed LAZY_COMMIT_SECONDS later."""
        out = list(outgoing)
        if not out:
            self._persist_later()
        elif not self.persist_or_log():
            return
        self._log_events()
        for item in out:
            link = self.links.get(item.node)
            if link is None:
                continue
            if isinstance(item.msg, Leaving):
                link.close(item.msg.reason)
            else:
                link.put(item.msg)
                for hook in self.hooks:
                    hook.sent(item.node, item.msg)

    def _log_events(self) -> None:
        """What the state noted for the log since the last call."""
        notices, self.state.notices = self.state.notices, []
        for event, fields in notices:
            logger.warning("%s %s", event, fields)
        for node, what in self.state.take_violations():
            logger.warning("node.violation node=%s what=%s", node, what)
        for node, job_id, then in self.state.take_duplicates():
            # a second run: the first outcome stands
            throttled.warning("job.duplicate job_id=%s node=%s was=%s", job_id, node, then)
        for node, job_id, by, rule in self.state.take_overdue():
            # Past its own expected time, a job tells of a slow node; past the usual time, it
            # may just be longer than most (one-off jobs of any length): a guess.
            logger.log(logging.INFO if rule == "expected" else logging.DEBUG,
                       "job.overdue job_id=%s node=%s seen_by=%s rule=%s", job_id, node, by,
                       rule)

    # ------------------------------------------------------------------ connections

    async def _handshake(self, stream: FramedStream, peer: object
                         ) -> tuple[Hello, str] | None:
        """CHALLENGE out, HELLO in, the proof checked: the HELLO of an authentic node, or
        None once the peer has been told `authentication failed` (and nothing else)."""
        challenge = auth.new_nonce()
        await stream.send([Challenge(challenge)])
        hello = await stream.recv(HANDSHAKE_TIMEOUT)
        if not isinstance(hello, Hello):
            raise RemoteProtocolError(f"expected HELLO, got {type(hello).__name__}")
        token = self.cfg.cluster_token
        if token is None or hello.version != PROTOCOL_VERSION:
            return hello, challenge  # ProxyState.on_hello refuses the version, saying why
        why = auth.check_node(token, challenge, hello.nonce, hello.node_id, hello.incarnation,
                              hello.proof)
        if why is None:
            return hello, challenge
        self.auth_failures += 1
        throttled.warning("node.auth_failed node=%r peer=%s reason=%s", hello.node_id[:64],
                          peer, why)
        await stream.send([Refused(AUTH_FAILED)])
        return None

    def _welcome(self, hello: Hello, challenge: str) -> Welcome:
        token = self.cfg.cluster_token
        proof = "" if token is None else auth.proxy_proof(
            token, challenge, hello.nonce, hello.node_id, self.state.proxy_id)
        return Welcome(self.state.proxy_id, proof)

    def _turned_away(self, peer: object) -> bool:
        """No handshake for this connection: the proxy stops (it was accepted just before
        the listening socket closed), or too many are in progress."""
        if self.stopping:
            return True
        if self.handshakes >= MAX_HANDSHAKES:
            throttled.warning("node.handshake_refused peer=%s reason=%d handshakes in "
                              "progress", peer, self.handshakes)
            return True
        return False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._turned_away(peer):
            writer.close()
            return
        stream = FramedStream(reader, writer, HANDSHAKE_MAX_FRAME)
        node_id: NodeId | None = None
        broke = ""  # how the node broke the protocol, if it did
        handler = asyncio.current_task()
        assert handler is not None
        self._connections[handler] = stream
        try:
            self.handshakes += 1
            try:
                shook = await self._handshake(stream, peer)
            finally:
                self.handshakes -= 1
            if shook is None:
                return
            hello, challenge = shook
            stream.max_frame_bytes = MAX_FRAME_BYTES
            known = self.state.nodes.get(hello.node_id)
            was, held = (known.incarnation, len(known.assigned)) if known else (None, 0)
            if self.store_health.healthy:
                reason, out = self.state.on_hello(hello, time.monotonic())
            else:  # nothing of it could be stored
                reason, out = (f"the proxy's stable storage is failing "
                               f"({self.store_health.error})", [])
            if reason is not None:
                logger.warning("node.refused node=%s peer=%s reason=%s", hello.node_id, peer,
                               reason)
                await stream.send([Refused(reason)])
                return
            node_id = hello.node_id
            self.client_addresses[node_id] = (hello.client_address, str(peer[0]) if peer else "")
            if not self.persist_or_log():  # the node is stored before it is welcomed
                return
            link = NodeLink(node_id, stream)
            self.links[node_id] = link
            link.put(self._welcome(hello, challenge))
            self.route(out)
            logger.info("node.joined node=%s slots=%d peer=%s holds=%d", node_id, hello.slots,
                        peer, len(hello.queued) + len(hello.running) + len(hello.finished))
            if was is not None and was != hello.incarnation:
                # Results owed to the old one now go to this one, which does not know them:
                # two nodes taking turns with one NODE_ID drop each other's results (each
                # asks again for its own, and the jobs run again). Say so.
                logger.warning("node.new_incarnation node=%s was=%s now=%s requeued=%d: its "
                               "data directory was emptied, or another node uses this "
                               "NODE_ID", node_id, was, hello.incarnation, held)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._recv_loop(link))
                tg.create_task(self._send_loop(link))
        except* RemoteProtocolError as group:
            logger.warning("node.protocol_error node=%s peer=%s error=%s", node_id, peer,
                           group.exceptions[0])
            broke = protocol_error(group.exceptions[0])
        except* (OSError, TimeoutError, ProtocolError) as group:
            logger.info("node.link_lost node=%s peer=%s error=%s", node_id, peer,
                        group.exceptions[0] or "closed")
        finally:
            if node_id is not None:
                self._disconnected(node_id, stream, broke)
            self._connections.pop(handler, None)
            await stream.aclose()

    def _disconnected(self, node_id: NodeId, stream: FramedStream, broke: str) -> None:
        """A welcomed node's connection ended: told why if the proxy ended it (`broke`: it
        sent what the protocol does not allow, a version mismatch perhaps)."""
        link = self.links.get(node_id)
        if link is None or link.stream is not stream:
            return  # refused, or never welcomed
        if broke:
            link.close(broke)
        if link.closing:  # the node's log says why (it reconnects as after any loss)
            stream.send_last(Leaving(link.closing))
        del self.links[node_id]
        self.state.on_disconnect(node_id, time.monotonic())
        entry = self.state.nodes.get(node_id)
        said = entry.leaving[:500] if entry is not None else ""  # its LEAVING, if any
        # Last: free text, and a log field runs until the next " key=".
        logger.info("node.disconnected node=%s%s", node_id, f" leaving={said}" if said else "")

    async def close_connections(self) -> None:
        """At shutdown: close every connection and let its handler end by itself. (Left to
        asyncio.run to cancel, each would be logged as an error by Python 3.11's stream
        server.) A node told `stopping` reconnected at once, and a handshake with the proxy
        going away joined it, to be dropped a moment later without a word: the caller stops
        listening first, and nothing accepted meanwhile is served."""
        self.stopping = True
        handlers = list(self._connections)
        for link in self.links.values():
            link.stream.send_last(Leaving("stopping"))
        for stream in self._connections.values():
            stream.writer.close()
        if handlers:
            await asyncio.wait(handlers, timeout=SHUTDOWN_SECONDS)

    async def _recv_loop(self, link: NodeLink) -> None:
        silence = max(2 * self.cfg.node_timeout, 5.0)
        while not link.closing:
            batch = await link.stream.recv_batch(silence)
            if link.closing or not self.store_health.healthy:
                return  # dropped: what came is sent again after the next HELLO
            now = time.monotonic()
            out: list[Outgoing] = []
            if self.state.release_due(time.time()):  # a job came due: a round is worth it
                out += self.state.dispatch()
            for msg in batch:
                for hook in self.hooks:
                    hook.received(link.node_id, msg)
                out += self.state.on_message(link.node_id, msg, now)
                for hook in self.hooks:
                    hook.handled(link.node_id, msg)
            self.route(out)

    async def _send_loop(self, link: NodeLink) -> None:
        while True:
            await link.wake.wait()
            link.wake.clear()
            if link.closing:
                raise ConnectionError(f"closed by the proxy: {link.closing}")
            frames = [part for msg in link.outbox for part in _split(msg)]
            link.outbox.clear()
            await link.stream.send(frames)

    # ------------------------------------------------------------------ tickers

    async def tick_loop(self) -> None:
        """Every TICK_SECONDS (or DISPATCH_PERIOD if shorter): release the delayed jobs and
        retries whose time came, judge silent and late nodes; a dispatch round every
        DISPATCH_PERIOD. (All of it ran every DISPATCH_PERIOD: with the original's 3 s, a
        dead node was noticed up to 3 s late and a `--delay 2` job ran after up to 5 s; with
        a period of hours, never.)"""
        period = self.cfg.dispatch_period
        step = min(period, TICK_SECONDS)
        last_round = time.monotonic()
        while True:
            asleep = time.monotonic()
            await asyncio.sleep(step)
            self._excuse_a_stall(time.monotonic() - asleep - step)
            await self.store_health.back.wait()
            now = time.monotonic()
            released = self.state.release_due(time.time())
            round_due = now - last_round >= period
            if round_due:
                last_round = now
            self.route(self.state.tick(now, dispatch=round_due or released > 0))

    def _excuse_a_stall(self, late: float) -> None:
        """A tick `late` seconds later than asked for: this process did not run (stopped,
        swapped out, a VM paused, a disk that blocked it). The nodes' INFO frames wait unread
        in its sockets, and judging their silence now would declare every one of them dead
        at once (seen: all four links closed, a job run twice, a cancel told "its node was
        lost"). Each gets a full NODE_TIMEOUT from now instead, as after a restart."""
        if late > self.state.settings.node_timeout / 2:
            logger.warning("proxy.stalled for=%.1fs: every node gets a full NODE_TIMEOUT "
                           "from now", late)
            self.state.excuse_silence(time.monotonic())

    async def sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.request_result_period)
            await self.store_health.back.wait()
            self.route(self.state.sync(time.monotonic(), self.cfg.request_result_period))

    async def stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.stats_log_period)
            stats = self.state.stats()
            nodes = ",".join(
                f"{n.node_id}:{'up' if n.alive else 'down'}/{n.slots}/{n.running}/{n.queued}"
                f"/{n.done}/{n.failed}/{n.duplicates}" for n in stats.nodes)
            logger.info("cluster.stats queue=%d jobs=%d completed=%d duplicates=%d "
                        "overdue=%d "
                        "node_fields=id:state/slots/running/queued/done/failed/dup nodes=%s",
                        stats.queue_length, len(self.state.jobs), self.state.completed,
                        self.state.duplicates, self.state.overdue_marks, nodes)


def _split(msg: Message) -> list[Message]:
    """Keep frames near the soft size limit however large a batch the state made."""
    if isinstance(msg, Job):
        parts, start = [], 0
        for chunk in chunk_by_size(msg.jobs, spec_size):
            limits = msg.overdue_after[start:start + len(chunk)]
            parts.append(Job(tuple(chunk), limits if any(limits) else ()))
            start += len(chunk)
        return list(parts)
    if isinstance(msg, Result):
        return [Result(tuple(c)) for c in chunk_by_size(msg.outcomes, outcome_size)]
    return [msg]
