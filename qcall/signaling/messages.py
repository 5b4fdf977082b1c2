"""Signaling wire messages: frozen dataclasses shared by the server and the client.

Every message is one JSON object in one WebSocket text frame, with a ``type``
member naming it (see ``docs/signaling.md`` for the full specification).
Each class checks itself in ``__post_init__`` and raises :class:`ValueError`
naming the offending field; :func:`parse_client_message`,
:func:`parse_server_message` and every ``Message.parse(text)`` wrap that as
:class:`~qcall.exceptions.SignalingProtocolError` (code ``bad_message``).
Nothing else escapes a parser, whatever the input.

Direction matters: a client sends ``register`` and call messages; the server
sends ``challenge``, ``registered``, ``presence``, ``error`` and relays call
messages with ``peer`` (the sender's registered name) and ``fingerprint``
(:func:`qcall.identity.fingerprint` of the sender's ML-DSA-65 public key, the
same string ``qcall identity show`` and ``qcall contacts`` print) filled in by
the server. Names follow :func:`qcall.identity.validate_name`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from qcall import identity, pqc
from qcall.exceptions import SignalingError, SignalingProtocolError
from qcall.signaling.errors import ERROR_CODES, error_for
from qcall.signaling.fields import (
    PRINTABLE_RE,
    b64,
    b64decode,
    check_fingerprint,
    check_int,
    check_name,
    check_optional,
    check_payload,
    check_printable,
    check_re,
)

__all__ = [
    "ALGORITHM",
    "CALL_MESSAGES",
    "CLIENT_MESSAGES",
    "EARLY_OFFER",
    "ERROR_CODES",
    "MAX_CALLS",
    "MAX_FEATURES",
    "MAX_MESSAGE_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_SERVER_MESSAGE_SIZE",
    "MAX_WATCH",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGES",
    "Accept",
    "Answer",
    "Busy",
    "CallMessage",
    "Cancel",
    "Challenge",
    "ClientMessage",
    "ErrorMessage",
    "Hangup",
    "ICECandidate",
    "Invite",
    "Message",
    "Offer",
    "OnlinePeer",
    "PayloadMessage",
    "Presence",
    "Register",
    "Registered",
    "Reject",
    "Ringing",
    "ServerMessage",
    "TurnCredentials",
    "error_for",
    "fingerprint",
    "parse_client_message",
    "parse_server_message",
    "registration_data",
]

#: Version announced in ``challenge``; bumped on incompatible changes.
PROTOCOL_VERSION = 1

#: Largest text frame the server processes, in UTF-8 bytes (error ``too_big`` above).
MAX_MESSAGE_SIZE = 64 * 1024

#: Largest frame a client accepts from the server: a ``registered`` presence
#: snapshot grows with the number of peers online (about 100 bytes each).
MAX_SERVER_MESSAGE_SIZE = 16 * 1024 * 1024

#: Largest opaque ``payload`` of ``offer``/``answer``/``ice``, in UTF-8 bytes.
MAX_PAYLOAD_SIZE = 48 * 1024

#: Most call ids in a ``registered`` message's ``calls``.
MAX_CALLS = 64

#: Most names in a ``register`` message's ``watch`` list (a server may allow fewer).
MAX_WATCH = 1000

#: Optional protocol features (``challenge.features``, ``register.features``): the
#: server relays a caller's signed ``offer`` while the call rings (docs/signaling.md,
#: "The offer while ringing").
EARLY_OFFER = "early_offer"

#: Most names in a ``features`` list (each 1-32 of ``a-z _``; unknown ones are ignored).
MAX_FEATURES = 16

#: Size of the registration challenge nonce in bytes.
NONCE_SIZE = 32

#: The only identity algorithm accepted for registration (FIPS 204, ML-DSA-65).
ALGORITHM = "ML-DSA-65"

#: Domain-separation label of the signed registration data (see :func:`registration_data`).
REGISTRATION_LABEL = b"qcall-signaling-register-v1"

_CALL_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_CODE_RE = re.compile(r"[a-z][a-z_]{0,31}")
_MAX_SERVER_ID = 128
_MAX_REASON = 128
_MAX_ERROR_TEXT = 256
_MAX_ONLINE = 10_000


# --- shared helpers -------------------------------------------------------------------


def fingerprint(public_key: bytes) -> str:
    """Return the fingerprint of an ML-DSA public key (:func:`qcall.identity.fingerprint`)."""
    return identity.fingerprint(public_key)


def registration_data(nonce: bytes, name: str, server_id: str) -> bytes:
    """Return the bytes a client signs to register (docs/signaling.md, "Registration").

    The encoding is domain-separated and unambiguous: the label
    ``qcall-signaling-register-v1``, then nonce, UTF-8 name and UTF-8 server id,
    each preceded by its length as a 2-byte big-endian integer.
    """
    parts = [REGISTRATION_LABEL, nonce, name.encode(), server_id.encode()]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


#: Domain label of :func:`move_data`.
MOVE_LABEL = b"qcall-signaling-move-v1"


def move_data(nonce: bytes, name: str, server_id: str, new_fingerprint: str) -> bytes:
    """Return the bytes the *previous* key signs to move ``name`` to a new key.

    Like :func:`registration_data`, with the label ``qcall-signaling-move-v1`` and
    the new key's fingerprint last (docs/signaling.md, "Moving a name").
    """
    parts = [MOVE_LABEL, nonce, name.encode(), server_id.encode(), new_fingerprint.encode()]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


# --- base class ---------------------------------------------------------------------------

M = TypeVar("M", bound="Message")


@dataclass(frozen=True)
class Message:
    """Base of every signaling message. ``TYPE`` is its JSON ``type`` member."""

    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of this message (``None`` fields left out)."""
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _to_json(value)
        return out

    def serialize(self) -> str:
        """Return the compact JSON text of this message, ready for one text frame."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls: type[M], obj: Mapping[str, Any]) -> M:
        """Build a message from a decoded JSON object (``type`` is not checked here).

        Unknown members are ignored (forward compatibility); missing required
        ones raise :class:`ValueError` naming the field.
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in obj:
                kwargs[f.name] = _from_json(cls, f.name, obj[f.name])
            elif _required(f):
                raise ValueError(f"field {f.name!r} is missing")
        return cls(**kwargs)

    @classmethod
    def parse(cls: type[M], text: str | bytes) -> M:
        """Parse one frame that must hold a message of this class.

        Raises:
            SignalingProtocolError: malformed JSON, another type, bad or missing field.
        """
        obj = _decode(text, MAX_SERVER_MESSAGE_SIZE)
        if obj.get("type") != cls.TYPE:
            raise SignalingProtocolError(f"expected a {cls.TYPE!r} message")
        try:
            return cls.from_dict(obj)
        except (ValueError, TypeError) as exc:
            raise SignalingProtocolError(f"invalid {cls.TYPE!r} message: {exc}") from exc


