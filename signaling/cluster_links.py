"""Direct links between signaling instances: the asyncio shell of :mod:`signaling.cluster_link`.

:class:`Links` listens for the other instances' links (:class:`_Inbound`), dials
its own to the instances it sends call frames to (:class:`_Outbound`, one per
peer instance, opened on first use and kept), and decides per frame, with one
:class:`~signaling.cluster_link.LinkSender` per peer, whether the frame goes over
the link or back to :class:`signaling.cluster.Cluster` for Redis. Nothing here
ever waits on a peer: writes are buffered by the transport, a peer whose
buffer passes :data:`WRITE_LIMIT` or whose acknowledgements are late by
``timeout`` seconds loses its link (its unacknowledged frames go over Redis),
connecting and authenticating are bounded by ``timeout`` too, and a link is
tried again :data:`RETRY` seconds after it failed.

Per frame the hop costs one tag (HMAC-SHA-256, its keyed state made once per
link: :class:`~signaling.cluster_link.Tagger`), one copy of the frame into the
write, and one system call per loop iteration (frames written later in the
same iteration are joined into one write at its end); the receiver cuts
frames straight out of what it read and checks tags over views. With ``tls``
the links run inside mutual TLS, everything else unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from qcall.exceptions import ClusterLinkError
from signaling.cluster_link import (
    MIN_SECRET,
    NONCE_LEN,
    TAG_LEN,
    Auth,
    FrameReader,
    Hello,
    LinkKind,
    LinkReceiver,
    LinkSender,
    Tagger,
    Welcome,
    encode,
    link_macs,
    transcript,
)

__all__ = ["Links", "parse_endpoint"]

logger = logging.getLogger(__name__)

#: Seconds before a failed link to a peer is tried again.
RETRY = 1.0
#: Seconds an inbound link waits before acknowledging (acks are coalesced).
ACK_DELAY = 0.01
#: Bytes buffered for a peer above which it counts as not reading (its link fails).
WRITE_LIMIT = 4 << 20
#: Inbound links not authenticated yet, at most (more are closed at once).
MAX_PENDING = 64
_U64 = struct.Struct(">Q")

#: ``deliver(inst, epoch, header, frame)``: an authenticated frame from a peer.
Deliver = Callable[[str, int, dict[str, Any], str], None]


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[V6]:PORT``) as advertised in Redis; ``None`` if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class _Link(asyncio.Protocol):
    """What both ends share: framing, the error frame, closing once."""

    peer = "?"
    direction = "?"  # "from" (inbound) or "to" (outbound), for logs

    def __init__(self, links: Links) -> None:
        self.links = links
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.session = b""
        self.tagger: Tagger | None = None  # keyed with ``session`` once it is known
        self.closed = False
        self._deadline: asyncio.TimerHandle | None = None
        self._batch: list[bytes] | None = None  # frames written later in this loop tick

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_LIMIT)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.links.timeout, self.fail, "handshake timed out")

    def authenticated(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def write(self, kind: LinkKind, body: bytes) -> None:
        if self.transport is not None and not self.closed:
            if self._batch:  # behind the frames of this tick, in order
                self.transport.write(b"".join(self._batch))
                self._batch = []
            self.transport.write(encode(kind, body))

    def keyed(self, session: bytes) -> None:
        """The session key is known: tags from now on."""
        self.session, self.tagger = session, Tagger(session)

    def write_tagged(self, kind: LinkKind, data: bytes) -> None:
        """Write ``kind`` with body ``tag ‖ data``.

        The first frame of a loop tick goes to the socket at once (no added
        latency); the others written in the same tick are joined and written in
        one go at its end (one system call for a burst, e.g. several users'
        frames read in one poll).
        """
        if self.transport is None or self.closed or self.tagger is None:
            return
        frame = self.tagger.frame(kind, data)
        if self._batch is not None:
            self._batch.append(frame)
            return
        self.transport.write(frame)
        self._batch = []
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self.transport is not None and not self.closed:
            self.transport.write(b"".join(batch))

    def fail(self, reason: str) -> None:
        """Tell the peer why (``ERROR``) and close."""
        if self.closed:
            return
        logger.warning("! link %s %s: %s", self.direction, self.peer, reason)
        self.write(LinkKind.ERROR, reason.encode()[:512])
        self.close()

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.transport is not None:
            if self._batch and not self.closed:
                self.transport.write(b"".join(self._batch))  # close() still sends it
            self.transport.close()
        self._batch = None
        self.closed = True

    def pause_writing(self) -> None:
        self.fail(f"peer does not read ({WRITE_LIMIT} bytes buffered)")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for kind, body in self.reader.feed(data):
                if kind is LinkKind.ERROR:
                    text = body.decode(errors="replace")
                    logger.warning("! link %s %s refused: %s", self.direction, self.peer, text)
                    self.close()
                    return
                self.handle(kind, body)
                if self.closed:
                    return
        except ClusterLinkError as exc:
            self.fail(str(exc))
        self.received()

    def handle(self, kind: LinkKind, body: bytes) -> None:
        raise NotImplementedError

    def received(self) -> None:
        """After a batch of frames."""

    def check_tag(self, kind: LinkKind, body: bytes) -> memoryview:
        assert self.tagger is not None  # only called once authenticated
        return self.tagger.check(kind, body)


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class _Inbound(_Link):
    """A link another instance dialed to this one: handshake, then its frames in."""

    direction = "from"

    def __init__(self, links: Links) -> None:
        super().__init__(links)
        self.hello: Hello | None = None
        self.epoch = 0
        self._auth_mac = b""
        self._seq = 0
        self._ack = 0  # the highest seq to acknowledge
        self._ack_sent = 0
        self._ack_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.links._pending += 1
        if self.links._pending > MAX_PENDING:
            self.fail("too many links in their handshake")

    def authenticated(self) -> None:
        super().authenticated()
        self.links._pending -= 1

    def handle(self, kind: LinkKind, body: bytes) -> None:
        if self.hello is None:
            if kind is not LinkKind.HELLO:
                raise ClusterLinkError(f"hello expected, got {kind.name.lower()}")
            self._hello(Hello.parse(body))
        elif self._auth_mac:
            if kind is not LinkKind.AUTH:
                raise ClusterLinkError(f"auth expected, got {kind.name.lower()}")
            if not _equal(Auth.parse(body).mac, self._auth_mac):
                raise ClusterLinkError("authentication failed (another cluster secret?)")
            self._auth_mac = b""
            self.authenticated()
            self.links._inbound_up(self)
        elif kind is LinkKind.FRAME:
            self.check_tag(kind, body)
            self._frame(body)
        else:
            raise ClusterLinkError(f"{kind.name.lower()} unexpected on an open link")

    def _hello(self, hello: Hello) -> None:
        self.peer = hello.sender
        if hello.target != self.links.instance_id:
            raise ClusterLinkError(f"this is instance {self.links.instance_id}, not {hello.target}")
        if hello.sender == self.links.instance_id:
            raise ClusterLinkError("a link from this instance to itself")
        self.hello, self.epoch = hello, hello.epoch
        nonce = os.urandom(NONCE_LEN)
        acked = self.links.receiver.delivered(hello.sender, hello.epoch)
        relay = hello.relay and self.links.relay  # both: relay frames on this link
        t = transcript(hello, nonce, self.links.epoch, acked, relay)
        mac, self._auth_mac, session = link_macs(self.links.secret, t)
        self.keyed(session)
        self._ack = self._ack_sent = self._seq = acked
        welcome = Welcome(nonce, self.links.epoch, acked, mac, relay)
        self.write(LinkKind.WELCOME, welcome.body())

    def _frame(self, body: bytes) -> None:
        """``body`` = tag (checked) ‖ header line ‖ ``\\n`` ‖ the client's frame."""
        end = body.find(b"\n", TAG_LEN)
        try:
            if end < 0:
                raise ValueError("no header line")
            header = json.loads(body[TAG_LEN:end])
            seq, epoch, inst = header["seq"], header["epoch"], header["inst"]
        except (ValueError, KeyError, TypeError):
            raise ClusterLinkError("frame: header is not {inst, epoch, seq, ...}") from None
        if inst != self.peer or type(epoch) is not int or epoch != self.epoch:
            raise ClusterLinkError(f"frame: from {inst!r} epoch {epoch!r} on {self.peer}'s link")
        if type(seq) is not int or seq <= self._seq:  # not true, not 2.0
            raise ClusterLinkError(f"frame: seq {seq!r} not after {self._seq}")
        self._seq = seq
        try:
            text = str(memoryview(body)[end + 1 :], "utf-8")  # no copy before decoding
        except UnicodeDecodeError:
            raise ClusterLinkError("frame: not UTF-8") from None
        self.links.deliver(inst, epoch, header, text)

    def ack(self, seq: int) -> None:
        """Frames up to ``seq`` were delivered (by any path): acknowledge soon."""
        self._ack = max(self._ack, seq)
        if self._ack_timer is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(ACK_DELAY, self._send_ack)

    def flush_ack(self) -> None:
        """Acknowledge now what waits for its acknowledgement."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self._send_ack()

    def _send_ack(self) -> None:
        self._ack_timer = None
        if self._ack > self._ack_sent:
            self._ack_sent = self._ack
            self.write_tagged(LinkKind.ACK, _U64.pack(self._ack))

    def close(self) -> None:
        if not self.closed and self.transport is not None and self._deadline is not None:
            self.links._pending -= 1  # closed during its handshake
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        super().close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self.links._inbound_down(self)


class _Outbound(_Link):
    """The link this instance dialed to ``peer``: hello, then frames out, acks in."""

    direction = "to"

    def __init__(self, links: Links, peer: str) -> None:
        super().__init__(links)
        self.peer = peer
        self.up = False
        self.relay = False  # the listener takes relay frames (negotiated, authenticated)
        self._hello = Hello(
            links.instance_id, peer, links.epoch, os.urandom(NONCE_LEN), links.relay
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.write(LinkKind.HELLO, self._hello.body())

    def handle(self, kind: LinkKind, body: bytes) -> None:
        if not self.up:
            if kind is not LinkKind.WELCOME:
                raise ClusterLinkError(f"welcome expected, got {kind.name.lower()}")
            welcome = Welcome.parse(body)
            if welcome.relay and not self._hello.relay:
                raise ClusterLinkError("welcome.relay: not offered")
            t = transcript(self._hello, welcome.nonce, welcome.epoch, welcome.acked, welcome.relay)
            mac, auth, session = link_macs(self.links.secret, t)
            self.keyed(session)
            if not _equal(welcome.mac, mac):
                raise ClusterLinkError("peer failed authentication (another cluster secret?)")
            self.write(LinkKind.AUTH, Auth(auth).body())
            self.up, self.relay = True, welcome.relay
            self.authenticated()
            self.links._outbound_up(self, welcome.acked)
        elif kind is LinkKind.ACK:
            data = self.check_tag(kind, body)
            if len(data) != _U64.size:
                raise ClusterLinkError("ack: not 8 bytes")
            self.links.senders[self.peer].on_ack(_U64.unpack(data)[0])
            self.links.release(self)
        else:
            raise ClusterLinkError(f"{kind.name.lower()} unexpected from the listener")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self.links._outbound_down(self, "closed" if exc is None else str(exc))


class Links:
    """This instance's direct links (see the module docstring).

    Args:
        instance_id: this instance's id.
        secret: the cluster's shared secret (at least 16 bytes).
        deliver: called with each authenticated, fresh frame from a peer (either path:
            :meth:`fresh` decides).
        resolve: coroutine returning a peer instance's advertised ``HOST:PORT``.
        republish: called with a peer's unacknowledged frames, in order, when its link
            fails: they go over Redis, ahead of anything sent after.
        timeout: seconds for connecting, for the handshake, and for an ack.
        epoch: this run's number (grows across restarts: microseconds since 1970).
        tls: ``(server context, client context)``: every link runs over mutually
            authenticated TLS (both ends' certificates checked against the cluster's
            CA, the dialed address against the listener's certificate), inside which
            the handshake and tags above run unchanged; ``None``: plain TCP.
        relay: offer relay frames in the handshake (docs/signaling.md, "Relay fast
            path"); ``False`` behaves as an instance of the version before them.
    """

    def __init__(
        self,
        instance_id: str,
        secret: bytes,
        *,
        deliver: Deliver,
        resolve: Callable[[str], Awaitable[str | None]],
        republish: Callable[[str, list[bytes]], None],
        epoch: int,
        timeout: float = 1.0,
        tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
        relay: bool = True,
    ) -> None:
        if len(secret) < MIN_SECRET:
            raise ClusterLinkError(f"the cluster secret must have at least {MIN_SECRET} bytes")
        self.instance_id, self.secret, self.epoch = instance_id, secret, epoch
        self.deliver, self._resolve, self._republish = deliver, resolve, republish
        self.timeout = timeout
        self.tls = tls
        self.relay = relay
        self.receiver = LinkReceiver()
        self.senders: dict[str, LinkSender] = {}
        self._outbound: dict[str, _Outbound] = {}
        self._inbound: dict[str, _Inbound] = {}
        self._retry_at: dict[str, float] = {}
        self._connecting: set[str] = set()
        self._pending = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Times a link failed and its frames went over Redis (tests, figures).
        self.failovers = 0
        #: Frames sent over links (the others went over Redis).
        self.sent = 0

    def __repr__(self) -> str:
        return f"<Links of {self.instance_id}: {len(self._outbound)} out, {len(self._inbound)} in>"

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port``; return the ``HOST:PORT`` to advertise."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Inbound(self), host, port,
            ssl=self.tls[0] if self.tls else None,
            ssl_handshake_timeout=self.timeout if self.tls else None,
        )  # fmt: skip
        bound = self._server.sockets[0].getsockname()
        self._tasks.add(asyncio.create_task(self._run_checks()))
        endpoint = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        logger.info("= links: listening on %s%s", endpoint, " (TLS)" if self.tls else "")
        return endpoint

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for inbound in self._inbound.values():
            inbound.flush_ack()  # the peers need not resend what was delivered here
        for link in [*self._outbound.values(), *self._inbound.values()]:
            link.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), self.timeout)

    # --- sending --------------------------------------------------------------------

    def next_seq(self, inst: str) -> int:
        """Number the next frame for ``inst``."""
        sender = self.senders.get(inst)
        if sender is None:
            sender = self.senders[inst] = LinkSender(catch_up=self.timeout)
        return sender.next_seq()

    def relays(self, inst: str) -> bool:
        """Whether ``inst`` takes relay frames: its link is up and both ends offered them
        (an instance of a version before them is sent client frames)."""
        link = self._outbound.get(inst)
        return link is not None and link.up and link.relay

    def send(self, inst: str, seq: int, message: bytes) -> bool:
        """Send frame ``seq`` to ``inst`` over its link if it can (True: written, or
        held for the link until earlier Redis frames are delivered); False: use Redis."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        link = self._outbound.get(inst)
        if link is None and inst not in self._connecting and now >= self._retry_at.get(inst, 0.0):
            self._retry_at[inst] = now + RETRY
            self._connecting.add(inst)
            task = asyncio.create_task(self._connect(inst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        sender = self.senders[inst]
        if link is None or not link.up:
            sender.over_redis(seq, now)  # a link coming up later waits for it
            return False
        routed = sender.route(seq, message, now)
        if routed is False:
            return False
        if routed:
            self._write(link, message)
        if sender.stuck:
            link.fail("too many frames unacknowledged")
        return True

    def _write(self, link: _Outbound, message: bytes) -> None:
        link.write_tagged(LinkKind.FRAME, message)
        self.sent += 1

    def release(self, link: _Outbound) -> None:
        """Write what ``link``'s sender held until the Redis frames before it arrived."""
        sender = self.senders.get(link.peer)
        if sender is not None and link.up and not link.closed:
            for message in sender.release(asyncio.get_running_loop().time()):
                self._write(link, message)

    async def _connect(self, inst: str) -> None:
        try:
            endpoint = await asyncio.wait_for(self._resolve(inst), self.timeout)
            address = parse_endpoint(endpoint) if endpoint else None
            if address is None:
                return  # an instance without links (older version, or no secret): Redis
            loop = asyncio.get_running_loop()
            tls: dict[str, Any] = {}
            if self.tls is not None:  # the certificate must name the advertised host
                tls = {"ssl": self.tls[1], "server_hostname": address[0]}
            _, link = await asyncio.wait_for(
                loop.create_connection(lambda: _Outbound(self, inst), *address, **tls),
                self.timeout,
            )
            self._outbound[inst] = link
            if link.closed:
                self._outbound.pop(inst, None)
        except ssl.SSLError as exc:  # a certificate not of this cluster: loud
            logger.warning("! no link to %s: TLS: %s", inst, exc)
        except (OSError, TimeoutError, ClusterLinkError) as exc:
            logger.info("! no link to %s: %s", inst, exc or type(exc).__name__)
        except Exception:  # Redis errors: the caller's fallback carries the frames
            logger.exception("! no link to %s", inst)
        finally:
            self._connecting.discard(inst)

    def _outbound_up(self, link: _Outbound, acked: int) -> None:
        sender = self.senders.setdefault(link.peer, LinkSender(catch_up=self.timeout))
        sender.on_up(acked)
        logger.info("= link to %s up (peer had delivered up to %d)", link.peer, acked)

    def _outbound_down(self, link: _Outbound, reason: str) -> None:
        if self._outbound.get(link.peer) is link:
            del self._outbound[link.peer]
        self._retry_at[link.peer] = asyncio.get_running_loop().time() + RETRY
        sender = self.senders.get(link.peer)
        if sender is None or not link.up:
            return
        resend = sender.on_down(asyncio.get_running_loop().time())
        self.failovers += 1
        log = logger.warning if resend else logger.info  # a peer stopping: nothing lost
        log("! link to %s down (%s): %d frames over Redis", link.peer, reason, len(resend))
        if resend:
            self._republish(link.peer, resend)

    def forget(self, inst: str) -> None:
        """``inst`` died: close its link, drop what it did not acknowledge.

        Its numbering goes on (an instance only thought dead, e.g. stopped for a
        while, still remembers the last number it delivered)."""
        link = self._outbound.pop(inst, None)
        if link is not None:
            link.up = False  # nothing to resend: nobody there
            link.close()
        sender = self.senders.get(inst)
        if sender is not None:
            sender.on_down(asyncio.get_running_loop().time())
        self._retry_at.pop(inst, None)

    async def _run_checks(self) -> None:
        """Take down links whose peer is late with its acknowledgements."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeout / 4)
            now = loop.time()
            for inst, link in list(self._outbound.items()):
                sender = self.senders.get(inst)
                if link.up and sender is not None and sender.overdue(now, self.timeout):
                    link.fail(f"no acknowledgement within {self.timeout:g} s")
                else:
                    self.release(link)  # held frames whose Redis frames were lost

    # --- receiving ------------------------------------------------------------------

    def _inbound_up(self, link: _Inbound) -> None:
        old = self._inbound.get(link.peer)
        self._inbound[link.peer] = link
        if old is not None and old is not link:
            old.close()
        # Frames delivered over Redis since the WELCOME named what we had: the
        # sender holds its link frames until they are acknowledged here.
        link.ack(self.receiver.delivered(link.peer, link.epoch))
        logger.info("= link from %s up", link.peer)

    def _inbound_down(self, link: _Inbound) -> None:
        if self._inbound.get(link.peer) is link:
            del self._inbound[link.peer]

    def fresh(self, inst: str, epoch: int, seq: int) -> bool:
        """Whether frame ``seq`` of ``inst`` is new (deliver it); acknowledges it."""
        if not self.receiver.fresh(inst, epoch, seq):
            return False
        link = self._inbound.get(inst)
        if link is not None and link.epoch == epoch:
            link.ack(seq)
        return True
