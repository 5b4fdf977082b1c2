"""Helpers shared by the handshake tests: identities, pairs, transfer()."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qcall import pqc
from qcall.exceptions import IdentityChangedError, UnknownIdentityError
from qcall.handshake import (
    CalleeHandshake,
    CallerHandshake,
    HandshakeProtocol,
    QKDKey,
    QKDRoute,
)
from qcall.handshake.events import Event
from qcall.handshake.messages import Message

E = TypeVar("E", bound=Event)
M = TypeVar("M", bound=Message)

BACKEND = pqc.get_backend("cryptography")
ALICE_SEED = bytes(range(32))
BOB_SEED = bytes(range(32, 64))
ALICE = BACKEND.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, ALICE_SEED)
BOB = BACKEND.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, BOB_SEED)
ROUTE = QKDRoute("KME-Beijing", "SAE-alice", "SAE-bob")
NOW = 1_780_000_000.0  # a fixed "wall clock" for the manual clock
SDP_OFFER = "v=0\r\na=fingerprint:sha-256 AA:BB\r\n"
SDP_ANSWER = "v=0\r\na=fingerprint:sha-256 CC:DD\r\n"


class Pins:
    """A tiny contacts store: TOFU off, exact pins only."""

    def __init__(self, **pins: bytes) -> None:
        self.pins = dict(pins)
        self.calls: list[str] = []

    def __call__(self, name: str, public_key: bytes) -> None:
        self.calls.append(name)
        if name not in self.pins:
            raise UnknownIdentityError(f"{name!r} is not a contact")
        if self.pins[name] != public_key:
            raise IdentityChangedError(f"{name!r} presented a different identity key")


def new_qkd_key(size: int = 32) -> QKDKey:
    return QKDKey(str(uuid.uuid4()), os.urandom(size))


@dataclass
class Pair:
    caller: CallerHandshake
    callee: CalleeHandshake
    qkd: dict[str, bytes] = field(default_factory=dict)  # the callee's "KME"
    caller_events: list[Event] = field(default_factory=list)
    callee_events: list[Event] = field(default_factory=list)


def make_pair(
    policy: str = "hybrid",
    caller_kwargs: dict[str, Any] | None = None,
    callee_kwargs: dict[str, Any] | None = None,
) -> Pair:
    caller_args: dict[str, Any] = {
        "check_peer": Pins(bob=BOB.public_bytes()),
        "policy": policy,
        "qkd_route": ROUTE if policy in ("hybrid", "otp") else None,
        **(caller_kwargs or {}),
    }
    callee_args: dict[str, Any] = {
        "check_peer": Pins(alice=ALICE.public_bytes()),
        "policy": policy,
        **(callee_kwargs or {}),
    }
    caller = CallerHandshake(ALICE, "alice", "bob", **caller_args)
    callee = CalleeHandshake(BOB, "bob", **callee_args)
    return Pair(caller, callee)


def transfer(
    src: HandshakeProtocol,
    dst: HandshakeProtocol,
    now: float,
    mutate: Callable[[bytes], bytes] | None = None,
) -> int:
    """Deliver every queued message from src to dst; return how many."""
    messages = src.data_to_send()
    for data in messages:
        dst.receive_data(mutate(data) if mutate else data, now)
    return len(messages)


def drain(pair: Pair) -> None:
    pair.caller_events += pair.caller.events_received()
    pair.callee_events += pair.callee.events_received()


def serve_qkd(pair: Pair, *, wrong: bool = False) -> None:
    """Answer the callee's QKDKeysNeeded events from pair.qkd (the 'KME')."""
    from qcall.handshake import QKDKeysNeeded

    for event in pair.callee.events_received():
        pair.callee_events.append(event)
        if isinstance(event, QKDKeysNeeded):
            keys = []
            for key_id in event.key_ids:
                key = pair.qkd[key_id]
                if wrong:
                    key = bytes([key[0] ^ 1]) + key[1:]
                keys.append(QKDKey(key_id, key))
            pair.callee.receive_qkd_keys(keys)


def run_handshake(
    pair: Pair,
    now: float = NOW,
    *,
    exporter: bytes | None = None,
    qkd_size: int = 32,
    wrong_qkd: bool = False,
    mutate_answer: Callable[[bytes], bytes] | None = None,
) -> Pair:
    """Offer → answer → exporter → confirm, with the manual clock."""
    keys = []
    if pair.caller.policy in ("hybrid", "otp"):
        key = new_qkd_key(qkd_size)
        pair.qkd[key.key_id] = key.key
        keys.append(key)
    pair.caller.send_offer(SDP_OFFER, now, keys)
    transfer(pair.caller, pair.callee, now)
    serve_qkd(pair, wrong=wrong_qkd)
    if pair.callee.state.name == "CALLEE_EXPECT_ANSWER_SDP":
        pair.callee.send_answer(SDP_ANSWER, now)
    transfer(pair.callee, pair.caller, now, mutate_answer)
    drain(pair)
    exporter = exporter if exporter is not None else os.urandom(88)
    for side in (pair.caller, pair.callee):
        if side.state.name == "EXPECT_KEY_MATERIAL":
            side.receive_dtls_exporter(exporter)
    transfer(pair.caller, pair.callee, now)
    transfer(pair.callee, pair.caller, now)
    drain(pair)
    return pair


def events_of(events: Sequence[Event], cls: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, cls)]


def replace_message(msg: M, **changes: Any) -> M:
    """``dataclasses.replace`` for a message (each concrete message class is a dataclass)."""
    assert dataclasses.is_dataclass(msg)
    return dataclasses.replace(msg, **changes)


def resign(
    data: bytes, key: pqc.SigningKey, context: bytes, *prefix: bytes, **changes: Any
) -> bytes:
    """Re-sign a (modified) offer/answer with `key`: a misbehaving but authentic peer."""
    from qcall.handshake.keyschedule import transcript_hash
    from qcall.handshake.messages import parse_message
    from qcall.handshake.protocol import TRANSCRIPT_DOMAIN

    msg = replace_message(parse_message(data), signature=b"", **changes)
    running = transcript_hash(TRANSCRIPT_DOMAIN, *prefix, msg.signed_part())
    return replace_message(msg, signature=key.sign(running, context)).serialize()