def _required(f: Field[Any]) -> bool:
    if f.metadata.get("required"):
        return True
    return f.default is MISSING and f.default_factory is MISSING


def _to_json(value: Any) -> Any:
    if hasattr(value, "to_json"):  # a nested object of another module's frames
        return value.to_json()
    if isinstance(value, bytes):
        return b64(value)
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, OnlinePeer):
        return {"name": value.name, "fingerprint": value.fingerprint}
    if isinstance(value, TurnCredentials):
        return {**value.ice_server(), "expires": value.expires}
    return value


#: Members holding base64 bytes, decoded by :meth:`Message.from_dict`.
_BYTES_FIELDS = {"nonce", "public_key", "signature", "previous_key", "previous_signature"}


def _from_json(cls: type[Message], name: str, value: Any) -> Any:
    if name in _BYTES_FIELDS:
        return b64decode(name, value)
    if name == "online" and cls is Registered:
        if not isinstance(value, list) or len(value) > _MAX_ONLINE:
            raise ValueError(f"field {name!r} must be a list of at most {_MAX_ONLINE} peers")
        peers = []
        for item in value:
            if not isinstance(item, dict):
                raise ValueError(f"field {name!r} must hold objects")
            if "name" not in item or "fingerprint" not in item:
                raise ValueError(f"field {name!r} entries need 'name' and 'fingerprint'")
            peers.append(OnlinePeer(item["name"], item["fingerprint"]))
        return tuple(peers)
    if name == "turn" and cls is Registered and value is not None:
        if not isinstance(value, dict) or not isinstance(value.get("urls"), list):
            raise ValueError(f"field {name!r} must be an object with 'urls'")
        missing = {"username", "credential", "expires"} - value.keys()
        if missing:
            raise ValueError(f"field {name!r} needs {sorted(missing)[0]!r}")
        return TurnCredentials(
            tuple(value["urls"]), value["username"], value["credential"], value["expires"]
        )
    if name == "watch" and value is not None:
        if not isinstance(value, list) or len(value) > MAX_WATCH:
            raise ValueError(f"field {name!r} must be a list of at most {MAX_WATCH} names")
        return tuple(value)
    if name == "features" and value is not None:
        if not isinstance(value, list) or len(value) > MAX_FEATURES:
            raise ValueError(f"field {name!r} must be a list of at most {MAX_FEATURES} names")
        return tuple(value)
    if name == "calls":
        if not isinstance(value, list) or len(value) > MAX_CALLS:
            raise ValueError(f"field {name!r} must be a list of at most {MAX_CALLS} call ids")
        return tuple(value)
    return value


