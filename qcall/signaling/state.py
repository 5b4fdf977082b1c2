"""The signaling protocol's state: connections, calls and the call state rules.

Kept apart from :mod:`qcall.signaling.protocol` (the state machine that uses
them); that module re-exports the public names.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import NewType

from qcall.signaling.messages import ServerMessage
from qcall.typing import PeerId

__all__ = [
    "CALL_RULES",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TRY_AGAIN_LATER",
    "EARLY_OFFER_EXPIRED",
    "EARLY_OFFER_MAX_HOLD",
    "EARLY_OFFER_SENT",
    "EARLY_RULES",
    "END",
    "RELAY",
    "Call",
    "CallState",
    "CloseConnection",
    "Connection",
    "ConnectionId",
    "Output",
    "Role",
    "address_key",
]

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
#: What follows an accepted call message in :data:`CALL_RULES`: the call ends, or is
#: relayed with its state unchanged.
END = "end"
RELAY = "relay"

#: The state rules: message type -> (roles allowed, states allowed, what follows:
#: the next state, ``"end"`` (the call ends) or ``"relay"`` (state unchanged)).
#: Every accepted message is relayed to the other party; anything else is ``bad_state``.
CALL_RULES: dict[str, tuple[frozenset[Role], frozenset[CallState], CallState | str]] = {
    "ringing": (frozenset({Role.CALLEE}), frozenset({CallState.INVITED}), CallState.RINGING),
    "accept": (frozenset({Role.CALLEE}), _PRE, CallState.ACCEPTED),
    "reject": (frozenset({Role.CALLEE}), _PRE, END),
    "busy": (frozenset({Role.CALLEE}), _PRE, END),
    "cancel": (frozenset({Role.CALLER}), _PRE, END),
    "hangup": (_BOTH, _ANY, END),
    "offer": (_BOTH, _UP, RELAY),
    "answer": (_BOTH, _UP, RELAY),
    "ice": (_BOTH, _UP, RELAY),
}

#: Messages also allowed before the call is accepted, for a server that offers the
#: ``early_offer`` feature (docs/signaling.md, "The offer while ringing"): the
#: caller's one ``offer`` while the call is INVITED or RINGING. It is relayed at once
#: to a callee that asked for the feature (or to another instance, whose callee's
#: own choice applies there), else held and relayed right behind the callee's
#: ``accept``; a second one before the accept is ``bad_state``.
EARLY_RULES: dict[str, tuple[frozenset[Role], frozenset[CallState], CallState | str]] = {
    "offer": (frozenset({Role.CALLER}), _PRE, RELAY),
}


#: Seconds a held early offer may wait for the callee's ``accept``: older, it is
#: dropped and the relayed ``accept`` carries :data:`EARLY_OFFER_EXPIRED` as its
#: ``reason`` (the caller signs a fresh offer; a callee's clock window is ±60 s).
EARLY_OFFER_MAX_HOLD = 20.0
#: The ``reason`` of an ``accept`` (the callee's, or the server's for a held offer):
#: the early offer is too old, send a freshly stamped one.
EARLY_OFFER_EXPIRED = "early offer expired"
#: The ``reason`` of the caller's ``offer`` sent while the call rings: a callee that
#: asked for a fresh one (:data:`EARLY_OFFER_EXPIRED`) skips it if it comes after.
EARLY_OFFER_SENT = "sent while ringing"


@dataclass(slots=True)
class Connection:
    """One WebSocket connection (or a cluster's stand-in for a remote user)."""

    id: ConnectionId
    nonce: bytes
    tokens: float
    last: float
    address: str | None
    name: PeerId | None = None
    closed: bool = False
    watch: tuple[PeerId, ...] | None = None  # presence subscriptions; None: everyone
    remote: bool = False  # a stand-in for a user on another instance (attach_remote)
    early_offer: bool = False  # asked for early_offer (register.features); a stand-in:
    #                            its instance takes early offers (Cluster.features)


@dataclass(slots=True)
class Call:
    """One call the server brokers."""

    call_id: str
    caller: PeerId
    callee: PeerId
    fingerprints: tuple[str, str]  # the caller's, the callee's: pins may expire meanwhile
    state: CallState
    deadline: float  # ring timeout, then (once accepted) the call time limit
    grace_deadline: float | None = None
    #: The caller's offer came before the accept (only one may); ``held``: kept for a
    #: callee that did not ask for it, relayed right behind its ``accept``.
    early_offer: bool = False
    early_at: float = 0.0
    held: ServerMessage | None = None

    def other(self, name: PeerId) -> PeerId:
        return self.callee if name == self.caller else self.caller

    def fingerprint(self, name: PeerId) -> str:
        return self.fingerprints[name != self.caller]


def address_key(host: str) -> str:
    """Return the key under which per-address limits count a client at ``host``.

    IPv4 addresses count alone; IPv6 addresses by their /64 prefix (one
    subscriber usually holds a whole /64); IPv4-mapped IPv6 as IPv4. Anything
    else (a Unix socket path) is used as is.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def safe_text(text: str) -> str:
    """Make an exception message fit an ``error`` message (printable ASCII, ≤ 256)."""
    return _UNPRINTABLE.sub("?", text)[:256]


#: Texts of the registration refusals of :meth:`PinRegistry.refusal`.
PIN_REFUSALS = {
    "server_full": "too many identities",
    "too_many_names": "this key has {config.max_names_per_key} names already",
    "too_many_identities": (
        "more than {config.max_new_names_per_address} new names from your address "
        "in {config.new_names_window:g} s: try again later"
    ),
}


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
