"""Limits and timeouts of a signaling server (docs/signaling.md, "Limits").

:class:`ServerConfig` is read by the Sans-I/O protocol
(:mod:`qcall.signaling.protocol`) and, for the outbox, by the websockets shell
(``signaling/server.py``). ``python -m signaling`` has one flag per field
(``--max-watch`` for ``max_watch``); :data:`LIMITS` describes them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from qcall.signaling.messages import MAX_CALLS, MAX_MESSAGE_SIZE, MAX_WATCH

__all__ = ["LIMITS", "ServerConfig"]

DAY = 86_400.0


@dataclass(frozen=True)
class ServerConfig:
    """Limits and timeouts of a signaling server (documented in docs/signaling.md).

    Times are seconds. Counting limits refuse with the error code in brackets
    (docs/signaling.md, "Errors").

    Attributes:
        server_id: bound into every registration signature; identifies this server.
        auth_timeout: seconds a connection may stay unregistered before it is closed.
        rate: sustained messages per second per connection (token bucket refill).
        burst: token bucket size: messages a connection may send at once.
        max_message_size: largest frame processed, in UTF-8 bytes (``too_big`` above).
        call_grace: seconds an accepted call survives one party's disconnection,
            so that a reconnecting client finds it again.
        max_connections: registered connections (``server_full``).
        max_unauthenticated: connections waiting to register, a pool of their
            own; when full, the oldest is closed (``too_many_connections``).
        max_unauthenticated_per_address: the same, per client address (IPv6: per /64).
        max_identities: names pinned at once (``server_full``).
        max_names_per_key: names pinned to one identity key (``too_many_names``).
        max_new_names_per_address: names first pinned from one address per
            ``new_names_window`` (``too_many_identities``).
        new_names_window: length of that fixed window.
        pin_ttl: a name offline this long loses its pin (the name is free again).
        max_watch: names in a ``register`` ``watch`` list (``too_many_watched``).
        ring_timeout: an invitation not accepted by then ends (``hangup``,
            reason ``ring timeout``, to both parties).
        max_pending_invites: unanswered invitations one callee may have
            (``too_many_invites`` for the next caller).
        max_call_duration: an accepted call ends after this long (``hangup``,
            reason ``call time limit``, to both parties).
        max_outbox_bytes: bytes queued for a client that does not read; above,
            it is closed (1008 ``too slow``). A single message is always queued.
        early_offer: offer the ``early_offer`` feature (the caller's signed offer
            relayed while the call rings; docs/signaling.md, "The offer while ringing").
    """

    server_id: str = "qcall-signaling"
    auth_timeout: float = 10.0
    rate: float = 20.0
    burst: float = 40.0
    max_message_size: int = MAX_MESSAGE_SIZE
    call_grace: float = 30.0
    max_connections: int = 10_000
    max_unauthenticated: int = 1000
    max_unauthenticated_per_address: int = 16
    max_identities: int = 100_000
    max_names_per_key: int = 4
    max_new_names_per_address: int = 32
    new_names_window: float = 3600.0
    pin_ttl: float = 30 * DAY
    max_watch: int = MAX_WATCH
    ring_timeout: float = 120.0
    max_pending_invites: int = 8
    max_call_duration: float = DAY
    max_outbox_bytes: int = 256 * 1024
    early_offer: bool = True

    def __post_init__(self) -> None:
        if not 0 < len(self.server_id) <= 128 or not self.server_id.isprintable():
            raise ValueError("field 'server_id' must be 1-128 printable characters")
        if not self.server_id.isascii():
            raise ValueError("field 'server_id' must be ASCII")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not value > 0 and f.name != "call_grace":
                raise ValueError(f"field {f.name!r} must be positive")
            if f.type == "int" and value < 1:
                raise ValueError(f"field {f.name!r} must be at least 1")
        if not self.burst >= 1:
            raise ValueError("field 'burst' must be at least 1")
        if not self.call_grace >= 0:
            raise ValueError("field 'call_grace' must not be negative")
        uppers = {
            "max_message_size": MAX_MESSAGE_SIZE,
            "max_watch": MAX_WATCH,
            # registered.calls lists one accepted, one outgoing and the incoming calls
            "max_pending_invites": MAX_CALLS - 2,
        }
        for name, upper in uppers.items():
            if getattr(self, name) > upper:
                raise ValueError(f"field {name!r} must be at most {upper}")


#: Flag metavar and help of every limit (``python -m signaling --help``), in docs order.
LIMITS: dict[str, tuple[str, str]] = {
    "auth_timeout": ("SECONDS", "seconds to register"),
    "rate": ("N", "messages/s per connection"),
    "burst": ("N", "message burst per connection"),
    "max_message_size": ("BYTES", "largest frame processed"),
    "call_grace": ("SECONDS", "how long an accepted call waits for a dropped party"),
    "max_connections": ("N", "registered connections"),
    "max_unauthenticated": ("N", "connections waiting to register (oldest closed when full)"),
    "max_unauthenticated_per_address": ("N", "the same, per client address (IPv6: per /64)"),
    "max_identities": ("N", "names pinned at once"),
    "max_names_per_key": ("N", "names pinned to one identity key"),
    "max_new_names_per_address": ("N", "names first pinned from one address per window"),
    "new_names_window": ("SECONDS", "that window"),
    "pin_ttl": ("SECONDS", "how long a name may stay offline before it loses its pin"),
    "max_watch": ("N", "names in a register's watch list"),
    "ring_timeout": ("SECONDS", "how long an invitation may ring"),
    "max_pending_invites": ("N", "unanswered invitations per callee"),
    "max_call_duration": ("SECONDS", "how long an accepted call may last"),
    "max_outbox_bytes": ("BYTES", "queued for a client that does not read"),
}
