"""The signaling server's state machine, without any I/O (Sans-I/O).

:class:`SignalingProtocol` holds the connections, registered peers, pinned
identities and calls of one server. The shell (``signaling/server.py``) feeds
it events and performs the :data:`Output` it returns:

* :meth:`~SignalingProtocol.connect` when a WebSocket opens (→ ``challenge``);
* :meth:`~SignalingProtocol.receive` for each text frame;
* :meth:`~SignalingProtocol.disconnect` when a WebSocket closes;
* :meth:`~SignalingProtocol.handle_timer` once :meth:`~SignalingProtocol.get_timer`
  is reached (authentication timeouts, call grace periods, ring timeouts and
  call time limits, pin expiry).

Each returns a list of ``(connection_id, message)`` pairs to send, where the
message is a :class:`~qcall.signaling.messages.ServerMessage` or a
:class:`CloseConnection`. Time is the ``now`` argument (any monotonic clock).
Nothing here raises on bad input: every problem becomes an ``error`` message
for the connection at fault (docs/signaling.md, "Errors"), and everyone else
is served as before.

The state rules of calls live in one table, :data:`CALL_RULES`. The limits
(:class:`~qcall.signaling.config.ServerConfig`, docs/signaling.md "Limits")
bound what one client can make the server hold: unregistered connections
have a pool of their own with a per-address share; names are pinned by
:class:`~qcall.signaling.pins.PinRegistry` (per key, per address, expiring);
a callee has a bounded number of unanswered invitations, each ringing for at
most ``ring_timeout``, and an accepted call lasts at most ``max_call_duration``.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _quote

from qcall import pqc
from qcall.exceptions import InvalidKeyError, SignalingProtocolError
from qcall.signaling.config import ServerConfig
from qcall.signaling.messages import (
    EARLY_OFFER,
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
    TurnCredentials,
    fingerprint,
    move_data,
    parse_client_message,
    parse_server_message,
    registration_data,
)
from qcall.signaling.pins import PinRegistry
from qcall.signaling.state import (
    CALL_RULES,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    EARLY_OFFER_EXPIRED,
    EARLY_OFFER_MAX_HOLD,
    EARLY_RULES,
    END,
    PIN_REFUSALS,
    RELAY,
    Call,
    CallState,
    CloseConnection,
    Connection,
    ConnectionId,
    Output,
    Role,
    address_key,
    safe_text,
    utf8_len,
)
from qcall.typing import PeerId

__all__ = [
    "CALL_RULES",
    "EARLY_RULES",
    "RELAYED_HEADROOM",
    "CallState",
    "CloseConnection",
    "ConnectionId",
    "Output",
    "Role",
    "ServerConfig",
    "SignalingProtocol",
    "address_key",
]

logger = logging.getLogger(__name__)

#: Characters a relayed message may exceed ``max_message_size`` by: the ``peer`` and
#: ``fingerprint`` the server adds (:meth:`SignalingProtocol.forwarded_relay`).
RELAYED_HEADROOM = 512


def _default_verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    backend = pqc.get_backend()
    return backend.verify(pqc.SignatureScheme.ML_DSA_65, public_key, signature, data)


# Why the server ends a call by itself: the ``reason`` of its ``hangup``.
_DISCONNECTED = "disconnected"
_PEER_LOST = "peer lost"
_RING_TIMEOUT = "ring timeout"
_TIME_LIMIT = "call time limit"


class SignalingProtocol:
    """Pure state machine of a signaling server: connections, peers, pins, calls.

    Args:
        config: limits and timeouts.
        verify: ``verify(public_key, signature, data) -> bool`` for ML-DSA-65
            (FIPS 204, Algorithm 3); default: :mod:`qcall.pqc`.
        random_bytes: source of challenge nonces (default :func:`os.urandom`).
        wall_clock: Unix time for the ``challenge`` ``time`` field.
        turn: ``turn(name, unix_now)`` gives each registered user TURN
            credentials (``registered.turn``, :mod:`qcall.signaling.turn`).
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        verify: Callable[[bytes, bytes, bytes], bool] = _default_verify,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        turn: Callable[[str, float], TurnCredentials] | None = None,
    ) -> None:
        self.config = config = config or ServerConfig()
        self._turn = turn
        self._verify = verify
        self._random = random_bytes
        self._wall_clock = wall_clock
        self._next_id = 0
        self._connections: dict[ConnectionId, Connection] = {}
        # Connections waiting to register, oldest first (all, and per address).
        self._pending: dict[ConnectionId, Connection] = {}
        self._pending_by_address: dict[str, dict[ConnectionId, None]] = {}
        self._online: dict[PeerId, ConnectionId] = {}
        self._pins = PinRegistry(
            config.max_identities,
            config.max_names_per_key,
            config.max_new_names_per_address,
            config.new_names_window,
            config.pin_ttl,
        )
        self._pin_timer: float | None = None
        self._calls: dict[str, Call] = {}
        # Calls by party: the accepted one, the outgoing invitation, the incoming ones.
        self._active: dict[PeerId, str] = {}
        self._outgoing: dict[PeerId, str] = {}
        self._incoming: dict[PeerId, dict[str, None]] = {}
        # Presence subscribers: connections watching everyone, and per watched name
        # (one connection id, or a dict of them, used as an ordered set, once a second
        # connection watches it).
        self._watch_all: set[ConnectionId] = set()
        self._watchers: dict[PeerId, ConnectionId | dict[ConnectionId, None]] = {}
        self._timers: list[tuple[float, int, str, object]] = []
        self._timer_seq = 0
        self.debug = logger.isEnabledFor(logging.DEBUG)

    # --- observers ----------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Number of open connections (registered or not)."""
        return len(self._connections)

    @property
    def unauthenticated(self) -> int:
        """Number of connections waiting to register."""
        return len(self._pending)

    @property
    def registered(self) -> int:
        """Number of registered (online) peers."""
        return len(self._online)

    @property
    def identities(self) -> int:
        """Number of pinned names."""
        return len(self._pins)

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

    def connection_of(self, name: str) -> ConnectionId | None:
        """Return the connection ``name`` is registered on here (a cluster's stand-in for a
        user of another instance included), if online."""
        return self._online.get(PeerId(name))

    def fingerprint_of(self, name: str) -> str | None:
        """Return the identity fingerprint pinned for ``name``, if any."""
        return self._pins.fingerprint(PeerId(name))

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` should next run, or ``None``."""
        return self._timers[0][0] if self._timers else None

    # --- inputs ---------------------------------------------------------------------

    def connect(self, now: float, address: str | None = None) -> tuple[ConnectionId, list[Output]]:
        """Open a connection and return its id and the ``challenge`` to send it.

        Unregistered connections have a pool of their own (``max_unauthenticated``,
        ``max_unauthenticated_per_address``): when the new one does not fit, the
        oldest one (of its address, else of all) is closed with
        ``too_many_connections``, so that a flood of idle sockets cannot keep
        anybody else from registering.

        Args:
            address: the client's :func:`address_key`; ``None`` (unknown) is
                exempt from the per-address limits.

        Returns:
            the connection id, and the outputs: closes of evicted connections,
            then the ``challenge`` (last).

        After calling this method: send the outputs, then call :meth:`receive`
        for each frame and :meth:`disconnect` when the connection closes.
        """
        self._next_id += 1
        cid = ConnectionId(self._next_id)
        out: list[Output] = []
        same = self._pending_by_address.get(address) if address is not None else None
        if same is not None and len(same) >= self.config.max_unauthenticated_per_address:
            oldest = self._pending[next(iter(same))]
            out += self._evict(oldest, "too many connections waiting to register from here")
        if len(self._pending) >= self.config.max_unauthenticated:
            oldest = next(iter(self._pending.values()))
            out += self._evict(oldest, "too many connections waiting to register")
        conn = Connection(cid, self._random(NONCE_SIZE), self.config.burst, now, address)
        self._connections[cid] = self._pending[cid] = conn
        if address is not None:
            self._pending_by_address.setdefault(address, {})[cid] = None
        self._add_timer(now + self.config.auth_timeout, "auth", cid)
        features = (EARLY_OFFER,) if self.config.early_offer else ()
        now_s = int(self._wall_clock())
        out.append((cid, Challenge(conn.nonce, self.config.server_id, now_s, features=features)))
        return cid, out

    def receive(self, connection: ConnectionId, text: str | bytes, now: float) -> list[Output]:
        """Handle one frame received on ``connection``.

        Returns:
            the messages to send (to this and other connections) and closes to perform.
        """
        conn = self._connections.get(connection)
        if conn is None or conn.closed:
            return []
        # Token bucket: refill at `rate` per second up to `burst`, spend one per message.
        if conn.remote:  # the other instance applied the limits already
            conn.tokens = self.config.burst
        conn.tokens = min(self.config.burst, conn.tokens + (now - conn.last) * self.config.rate)
        conn.last = now
        if conn.tokens < 1.0:
            return [self._error(conn, "rate_limited", "too many messages, slow down")]
        conn.tokens -= 1.0
        size = len(text) if isinstance(text, bytes) or text.isascii() else utf8_len(text)
        if size > self.config.max_message_size:
            return [
                self._error(conn, "too_big", f"message over {self.config.max_message_size} bytes")
            ]
        try:
            msg = parse_client_message(text)
        except SignalingProtocolError as exc:
            return [self._error(conn, "bad_message", safe_text(str(exc)))]
        if self.debug:
            logger.debug("< %d %r", connection, msg)
        if conn.name is None:
            if isinstance(msg, Register):
                return self._register(conn, msg, now)
            return [self._error(conn, "auth_required", "register first", ref=msg.TYPE)]
        if isinstance(msg, Register):
            return [self._error(conn, "bad_state", "already registered", ref=msg.TYPE)]
        return self._call_message(conn, conn.name, msg, now)

    def disconnect(self, connection: ConnectionId, now: float) -> list[Output]:
        """Forget a closed connection; tell others if a registered peer left.

        The peer's unanswered invitations (both ways) end with ``hangup``
        (reason ``disconnected``); an accepted call waits ``call_grace`` seconds
        for it to come back; its pin starts to age (``pin_ttl``).
        """
        conn = self._connections.pop(connection, None)
        if conn is None:
            return []
        self._leave_pending(conn)
        self._unsubscribe(conn)
        name = conn.name
        if name is None or self._online.get(name) != connection:
            return []
        del self._online[name]
        fp = self._fingerprint(name)
        out = [] if conn.remote else self._presence(Presence(name, fp, False))
        for call_id in self._calls_of(name):
            call = self._calls[call_id]
            if call.state is not CallState.ACCEPTED:
                out += self._end_call(call, _DISCONNECTED, gone=name)
            elif call.grace_deadline is None:
                # Keep an accepted call for a while: the client may reconnect.
                call.grace_deadline = now + self.config.call_grace
                self._add_timer(call.grace_deadline, "grace", call_id)
        self._pins.idle(name, now)
        self._arm_pin_timer()
        return out

    def handle_timer(self, now: float) -> list[Output]:
        """Run the timers due at ``now``.

        Authentication timeouts, call grace periods, ring timeouts and call time
        limits, pin expiry.
        """
        out: list[Output] = []
        while self._timers and self._timers[0][0] <= now:
            deadline, _, kind, key = heapq.heappop(self._timers)
            if kind == "auth":
                conn = self._connections.get(key)  # type: ignore[call-overload]
                if conn is not None and conn.name is None and not conn.closed:
                    out.append(self._error(conn, "auth_timeout", "no registration in time"))
                    out.append(self._close(conn, "registration timeout"))
            elif kind == "pins":
                self._pin_timer = None
                for name in self._pins.expire(now):
                    for call_id in self._calls_of(name):  # in its grace period
                        out += self._end_call(self._calls[call_id], _PEER_LOST, gone=name)
                self._arm_pin_timer()
            else:
                call = self._calls.get(key)  # type: ignore[call-overload]
                if call is None:
                    continue
                if kind == "grace" and call.grace_deadline == deadline:
                    gone = call.caller if call.caller not in self._online else call.callee
                    out += self._end_call(call, _PEER_LOST, gone=gone)
                elif kind == "call" and call.deadline == deadline:
                    reason = _TIME_LIMIT if call.state is CallState.ACCEPTED else _RING_TIMEOUT
                    out += self._end_call(call, reason)
        return out

    # --- cluster hooks (signaling/cluster.py, docs/signaling.md "Several instances") ----

    def is_remote(self, connection: ConnectionId) -> bool:
        """Whether ``connection`` is a stand-in made by :meth:`attach_remote`."""
        conn = self._connections.get(connection)
        return conn is not None and conn.remote

    def watch_of(self, connection: ConnectionId) -> tuple[PeerId, ...] | None:
        """The names ``connection`` watches (``None``: everyone, or no such connection)."""
        conn = self._connections.get(connection)
        return conn.watch if conn is not None else None

    def remote_presence(self, name: PeerId, fp: str, online: bool) -> list[Output]:
        """``name`` came online or went offline on another instance: tell its watchers here."""
        connection = self._online.get(name)
        if connection is not None and not self._connections[connection].remote:
            return []  # registered here: this instance speaks for it
        return self._presence(Presence(name, fp, online))

    def has_calls(self, name: PeerId) -> bool:
        """Whether ``name`` is a party to a live call here."""
        return bool(self._calls_of(name))

    def attach_remote(
        self, name: PeerId, fp: str, now: float, early_offer: bool = False
    ) -> tuple[ConnectionId | None, list[Output]]:
        """Register a stand-in for ``name``, authenticated by another instance.

        Call messages to it are forwarded by the shell to that instance; frames
        its user sent there are fed here with :meth:`receive`. It watches nobody
        and is exempt from the rate limit (applied where the user is); it sends
        no presence (:meth:`remote_presence` does). ``early_offer``: that instance
        takes early offers. Returns ``(None, [])`` when ``name`` is registered
        here already, or pinned here to another key.
        """
        if name in self._online or self._pins.fingerprint(name) not in (None, fp):
            return None, []
        self._next_id += 1
        cid = ConnectionId(self._next_id)
        conn = Connection(cid, b"", self.config.burst, now, None, name=name, remote=True)
        conn.early_offer, self._connections[cid] = early_offer, conn
        if self._pins.fingerprint(name) is None:
            self._pins.pin(name, fp, None, now)
        self._pins.in_use(name)
        self._online[name] = cid
        self._subscribe(conn, ())
        return cid, []  # presence of remote users: remote_presence()

    def forwarded_relay(
        self, connection: ConnectionId, call_id: str, kind: str, text: str, now: float = 0.0
    ) -> ConnectionId | None:
        """The recipient here of ``text``, a relayed ``offer``/``answer``/``ice`` that
        stand-in ``connection``'s instance validated and serialized (the relay fast
        path, docs/signaling.md "Relay fast path"); ``None``: not deliverable (dropped).

        Runs the checks :meth:`receive` runs on a relay message, against this
        instance's own state: a call ``call_id`` of this user, the role and state
        :data:`CALL_RULES` allow for ``kind``, a recipient connected here; and that
        ``text`` is that message, from that user, with the fingerprint this instance
        holds for the call (its first members, compared as serialized). The rest of
        ``text`` (``payload``, ``reason``) is the sending instance's validation. The
        caller's ``offer`` while the call rings (:data:`EARLY_RULES`) is delivered, or
        held for a callee that did not ask for it (``now``: the time it came).
        """
        conn = self._connections.get(connection)
        if conn is None or conn.closed or not conn.remote or conn.name is None:
            return None
        rule = CALL_RULES.get(kind)
        call = self._calls.get(call_id)
        name = conn.name
        if rule is None or rule[2] != RELAY or call is None:
            return None
        if name == call.caller:
            role = Role.CALLER
        elif name == call.callee:
            role = Role.CALLEE
        else:
            return None
        early = False
        if role not in rule[0] or call.state not in rule[1]:
            if not self._early_allowed(call, role, kind):
                return None
            early = True  # the offer while ringing: relayed now or held (as receive())
        if len(text) > self.config.max_message_size + RELAYED_HEADROOM:
            return None
        head = (  # as Message.serialize writes them (json.dumps escapes the same way)
            f'{{"type":{_quote(kind)},"call_id":{_quote(call_id)},"peer":{_quote(name)},'
            f'"fingerprint":{_quote(call.fingerprint(name))},'
        )
        if not text.startswith(head) or not text.endswith("}"):
            return None
        target = self._online.get(call.other(name))
        if target is None or self._connections[target].remote:
            return None
        if early and not self._early_now(call, self._connections[target], now):
            try:  # held for a callee that did not ask: relayed behind its accept
                call.held = parse_server_message(text)
            except SignalingProtocolError:
                return None
            return None
        return target

    # --- registration (docs/signaling.md, "Registration") -------------------------------

    def _move_pin(
        self, conn: Connection, msg: Register, name: PeerId, pinned: str, fp: str
    ) -> bool:
        """Hook: move ``name`` from its pinned key to ``fp`` if the pinned key signed it.

        The ``register`` carries ``previous_key`` (whose fingerprint must be the
        pinned one) and ``previous_signature`` over :func:`move_data` (this
        connection's nonce, the name, the server id, the new fingerprint). See
        docs/signaling.md, "Moving a name".
        """
        if msg.previous_key is None or msg.previous_signature is None:
            return False
        if fingerprint(msg.previous_key) != pinned:
            return False
        data = move_data(conn.nonce, name, self.config.server_id, fp)
        try:
            valid = self._verify(msg.previous_key, msg.previous_signature, data)
        except InvalidKeyError:
            valid = False
        if valid:
            self._pins.move(name, fp)
            logger.info("= name %s moved to key %s (signed by its previous key)", name, fp[:19])
        return valid

    def _register(self, conn: Connection, msg: Register, now: float) -> list[Output]:
        name = PeerId(msg.name)
        ref = msg.TYPE
        if msg.watch is not None and len(msg.watch) > self.config.max_watch:
            text = f"at most {self.config.max_watch} names in 'watch'"
            return [self._error(conn, "too_many_watched", text, ref=ref), self._close(conn, text)]
        data = registration_data(conn.nonce, name, self.config.server_id)
        try:
            valid = self._verify(msg.public_key, msg.signature, data)
        except InvalidKeyError:
            valid = False
        if not valid:
            return [
                self._error(conn, "auth_failed", "signature does not verify", ref=ref),
                self._close(conn, "authentication failed"),
            ]
        fp = fingerprint(msg.public_key)
        pinned = self._pins.fingerprint(name)
        if pinned is not None and pinned != fp and self._move_pin(conn, msg, name, pinned, fp):
            pinned = fp  # moved: the name is now pinned to this key
        if pinned is not None and pinned != fp:
            return [
                self._error(conn, "name_taken", "name registered with another key", ref=ref),
                self._close(conn, "name taken"),
            ]
        refusal = None
        if name not in self._online and len(self._online) >= self.config.max_connections:
            refusal = "server_full", "too many connections"
        elif pinned is None:
            code = self._pins.refusal(fp, conn.address, now)
            if code is not None:
                refusal = code, PIN_REFUSALS[code].format(config=self.config)
        if refusal is not None:
            code, text = refusal
            close = CLOSE_POLICY_VIOLATION if code == "too_many_names" else CLOSE_TRY_AGAIN_LATER
            return [self._error(conn, code, text, ref=ref), self._close(conn, text, close)]
        if pinned is None:
            self._pins.pin(name, fp, conn.address, now)
        self._pins.in_use(name)
        self._leave_pending(conn)
        conn.name = name
        conn.nonce = b""  # single use
        conn.early_offer = self.config.early_offer and EARLY_OFFER in (msg.features or ())
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
        if old is None:
            out += self._presence(Presence(name, fp, True), exclude=conn.id)
        self._subscribe(conn, msg.watch)
        watched = self._online if conn.watch is None else conn.watch
        online = tuple(
            OnlinePeer(peer, self._fingerprint(peer))
            for peer in watched
            if peer != name and peer in self._online
        )
        calls = self._calls_of(name)
        for call_id in calls:
            call = self._calls[call_id]
            if call.other(name) in self._online:
                call.grace_deadline = None  # both parties are back in time
        turn = self._turn(name, self._wall_clock()) if self._turn is not None else None
        out.append((conn.id, Registered(name, fp, online, tuple(calls), turn)))
        logger.info("= %s registered (fingerprint %s…)", name, fp[:16])
        return out

    # --- calls (docs/signaling.md, "Calls") --------------------------------------------------

    def _call_message(
        self, conn: Connection, name: PeerId, msg: CallMessage, now: float
    ) -> list[Output]:
        if isinstance(msg, Invite):
            return self._invite(conn, name, msg, now)
        call = self._calls.get(msg.call_id)
        if call is None or name not in (call.caller, call.callee):
            return [self._error(conn, "unknown_call", "no such call", msg.call_id, msg.TYPE)]
        role = Role.CALLER if name == call.caller else Role.CALLEE
        if self._early_allowed(call, role, msg.TYPE):
            return self._early(conn, call, name, msg, now)
        roles, states, next_state = CALL_RULES[msg.TYPE]
        if role not in roles or call.state not in states:
            text = f"{msg.TYPE} not allowed for the {role.value} in state {call.state.name}"
            return [self._error(conn, "bad_state", text, msg.call_id, msg.TYPE)]
        if next_state is CallState.ACCEPTED and (name in self._active or name in self._outgoing):
            # One call at a time: the callee's own accepted call or invitation comes first.
            text = "accept not allowed while you are in another call or calling"
            return [self._error(conn, "bad_state", text, msg.call_id, msg.TYPE)]
        other = call.other(name)
        relayed = dataclasses.replace(msg, peer=name, fingerprint=call.fingerprint(name))
        target = self._online.get(other)
        if next_state == END:
            self._forget_call(call)
            return [(target, relayed)] if target is not None else []
        if target is None:
            return [self._error(conn, "unavailable", "peer is offline", msg.call_id, msg.TYPE)]
        out: list[Output] = [(target, relayed)]
        if next_state is CallState.ACCEPTED:
            self._unlist_invitation(call)
            self._active[call.caller] = self._active[call.callee] = call.call_id
            call.deadline = now + self.config.max_call_duration
            self._add_timer(call.deadline, "call", call.call_id)
            if call.held is not None:  # the early offer, for a callee that did not ask
                held, call.held = call.held, None
                caller_remote = self._connections[target].remote  # its instance: no expiry
                if now - call.early_at <= EARLY_OFFER_MAX_HOLD or caller_remote:
                    out.append((conn.id, held))
                else:  # too old for its clock window: the caller signs a fresh one
                    out[0] = (target, dataclasses.replace(relayed, reason=EARLY_OFFER_EXPIRED))
        if isinstance(next_state, CallState):
            call.state = next_state
        return out

    def _early_allowed(self, call: Call, role: Role, kind: str) -> bool:
        """Whether ``kind`` from ``role`` is the one offer :data:`EARLY_RULES` allows now."""
        rule = EARLY_RULES.get(kind)
        if rule is None or not self.config.early_offer or call.early_offer:
            return False
        return role in rule[0] and call.state in rule[1]

    def _early(
        self, conn: Connection, call: Call, name: PeerId, msg: CallMessage, now: float
    ) -> list[Output]:
        """The caller's offer while the call rings: relayed now, or held for the accept."""
        target = self._online.get(call.callee)
        if target is None:
            return [self._error(conn, "unavailable", "peer is offline", msg.call_id, msg.TYPE)]
        relayed = dataclasses.replace(msg, peer=name, fingerprint=call.fingerprint(name))
        if self._early_now(call, self._connections[target], now):
            return [(target, relayed)]
        call.held = relayed
        return []

    @staticmethod
    def _early_now(call: Call, callee: Connection, now: float) -> bool:
        """Take the call's one early offer (came at ``now``); whether ``callee`` gets it now.

        Delivered now to a callee that asked for it, or to another instance that takes
        early offers (its callee decides there); otherwise the server holds it
        (``call.held``) until the accept."""
        call.early_offer, call.early_at = True, now
        return callee.early_offer

    def _invite(self, conn: Connection, name: PeerId, msg: Invite, now: float) -> list[Output]:
        callee = PeerId(msg.peer or "")
        cid = msg.call_id
        if callee == name:
            return [self._error(conn, "bad_message", "field 'peer': cannot call yourself", cid)]
        if cid in self._calls:
            return [self._error(conn, "bad_state", "call_id already in use", cid, msg.TYPE)]
        if name in self._active or name in self._outgoing:
            return [self._error(conn, "bad_state", "you are already in a call", cid, msg.TYPE)]
        target = self._online.get(callee)
        if target is None:
            return [self._error(conn, "unavailable", f"{callee} is offline", cid, msg.TYPE)]
        callee_fp = self._fingerprint(callee)
        if callee in self._active:
            return [(conn.id, Busy(cid, callee, callee_fp, "in another call"))]
        incoming = self._incoming.get(callee, {})
        if len(incoming) >= self.config.max_pending_invites:
            text = f"{callee} has {len(incoming)} unanswered invitations"
            return [self._error(conn, "too_many_invites", text, cid, msg.TYPE)]
        caller_fp = self._fingerprint(name)
        deadline = now + self.config.ring_timeout
        call = Call(cid, name, callee, (caller_fp, callee_fp), CallState.INVITED, deadline)
        self._calls[cid] = call
        self._outgoing[name] = cid
        self._incoming.setdefault(callee, {})[cid] = None
        self._add_timer(deadline, "call", cid)
        return [(target, Invite(cid, peer=name, fingerprint=caller_fp, payload=msg.payload))]

    def _calls_of(self, name: PeerId) -> list[str]:
        """Ids of the live calls of ``name``: accepted, outgoing, then incoming."""
        calls = [self._active.get(name), self._outgoing.get(name)]
        return [c for c in calls if c is not None] + list(self._incoming.get(name, ()))

    def _end_call(self, call: Call, reason: str, gone: PeerId | None = None) -> list[Output]:
        """End ``call``; tell each online party other than ``gone`` (``hangup``, ``reason``).

        Each party's ``hangup`` names the other party as the sender.
        """
        self._forget_call(call)
        out: list[Output] = []
        for party in (call.caller, call.callee):
            target = self._online.get(party)
            if party != gone and target is not None:
                other = call.other(party)
                out.append((target, Hangup(call.call_id, other, call.fingerprint(other), reason)))
        return out

    def _forget_call(self, call: Call) -> None:
        cid = call.call_id
        del self._calls[cid]
        for party in (call.caller, call.callee):
            if self._active.get(party) == cid:
                del self._active[party]
        self._unlist_invitation(call)

    def _unlist_invitation(self, call: Call) -> None:
        """Take ``call`` out of its parties' invitations (it was accepted or ended)."""
        cid = call.call_id
        if self._outgoing.get(call.caller) == cid:
            del self._outgoing[call.caller]
        incoming = self._incoming.get(call.callee)
        if incoming is not None and cid in incoming:
            del incoming[cid]
            if not incoming:
                del self._incoming[call.callee]

    # --- helpers ----------------------------------------------------------------------------

    def _presence(self, msg: Presence, exclude: ConnectionId | None = None) -> list[Output]:
        """Send ``msg`` to the connections watching everyone or its name."""
        out: list[Output] = [(cid, msg) for cid in self._watch_all if cid != exclude]
        watchers = self._watchers.get(PeerId(msg.name))
        if isinstance(watchers, dict):
            out += [(cid, msg) for cid in watchers if cid != exclude]
        elif watchers is not None and watchers != exclude:
            out.append((watchers, msg))
        return out

    def _subscribe(self, conn: Connection, watch: tuple[str, ...] | None) -> None:
        """Record whose presence a newly registered connection receives.

        Memory (docs/signaling.md, "Limits"): the watch tuple and the index share
        the name strings, and a name watched by one connection maps to its id
        alone; a name with several watchers maps to a dict of them (a small set
        costs about 2 KiB, four times a dict with as many members).
        """
        if watch is None:
            self._watch_all.add(conn.id)
            return
        conn.watch = tuple(dict.fromkeys(PeerId(name) for name in watch))
        for name in conn.watch:
            watchers = self._watchers.get(name)
            if watchers is None:
                self._watchers[name] = conn.id
            elif isinstance(watchers, dict):
                watchers[conn.id] = None
            else:
                self._watchers[name] = {watchers: None, conn.id: None}

    def _unsubscribe(self, conn: Connection) -> None:
        self._watch_all.discard(conn.id)
        for name in conn.watch or ():
            watchers = self._watchers.get(name)
            if isinstance(watchers, dict):
                watchers.pop(conn.id, None)
                if len(watchers) == 1:
                    self._watchers[name] = next(iter(watchers))
            elif watchers == conn.id:
                del self._watchers[name]
        conn.watch = None

    def _fingerprint(self, name: PeerId) -> str:
        """The pinned fingerprint of a name that is online (so pinned)."""
        fp = self._pins.fingerprint(name)
        assert fp is not None, name
        return fp

    def _leave_pending(self, conn: Connection) -> None:
        """``conn`` no longer waits to register (registered, closed or gone)."""
        if self._pending.pop(conn.id, None) is not None and conn.address is not None:
            same = self._pending_by_address[conn.address]
            del same[conn.id]
            if not same:
                del self._pending_by_address[conn.address]

    def _evict(self, conn: Connection, text: str) -> list[Output]:
        """Close an unregistered connection to make room for a new one."""
        return [
            self._error(conn, "too_many_connections", text),
            self._close(conn, "too many connections", CLOSE_TRY_AGAIN_LATER),
        ]

    def _error(
        self,
        conn: Connection,
        code: str,
        text: str,
        call_id: str | None = None,
        ref: str | None = None,
    ) -> Output:
        if self.debug:
            logger.debug("! %d %s: %s", conn.id, code, text)
        return conn.id, ErrorMessage(code, safe_text(text), call_id, ref)

    def _close(self, conn: Connection, reason: str, code: int = CLOSE_POLICY_VIOLATION) -> Output:
        conn.closed = True
        self._leave_pending(conn)  # its socket may linger while closing: not in the pool
        return conn.id, CloseConnection(code, reason)

    def _arm_pin_timer(self) -> None:
        """Keep one timer for the next pin expiry (``pins`` in :meth:`handle_timer`)."""
        if self._pin_timer is None:
            deadline = self._pins.next_expiry()
            if deadline is not None:
                self._pin_timer = deadline
                self._add_timer(deadline, "pins", None)

    def _add_timer(self, deadline: float, kind: str, key: object) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, kind, key))
