"""Several interchangeable signaling instances sharing one Redis (``--redis``).

docs/signaling.md, "Several instances", is the specification; in short:

* **Liveness.** Each instance keeps ``qcall:instance:ID`` alive (``PX`` ``liveness``,
  refreshed every ``heartbeat``). An instance that dies stops refreshing it, and
  within ``liveness`` seconds every name it held counts as offline: nothing has
  to clean up after a ``kill -9``. Beside it, ``qcall:features:ID`` (same
  expiry) lists the protocol features the instance takes from others
  (``early_offer``); an instance without one (older, or ``--no-early-offer``)
  gets the caller's early offer from the caller's instance behind the accept.
* **Names.** ``qcall:name:NAME`` is a hash ``{inst, fp}``: the instance the name
  is registered on and its fingerprint; ``qcall:pin:NAME`` the pinned fingerprint
  (``PX`` ``pin_ttl``). A registration is confirmed only after one Lua script
  (atomic in Redis) claimed the name: a name pinned to another key is refused
  (``name_taken``); a name held by another live instance moves here, and that
  instance closes its connection with ``replaced``, as a second login does on
  one instance. Two instances registering the same name at once: the later
  claim wins, the other connection gets ``replaced`` (never both online).
* **Messages between instances** go over Redis pub/sub, one channel per
  instance (``qcall:to:ID``) and one for presence (``qcall:presence:all``). A call
  between users of two instances runs the same state machine on both: each
  instance holds a *stand-in* connection for the remote party
  (:meth:`SignalingProtocol.attach_remote`), and every frame a user sends that
  the protocol addresses to a stand-in is published, verbatim, to the stand-in's
  instance, which feeds it to its own protocol as coming from that user.
* **Mail between instances.** An envelope stored (in the shared PostgreSQL store)
  for a user registered on another instance is announced to that instance
  (:meth:`Cluster.mail`, one Lua script: look the name up, publish); it queues
  the ``mail`` push for its user at once. Small pushes travel inline, bigger
  ones are read back from the shared store by the receiving instance.
* **Redis restarted.** The heartbeat notices its instance key is gone and claims
  its users' names again; the subscriber reconnects and subscribes again, and
  tells its users ``mail_waiting`` (announcements may have been lost meanwhile).

* **Direct links** (``link_secret``; :mod:`signaling.cluster_links`): with a
  cluster secret, each instance listens for links and advertises ``HOST:PORT``
  as the value of its ``qcall:instance:ID`` key; call frames for another
  instance go over an authenticated TCP link to it, numbered per pair of
  instances (``epoch``, ``seq`` in the header) so that the receiver delivers each
  once and in order whichever path it took; Redis carries them while the link
  is down or catching up (docs/signaling.md, "Direct links between instances").

Messages on ``qcall:to:ID`` are one JSON header line, ``\n``, then a raw body
(a forwarded frame or a ``mail`` push, never escaped into JSON):
``{"from", "fp", "inst"[, "epoch", "seq"]}`` + frame, ``{"relay", "fp", "inst", "epoch",
"call", "type", "seq"}`` + relayed message (the relay fast path: a link's frame
resent), ``{"kick", "inst"}``, ``{"mail"}`` + push,
``{"mail", "id"}`` (the receiving instance reads envelope ``id`` from the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from qcall.exceptions import ClusterError, MessageStoreError
from qcall.signaling.mailbox import MailEnvelope, MailPush, MailWaiting
from qcall.signaling.messages import (
    EARLY_OFFER,
    CallMessage,
    ErrorMessage,
    Offer,
    OnlinePeer,
    Registered,
)
from qcall.signaling.protocol import CALL_RULES, CloseConnection, ConnectionId, Output
from qcall.signaling.state import RELAY
from qcall.typing import PeerId
from signaling.cluster_link import client_message, header_start, relay_message
from signaling.cluster_links import Links

if TYPE_CHECKING:
    from signaling.server import SignalingServer

__all__ = ["Cluster"]

logger = logging.getLogger(__name__)

PREFIX = "qcall:"

# KEYS: name hash, pin key. ARGV: instance, fingerprint, pin ttl ms, instance key prefix.
_CLAIM = """
local pin = redis.call('GET', KEYS[2])
if pin and pin ~= ARGV[2] then return 'pinned' end
local owner = redis.call('HGET', KEYS[1], 'inst')
redis.call('HSET', KEYS[1], 'inst', ARGV[1], 'fp', ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if owner and owner ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. owner) == 1 then
  return 'moved:' .. owner
