"""The signaling server's state machine, without any I/O (Sans-I/O).

:class:`SignalingProtocol` holds the connections, registered peers, pinned
identities and calls of one server. The shell (``signaling/server.py``) feeds
it events and performs the :data:`Output` it returns:

* :meth:`~SignalingProtocol.connect` when a WebSocket opens (→ ``challenge``);
* :meth:`~SignalingProtocol.receive` for each text frame;
* :meth:`~SignalingProtocol.disconnect` when a WebSocket closes;
* :meth:`~SignalingProtocol.handle_timer` once :meth:`~SignalingProtocol.get_timer`
  is reached (authentication timeouts, call grace periods).

Each returns a list of ``(connection_id, message)`` pairs to send, where the
message is a :class:`~qcall.signaling.messages.ServerMessage` or a
:class:`CloseConnection`. Time is the ``now`` argument (any monotonic clock).
Nothing here raises on bad input: every problem becomes an ``error`` message
for the connection at fault (docs/signaling.md, "Errors"), and everyone else
is served as before.

The state rules of calls live in one table, :data:`CALL_RULES`.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NewType

from qcall import pqc
from qcall.exceptions import InvalidKeyError, SignalingProtocolError
from qcall.signaling.messages import (
    MAX_MESSAGE_SIZE,
    NONCE_SIZE,
    Busy,
    CallMessage,
    Challenge,
    ErrorMessage,
    Hangup,
    Invite,
    OnlinePeer,
    Presence,
    Register,
    Registered,
    ServerMessage,
    fingerprint,
    parse_client_message,
    registration_data,
)
from qcall.typing import PeerId

__all__ = [
    "CALL_RULES",
    "CallState",
    "CloseConnection",
    "ConnectionId",
    "Output",
    "Role",
    "ServerConfig",
    "SignalingProtocol",
]

logger = logging.getLogger(__name__)

#: Identifies one WebSocket connection inside a :class:`SignalingProtocol`.
ConnectionId = NewType("ConnectionId", int)

#: WebSocket close codes used by the server (RFC 6455, section 7.4.1).
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class CloseConnection:
    """Output: close this connection (after sending what precedes it)."""

    code: int
    reason: str


Output = tuple[ConnectionId, ServerMessage | CloseConnection]


@dataclass(frozen=True)
class ServerConfig:
    """Limits and timeouts of a signaling server (documented in docs/signaling.md).

    Attributes:
        server_id: bound into every registration signature; identifies this server.
        auth_timeout: seconds a connection may stay unregistered before it is closed.
        rate: sustained messages per second per connection (token bucket refill).
        burst: token bucket size: messages a connection may send at once.
        max_message_size: largest frame processed, in UTF-8 bytes (``too_big`` above).
        call_grace: seconds an accepted call survives one party's disconnection,
            so that a reconnecting client finds it again.
        max_connections: simultaneous connections (``server_full`` above).
        max_identities: distinct names pinned for the server's lifetime.
    """

    server_id: str = "qcall-signaling"
    auth_timeout: float = 10.0
    rate: float = 20.0
    burst: float = 40.0
    max_message_size: int = MAX_MESSAGE_SIZE
    call_grace: float = 30.0
    max_connections: int = 10_000
    max_identities: int = 100_000

    def __post_init__(self) -> None:
        if not 0 < len(self.server_id) <= 128 or not self.server_id.isprintable():
            raise ValueError("field 'server_id' must be 1-128 printable characters")
        if not self.server_id.isascii():
            raise ValueError("field 'server_id' must be ASCII")
        for name in ("auth_timeout", "rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"field {name!r} must be positive")
        if not self.burst >= 1:
            raise ValueError("field 'burst' must be at least 1")
        if not self.call_grace >= 0:
            raise ValueError("field 'call_grace' must not be negative")
        for name in ("max_message_size", "max_connections", "max_identities"):
            if getattr(self, name) < 1:
                raise ValueError(f"field {name!r} must be at least 1")


class CallState(enum.IntEnum):
    """Server-side state of a call (docs/signaling.md, "Calls")."""

    INVITED = 1
    RINGING = 2
    ACCEPTED = 3


class Role(enum.Enum):
    """Who sent a call message."""

    CALLER = "caller"
    CALLEE = "callee"


_ANY = frozenset(CallState)
_PRE = frozenset({CallState.INVITED, CallState.RINGING})
_UP = frozenset({CallState.ACCEPTED})
_BOTH = frozenset(Role)
_END = "end"
_RELAY = "relay"

#: The state rules: message type -> (roles allowed, states allowed, what follows:
#: the next state, ``"end"`` (the call ends) or ``"relay"`` (state unchanged)).
#: Every accepted message is relayed to the other party; anything else is ``bad_state``.
CALL_RULES: dict[str, tuple[frozenset[Role], frozenset[CallState], CallState | str]] = {
    "ringing": (frozenset({Role.CALLEE}), frozenset({CallState.INVITED}), CallState.RINGING),
    "accept": (frozenset({Role.CALLEE}), _PRE, CallState.ACCEPTED),
    "reject": (frozenset({Role.CALLEE}), _PRE, _END),
    "busy": (frozenset({Role.CALLEE}), _PRE, _END),
    "cancel": (frozenset({Role.CALLER}), _PRE, _END),
    "hangup": (_BOTH, _ANY, _END),
    "offer": (_BOTH, _UP, _RELAY),
    "answer": (_BOTH, _UP, _RELAY),
    "ice": (_BOTH, _UP, _RELAY),
}


@dataclass
class _Connection:
    id: ConnectionId
    nonce: bytes
    auth_deadline: float
    tokens: float
    last: float
    name: PeerId | None = None
    closed: bool = False
    watch: frozenset[PeerId] | None = None  # presence subscriptions; None: everyone


@dataclass
class _Call:
    call_id: str
    caller: PeerId
    callee: PeerId
    state: CallState
    grace_deadline: float | None = None

    def other(self, name: PeerId) -> PeerId:
        return self.callee if name == self.caller else self.caller


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _safe_text(text: str) -> str:
    """Make an exception message fit an ``error`` message (printable ASCII, ≤ 256)."""
    return _UNPRINTABLE.sub("?", text)[:256]


def _default_verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    backend = pqc.get_backend()
    return backend.verify(pqc.SignatureScheme.ML_DSA_65, public_key, signature, data)


class SignalingProtocol:
    """Pure state machine of a signaling server: connections, peers, pins, calls.

    Args:
        config: limits and timeouts.
        verify: ``verify(public_key, signature, data) -> bool`` for ML-DSA-65
            (FIPS 204, Algorithm 3); default: :mod:`qcall.pqc`.
        random_bytes: source of challenge nonces (default :func:`os.urandom`).
        wall_clock: Unix time for the ``challenge`` ``time`` field.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        verify: Callable[[bytes, bytes, bytes], bool] = _default_verify,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or ServerConfig()
        self._verify = verify
        self._random = random_bytes
        self._wall_clock = wall_clock
        self._next_id = 0
        self._connections: dict[ConnectionId, _Connection] = {}
        self._online: dict[PeerId, ConnectionId] = {}
        self._pins: dict[PeerId, bytes] = {}
        self._fingerprints: dict[PeerId, str] = {}
        self._calls: dict[str, _Call] = {}
        self._peer_call: dict[PeerId, str] = {}
        # Presence subscribers: connections watching everyone, and per watched name.
        self._watch_all: set[ConnectionId] = set()
        self._watchers: dict[PeerId, set[ConnectionId]] = {}
        self._timers: list[tuple[float, int, str, object]] = []
        self._timer_seq = 0
        self.debug = logger.isEnabledFor(logging.DEBUG)

    # --- observers ----------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Number of open connections (registered or not)."""
        return len(self._connections)

    @property
    def registered(self) -> int:
        """Number of registered (online) peers."""
        return len(self._online)

    @property
    def calls(self) -> int:
        """Number of live calls."""
        return len(self._calls)

    def call_state(self, call_id: str) -> CallState | None:
        """Return the state of a live call, or ``None``."""
        call = self._calls.get(call_id)
        return call.state if call else None

    def name_of(self, connection: ConnectionId) -> PeerId | None:
        """Return the name registered on ``connection``, if any."""
        conn = self._connections.get(connection)
        return conn.name if conn else None

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` should next run, or ``None``."""
        return self._timers[0][0] if self._timers else None

    # --- inputs ---------------------------------------------------------------------

    def connect(self, now: float) -> tuple[ConnectionId, list[Output]]:
        """Open a connection and return its id and the ``challenge`` to send it.

        After calling this method: send the outputs, then call :meth:`receive`
        for each frame and :meth:`disconnect` when the connection closes.
        """
        self._next_id += 1
        cid = ConnectionId(self._next_id)
        if len(self._connections) >= self.config.max_connections:
            return cid, [
                (cid, ErrorMessage("server_full", "too many connections")),
                (cid, CloseConnection(CLOSE_TRY_AGAIN_LATER, "server full")),
            ]
        nonce = self._random(NONCE_SIZE)
        deadline = now + self.config.auth_timeout
        self._connections[cid] = _Connection(
            cid, nonce, deadline, tokens=self.config.burst, last=now
        )
        self._add_timer(deadline, "auth", cid)
        challenge = Challenge(nonce, self.config.server_id, int(self._wall_clock()))
        return cid, [(cid, challenge)]

    def receive(self, connection: ConnectionId, text: str | bytes, now: float) -> list[Output]:
        """Handle one frame received on ``connection``.

        Returns:
            the messages to send (to this and other connections) and closes to perform.
        """
        conn = self._connections.get(connection)
        if conn is None or conn.closed:
            return []
        # Token bucket: refill at `rate` per second up to `burst`, spend one per message.
        conn.tokens = min(self.config.burst, conn.tokens + (now - conn.last) * self.config.rate)
        conn.last = now
        if conn.tokens < 1.0:
            return [self._error(conn, "rate_limited", "too many messages, slow down")]
        conn.tokens -= 1.0
        size = len(text) if isinstance(text, bytes) or text.isascii() else _utf8_len(text)
        if size > self.config.max_message_size:
            return [
                self._error(conn, "too_big", f"message over {self.config.max_message_size} bytes")
            ]
        try:
            msg = parse_client_message(text)
        except SignalingProtocolError as exc:
            return [self._error(conn, "bad_message", _safe_text(str(exc)))]
        if self.debug:
            logger.debug("< %d %r", connection, msg)
        if conn.name is None:
            if isinstance(msg, Register):
                return self._register(conn, msg)
            return [self._error(conn, "auth_required", "register first", ref=msg.TYPE)]
        if isinstance(msg, Register):
            return [self._error(conn, "bad_state", "already registered", ref=msg.TYPE)]
        return self._call_message(conn, conn.name, msg, now)

    def disconnect(self, connection: ConnectionId, now: float) -> list[Output]:
        """Forget a closed connection; tell others if a registered peer left."""
        conn = self._connections.pop(connection, None)
        if conn is not None:
            self._unsubscribe(conn)
        if conn is None or conn.name is None or self._online.get(conn.name) != connection:
            return []
        name = conn.name
        del self._online[name]
        out: list[Output] = self._presence(Presence(name, self._fingerprints[name], False))
        call_id = self._peer_call.get(name)
        if call_id is not None:
            call = self._calls[call_id]
            if call.state is CallState.ACCEPTED:
                # Keep an accepted call for a while: the client may reconnect.
                if call.grace_deadline is None:
                    call.grace_deadline = now + self.config.call_grace
                    self._add_timer(call.grace_deadline, "grace", call_id)
            else:
                out += self._end_call(call, name, "disconnected")
        return out

    def handle_timer(self, now: float) -> list[Output]:
        """Run the timers due at ``now``: authentication timeouts, call grace periods."""
        out: list[Output] = []
        while self._timers and self._timers[0][0] <= now:
            deadline, _, kind, key = heapq.heappop(self._timers)
            if kind == "auth":
                conn = self._connections.get(key)  # type: ignore[call-overload]
                if conn is not None and conn.name is None and not conn.closed:
                    out.append(self._error(conn, "auth_timeout", "no registration in time"))
                    out.append(self._close(conn, "registration timeout"))
            elif kind == "grace":
                call = self._calls.get(key)  # type: ignore[call-overload]
                if call is not None and call.grace_deadline == deadline:
                    gone = call.caller if call.caller not in self._online else call.callee
                    out += self._end_call(call, gone, "peer lost")
        return out

    # --- registration (docs/signaling.md, "Registration") -------------------------------

    def _register(self, conn: _Connection, msg: Register) -> list[Output]:
        name = PeerId(msg.name)
        data = registration_data(conn.nonce, name, self.config.server_id)
        try:
            valid = self._verify(msg.public_key, msg.signature, data)
        except InvalidKeyError:
            valid = False
        if not valid:
            return [
                self._error(conn, "auth_failed", "signature does not verify", ref=msg.TYPE),
                self._close(conn, "authentication failed"),
            ]
        pinned = self._pins.get(name)
        if pinned is not None and pinned != msg.public_key:
            return [
                self._error(conn, "name_taken", "name registered with another key", ref=msg.TYPE),
                self._close(conn, "name taken"),
            ]
        if pinned is None and len(self._pins) >= self.config.max_identities:
            return [
                self._error(conn, "server_full", "too many identities", ref=msg.TYPE),
                self._close(conn, "server full", CLOSE_TRY_AGAIN_LATER),
            ]
        if pinned is None:
            self._pins[name] = msg.public_key
            self._fingerprints[name] = fingerprint(msg.public_key)
        conn.name = name
        conn.nonce = b""  # single use
        out: list[Output] = []
        old_id = self._online.get(name)
        old = self._connections.get(old_id) if old_id is not None else None
        if old is not None:
            # Second login of the same identity: the new connection replaces the old one.
            old.name = None
            self._unsubscribe(old)
            out.append(self._error(old, "replaced", "registered again on another connection"))
            out.append(self._close(old, "replaced by a new connection"))
        self._online[name] = conn.id
        fp = self._fingerprints[name]
        if old is None:
            out += self._presence(Presence(name, fp, True), exclude=conn.id)
        self._subscribe(conn, msg.watch)
        watched = self._online if conn.watch is None else conn.watch
        online = tuple(
            OnlinePeer(peer, self._fingerprints[peer])
            for peer in watched
            if peer != name and peer in self._online
        )
        call_id = self._peer_call.get(name)
        if call_id is not None:
            call = self._calls[call_id]
            if call.other(name) in self._online:
                call.grace_deadline = None  # both parties are back in time
        calls = (call_id,) if call_id is not None else ()
        out.append((conn.id, Registered(name, fp, online, calls)))
        logger.info("= %s registered (fingerprint %s…)", name, fp[:16])
        return out

    # --- calls (docs/signaling.md, "Calls") --------------------------------------------------

    def _call_message(
        self, conn: _Connection, name: PeerId, msg: CallMessage, now: float
    ) -> list[Output]:
        if isinstance(msg, Invite):
            return self._invite(conn, name, msg)
        call = self._calls.get(msg.call_id)
        if call is None or name not in (call.caller, call.callee):
            return [self._error(conn, "unknown_call", "no such call", msg.call_id, msg.TYPE)]
        role = Role.CALLER if name == call.caller else Role.CALLEE
        roles, states, next_state = CALL_RULES[msg.TYPE]
        if role not in roles or call.state not in states:
            text = f"{msg.TYPE} not allowed for the {role.value} in state {call.state.name}"
            return [self._error(conn, "bad_state", text, msg.call_id, msg.TYPE)]
        other = call.other(name)
        relayed = dataclasses.replace(msg, peer=name, fingerprint=self._fingerprints[name])
        target = self._online.get(other)
        if next_state == _END:
            self._forget_call(call)
            return [(target, relayed)] if target is not None else []
        if target is None:
            return [self._error(conn, "unavailable", "peer is offline", msg.call_id, msg.TYPE)]
        if isinstance(next_state, CallState):
            call.state = next_state
        return [(target, relayed)]

    def _invite(self, conn: _Connection, name: PeerId, msg: Invite) -> list[Output]:
        callee = PeerId(msg.peer or "")
        cid = msg.call_id
        if callee == name:
            return [self._error(conn, "bad_message", "field 'peer': cannot call yourself", cid)]
        if cid in self._calls:
            return [self._error(conn, "bad_state", "call_id already in use", cid, msg.TYPE)]
        if name in self._peer_call:
            return [self._error(conn, "bad_state", "you are already in a call", cid, msg.TYPE)]
        target = self._online.get(callee)
        if target is None:
            return [self._error(conn, "unavailable", f"{callee} is offline", cid, msg.TYPE)]
        if callee in self._peer_call:
            fp = self._fingerprints[callee]
            return [(conn.id, Busy(cid, callee, fp, "in another call"))]
        call = _Call(cid, name, callee, CallState.INVITED)
        self._calls[cid] = call
        self._peer_call[name] = self._peer_call[callee] = cid
        relayed = Invite(cid, peer=name, fingerprint=self._fingerprints[name])
        return [(target, relayed)]

    def _end_call(self, call: _Call, gone: PeerId, reason: str) -> list[Output]:
        """End ``call`` on behalf of ``gone``; tell the other party if it is online."""
        self._forget_call(call)
        target = self._online.get(call.other(gone))
        if target is None:
            return []
        return [(target, Hangup(call.call_id, gone, self._fingerprints[gone], reason))]

    def _forget_call(self, call: _Call) -> None:
        self._calls.pop(call.call_id, None)
        for party in (call.caller, call.callee):
            if self._peer_call.get(party) == call.call_id:
                del self._peer_call[party]

    # --- helpers ----------------------------------------------------------------------------

    def _presence(self, msg: Presence, exclude: ConnectionId | None = None) -> list[Output]:
        """Send ``msg`` to the connections watching everyone or its name."""
        out: list[Output] = [(cid, msg) for cid in self._watch_all if cid != exclude]
        out += [(cid, msg) for cid in self._watchers.get(PeerId(msg.name), ()) if cid != exclude]
        return out

    def _subscribe(self, conn: _Connection, watch: tuple[str, ...] | None) -> None:
        """Record whose presence a newly registered connection receives."""
        if watch is None:
            self._watch_all.add(conn.id)
            return
        conn.watch = frozenset(PeerId(name) for name in watch)
        for name in conn.watch:
            self._watchers.setdefault(name, set()).add(conn.id)

    def _unsubscribe(self, conn: _Connection) -> None:
        self._watch_all.discard(conn.id)
        for name in conn.watch or ():
            watchers = self._watchers.get(name)
            if watchers is not None:
                watchers.discard(conn.id)
                if not watchers:
                    del self._watchers[name]
        conn.watch = None

    def _error(
        self,
        conn: _Connection,
        code: str,
        text: str,
        call_id: str | None = None,
        ref: str | None = None,
    ) -> Output:
        if self.debug:
            logger.debug("! %d %s: %s", conn.id, code, text)
        return conn.id, ErrorMessage(code, _safe_text(text), call_id, ref)

    def _close(self, conn: _Connection, reason: str, code: int = CLOSE_POLICY_VIOLATION) -> Output:
        conn.closed = True
        return conn.id, CloseConnection(code, reason)

    def _add_timer(self, deadline: float, kind: str, key: object) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, kind, key))


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
