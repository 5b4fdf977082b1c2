"""A malicious signaling server: the real protocol, but it rewrites what it relays.

:class:`MaliciousProtocol` is the real :class:`~qcall.signaling.protocol.SignalingProtocol`
(registration, presence, call state rules: clients cannot tell it apart) whose
relayed ``offer`` / ``answer`` payloads go through rewrite functions first.
:class:`MaliciousSignalingServer` runs it in the real websockets shell
(:class:`signaling.server.SignalingServer`), so phones talk to it over a real
WebSocket exactly as to an honest server.

A rewrite gets the handshake message bytes (the base64-decoded payload,
``docs/handshake.md`` §3) and the call's :class:`Relayed` record, and returns
new bytes (or ``None`` to pass the message through). The helpers below build
the attacks of ``docs/threat-model.md``: swap one signed field and keep the
signature, re-sign with the server's own ML-DSA identity, replay a recorded
offer, send garbage.

Each side also sends its SDP ahead of its signed message: the caller's rides the
``invite`` and the callee's the ``accept`` (payload ``qcall-sdp:`` + SDP), or in
the earlier flow an ``ice`` message (docs/calls.md). While a rewrite is active the
server drops those, as a man in the middle that keeps its story consistent
would (an invite or accept loses its payload): the callee then works from the
signed offer's SDP, the caller from the signed answer's. ``rewrite_sdp_ahead``
tampers with them instead. (Payloads that are not base64 handshake messages —
``plain-sdp:`` — pass untouched.)
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qcall import pqc
from qcall.handshake.keyschedule import Transcript
from qcall.handshake.messages import Answer, Offer, parse_message
from qcall.handshake.protocol import ANSWER_CONTEXT, OFFER_CONTEXT, TRANSCRIPT_DOMAIN
from qcall.signaling.messages import (
    Accept as AcceptMessage,
    Answer as AnswerMessage,
    ICECandidate as IceMessage,
    Invite as InviteMessage,
    Offer as OfferMessage,
)
from qcall.signaling.protocol import ConnectionId, Output, SignalingProtocol
from signaling.server import SignalingServer

__all__ = [
    "MaliciousProtocol",
    "MaliciousSignalingServer",
    "Recorder",
    "Relayed",
    "Rewrite",
    "replace_fields",
    "resign_answer",
    "resign_offer",
    "set_field",
]


@dataclass
class Relayed:
    """What the server saw of one call: the original handshake messages, as sent."""

    call_id: str
    offer: bytes | None = None
    answer: bytes | None = None


SDP_AHEAD = "qcall-sdp:"

#: ``rewrite(data, relayed) -> new data | None`` for one handshake message; a
#: ``str`` result is sent as the payload itself (e.g. text that is not base64).
Rewrite = Callable[[bytes, Relayed], bytes | str | None]


class MaliciousProtocol(SignalingProtocol):
    """The real signaling protocol, with ``offer``/``answer`` payloads rewritten.

    Attributes:
        rewrite_offer: applied to every relayed offer (``None``: relay verbatim).
        rewrite_answer: applied to every relayed answer.
        rewrite_sdp_ahead: applied to every SDP sent ahead (``None``: relay them
            verbatim, unless an offer/answer rewrite is active: then drop them).
        relayed: every call seen, by ``call_id``, with the original payloads.
        rewritten: how many payloads were changed.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rewrite_offer: Rewrite | None = None
        self.rewrite_answer: Rewrite | None = None
        self.rewrite_sdp_ahead: Callable[[str], str] | None = None
        self.relayed: dict[str, Relayed] = {}
        self.rewritten = 0

    def honest(self) -> None:
        """Stop attacking: relay everything verbatim from now on."""
        self.rewrite_offer = self.rewrite_answer = None
        self.rewrite_sdp_ahead = None

    def receive(self, connection: ConnectionId, text: str | bytes, now: float) -> list[Output]:
        outputs = [self._tamper(output) for output in super().receive(connection, text, now)]
        return [output for output in outputs if output is not None]

    def _tamper(self, output: Output) -> Output | None:
        target, msg = output
        ahead = IceMessage | InviteMessage | AcceptMessage
        if isinstance(msg, ahead) and msg.payload is not None and msg.payload.startswith(SDP_AHEAD):
            if self.rewrite_sdp_ahead is not None:
                self.rewritten += 1
                sdp = self.rewrite_sdp_ahead(msg.payload[len(SDP_AHEAD) :])
                return target, dataclasses.replace(msg, payload=SDP_AHEAD + sdp)
            if self.rewrite_offer is not None or self.rewrite_answer is not None:
                # dropped (an invite or accept: its SDP only): the peer falls back on
                # the signed SDP
                if isinstance(msg, IceMessage):
                    return None
                return target, dataclasses.replace(msg, payload=None)
            return output
        kinds = OfferMessage | AnswerMessage | InviteMessage | AcceptMessage
        if not isinstance(msg, kinds) or msg.payload is None or msg.payload.startswith("plain"):
            return output
        relayed = self.relayed.setdefault(msg.call_id, Relayed(msg.call_id))
        data = base64.b64decode(msg.payload)
        if isinstance(msg, OfferMessage | InviteMessage):
            relayed.offer = data
            rewrite = self.rewrite_offer
        else:
            relayed.answer = data
            rewrite = self.rewrite_answer
        new = rewrite(data, relayed) if rewrite is not None else None
        if new is None:
            return output
        self.rewritten += 1
        payload = new if isinstance(new, str) else base64.b64encode(new).decode("ascii")
        return target, dataclasses.replace(msg, payload=payload)


