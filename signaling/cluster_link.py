"""Direct links between signaling instances: wire format and stream state (pure, Sans-I/O).

docs/signaling.md, "Direct links between instances", is the specification. In
short: an instance sending call frames to another instance opens one TCP
connection to it (the endpoint the receiver advertises in Redis) and, once
both proved they hold the cluster's shared secret, writes each frame there
instead of publishing it to Redis; Redis stays the fallback and the source
of truth for names, presence and liveness.

Frame on the link: ``kind (u8) | length (u32, big endian) | body``::

    dialer                                     listener
      HELLO   {v, from, to, epoch, nonce} ------->
      <------- WELCOME {v, nonce, epoch, acked, mac}     mac = HMAC(S, "qcall-link-v1 welcome" ‖ T)
      AUTH    {mac} ------------------------------>      mac = HMAC(S, "qcall-link-v1 auth" ‖ T)
      FRAME   tag(16) ‖ message ----------------->       tag = HMAC(K, kind ‖ message)[:16]
      <------- ACK     tag(16) ‖ seq (u64)                K   = HMAC(S, "qcall-link-v1 session" ‖ T)
      ERROR   UTF-8 reason (either side, then close)

(``S`` the cluster secret, ``K`` the session key; tests/vectors/cluster_link.json
holds handshakes, frames and refused inputs made by scripts/gen_link_vectors.py.)

``T`` (:func:`transcript`) binds both instance ids, both nonces, both epochs
and ``acked`` (and ``relay`` when both offered relay frames). ``message`` is
exactly what the Redis path publishes: a JSON header line ``{"from", "fp",
"inst", "epoch", "seq"}``, ``\\n``, the client's frame; or, on a link that agreed
on ``relay``, a relay frame: ``{"relay", "fp", "inst", "epoch", "call", "type",
"seq"}``, ``\\n``, the relayed message as its recipient gets it (docs/signaling.md,
"Relay fast path"). Every frame one instance sends another — over the link or over Redis —
takes the next number of one sequence (:class:`LinkSender`), so the receiver
(:class:`LinkReceiver`) delivers each number once and in order whichever way it
came, and the sender switches between the two paths without loss (it resends
over Redis what the link did not acknowledge) or duplication.

Error policy: parsers raise :class:`~qcall.exceptions.ClusterLinkError`
naming the field; the shell sends it as ``ERROR`` and closes the link.
Secret and session keys never appear in a repr, a log or an error.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from qcall.exceptions import ClusterLinkError

__all__ = [
    "MAX_BODY",
    "VERSION",
    "Auth",
    "FrameReader",
    "Hello",
    "LinkKind",
    "LinkReceiver",
    "LinkSender",
    "Tagger",
    "Welcome",
    "client_message",
    "encode",
    "frame_tag",
    "header_start",
    "link_macs",
    "relay_message",
    "transcript",
]

VERSION = 1
#: Largest body accepted: a client frame (``2 × max_message_size`` at most, the
#: server's hard limit) plus its header line.
MAX_BODY = 4 << 20
#: Bytes of an HMAC-SHA-256 tag kept on ``FRAME`` and ``ACK``.
TAG_LEN = 16
NONCE_LEN = 32
#: Smallest cluster secret accepted, bytes.
MIN_SECRET = 16
_HEAD = struct.Struct(">BI")
_U64 = struct.Struct(">Q")


class LinkKind(enum.IntEnum):
    """The ``kind`` byte of a link frame."""

    HELLO = 1
    WELCOME = 2
    AUTH = 3
    FRAME = 4
    ACK = 5
    ERROR = 6


_KINDS = {int(kind): kind for kind in LinkKind}


def encode(kind: LinkKind, body: bytes) -> bytes:
    """One link frame."""
    return _HEAD.pack(kind, len(body)) + body


class FrameReader:
    """Sans-I/O decoder: :meth:`feed` bytes, get whole ``(kind, body)`` frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[LinkKind, bytes]]:
        """Add ``data``; return the frames now complete.

        Whole frames are cut straight out of ``data`` (one copy each); only an
        incomplete tail waits in the buffer.

        Raises:
            ClusterLinkError: unknown kind or a body above :data:`MAX_BODY`.
        """
        buf = self._buffer
        buffered = bool(buf)
        if buffered:
            buf += data
            view = memoryview(buf)
        else:
            view = memoryview(data)
        out: list[tuple[LinkKind, bytes]] = []
        at = 0
        try:
            while len(view) - at >= _HEAD.size:
                kind, length = _HEAD.unpack_from(view, at)
                if kind not in _KINDS:
                    raise ClusterLinkError(f"frame kind {kind} unknown")
                if length > MAX_BODY:
                    raise ClusterLinkError(f"frame of {length} bytes is above {MAX_BODY}")
                end = at + _HEAD.size + length
                if len(view) < end:
                    break
                out.append((_KINDS[kind], bytes(view[at + _HEAD.size : end])))
                at = end
            if not buffered:
                buf += view[at:]  # the incomplete tail, if any
        finally:
            view.release()
        if buffered:
            del buf[:at]
        return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:  # NaN, Infinity: not JSON (RFC 8259), refused like any other non-JSON
        data = json.loads(body.decode(), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise ClusterLinkError(f"{what}: not JSON") from None
    if not isinstance(data, dict):
        raise ClusterLinkError(f"{what}: not an object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value: Any = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ClusterLinkError(f"{what}.{name}: missing or wrong type")
    if isinstance(value, int) and not 0 <= value < 1 << 64:
        raise ClusterLinkError(f"{what}.{name}: out of range")
    if isinstance(value, str):
        if not 0 < len(value) <= 256:
            raise ClusterLinkError(f"{what}.{name}: empty or longer than 256")
        if not value.isascii():
            try:  # a lone surrogate (``"\\ud800"``) decodes from JSON but has no UTF-8
                value.encode()
            except UnicodeEncodeError:
                raise ClusterLinkError(f"{what}.{name}: not UTF-8") from None
    return value


def _b64(data: dict[str, Any], name: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(_field(data, name, str, what), validate=True)
    except ValueError:
        raise ClusterLinkError(f"{what}.{name}: not base64") from None
    if len(raw) != size:
        raise ClusterLinkError(f"{what}.{name}: {len(raw)} bytes, not {size}")
    return raw


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _version(data: dict[str, Any], what: str) -> int:
    version = _field(data, "v", int, what)
    if version != VERSION:
        raise ClusterLinkError(f"{what}.v: version {version} not spoken (only {VERSION})")
    return int(version)


@dataclass(frozen=True)
class Hello:
    """Dialer → listener: who dials whom; ``epoch`` numbers the dialer's run."""

    sender: str
    target: str
    epoch: int
    nonce: bytes = field(repr=False)
    relay: bool = False  # the dialer sends relay frames if the listener takes them

    def body(self) -> bytes:
        nonce = base64.b64encode(self.nonce).decode()
        data = {"v": VERSION, "from": self.sender, "to": self.target,
                "epoch": self.epoch, "nonce": nonce}  # fmt: skip
        return _dump({**data, "relay": 1} if self.relay else data)

    @classmethod
    def parse(cls, body: bytes) -> Hello:
        d = _json(body, "hello")
        _version(d, "hello")
        return cls(
            _field(d, "from", str, "hello"), _field(d, "to", str, "hello"),
            _field(d, "epoch", int, "hello"), _b64(d, "nonce", NONCE_LEN, "hello"),
            _relay(d, "hello"),
        )  # fmt: skip


def _relay(data: dict[str, Any], what: str) -> bool:
    """The optional ``relay`` member (1: relay frames; absent: an older instance)."""
    value = data.get("relay")
    if value is not None and (type(value) is not int or value != 1):  # not true, not 1.0
        raise ClusterLinkError(f"{what}.relay: not 1")
    return value == 1


@dataclass(frozen=True)
class Welcome:
    """Listener → dialer: its nonce and epoch, the last ``seq`` it delivered of the
    dialer's epoch (``acked``, 0: none), and its proof of the secret."""

    nonce: bytes = field(repr=False)
    epoch: int
    acked: int
    mac: bytes = field(repr=False)
    relay: bool = False  # relay frames accepted (only in answer to a hello offering them)

    def body(self) -> bytes:
        data = {
            "v": VERSION, "nonce": base64.b64encode(self.nonce).decode(), "epoch": self.epoch,
            "acked": self.acked, "mac": base64.b64encode(self.mac).decode(),
        }  # fmt: skip
        return _dump({**data, "relay": 1} if self.relay else data)

    @classmethod
    def parse(cls, body: bytes) -> Welcome:
        d = _json(body, "welcome")
        _version(d, "welcome")
        return cls(
            _b64(d, "nonce", NONCE_LEN, "welcome"), _field(d, "epoch", int, "welcome"),
            _field(d, "acked", int, "welcome"), _b64(d, "mac", 32, "welcome"),
            _relay(d, "welcome"),
        )  # fmt: skip


@dataclass(frozen=True)
class Auth:
    """Dialer → listener: the dialer's proof of the secret."""

    mac: bytes = field(repr=False)

    def body(self) -> bytes:
        return _dump({"mac": base64.b64encode(self.mac).decode()})

    @classmethod
    def parse(cls, body: bytes) -> Auth:
        return cls(_b64(_json(body, "auth"), "mac", 32, "auth"))


def _l(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def transcript(hello: Hello, nonce: bytes, epoch: int, acked: int, relay: bool = False) -> bytes:
    """``T`` = L(from) ‖ L(to) ‖ u64(dialer epoch) ‖ L(dialer nonce) ‖ L(listener nonce)
    ‖ u64(listener epoch) ‖ u64(acked) [‖ ``"relay"`` if both offered relay frames];
    ``L(x)`` = u16 length ‖ x (UTF-8 for ids)."""
    return (
        _l(hello.sender.encode()) + _l(hello.target.encode()) + _U64.pack(hello.epoch)
        + _l(hello.nonce) + _l(nonce) + _U64.pack(epoch) + _U64.pack(acked)
        + (b"relay" if relay else b"")
    )  # fmt: skip


def link_macs(secret: bytes, t: bytes) -> tuple[bytes, bytes, bytes]:
    """``(welcome mac, auth mac, session key)``: HMAC-SHA-256 of the secret over
    ``b"qcall-link-v1 welcome" ‖ T``, ``… auth ‖ T``, ``… session ‖ T``."""
    return tuple(  # type: ignore[return-value]
        hmac.digest(secret, b"qcall-link-v1 " + label + t, hashlib.sha256)
        for label in (b"welcome", b"auth", b"session")
    )


def frame_tag(session: bytes, kind: LinkKind, data: bytes) -> bytes:
    """``HMAC-SHA-256(session, kind (u8) ‖ data)``, first :data:`TAG_LEN` bytes."""
    return hmac.digest(session, bytes((kind,)) + data, hashlib.sha256)[:TAG_LEN]


class Tagger:
    """:func:`frame_tag` for one link's session key, keyed once (per frame: one
    copy of the keyed HMAC state, no copy of the data).

    The key stays inside the HMAC objects; nothing here prints it.
    """

    __slots__ = ("_keyed",)

    def __init__(self, session: bytes) -> None:
        self._keyed = {
            kind: hmac.new(session, bytes((kind,)), hashlib.sha256)
            for kind in (LinkKind.FRAME, LinkKind.ACK)
        }

    def __repr__(self) -> str:
        return "<Tagger>"

    def tag(self, kind: LinkKind, data: bytes | memoryview) -> bytes:
        """``frame_tag(session, kind, data)``."""
        mac = self._keyed[kind].copy()
        mac.update(data)
        return mac.digest()[:TAG_LEN]

    def frame(self, kind: LinkKind, data: bytes) -> bytes:
        """The whole link frame ``encode(kind, tag ‖ data)``, ``data`` copied once."""
        return b"".join((_HEAD.pack(kind, TAG_LEN + len(data)), self.tag(kind, data), data))

    def check(self, kind: LinkKind, body: bytes) -> memoryview:
        """``body`` = tag ‖ data: ``data`` (a view, no copy) if the tag is right.

        Raises:
            ClusterLinkError: shorter than a tag, or a wrong tag.
        """
        if len(body) < TAG_LEN:
            raise ClusterLinkError(f"{kind.name.lower()}: shorter than its tag")
        data = memoryview(body)[TAG_LEN:]
        if not hmac.compare_digest(self.tag(kind, data), body[:TAG_LEN]):
            raise ClusterLinkError(f"{kind.name.lower()}: bad tag")
        return data


def header_start(name: str, fp: str, inst: str, epoch: int, *, relay: bool = False) -> bytes:
    """The header line of ``name``'s numbered frames up to its ``epoch`` member, without
    the closing brace: ``{"from": NAME, "fp": FP, "inst": INST, "epoch": EPOCH``
    (``"relay"`` for ``"from"`` with ``relay``), as :func:`json.dumps` writes it
    (``", "`` and ``": "`` separators, non-ASCII escaped). :func:`client_message`
    and :func:`relay_message` add the rest; a sender makes it once per name."""
    header = {"relay" if relay else "from": name, "fp": fp, "inst": inst, "epoch": epoch}
    return json.dumps(header)[:-1].encode()


def client_message(start: bytes, seq: int, frame: bytes) -> bytes:
    """A numbered client frame: ``start`` (:func:`header_start`), ``, "seq": SEQ}``,
    ``\\n``, the client's frame as it came."""
    return b'%s, "seq": %d}\n%s' % (start, seq, frame)


def relay_message(start: bytes, call_id: str, kind: str, seq: int, body: bytes) -> bytes:
    """A relay frame: ``start`` (:func:`header_start` with ``relay``), ``, "call": CALL,
    "type": TYPE, "seq": SEQ}``, ``\\n``, the relayed message ``body``. ``call_id``
    (``A-Z a-z 0-9 _ -``) and ``kind`` (``offer``, ``answer``, ``ice``) need no escaping."""
    return b'%s, "call": "%s", "type": "%s", "seq": %d}\n%s' % (
        start, call_id.encode(), kind.encode(), seq, body
    )  # fmt: skip


class LinkSender:
    """One instance's stream of frames to one other instance (which path, what to resend).

    Every frame gets the next ``seq``. :meth:`route` says whether it goes over
    the link (kept until acknowledged), is held for the link, or goes over Redis
    (no link up; :meth:`over_redis` for frames sent there while no link existed).
    After frames went over Redis the link carries frames again only once they are
    acknowledged (the listener acknowledges what it delivered, whichever path), or
    ``catch_up`` seconds after the last one (Redis lost it: the receiver then
    delivers what comes next); until then frames for the link are held, in order,
    and :meth:`release` hands them out. So the two paths never overtake each other.

    Args:
        max_unacked: frames in flight on the link above which it counts as stuck.
        max_unacked_bytes: the same in bytes.
        catch_up: seconds after the last Redis frame after which the link is used
            even if that frame was not acknowledged.
    """

    def __init__(
        self, *, max_unacked: int = 4096, max_unacked_bytes: int = 16 << 20, catch_up: float = 1.0
    ) -> None:
        self.seq = 0
        self.up = False
        self.acked = 0
        self.redis_high = 0  # highest seq sent over Redis
        self._redis_at = float("-inf")
        self._unacked: deque[tuple[int, bytes, float]] = deque()
        self._held: list[tuple[int, bytes, float]] = []  # for the link, after Redis
        self._unacked_bytes = 0
        self.max_unacked, self.max_unacked_bytes = max_unacked, max_unacked_bytes
        self.catch_up = catch_up

    def __repr__(self) -> str:
        return f"<LinkSender seq={self.seq} acked={self.acked} up={self.up}>"

    def next_seq(self) -> int:
        """Number the next frame (then call :meth:`route` with it)."""
        self.seq += 1
        return self.seq

    def route(self, seq: int, message: bytes, now: float) -> bool | None:
        """Where frame ``seq`` goes: True over the link now (kept until acknowledged);
        None held, for the link, until the frames sent over Redis before it are
        delivered (:meth:`release`); False over Redis (no link up)."""
        if not self.up:
            self.over_redis(seq, now)
            return False
        if self._held or not self._caught_up(now):
            self._held.append((seq, message, now))
            return None
        self._keep(seq, message, now)
        return True

    def release(self, now: float) -> list[bytes]:
        """The held frames whose turn came (after an ack, or ``catch_up`` seconds
        after the last Redis frame: Redis lost it), in order; now kept as sent."""
        if not self._held or not self.up or not self._caught_up(now):
            return []
        out = [message for _, message, _ in self._held]
        for seq, message, _ in self._held:
            self._keep(seq, message, now)
        self._held.clear()
        return out

    def over_redis(self, seq: int, now: float) -> None:
        """Frame ``seq`` went over Redis (also while no link is up): a link frame
        must not overtake it, so the link waits for its acknowledgement."""
        self.redis_high, self._redis_at = max(self.redis_high, seq), now

    def _caught_up(self, now: float) -> bool:
        return self.acked >= self.redis_high or now - self._redis_at >= self.catch_up

    def _keep(self, seq: int, message: bytes, now: float) -> None:
        self._unacked.append((seq, message, now))
        self._unacked_bytes += len(message)

    @property
    def stuck(self) -> bool:
        """Too much in flight on the link: the caller takes it down."""
        in_flight = len(self._held) + len(self._unacked)
        return in_flight > self.max_unacked or self._unacked_bytes > self.max_unacked_bytes

    def overdue(self, now: float, timeout: float) -> bool:
        """Whether the oldest frame in flight waited more than ``timeout`` for its ack."""
        return bool(self._unacked) and now - self._unacked[0][2] > timeout

    def on_ack(self, seq: int) -> None:
        """The listener delivered every frame up to ``seq``."""
        if seq > self.seq:
            raise ClusterLinkError(f"ack {seq} for a frame never sent (last {self.seq})")
        self.acked = max(self.acked, seq)
        while self._unacked and self._unacked[0][0] <= seq:
            self._unacked_bytes -= len(self._unacked.popleft()[1])

    def on_up(self, acked: int) -> None:
        """The link is authenticated; the listener had delivered up to ``acked``."""
        self.up = True
        self.on_ack(min(acked, self.seq))

    def on_down(self, now: float) -> list[bytes]:
        """The link failed: return the frames to resend over Redis, in order."""
        self.up = False
        frames = [*self._unacked, *self._held]
        resend = [message for _, message, _ in frames]
        if frames:
            self.redis_high, self._redis_at = frames[-1][0], now
        self._unacked.clear()
        self._held.clear()
        self._unacked_bytes = 0
        return resend


class LinkReceiver:
    """Which frames from other instances to deliver: each ``seq`` once, never an older one.

    Per sending instance it keeps ``(epoch, last seq delivered)``; a frame of a
    newer epoch (the sender restarted) starts afresh, one of an older epoch
    is dropped. At most ``size`` instances are remembered (the oldest go).
    """

    def __init__(self, size: int = 4096) -> None:
        self._last: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._size = size

    def fresh(self, inst: str, epoch: int, seq: int) -> bool:
        """Whether to deliver frame ``seq`` of ``inst``'s ``epoch`` (and remember it)."""
        known = self._last.get(inst)
        if known is not None and (epoch < known[0] or (epoch == known[0] and seq <= known[1])):
            return False
        self._last[inst] = (epoch, seq)
        self._last.move_to_end(inst)
        if len(self._last) > self._size:
            self._last.popitem(last=False)
        return True

    def delivered(self, inst: str, epoch: int) -> int:
        """The last ``seq`` delivered of ``inst``'s ``epoch`` (0: none)."""
        known = self._last.get(inst)
        return known[1] if known is not None and known[0] == epoch else 0
