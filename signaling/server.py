"""The signaling server: a thin websockets shell around :class:`SignalingProtocol`.

All decisions are taken by the Sans-I/O core in :mod:`qcall.signaling.protocol`;
this module only moves frames: one ``async for message in websocket`` loop per
connection, one writer task per connection draining a bounded outbox (a client
that does not read is disconnected instead of slowing everyone down), and one
timer task running :meth:`SignalingProtocol.handle_timer`. It tells the
protocol each client's address (:func:`~qcall.signaling.protocol.address_key`
of the TCP peer address) for the per-address limits.

The outbox of a connection holds at most ``outbox_size`` messages and
``config.max_outbox_bytes`` bytes, counting the message being written (a
single message is always accepted, however large): above either, the client
is closed (1008 ``too slow``).

Compression (permessage-deflate) is off: the payloads are mostly base64 of
keys and signatures, which do not compress, and each deflate context costs
tens of KiB per connection (scripts/load_signaling.py measures it).

``GET /healthz`` on the same port answers 200 with a small JSON document
(``status``, ``connections``, ``registered``, ``calls``, ``version``).

Garbage collection (``manage_gc``, on in ``python -m signaling``): with
thousands of connections, CPython's full collections scan every connection's
objects and paused this server for 0.5-0.9 s at 10,000 connections
(scripts/load_signaling.py). Once :data:`GC_MIN_CONNECTIONS` are open, the
server moves the long-lived objects out of the collector's sight every
second (:func:`gc.freeze`), and reclaims the few cycles closed connections
leave behind with one full collection after many disconnections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import ssl as ssl_module
from collections.abc import Coroutine
from typing import Any, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from qcall import __version__
from qcall._aio import AsyncClosing
from qcall.signaling.mailbox import MAX_MAILBOX_FRAME, MailWaiting, is_mailbox_frame
from qcall.signaling.messages import ErrorMessage
from qcall.signaling.protocol import (
    CloseConnection,
    ConnectionId,
    Output,
    ServerConfig,
    SignalingProtocol,
    address_key,
)
from qcall.typing import PeerId
from signaling.mailbox import Mailbox
from signaling.store import MessageStore

__all__ = ["ClusterHooks", "SignalingServer"]

logger = logging.getLogger(__name__)

#: Frames above this many times ``max_message_size`` are refused by websockets
#: itself (close code 1009) without being read into memory; frames between the
#: two limits are read and answered with the ``too_big`` error.
HARD_LIMIT_FACTOR = 2

#: ``manage_gc``: below this many open connections the collector runs as usual.
GC_MIN_CONNECTIONS = 1000
#: ``manage_gc``: seconds between two :func:`gc.freeze` calls.
GC_INTERVAL = 1.0

#: A received frame above this many characters is followed by a ping (see
#: :data:`_PING`) once the connection has been quiet for :data:`RELEASE_DELAY`.
RELEASE_SIZE = 4096
#: Seconds without a new frame after a big one before the release ping goes out:
#: a frame arriving meanwhile frees the big one itself, and the ping stays off
#: the relaying (it used to compete with it, e.g. with the next instance's work
#: on a frame crossing instances: docs/performance.md, "round 3").
RELEASE_DELAY = 0.02


class _Ping:
    """Outbox item: send a WebSocket ping.

    websockets keeps the last frame it parsed until the next one arrives: after
    a 64 KiB ``register``, an idle client would make the server hold 64 KiB
    more for as long as it stays silent. The client's pong is a frame, so it
    releases the big one after one round trip. Sent only once the client has
    been quiet for :data:`RELEASE_DELAY` (any frame releases the one before).
    A client that does not answer pings is closed by the keepalive (20 s ping
    interval, 20 s timeout).
    """


_PING = _Ping()


class ClusterHooks(Protocol):
    """What several instances sharing Redis add to the shell (``signaling/cluster.py``)."""

    async def before(self, cid: ConnectionId, text: str | bytes) -> None: ...
    async def after(
        self, cid: ConnectionId, text: str | bytes, out: list[Output]
    ) -> list[Output]: ...
    async def left(self, name: PeerId) -> None: ...
    def mail(self, name: PeerId, text: str) -> None: ...


_Item = str | CloseConnection | _Ping

_MAIL_WAITING = MailWaiting().serialize()
#: Bytes queued for a connection above which a mailbox answer closes it as too slow
#: (answers are bounded by its requests in flight; a fetch answer is ≤ 1.4 MB).
MAILBOX_OUTBOX_BYTES = 8 * 1024 * 1024


class _Outbox:
    """What is queued for one connection, and its size in bytes (all ASCII JSON)."""

    __slots__ = ("mail_waiting", "pinging", "queue", "size", "ws")

    def __init__(self, ws: ServerConnection, maxsize: int) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize)
        self.size = 0  # bytes queued or being written
        self.pinging = False  # a release ping is queued or awaits its pong
        self.mail_waiting = False  # an envelope was not pushed: say so once drained

    def pong(self, _: object) -> None:
        self.pinging = False


def _release(outbox: _Outbox) -> None:
    """Queue the release ping (:class:`_Ping`) unless one is on its way."""
    if not outbox.pinging:
        outbox.pinging = True
        with contextlib.suppress(asyncio.QueueFull):
            outbox.queue.put_nowait(_PING)


class SignalingServer(AsyncClosing):
    """A running signaling server.

    Usage::

        async with SignalingServer(ServerConfig(server_id="example")) as server:
            await server.start("127.0.0.1", 0)
            print(server.port)
            await server.serve_forever()

    Args:
        config: limits and timeouts of the protocol.
        protocol: a prepared protocol (tests); default: a new one from ``config``.
        outbox_size: messages queued per connection before it is dropped as too
            slow (and ``config.max_outbox_bytes`` bytes).
        manage_gc: keep full garbage collections from pausing a big server (see
            the module docstring); changes the whole process's collector, so
            only for a process that runs the server alone.
        gc_min_connections: open connections from which ``manage_gc`` acts.
        mailbox: the store of offline messages and prekeys (:mod:`signaling.mailbox`);
            ``None``: the server answers no mailbox frames. Closed with the server.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        protocol: SignalingProtocol | None = None,
        outbox_size: int = 1024,
        manage_gc: bool = False,
        gc_min_connections: int = GC_MIN_CONNECTIONS,
        mailbox: MessageStore | None = None,
    ) -> None:
        self.protocol = protocol or SignalingProtocol(config)
        self.config = self.protocol.config
        self._outbox_size = outbox_size
        self._outboxes: dict[ConnectionId, _Outbox] = {}
        self._server: Server | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_changed = asyncio.Event()
        self._wake_at: float | None = None  # when the timer task wakes up next
        self._tasks: set[asyncio.Task[None]] = set()
        self._manage_gc = manage_gc
        self._gc_min_connections = gc_min_connections
        self._gc_task: asyncio.Task[None] | None = None
        self._closed_since_collect = 0
        self._frozen = False  # not gc.get_freeze_count(): it walks every frozen object
        self.mailbox = None
        if mailbox is not None:
            self.mailbox = Mailbox(
                mailbox, self._send_text, self._push_text, self.protocol.fingerprint_of
            )
        #: Set by :meth:`signaling.cluster.Cluster.start` (``--redis``); ``None``: one instance.
        self.cluster: ClusterHooks | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(
        self, host: str | None, port: int, *, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        """Listen on ``host:port`` (port 0: any free port, see :attr:`port`)."""
        self._server = await serve(
            self._handler,
            host,
            port,
            ssl=ssl,
            process_request=self._process_request,
            max_size=self.config.max_message_size * HARD_LIMIT_FACTOR,
            compression=None,  # see module docstring
            server_header=f"qcall-signaling/{__version__}",
        )
        self._timer_task = asyncio.create_task(self._run_timers())
        if self._manage_gc:
            self._gc_task = asyncio.create_task(self._run_gc())
        scheme = "wss" if ssl else "ws"
        logger.info("= listening on %s://%s:%d", scheme, host or "*", self.port)

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        if self._server is None:
            raise RuntimeError("server not started")
        await self._server.serve_forever()

    async def close(self) -> None:
        """Close every connection (code 1001) and stop listening."""
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
            self._gc_task = None
            if self._frozen:
                gc.unfreeze()
                self._frozen = False
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.mailbox is not None:
            await self.mailbox.close()

    # --- HTTP: /healthz ----------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != "/healthz":
            return None  # go on with the WebSocket handshake
        body = json.dumps(
            {
                "status": "ok",
                "connections": self.protocol.connections,
                "registered": self.protocol.registered,
                "calls": self.protocol.calls,
                "version": __version__,
            }
        )
        response = connection.respond(200, body + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    # --- WebSocket: the shell loop --------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        peer = ws.remote_address
        address = address_key(str(peer[0])) if peer else None
        cid, out = self.protocol.connect(loop.time(), address)
        outbox = _Outbox(ws, self._outbox_size)
        self._outboxes[cid] = outbox
        writer = asyncio.create_task(self._writer(outbox))
        self._dispatch(out)
        del out  # outputs can be O(peers) big: keep no reference while idle
        self._timer_changed.set()
        release: asyncio.TimerHandle | None = None  # the release ping, armed
        try:
            async for message in ws:
                if release is not None:  # this frame frees the big one before it
                    release.cancel()
                    release = None
                if self.mailbox is not None and is_mailbox_frame(message):
                    # Mailbox frames (docs/messaging.md §12): async, their own limits.
                    assert isinstance(message, str)
                    await self.mailbox.receive(cid, self.protocol.name_of(cid), message)
                    continue
                if (cluster := self.cluster) is not None:
                    await cluster.before(cid, message)
                    out = await cluster.after(
                        cid, message, self._receive(cid, message, loop.time())
                    )
                    self._dispatch(out)
                    del out
                else:
                    self._dispatch(self._receive(cid, message, loop.time()))
                if self.mailbox is not None and self.protocol.name_of(cid) is not None:
                    ws.protocol.max_message_size = max(  # registered: envelopes may be big
                        self.config.max_message_size * HARD_LIMIT_FACTOR, MAX_MAILBOX_FRAME
                    )
                self._check_timer()  # an invitation or an accept set a call timer
                if len(message) > RELEASE_SIZE and not outbox.pinging:  # see _Ping
                    release = loop.call_later(RELEASE_DELAY, _release, outbox)
                del message  # a 7 KiB register frame need not outlive its handling
        except ConnectionClosed:
            pass
        finally:
            if release is not None:
                release.cancel()
            self._closed_since_collect += 1
            self._outboxes.pop(cid, None)
            if self.mailbox is not None:
                self.mailbox.disconnect(cid)
            name = self.protocol.name_of(cid)
            self._dispatch(self.protocol.disconnect(cid, loop.time()))
            if self.cluster is not None and name is not None:
                self._spawn(self.cluster.left(name))
            self._timer_changed.set()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _receive(self, cid: ConnectionId, message: str | bytes, now: float) -> list[Output]:
        try:
            return self.protocol.receive(cid, message, now)
        except Exception:  # a bug, never bad input: keep serving everyone else
            logger.exception("! protocol failed on connection %d", cid)
            return [(cid, ErrorMessage("server_error", "internal error"))]

    def _dispatch(self, out: list[Output]) -> None:
        """Queue each output on its connection's outbox (no waiting)."""
        texts: dict[int, str] = {}  # a broadcast message is serialized once
        limit = self.config.max_outbox_bytes
        for cid, msg in out:
            outbox = self._outboxes.get(cid)
            if outbox is None:
                continue  # gone meanwhile
            item: _Item
            if isinstance(msg, CloseConnection):
                item, size = msg, 0
            else:
                text = texts.get(id(msg))
                if text is None:
                    text = texts[id(msg)] = msg.serialize()
                item, size = text, len(text)
            self._enqueue(cid, outbox, item, size, limit)

    def queue_text(self, cid: ConnectionId, text: str) -> None:
        """Queue an already serialized message on a connection, under the limits of
        :meth:`_dispatch` (a relayed frame from another instance: the relay fast path)."""
        outbox = self._outboxes.get(cid)
        if outbox is not None:  # (else gone meanwhile)
            self._enqueue(cid, outbox, text, len(text), self.config.max_outbox_bytes)

    def _enqueue(
        self, cid: ConnectionId, outbox: _Outbox, item: _Item, size: int, limit: int
    ) -> None:
        """Queue ``item`` unless the outbox already holds something and would pass
        ``limit`` bytes, or is full: then the connection is closed as too slow."""
        if (outbox.size and outbox.size + size > limit) or outbox.queue.full():
            self._too_slow(cid, outbox)
            return
        outbox.size += size
        outbox.queue.put_nowait(item)

    def _too_slow(self, cid: ConnectionId, outbox: _Outbox) -> None:
        """Drop ``cid``'s outbox once: nothing more is queued for it; its handler cleans up."""
        logger.warning("! connection %d does not read its messages: closing it", cid)
        del self._outboxes[cid]
        self._spawn(outbox.ws.close(1008, "too slow"))

    def _send_text(self, cid: int, text: str) -> None:
        """Queue a mailbox answer on a connection (closed as too slow if it does not read)."""
        outbox = self._outboxes.get(ConnectionId(cid))
        if outbox is None:
            return
        if outbox.size + len(text) > MAILBOX_OUTBOX_BYTES or outbox.queue.full():
            self._too_slow(ConnectionId(cid), outbox)
            return
        outbox.size += len(text)
        outbox.queue.put_nowait(text)

    def _push_text(self, name: str, text: str) -> bool:
        """Queue a ``mail`` push for ``name`` if online with room; else flag ``mail_waiting``."""
        cid = self.protocol.connection_of(name)
        outbox = self._outboxes.get(cid) if cid is not None else None
        if outbox is None:
            if self.cluster is not None and (cid is None or self.protocol.is_remote(cid)):
                self.cluster.mail(PeerId(name), text)  # registered on another instance?
                return True
            return False
        if (outbox.size and outbox.size + len(text) > self.config.max_outbox_bytes) or (
            outbox.queue.qsize() >= outbox.queue.maxsize // 2
        ):
            outbox.mail_waiting = True  # told once its outbox drained (_writer)
            return False
        outbox.size += len(text)
        outbox.queue.put_nowait(text)
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _writer(outbox: _Outbox) -> None:
        ws = outbox.ws
        try:
            while True:
                item = await outbox.queue.get()
                if isinstance(item, CloseConnection):
                    await ws.close(item.code, item.reason)
                    return
                if isinstance(item, _Ping):
                    pong = asyncio.ensure_future(await ws.ping())  # already a future
                    pong.add_done_callback(outbox.pong)
                    continue
                await ws.send(item)
                outbox.size -= len(item)
                if outbox.mail_waiting and outbox.queue.empty():
                    outbox.mail_waiting = False
                    await ws.send(_MAIL_WAITING)
        except ConnectionClosed:
            pass

    async def _run_gc(self) -> None:
        """``manage_gc``: freeze long-lived objects; reclaim garbage after many closes."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(GC_INTERVAL)
            connections = self.protocol.connections
            if connections < self._gc_min_connections:
                if self._frozen:
                    gc.unfreeze()  # small again: the collector sees everything
                    self._frozen = False
                continue
            closed = self._closed_since_collect
            if self._frozen and closed > max(self._gc_min_connections, connections // 2):
                # Closed connections leave a few cycles among frozen objects: one
                # full pass reclaims them, amortized over many disconnections.
                gc.unfreeze()
                start = loop.time()
                found = gc.collect()
                self._closed_since_collect = 0
                logger.info(
                    "= full garbage collection after %d closes: %d objects in %.0f ms",
                    closed, found, (loop.time() - start) * 1e3,
                )  # fmt: skip
            gc.freeze()  # O(1): the generations are spliced onto the permanent one
            self._frozen = True

    def _check_timer(self) -> None:
        """Wake the timer task if the protocol's next timer is due before its wake-up."""
        deadline = self.protocol.get_timer()
        if deadline is not None and (self._wake_at is None or deadline < self._wake_at):
            self._wake_at = deadline
            self._timer_changed.set()

    async def _run_timers(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._wake_at = self.protocol.get_timer()
            self._timer_changed.clear()
            wake = None if deadline is None else loop.call_at(deadline, self._timer_changed.set)
            try:
                await self._timer_changed.wait()
            finally:
                if wake is not None:
                    wake.cancel()
            try:
                out = self.protocol.handle_timer(loop.time())
            except Exception:
                logger.exception("! protocol timer failed")
                continue
            self._dispatch(out)