def _decode(text: str | bytes, limit: int) -> dict[str, Any]:
    if not isinstance(text, str):
        raise SignalingProtocolError("binary frames are not supported: send JSON text")
    if len(text) > limit:
        raise SignalingProtocolError(f"message larger than {limit} bytes")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise SignalingProtocolError("message is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise SignalingProtocolError("message must be a JSON object")
    if not isinstance(obj.get("type"), str):
        raise SignalingProtocolError("field 'type' is missing or not a string")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# --- registration -----------------------------------------------------------------------


@dataclass(frozen=True)
class OnlinePeer:
    """One entry of a ``registered`` message's ``online`` list."""

    name: str
    fingerprint: str

    def __post_init__(self) -> None:
        check_name("online.name", self.name)
        check_fingerprint("online.fingerprint", self.fingerprint)


@dataclass(frozen=True)
class TurnCredentials:
    """A ``registered`` message's ``turn`` member: short-lived TURN credentials.

    coturn's shared-secret REST scheme (``use-auth-secret``): ``username`` is
    ``EXPIRY:NAME`` (Unix seconds), ``credential`` is base64(HMAC-SHA1(secret,
    username)); the TURN server checks both and refuses them after ``EXPIRY``
    (:mod:`qcall.signaling.turn`).
    """

    urls: tuple[str, ...]
    username: str
    credential: str
    expires: int

    def __post_init__(self) -> None:
        if not isinstance(self.urls, tuple) or not 1 <= len(self.urls) <= 8:
            raise ValueError("field 'turn.urls' must be a list of 1-8 URLs")
        for url in self.urls:
            if not isinstance(url, str) or not url.startswith(("turn:", "turns:", "stun:")):
                raise ValueError("field 'turn.urls' must hold turn:, turns: or stun: URLs")
            check_re("turn.urls", url, PRINTABLE_RE, "printable ASCII")
        for name in ("username", "credential"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 1 <= len(value) <= 256:
                raise ValueError(f"field 'turn.{name}' must be 1-256 characters")
        if isinstance(self.expires, bool) or not isinstance(self.expires, int):
            raise ValueError("field 'turn.expires' must be an integer")

    def __repr__(self) -> str:  # the credential is a password: never in a log
        urls, user = self.urls, self.username
        return f"TurnCredentials(urls={urls!r}, username={user!r}, expires={self.expires})"

    def ice_server(self) -> dict[str, Any]:
        """The W3C ``RTCIceServer`` dictionary (``CallOptions.ice_servers`` entry)."""
        return {"urls": list(self.urls), "username": self.username, "credential": self.credential}


def _check_features(features: object) -> None:
    if not isinstance(features, tuple) or len(features) > MAX_FEATURES:
        raise ValueError(f"field 'features' must be a list of at most {MAX_FEATURES} names")
    for feature in features:
        check_re("features", feature, _CODE_RE, "1-32 of a-z _")


@dataclass(frozen=True)
class Challenge(Message):
    """Server → client, first message on every connection.

    Attributes:
        nonce: 32 fresh random bytes, valid for one registration on this connection.
        server_id: the server's identity, bound into the signature.
        time: server wall-clock time, Unix seconds (informational).
        version: :data:`PROTOCOL_VERSION`.
        features: optional features this server offers (e.g. :data:`EARLY_OFFER`).
    """

    TYPE: ClassVar[str] = "challenge"

    nonce: bytes
    server_id: str
    time: int
    version: int = PROTOCOL_VERSION
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"field 'nonce' must be {NONCE_SIZE} bytes")
        check_printable("server_id", self.server_id, _MAX_SERVER_ID, empty=False)
        check_int("time", self.time, 0, 2**53)
        check_int("version", self.version, 1, 2**16)
        _check_features(self.features)


@dataclass(frozen=True)
class Register(Message):
    """Client → server: register ``name`` with an ML-DSA-65 identity (FIPS 204).

    ``signature`` is ML-DSA-65 over :func:`registration_data` (nonce, name, server_id).
    ``watch`` (optional, not signed) limits presence to these names (at most
    1000, for example the contacts); absent, the client gets everyone's presence
    (docs/signaling.md, "Presence"). ``features`` (optional, not signed): the
    ``challenge`` features the client wants (e.g. :data:`EARLY_OFFER`).
    """

    TYPE: ClassVar[str] = "register"

    name: str
    public_key: bytes
    signature: bytes
    algorithm: str = ALGORITHM
    watch: tuple[str, ...] | None = None
    #: Optional, to move a name pinned to the previous key (see :func:`move_data`).
    previous_key: bytes | None = None
    previous_signature: bytes | None = None
    features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_name("name", self.name)
        self._check_previous()
        if self.features is not None:
            _check_features(self.features)
        if self.watch is not None:
            if not isinstance(self.watch, tuple) or len(self.watch) > MAX_WATCH:
                raise ValueError(f"field 'watch' must be a list of at most {MAX_WATCH} names")
            for watched in self.watch:
                check_name("watch", watched)
        if self.algorithm != ALGORITHM:
            raise ValueError(f"field 'algorithm' must be {ALGORITHM!r}")
        sizes = pqc.SignatureScheme.ML_DSA_65.sizes
        if not isinstance(self.public_key, bytes) or len(self.public_key) != sizes.public_key:
            raise ValueError(f"field 'public_key' must be {sizes.public_key} bytes")
        if not isinstance(self.signature, bytes) or len(self.signature) != sizes.signature:
            raise ValueError(f"field 'signature' must be {sizes.signature} bytes")

    def __repr__(self) -> str:
        return f"Register(name={self.name!r}, fingerprint={fingerprint(self.public_key)[:16]}…)"

    def _check_previous(self) -> None:
        if (self.previous_key is None) != (self.previous_signature is None):
            raise ValueError("fields 'previous_key' and 'previous_signature' go together")
        if self.previous_key is None:
            return
        sizes = pqc.SignatureScheme.ML_DSA_65.sizes
        if not isinstance(self.previous_key, bytes) or len(self.previous_key) != sizes.public_key:
            raise ValueError(f"field 'previous_key' must be {sizes.public_key} bytes")
        signature = self.previous_signature
        if not isinstance(signature, bytes) or len(signature) != sizes.signature:
            raise ValueError(f"field 'previous_signature' must be {sizes.signature} bytes")

    @classmethod
    def create(
        cls,
        key: pqc.SigningKey,
        name: str,
        challenge: Challenge,
        watch: Iterable[str] | None = None,
        previous: pqc.SigningKey | None = None,
        features: Iterable[str] | None = None,
    ) -> Register:
        """Sign ``challenge`` with ``key`` and return the ``register`` message.

        Args:
            watch: names whose presence to receive (default: everyone's).
            previous: the user's previous identity key: it signs :func:`move_data`,
                so a server that has ``name`` pinned to it moves the name to ``key``.
            features: the features wanted, of those ``challenge`` offers (others dropped).
        """
        data = registration_data(challenge.nonce, name, challenge.server_id)
        watched = None if watch is None else tuple(watch)
        wanted = tuple(f for f in features or () if f in challenge.features) or None
        if previous is None or previous.public_bytes() == key.public_bytes():
            return cls(name, key.public_bytes(), key.sign(data), watch=watched, features=wanted)
        new_fp = fingerprint(key.public_bytes())
        proof = move_data(challenge.nonce, name, challenge.server_id, new_fp)
        return cls(
            name,
            key.public_bytes(),
            key.sign(data),
            watch=watched,
            previous_key=previous.public_bytes(),
            previous_signature=previous.sign(proof),
            features=wanted,
        )


@dataclass(frozen=True)
class Registered(Message):
    """Server → client: registration accepted.

    Attributes:
        name: the registered name.
        fingerprint: the identity fingerprint the server pinned for it.
        online: every other registered peer the client watches (presence snapshot).
        calls: ids of calls of this name the server still holds (after a reconnect).
    """

    TYPE: ClassVar[str] = "registered"

    name: str
    fingerprint: str
    online: tuple[OnlinePeer, ...] = ()
    calls: tuple[str, ...] = ()
    turn: TurnCredentials | None = None

    def __post_init__(self) -> None:
        if self.turn is not None and not isinstance(self.turn, TurnCredentials):
            raise ValueError("field 'turn' must be TURN credentials")
        check_name("name", self.name)
        check_fingerprint("fingerprint", self.fingerprint)
        if not isinstance(self.online, tuple) or len(self.online) > _MAX_ONLINE:
            raise ValueError("field 'online' must be a list of peers")
        for peer in self.online:
            if not isinstance(peer, OnlinePeer):
                raise ValueError("field 'online' must hold peers")
        if not isinstance(self.calls, tuple) or len(self.calls) > MAX_CALLS:
            raise ValueError("field 'calls' must be a list of call ids")
        for call_id in self.calls:
            check_re("calls", call_id, _CALL_ID_RE, "8-64 of A-Z a-z 0-9 _ -")


@dataclass(frozen=True)
class Presence(Message):
    """Server → client: ``name`` came online or went offline."""

    TYPE: ClassVar[str] = "presence"

    name: str
    fingerprint: str
    online: bool

    def __post_init__(self) -> None:
        check_name("name", self.name)
        check_fingerprint("fingerprint", self.fingerprint)
        if not isinstance(self.online, bool):
            raise ValueError("field 'online' must be a boolean")


@dataclass(frozen=True)
class ErrorMessage(Message):
    """Server → client: a request failed. ``code`` is in :data:`ERROR_CODES`.

    ``call_id`` names the call concerned, ``ref`` the type of the failed message.
    """

    TYPE: ClassVar[str] = "error"

    code: str
    message: str = ""
    call_id: str | None = None
    ref: str | None = None

    def __post_init__(self) -> None:
        check_re("code", self.code, _CODE_RE, "1-32 of a-z _")
        check_printable("message", self.message, _MAX_ERROR_TEXT)
        check_optional("call_id", self.call_id, check_re, _CALL_ID_RE, "a call id")
        check_optional("ref", self.ref, check_re, _CODE_RE, "a message type")

    def exception(self) -> SignalingError:
        """Return the matching :class:`~qcall.exceptions.SignalingError`."""
        return error_for(self.code, self.message)


# --- calls -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallMessage(Message):
    """A call message: base of ``invite`` … ``hangup``, ``offer``, ``answer``, ``ice``.

    Client → server: ``peer`` names the callee in ``invite`` and is ignored
    otherwise (the server knows the call's parties); ``fingerprint`` is absent.
    Server → client: ``peer`` is the sender's registered name and ``fingerprint``
    its identity fingerprint, both asserted by the server.

    Attributes:
        call_id: chosen by the caller: 8-64 of ``A-Z a-z 0-9 _ -`` (e.g. 16 random bytes,
            base64url); unique among the server's live calls.
        reason: optional short printable text (``reject``, ``busy``, ``cancel``, ``hangup``).
    """

    call_id: str
    peer: str | None = None
    fingerprint: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        check_re("call_id", self.call_id, _CALL_ID_RE, "8-64 of A-Z a-z 0-9 _ -")
        check_optional("peer", self.peer, check_name)
        check_optional("fingerprint", self.fingerprint, check_fingerprint)
        check_optional("reason", self.reason, check_printable, _MAX_REASON)


@dataclass(frozen=True)
class EarlyPayloadMessage(CallMessage):
    """``invite`` and ``accept``: an optional ``payload`` (the caller's offer, the callee's
    answer: docs/signaling.md, "The offer in the invite"), relayed verbatim like
    :class:`PayloadMessage`'s. Peers and servers that predate it ignore the member.
    """

    payload: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional("payload", self.payload, check_payload, MAX_PAYLOAD_SIZE)

    def __repr__(self) -> str:  # no payload in logs
        size = "none" if self.payload is None else f"<{len(self.payload)} chars>"
        name = type(self).__name__
        return f"{name}(call_id={self.call_id!r}, peer={self.peer!r}, payload={size})"


@dataclass(frozen=True, repr=False)
class Invite(EarlyPayloadMessage):
    """Caller → callee: place a call. The server answers ``unavailable`` or relays it.

    ``payload``, when present: the caller's offer (the callee may answer in its ``accept``).
    """

    TYPE: ClassVar[str] = "invite"


@dataclass(frozen=True)
class Ringing(CallMessage):
    """Callee → caller: the callee's client is alerting its user."""

    TYPE: ClassVar[str] = "ringing"


@dataclass(frozen=True, repr=False)
class Accept(EarlyPayloadMessage):
    """Callee → caller: the callee picked up; offer/answer/ice may flow.

    ``payload``, when present: the callee's answer to the offer its ``invite`` carried.
    """

    TYPE: ClassVar[str] = "accept"


@dataclass(frozen=True)
class Reject(CallMessage):
    """Callee → caller: the callee declined. Ends the call."""

    TYPE: ClassVar[str] = "reject"


@dataclass(frozen=True)
class Busy(CallMessage):
    """Callee → caller (or the server for a callee already in a call). Ends the call."""

    TYPE: ClassVar[str] = "busy"


@dataclass(frozen=True)
class Cancel(CallMessage):
    """Caller → callee: the caller gave up before the call was accepted. Ends the call."""

    TYPE: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class Hangup(CallMessage):
    """Either party (or the server when a party is gone): end the call in any state."""

    TYPE: ClassVar[str] = "hangup"


@dataclass(frozen=True)
class PayloadMessage(CallMessage):
    """A call message with an opaque ``payload`` the server relays verbatim.

    The payload is a string of at most :data:`MAX_PAYLOAD_SIZE` UTF-8 bytes; the
    hybrid handshake rides inside it, signed end to end by the parties.
    """

    payload: str = field(default="", metadata={"required": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_payload("payload", self.payload, MAX_PAYLOAD_SIZE)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(call_id={self.call_id!r}, peer={self.peer!r}, "
            f"payload=<{len(self.payload)} chars>)"
        )


@dataclass(frozen=True, repr=False)  # keep PayloadMessage.__repr__: no payload in logs
class Offer(PayloadMessage):
    """Relay an SDP offer (and the signed handshake offer) to the other party."""

    TYPE: ClassVar[str] = "offer"


@dataclass(frozen=True, repr=False)  # keep PayloadMessage.__repr__: no payload in logs
class Answer(PayloadMessage):
    """Relay an SDP answer (and the signed handshake answer) to the other party."""

    TYPE: ClassVar[str] = "answer"


@dataclass(frozen=True, repr=False)  # keep PayloadMessage.__repr__: no payload in logs
class ICECandidate(PayloadMessage):
    """Relay an ICE candidate (trickle ICE) to the other party."""

    TYPE: ClassVar[str] = "ice"


# --- dispatch -------------------------------------------------------------------------------

ClientMessage = Register | CallMessage
ServerMessage = Challenge | Registered | Presence | ErrorMessage | CallMessage

#: Call message classes by ``type``.
CALL_MESSAGES: dict[str, type[CallMessage]] = {
    cls.TYPE: cls
    for cls in (Invite, Ringing, Accept, Reject, Busy, Cancel, Hangup, Offer, Answer, ICECandidate)
}

#: What a client may send, by ``type``.
CLIENT_MESSAGES: dict[str, type[Message]] = {Register.TYPE: Register, **CALL_MESSAGES}

#: What a server may send, by ``type``.
SERVER_MESSAGES: dict[str, type[Message]] = {
    Challenge.TYPE: Challenge,
    Registered.TYPE: Registered,
    Presence.TYPE: Presence,
    ErrorMessage.TYPE: ErrorMessage,
    **CALL_MESSAGES,
}


def _parse(text: str | bytes, table: Mapping[str, type[Message]], limit: int) -> Message:
    obj = _decode(text, limit)
    kind = obj["type"]
    cls = table.get(kind)
    if cls is None:
        raise SignalingProtocolError(f"unknown message type {kind[:32]!r}")
    try:
        return cls.from_dict(obj)
    except (ValueError, TypeError) as exc:
        raise SignalingProtocolError(f"invalid {kind!r} message: {exc}") from exc


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse a frame a client sent (server side).

    A call message must not carry ``fingerprint`` (only the server asserts it),
    and an ``invite`` must name its ``peer``.

    Raises:
        SignalingProtocolError: anything malformed; the message names the field.
    """
    msg = _parse(text, CLIENT_MESSAGES, MAX_MESSAGE_SIZE)
    if isinstance(msg, CallMessage):
        if msg.fingerprint is not None:
            raise SignalingProtocolError("field 'fingerprint' is set by the server only")
        if isinstance(msg, Invite) and msg.peer is None:
            raise SignalingProtocolError("invalid 'invite' message: field 'peer' is missing")
    assert isinstance(msg, Register | CallMessage)
    return msg


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse a frame the server sent (client side).

    Relayed call messages must carry the sender's ``peer`` and ``fingerprint``.

    Raises:
        SignalingProtocolError: anything malformed; the message names the field.
    """
    msg = _parse(text, SERVER_MESSAGES, MAX_SERVER_MESSAGE_SIZE)
    if isinstance(msg, CallMessage) and (msg.peer is None or msg.fingerprint is None):
        raise SignalingProtocolError(
            f"invalid {msg.TYPE!r} message: fields 'peer' and 'fingerprint' are required"
        )
    assert isinstance(msg, Challenge | Registered | Presence | ErrorMessage | CallMessage)
    return msg