end
return 'ok'
"""
# KEYS: name hash. ARGV: this instance, instance key prefix, channel prefix, message.
# Publishes the message to the instance holding the name, if it is another live one.
_MAIL = """
local inst = redis.call('HGET', KEYS[1], 'inst')
if not inst or inst == ARGV[1] or redis.call('EXISTS', ARGV[2] .. inst) == 0 then return 0 end
return redis.call('PUBLISH', ARGV[3] .. inst, ARGV[4])
"""
#: ``mail`` pushes up to this many characters travel inline through Redis; bigger
#: ones by id (Redis closes a subscriber whose pub/sub buffer passes 32 MB).
MAIL_INLINE = 64 * 1024
_PUSH_ID = re.compile(r'\{"type":"mail","envelope":\{"id":(\d+),')
_MAIL_WAITING = MailWaiting().serialize()
#: Seconds :meth:`Cluster.close` waits for each step of its clean-up.
CLOSE_TIMEOUT = 1.0
# KEYS: name hash. ARGV: instance key prefix, features key prefix. The name's
# {instance, fingerprint, that instance's features ("" if it advertises none)} if online.
_LOOKUP = """
local v = redis.call('HMGET', KEYS[1], 'inst', 'fp')
if not v[1] or redis.call('EXISTS', ARGV[1] .. v[1]) == 0 then return false end
v[3] = redis.call('GET', ARGV[2] .. v[1]) or ''
return v
"""
# KEYS: name hash. ARGV: instance.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'inst') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Cluster:
    """One instance's link to the others (see the module docstring).

    Args:
        url: ``redis://HOST:PORT/N``.
        instance_id: unique among the instances (printable ASCII, no spaces).
        liveness: seconds after its last heartbeat an instance counts as dead.
        heartbeat: seconds between heartbeats.
        pin_ttl: seconds a name's pinned fingerprint is kept in Redis.
        link_secret: the cluster's shared secret (≥ 16 bytes): call frames go over
            direct links between instances; ``None``: over Redis only.
        link_host: address to listen on for links, advertised to the others.
        link_port: port for links (0: any free one).
        link_timeout: seconds for a link to connect, authenticate, or acknowledge.
        link_tls: ``(server, client)`` TLS contexts: links run over mutual TLS
            (:class:`~signaling.cluster_links.Links`); ``None``: plain TCP.
    """

    def __init__(
        self,
        url: str,
        instance_id: str,
        *,
        liveness: float = 1.0,
        heartbeat: float = 0.25,
        pin_ttl: float = 30 * 86400.0,
        link_secret: bytes | None = None,
        link_host: str = "127.0.0.1",
        link_port: int = 0,
        link_timeout: float = 1.0,
        link_tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    ) -> None:
        if not instance_id or not instance_id.isprintable() or " " in instance_id:
            raise ValueError(f"bad instance id {instance_id!r}")
        self.instance_id = instance_id
        self.liveness, self.heartbeat, self.pin_ttl = liveness, heartbeat, pin_ttl
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=max(0.5, liveness), socket_connect_timeout=max(0.5, liveness)
        )
        # Subscriptions wait for long: no read timeout, a health check instead.
        self._sub_redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=max(0.5, liveness), health_check_interval=1
        )
        self._claim = self.redis.register_script(_CLAIM)
        self._release = self.redis.register_script(_RELEASE)
        self._mail = self.redis.register_script(_MAIL)
        self._lookup = self.redis.register_script(_LOOKUP)
        #: This run's number in frame headers (grows across restarts).
        self.epoch = time.time_ns() // 1000
        self.links: Links | None = None
        if link_secret is not None:
            self.links = Links(
                instance_id, link_secret, deliver=self._on_link_frame, resolve=self._endpoint_of,
                republish=self._queue_frames, epoch=self.epoch, timeout=link_timeout,
                tls=link_tls,
            )  # fmt: skip
        self._link_address = (link_host, link_port)
        self._endpoint = "1"  # the value of our instance key: "HOST:PORT" with links
        self._frame_queue: list[tuple[str, bytes, ConnectionId | None]] = []
        self._frame_wake = asyncio.Event()
        self._mail_queue: list[tuple[PeerId, bytes]] = []  # announcements to publish, in order
        self._mail_wake = asyncio.Event()
        self._server: SignalingServer | None = None
        self._local: dict[PeerId, str] = {}  # names registered here -> fingerprint
        self._headers: dict[tuple[PeerId, bool], tuple[str, bytes]] = {}  # see _link_header
        #: Relay frames delivered here by the fast path (tests, figures).
        self.relayed = 0
        self._standins: dict[PeerId, tuple[ConnectionId, str]] = {}  # -> (cid, instance)
        #: The protocol features this instance takes from other instances (its
        #: ``features`` key in Redis, refreshed with its instance key), and what the
        #: others advertise, as last looked up (an unknown one: none).
        self.features: frozenset[str] = frozenset()
        self._features_of: dict[str, frozenset[str]] = {}
        self._remote_online: dict[PeerId, tuple[str, str]] = {}  # -> (fingerprint, instance)
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._subscribed = asyncio.Event()
        #: Times the heartbeat found Redis empty and claimed the names again.
        self.recoveries = 0

    def __repr__(self) -> str:
        return f"<Cluster instance {self.instance_id}>"

    def _key(self, kind: str, name: str) -> str:
        return f"{PREFIX}{kind}:{name}"

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, server: SignalingServer) -> None:
        """Join the cluster and hook into ``server``.

        Raises:
            ClusterError: Redis is unreachable.
        """
        self._server = server
        if server.protocol.config.early_offer:
            self.features = frozenset({EARLY_OFFER})
        if self.links is not None:
            self._endpoint = await self.links.start(*self._link_address)
        try:
            await self._beat()
        except RedisError as exc:
            raise ClusterError(f"cannot reach Redis: {exc}") from None
        server.cluster = self
        self._tasks = [
            asyncio.create_task(self._run_heartbeat()),
            asyncio.create_task(self._run_subscriber()),
            asyncio.create_task(self._run_mail()),
            asyncio.create_task(self._run_frames()),
        ]
        await asyncio.wait_for(self._subscribed.wait(), 5.0)

    async def close(self) -> None:
        """Leave the cluster: release the names held here, stop the tasks.

        The server calls no hook any more; departures in progress (:meth:`left`)
        get a second to finish before the Redis clients close under them.
        """
        self._closing = True
        if self._server is not None:
            self._server.cluster = None
        if self.links is not None:
            await self.links.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a Redis client stuck in its clean-up must not hang us
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
        self._tasks = []
        if self._spawned:
            await asyncio.wait(list(self._spawned), timeout=CLOSE_TIMEOUT)
        for task in list(self._spawned):
            task.cancel()
        with contextlib.suppress(RedisError, OSError):
            for name in list(self._local):
                await self._release(keys=[self._key("name", name)], args=[self.instance_id])
            await self.redis.delete(
                self._key("instance", self.instance_id), self._key("features", self.instance_id)
            )
        for client in (self.redis, self._sub_redis):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT)

    # --- hooks called by the server shell ---------------------------------------------------

    async def before(self, cid: ConnectionId, text: str | bytes) -> None:
        """Before ``text`` from ``cid`` is handled: make a stand-in for a remote callee."""
        server = self._server
        if server is None or not isinstance(text, str) or '"invite"' not in text:
            return
        if server.protocol.name_of(cid) is None:
            return
        try:
            peer = json.loads(text).get("peer")
        except (ValueError, AttributeError):
            return  # the protocol answers bad_message
        if not isinstance(peer, str) or server.protocol.connection_of(PeerId(peer)) is not None:
            return
        try:  # one round trip: the name's instance (if alive) and its features
            found = await self._lookup(
                keys=[self._key("name", peer)],
                args=[self._key("instance", ""), self._key("features", "")],
            )
        except RedisError as exc:
            logger.warning("! cannot look %s up in Redis: %s", peer, exc)
            return  # the protocol answers unavailable
        if found and found[0].decode() != self.instance_id:
            inst = found[0].decode()
            self._features_of[inst] = frozenset(found[2].decode().split(",")) - {""}
            self._attach(PeerId(peer), found[1].decode(), inst)

    async def after(self, cid: ConnectionId, text: str | bytes, out: list[Output]) -> list[Output]:
        """After ``text`` from ``cid``: confirm a registration, forward to other instances."""
        server = self._server
        if server is None:
            return out
        for target, msg in out:
            if target == cid and isinstance(msg, Registered):
                return await self._confirm(cid, msg, out)
        name = server.protocol.name_of(cid)
        if name is None or server.protocol.is_remote(cid):
            return out
        kept: list[Output] = []
        instances: dict[str, CallMessage | None] = {}  # instance -> its one relay message
        for target, msg in out:
            standin = self._instance_of(target)
            if standin is None:
                kept.append((target, msg))
            elif not isinstance(msg, CloseConnection):
                relayed: CallMessage | None = None
                rule = CALL_RULES.get(msg.TYPE)
                if isinstance(msg, CallMessage) and rule is not None and rule[2] == RELAY:
                    relayed = msg if standin not in instances else None
                instances[standin] = relayed
        frame = text.encode() if isinstance(text, str) else text
        for inst in sorted(instances):
            if self.links is not None:  # numbered; the link if it can, else Redis in order
                one = instances[inst]
                if one is not None and self.links.relays(inst):  # the relay fast path
                    seq = self.links.next_seq(inst)
                    start = self._link_header(name, relay=True)
                    body = one.serialize().encode()
                    message = relay_message(start, one.call_id, one.TYPE, seq, body)
                    self._send_numbered(inst, seq, message, cid)
                else:
                    self._forward(inst, name, frame, cid)
                continue
            try:
                await self.redis.publish(self._key("to", inst), self._redis_frame(name, frame))
            except RedisError as exc:
                logger.warning("! cannot forward to instance %s: %s", inst, exc)
                kept.append((cid, ErrorMessage("unavailable", "peer unreachable now")))
        return kept

    def _link_header(self, name: PeerId, *, relay: bool = False) -> bytes:
        """``{"from", "fp", "inst", "epoch"`` of ``name``'s numbered frames, without
        the closing brace (``seq`` follows); made once per name and fingerprint.
        ``relay``: ``"relay"`` instead of ``"from"`` (a relay frame)."""
        fp = self._local.get(name, "")
        cached = self._headers.get((name, relay))
        if cached is None or cached[0] != fp:
            if len(self._headers) >= 4096:
                self._headers.clear()
            start = header_start(name, fp, self.instance_id, self.epoch, relay=relay)
            cached = self._headers[name, relay] = (fp, start)
        return cached[1]

    def mail(self, name: PeerId, text: str) -> None:
        """A ``mail`` push for ``name``, who is not registered here: announce it to
        the instance ``name`` is registered on (if any; queued, published in order)."""
        if len(text) <= MAIL_INLINE:
            body = json.dumps({"mail": name}).encode() + b"\n" + text.encode()
        else:
            found = _PUSH_ID.match(text)
            header = {"mail": name} if found is None else {"mail": name, "id": int(found[1])}
            body = json.dumps(header).encode() + b"\n"  # no id: the user is told to fetch
        self._mail_queue.append((name, body))
        self._mail_wake.set()

    async def left(self, name: PeerId) -> None:
        """``name``'s last connection here closed: release it and tell the others."""
        server = self._server
        if server is not None and server.protocol.connection_of(name) is not None:
            return  # replaced by a newer connection here
        if self._closing:
            return  # close() releases the names held here
        fp = self._local.pop(name, None)
        if fp is None:
            return  # never claimed, or moved to another instance (kick)
        task = asyncio.current_task()
        if task is not None:
            self._spawned.add(task)  # close() waits for it
        try:
            with contextlib.suppress(RedisError, OSError):
                await self._release(keys=[self._key("name", name)], args=[self.instance_id])
                await self._announce(name, fp, online=False)
        finally:
            if task is not None:
                self._spawned.discard(task)

    # --- internals --------------------------------------------------------------------------

    async def _confirm(self, cid: ConnectionId, msg: Registered, out: list[Output]) -> list[Output]:
        assert self._server is not None
        name = PeerId(msg.name)
        try:
            result = await self._claim(
                keys=[self._key("name", name), self._key("pin", name)],
                args=[
                    self.instance_id, msg.fingerprint, int(self.pin_ttl * 1000),
                    self._key("instance", ""),
                ],
            )  # fmt: skip
            verdict = result.decode() if isinstance(result, bytes) else str(result)
        except RedisError as exc:
            logger.warning("! cannot claim %s in Redis: %s", name, exc)
            verdict = "down"
        if verdict == "ok" or verdict.startswith("moved:"):
            self._local[name] = msg.fingerprint
            with contextlib.suppress(RedisError, OSError):
                await self._announce(name, msg.fingerprint, online=True)
                out = await self._add_remote_online(cid, msg, out)
            if verdict != "ok":  # a second login: the older connection is replaced
                kick = json.dumps({"kick": name, "inst": self.instance_id}) + "\n"
                with contextlib.suppress(RedisError):
                    await self.redis.publish(self._key("to", verdict[6:]), kick)
            return out
        code, text, close = {
            "pinned": ("name_taken", "name registered with another key", 1008),
        }.get(verdict, ("cluster_unavailable", "shared state unreachable, try again", 1013))
        logger.info("! registration of %s refused: %s", name, verdict)
        loop = asyncio.get_running_loop()
        self._server.protocol.disconnect(cid, loop.time())  # nobody was told yet
        return [
            (cid, ErrorMessage(code, text, ref="register")),
            (cid, CloseConnection(close, text)),
        ]

    async def _announce(self, name: PeerId, fp: str, *, online: bool) -> None:
        news = {"name": name, "fp": fp, "online": online, "inst": self.instance_id}
        await self.redis.publish(self._key("presence", "all"), json.dumps(news))

    async def _add_remote_online(
        self, cid: ConnectionId, msg: Registered, out: list[Output]
    ) -> list[Output]:
        """Add the watched names online on other instances to ``registered.online``."""
        assert self._server is not None
        protocol = self._server.protocol
        watch = protocol.watch_of(cid)
        if not watch:
            return out  # everyone (None): this instance's users only (docs/signaling.md)
        wanted = [n for n in watch if n != msg.name and protocol.connection_of(n) is None]
        if not wanted:
            return out
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in wanted:
                pipe.hmget(self._key("name", n), ["inst", "fp"])
            owners = await pipe.execute()
        found = [(n, i.decode(), f.decode()) for n, (i, f) in zip(wanted, owners, strict=True) if i]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, inst, _ in found:
                pipe.exists(self._key("instance", inst))
            alive = await pipe.execute()
        extra = tuple(OnlinePeer(n, fp) for (n, _, fp), up in zip(found, alive, strict=True) if up)
        if not extra:
            return out
        snapshot = dataclasses.replace(msg, online=msg.online + extra)
        return [(t, snapshot if m is msg else m) for t, m in out]

    def _on_presence(self, data: dict[str, Any]) -> None:
        server = self._server
        assert server is not None
        name, fp, inst = PeerId(str(data["name"])), str(data["fp"]), str(data["inst"])
        if inst == self.instance_id:
            return
        online = bool(data["online"])
        if online:
            self._remote_online[name] = (fp, inst)
        else:
            if self._remote_online.get(name, ("", ""))[1] != inst:
                return  # an older departure: the name lives elsewhere now
            del self._remote_online[name]
            entry = self._standins.get(name)
            if entry is not None and entry[1] == inst:
                self._drop(name)
        server._dispatch(server.protocol.remote_presence(name, fp, online))

    def _instance_of(self, target: ConnectionId) -> str | None:
        assert self._server is not None
        if not self._server.protocol.is_remote(target):
            return None
        name = self._server.protocol.name_of(target)
        entry = self._standins.get(name) if name is not None else None
        return entry[1] if entry else None

    def _attach(self, name: PeerId, fp: str, inst: str) -> ConnectionId | None:
        server = self._server
        assert server is not None
        loop = asyncio.get_running_loop()
        # An instance not known to take early offers (an older one, or run with
        # --no-early-offer) gets the caller's offer behind the callee's accept.
        early = EARLY_OFFER in self._features_of.get(inst, frozenset())
        standin, out = server.protocol.attach_remote(name, fp, loop.time(), early)
        if standin is not None:
            self._standins[name] = (standin, inst)
            server._dispatch(out)
        return standin

    def _drop(self, name: PeerId) -> None:
        server = self._server
        entry = self._standins.pop(name, None)
        if server is None or entry is None:
            return
        loop = asyncio.get_running_loop()
        server._dispatch(server.protocol.disconnect(entry[0], loop.time()))
        server._check_timer()

    def _on_kick(self, name: PeerId) -> None:
        """``name`` registered on another instance: close its connection here (``replaced``)."""
        server = self._server
        assert server is not None
        cid = server.protocol.connection_of(name)
        if cid is None or server.protocol.is_remote(cid):
            return
        self._local.pop(name, None)  # the other instance owns the name now
        text = "registered again on another instance"
        server._dispatch(
            [(cid, ErrorMessage("replaced", text)), (cid, CloseConnection(1008, text))]
        )

    def _on_frame(self, data: dict[str, Any], frame: str) -> None:
        """A frame from another instance: a client's frame (``from``), or a relay frame
        (``relay``: a relayed message that instance validated and serialized)."""
        server = self._server
        assert server is not None
        relay = data.get("relay")
        name, inst = PeerId(str(data["from"] if relay is None else relay)), str(data["inst"])
        if self.links is not None and "seq" in data:
            if not self.links.fresh(inst, int(data["epoch"]), int(data["seq"])):
                return  # delivered already (the other path), or older than one delivered
        current = server.protocol.connection_of(name)
        entry = self._standins.get(name)
        if entry is not None and (current != entry[0] or entry[1] != inst):
            self._drop(name)  # the user moved
            entry, current = None, server.protocol.connection_of(name)
        if entry is None:
            if current is not None:
                return  # the user is here now: the other instance's view is stale
            standin = self._attach(name, str(data["fp"]), inst)
            if standin is None:
                return
        else:
            standin = entry[0]
        if relay is not None:  # the relay fast path: checked here, not parsed again
            target = server.protocol.forwarded_relay(
                standin,
                str(data["call"]),
                str(data["type"]),
                frame,
                asyncio.get_running_loop().time(),
            )
            if target is not None:
                self.relayed += 1
                server.queue_text(target, frame)
            else:
                logger.debug("relay frame of %s from %s not deliverable here", name, inst)
            return
        loop = asyncio.get_running_loop()
        out = server.protocol.receive(standin, frame, loop.time())
        server._dispatch([(t, m) for t, m in out if not server.protocol.is_remote(t)])
        for target, msg in out:
            if target == standin and isinstance(msg, Offer) and msg.peer in self._local:
                # Our caller's early offer, held for that instance (it does not take
                # early offers), right behind the accept it just sent: as if sent now.
                held = Offer(msg.call_id, payload=msg.payload, reason=msg.reason)
                self._forward(inst, PeerId(msg.peer), held.serialize().encode())
        server._check_timer()

    def _forward(
        self, inst: str, name: PeerId, frame: bytes, cid: ConnectionId | None = None
    ) -> None:
        """Forward a frame of ``name`` (registered here) to instance ``inst``, in order:
        numbered, on the link if it can, else queued on Redis (``cid``: told if that
        fails); without links, queued on Redis."""
        if self.links is not None:
            seq = self.links.next_seq(inst)
            self._send_numbered(inst, seq, client_message(self._link_header(name), seq, frame), cid)
            return
        self._queue_frames(inst, [self._redis_frame(name, frame)])

    def _send_numbered(
        self, inst: str, seq: int, message: bytes, cid: ConnectionId | None
    ) -> None:
        """A numbered frame to ``inst``: on the link if it can, else queued on Redis."""
        assert self.links is not None
        if not self.links.send(inst, seq, message):
            self._queue_frames(inst, [message], cid)

    def _redis_frame(self, name: PeerId, frame: bytes) -> bytes:
        """A frame of ``name`` (registered here) as published on Redis: its JSON header
        ``{"from", "fp", "inst"}``, a newline, the frame."""
        header = {"from": name, "fp": self._local.get(name, ""), "inst": self.instance_id}
        return json.dumps(header).encode() + b"\n" + frame

    def _on_link_frame(self, inst: str, epoch: int, header: dict[str, Any], frame: str) -> None:
        """A frame that came over the link from ``inst`` (authenticated, header checked)."""
        try:
            self._on_frame(header, frame)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("! bad frame from instance %s: %s", inst, exc)
        except Exception:  # a bug, never the peer's input: the link and everyone go on
            logger.exception("! frame from instance %s failed", inst)

    async def _endpoint_of(self, inst: str) -> str | None:
        """The ``HOST:PORT`` instance ``inst`` advertises for links (``None``: none, dead)."""
        value = await self.redis.get(self._key("instance", inst))
        return value.decode() if value else None

    def _queue_frames(
        self, inst: str, messages: list[bytes], cid: ConnectionId | None = None
    ) -> None:
        """Publish numbered frames to ``inst`` over Redis, after those queued before."""
        self._frame_queue += [(inst, message, cid) for message in messages]
        self._frame_wake.set()

    async def _run_frames(self) -> None:
        """Publish the queued frames, all waiting ones in one pipeline, in order."""
        while True:
            await self._frame_wake.wait()
            self._frame_wake.clear()
            batch, self._frame_queue = self._frame_queue, []
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for inst, message, _ in batch:
                        pipe.publish(self._key("to", inst), message)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                logger.warning("! cannot forward %d frames: %s", len(batch), exc)
                server = self._server
                for cid in {cid for _, _, cid in batch if cid is not None}:
                    if server is not None:
                        error = ErrorMessage("unavailable", "peer unreachable now")
                        server._dispatch([(cid, error)])

    async def _run_mail(self) -> None:
        """Publish the queued mail announcements, all waiting ones in one pipeline."""
        while True:
            await self._mail_wake.wait()
            self._mail_wake.clear()
            batch, self._mail_queue = self._mail_queue, []
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, body in batch:
                        await self._mail(
                            keys=[self._key("name", name)],
                            args=[
                                self.instance_id, self._key("instance", ""), self._key("to", ""),
                                body,
                            ],
                            client=pipe,
                        )  # fmt: skip
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                # Stored all the same: the recipients fetch them when they (re)connect.
                logger.warning("! cannot announce %d envelopes: %s", len(batch), exc)

    def _on_mail(self, header: dict[str, Any], body: bytes) -> None:
        """Another instance stored an envelope for a user registered here: push it."""
        server = self._server
        assert server is not None
        name = PeerId(str(header["mail"]))
        cid = server.protocol.connection_of(name)
        if cid is None or server.protocol.is_remote(cid) or server.mailbox is None:
            return  # gone meanwhile: it fetches when it registers again
        if body:
            server._push_text(name, body.decode())
        elif isinstance(envelope_id := header.get("id"), int) and envelope_id > 0:
            self._spawn(self._push_stored(name, envelope_id))
        else:
            server._send_text(cid, _MAIL_WAITING)

    async def _push_stored(self, name: PeerId, envelope_id: int) -> None:
        """Read envelope ``envelope_id`` of ``name`` from the shared store and push it."""
        server = self._server
        assert server is not None and server.mailbox is not None
        try:
            stored = await server.mailbox.store.fetch(name, envelope_id - 1, 1)
        except MessageStoreError as exc:
            logger.warning("! cannot read envelope #%d for %s: %s", envelope_id, name, exc)
            stored = []
            cid = server.protocol.connection_of(name)
            if cid is not None:
                server._send_text(cid, _MAIL_WAITING)  # it fetches later
        if stored and stored[0].id == envelope_id:  # else acknowledged meanwhile
            e = stored[0]
            push = MailPush(MailEnvelope(e.id, e.sender, int(e.received_at * 1000), e.data))
            server._push_text(name, push.serialize())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def _tell_mail_waiting(self) -> None:
        """Announcements may have been lost (subscription lost): every local user fetches."""
        server = self._server
        if server is None or server.mailbox is None:
            return
        for name in self._local:
            cid = server.protocol.connection_of(name)
            if cid is not None and not server.protocol.is_remote(cid):
                server._send_text(cid, _MAIL_WAITING)

    async def _run_subscriber(self) -> None:
        presence = self._key("presence", "all").encode()
        while True:
            pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._key("to", self.instance_id), presence)
                if self._subscribed.is_set():
                    self._tell_mail_waiting()  # announcements may have been lost meanwhile
                self._subscribed.set()
                async for message in pubsub.listen():
                    try:
                        if message["channel"] == presence:
                            self._on_presence(json.loads(message["data"]))
                            continue
                        head, _, body = message["data"].partition(b"\n")
                        data = json.loads(head)
                        if "kick" in data:
                            self._on_kick(PeerId(str(data["kick"])))
                        elif "mail" in data:
                            self._on_mail(data, body)
                        else:
                            self._on_frame(data, body.decode())
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        logger.warning("! bad message from another instance: %s", exc)
            except (RedisError, OSError) as exc:
                logger.warning("! Redis subscription lost (%s); subscribing again", exc)
                await asyncio.sleep(min(0.2, self.heartbeat))
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), CLOSE_TIMEOUT)  # type: ignore[no-untyped-call]

    async def _beat(self) -> bool:
        """Refresh this instance's key; True if Redis had lost it (restart)."""
        key = self._key("instance", self.instance_id)
        ttl = int(self.liveness * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.set(key, self._endpoint, px=ttl)
            if self.features:  # (before the instance key's expiry, like it)
                pipe.set(self._key("features", self.instance_id), ",".join(self.features), px=ttl)
            existed = (await pipe.execute())[0]
        return not existed

    async def _run_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                if await self._beat() and self._local:
                    await self._reclaim()
                await self._check_standins()
            except (RedisError, OSError) as exc:
                logger.warning("! Redis heartbeat failed: %s", exc)

    async def _reclaim(self) -> None:
        """Redis lost our state (restarted): claim our users' names again."""
        self.recoveries += 1
        logger.warning("! Redis lost this instance's state: claiming %d names", len(self._local))
        for name, fp in list(self._local.items()):
            await self._claim(
                keys=[self._key("name", name), self._key("pin", name)],
                args=[self.instance_id, fp, int(self.pin_ttl * 1000), self._key("instance", "")],
            )

    async def _check_standins(self) -> None:
        """Users of dead instances go offline; drop stand-ins no call needs any more."""
        server = self._server
        peers = set(self.links.senders) if self.links is not None else set()
        if server is None or not (self._standins or self._remote_online or peers):
            return
        instances = sorted(
            {inst for _, inst in self._standins.values()}
            | {inst for _, inst in self._remote_online.values()}
            | peers
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for inst in instances:
                pipe.exists(self._key("instance", inst))
            alive = dict(zip(instances, await pipe.execute(), strict=True))
        for name, (fp, inst) in list(self._remote_online.items()):
            if not alive[inst]:
                del self._remote_online[name]
                server._dispatch(server.protocol.remote_presence(name, fp, False))
        for name, (_, inst) in list(self._standins.items()):
            if not alive[inst] or not server.protocol.has_calls(name):
                self._drop(name)
        for inst in peers:
            if not alive[inst] and self.links is not None:
                self.links.forget(inst)  # a restart under the same id starts afresh