class MaliciousSignalingServer(SignalingServer):
    """:class:`SignalingServer` running a :class:`MaliciousProtocol`."""

    protocol: MaliciousProtocol

    def __init__(self) -> None:
        super().__init__(protocol=MaliciousProtocol())


# --- rewrites ------------------------------------------------------------------------------


def replace_fields(**changes: Any) -> Rewrite:
    """Change fields of the offer/answer and keep its (now wrong) signature.

    A value may be a callable taking the old value. Fields that do not exist in
    the message are ignored, so one rewrite can serve both directions.
    """

    def rewrite(data: bytes, relayed: Relayed) -> bytes:
        msg = parse_message(data)
        names = {f.name for f in dataclasses.fields(msg)}  # type: ignore[arg-type]
        new = {
            k: (v(getattr(msg, k)) if callable(v) else v) for k, v in changes.items() if k in names
        }
        return dataclasses.replace(msg, **new).serialize()  # type: ignore[type-var]

    return rewrite


def _signer(key: pqc.SigningKey) -> dict[str, Any]:
    return {"sig_alg": key.algorithm.value, "public_key": key.public_bytes()}


def resign_offer(key: pqc.SigningKey, **changes: Any) -> Rewrite:
    """Change offer fields, put in the server's own public key and sign it properly.

    The offer verifies under the key it carries: only the callee's pinned
    contact (``check_peer``) can tell it is not the caller's identity.
    """

    def rewrite(data: bytes, relayed: Relayed) -> bytes:
        offer = parse_message(data)
        assert isinstance(offer, Offer)
        new = {k: (v(getattr(offer, k)) if callable(v) else v) for k, v in changes.items()}
        forged = dataclasses.replace(offer, **_signer(key), **new)
        body = forged.signed_part()
        signature = key.sign(Transcript(TRANSCRIPT_DOMAIN).hash_with(body), OFFER_CONTEXT)
        return forged.with_signature(body, signature)

    return rewrite


def resign_answer(key: pqc.SigningKey, **changes: Any) -> Rewrite:
    """Change answer fields, put in the server's own key, sign over the caller's offer."""

    def rewrite(data: bytes, relayed: Relayed) -> bytes:
        answer = parse_message(data)
        assert isinstance(answer, Answer) and relayed.offer is not None
        new = {k: (v(getattr(answer, k)) if callable(v) else v) for k, v in changes.items()}
        forged = dataclasses.replace(answer, **_signer(key), **new)
        body = forged.signed_part()
        running = Transcript(TRANSCRIPT_DOMAIN).add(relayed.offer).hash_with(body)
        return forged.with_signature(body, key.sign(running, ANSWER_CONTEXT))

    return rewrite


@dataclass
class Recorder:
    """Records offers as relayed; :meth:`replay` substitutes an old one later."""

    offers: list[bytes] = field(default_factory=list)

    def record(self, data: bytes, relayed: Relayed) -> None:
        self.offers.append(data)
        return None

    def replay(self, data: bytes, relayed: Relayed) -> bytes:
        return self.offers[0]


def set_field(tag: int, value: bytes) -> Rewrite:
    """Put raw ``value`` into TLV field ``tag``, bypassing every check of the encoder.

    For oversized or malformed fields that :meth:`Message.serialize` would refuse
    to produce (``docs/handshake.md`` §3.1 framing: u8 tag, u16 length, value).
    """

    def rewrite(data: bytes, relayed: Relayed) -> bytes:
        out = bytearray(data[:6])
        i = 6
        while i < len(data):
            t, n = data[i], int.from_bytes(data[i + 1 : i + 3], "big")
            v = value if t == tag else data[i + 3 : i + 3 + n]
            out += bytes([t]) + len(v).to_bytes(2, "big") + v
            i += 3 + n
        return bytes(out)

    return rewrite
