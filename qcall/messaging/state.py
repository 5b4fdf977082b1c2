"""The state of one 1:1 session, and its byte encoding (``docs/messaging.md`` §5.1, §10).

:class:`SessionState` is everything a session must remember between two
messages; :class:`~qcall.messaging.ratchet.Session` changes it. The client store
keeps it encrypted (AES-256-GCM under the store key) and replaces it in the
same transaction as the message it was advanced for. :meth:`SessionState.parse`
checks every field, so a corrupt state is a clear
:class:`~qcall.exceptions.MessageFormatError`, never a wrong key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qcall import pqc
from qcall.messaging.keyschedule import CHAIN_KEY_LEN, MESSAGE_KEY_LEN, SESSION_ID_LEN
from qcall.messaging.messages import Mode, QKDRef
from qcall.messaging.prekeys import check_name, parse_identity_key
from qcall.messaging.wire import Reader, Writer

__all__ = ["PARTS_VERSION", "STATE_VERSION", "Chain", "Role", "SessionState", "SkippedKey"]

#: Version octet of an encoded session state.
STATE_VERSION = 1
#: Version octet of each of the two parts a store keeps apart (docs/messaging.md §10.4).
PARTS_VERSION = 2

_KEM = pqc.KEM.ML_KEM_768
_SEED = _KEM.sizes.seed
_EK = _KEM.sizes.encapsulation_key
_CT = _KEM.sizes.ciphertext
_MAX_PK = max(s.sizes.public_key for s in pqc.SignatureScheme)
#: Bounds on the lists of a state (far above any limit a session applies).
_MAX_CHAINS = 1024
_MAX_SKIPPED = 1_000_000
_MAX_INIT = 16 * 1024


class Role(enum.IntEnum):
    """Who set the session up: the initiator's epochs are odd, the responder's even."""

    INITIATOR = 1
    RESPONDER = 2


@dataclass
class Chain:
    """A symmetric chain: its key for message ``next_index`` (secret)."""

    key: bytes
    next_index: int = 0

    def __repr__(self) -> str:
        return f"<Chain next={self.next_index}>"


@dataclass(frozen=True)
class SkippedKey:
    """A message key kept for a message not yet received (secret), and when it was kept."""

    material: bytes
    stored_ms: int

    def __repr__(self) -> str:
        return f"<SkippedKey stored={self.stored_ms}>"


@dataclass(repr=False)
class SessionState:
    """All a session remembers (``docs/messaging.md`` §5.1). Secret: never printed.

    Epochs alternate between the two parties; ``epoch`` is the newest one either
    side opened, ``send_epoch``/``recv_epoch`` the newest each side opened.
    """

    session_id: bytes
    role: Role
    mode: Mode
    own_name: str
    peer_name: str
    peer_identity: bytes
    created_ms: int
    root_key: bytes
    epoch: int = 0
    # --- sending side: our newest epoch, its KEM key pair and chain
    send_epoch: int = 0
    send_kem_seed: bytes = b""  # d ‖ z of the ratchet key we advertise (FIPS 203 §7.1)
    send_ek: bytes = b""
    send_ct: bytes = b""
    send_epoch_qkd: QKDRef | None = None
    send_generation: int = 0
    send_generation_qkd: QKDRef | None = None
    send_chain: Chain | None = None
    send_generation_seed: bytes = b""
    send_prev_generation: int = 0
    send_prev_length: int = 0
    # --- receiving side: the peer's newest epoch and its open chains by generation
    recv_epoch: int = 0
    peer_ek: bytes = b""
    recv_generation_seed: bytes = b""
    recv_chains: dict[int, Chain] = field(default_factory=dict)
    recv_generations_seen: set[int] = field(default_factory=set)
    skipped: dict[tuple[int, int, int], SkippedKey] = field(default_factory=dict)
    # --- set-up: the prekey message header, resent until the peer answers
    pending_init: bytes = b""
    # --- QKD policy counters (docs/messaging.md §5.5)
    sent_since_qkd: int = 0
    last_qkd_ms: int = 0

    def __repr__(self) -> str:
        return (
            f"<SessionState {self.session_id.hex()[:8]} {self.own_name}↔{self.peer_name} "
            f"{self.mode.value} epoch={self.epoch}>"
        )

    # --- encoding ---------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The encoding kept (encrypted) by the client store (``docs/messaging.md`` §10)."""
        w = _write_head(STATE_VERSION, self)
        _write_send_chain(w, self)
        w.u32(self.recv_epoch).var16(self.peer_ek).var8(self.recv_generation_seed)
        _write_chains(w, self)
        w.var32(self.pending_init).u32(self.sent_since_qkd).u64(self.last_qkd_ms)
        return w.bytes()

    # --- the two parts a store keeps apart (docs/messaging.md §10.4) ------------------

    def epoch_fields(self) -> tuple[object, ...]:
        """The fields of the epoch part, to tell whether it changed since it was written."""
        return (
            self.session_id, self.role, self.mode, self.own_name, self.peer_name,
            self.peer_identity, self.created_ms, self.root_key, self.epoch, self.send_epoch,
            self.send_kem_seed, self.send_ek, self.send_ct, self.send_epoch_qkd,
            self.recv_epoch, self.peer_ek, self.pending_init,
        )  # fmt: skip

    def serialize_epoch(self) -> bytes:
        """The epoch part: identities, root key and the ML-KEM ratchet state (§10.4)."""
        w = _write_head(PARTS_VERSION, self)
        w.u32(self.recv_epoch).var16(self.peer_ek).var32(self.pending_init)
        return w.bytes()

    def serialize_chains(self) -> bytes:
        """The chain part: symmetric chains, skipped keys and counters (§10.4)."""
        w = Writer().u8(PARTS_VERSION)
        _write_send_chain(w, self)
        w.var8(self.recv_generation_seed)
        _write_chains(w, self)
        w.u32(self.sent_since_qkd).u64(self.last_qkd_ms)
        return w.bytes()

    @classmethod
    def parse_parts(cls, epoch: bytes, chains: bytes) -> SessionState:
        """Decode a state from its two parts (a :class:`MessageFormatError` names the field)."""
        r = Reader(epoch, "session state (epoch part)")
        r.choice("version", [PARTS_VERSION])
        state = _read_head(cls, r)
        _read_send_keys(r, state)
        state.recv_epoch = r.u32("recv_epoch")
        state.peer_ek = _sized(r, r.var16("peer_ek", _EK), "peer_ek", _EK)
        state.pending_init = r.var32("pending_init", _MAX_INIT)
        r.end()
        r = Reader(chains, "session state (chain part)")
        r.choice("version", [PARTS_VERSION])
        _read_send_chain(r, state)
        seed = r.var8("recv_generation_seed")
        state.recv_generation_seed = _sized(r, seed, "recv_generation_seed", CHAIN_KEY_LEN)
        _read_chains(r, state)
        state.sent_since_qkd = r.u32("sent_since_qkd")
        state.last_qkd_ms = r.u64("last_qkd_ms")
        r.end()
        return state

    @classmethod
    def parse(cls, data: bytes) -> SessionState:
        """Decode a state (a :class:`MessageFormatError` names the field at fault)."""
        r = Reader(data, "session state")
        r.choice("version", [STATE_VERSION])
        state = _read_head(cls, r)
        _read_send_keys(r, state)
        _read_send_chain(r, state)
        state.recv_epoch = r.u32("recv_epoch")
        state.peer_ek = _sized(r, r.var16("peer_ek", _EK), "peer_ek", _EK)
        seed = r.var8("recv_generation_seed")
        state.recv_generation_seed = _sized(r, seed, "recv_generation_seed", CHAIN_KEY_LEN)
        _read_chains(r, state)
        state.pending_init = r.var32("pending_init", _MAX_INIT)
        state.sent_since_qkd = r.u32("sent_since_qkd")
        state.last_qkd_ms = r.u64("last_qkd_ms")
        r.end()
        return state


def _read_head(cls: type[SessionState], r: Reader) -> SessionState:
    sid = r.raw(SESSION_ID_LEN, "session_id")
    role = Role(r.choice("role", [1, 2]))
    mode = Mode.from_octet(r.choice("mode", [1, 2]))
    own = check_name(r.text8("own_name"), "session state: field 'own_name'")
    peer = check_name(r.text8("peer_name"), "session state: field 'peer_name'")
    peer_identity = r.var16("peer_identity", _MAX_PK)
    parse_identity_key(peer_identity, "session state: field 'peer_identity'")
    return cls(
        sid,
        role,
        mode,
        own,
        peer,
        peer_identity,
        r.u64("created_ms"),
        r.raw(CHAIN_KEY_LEN, "root_key"),
        r.u32("epoch"),
    )


def _write_head(version: int, s: SessionState) -> Writer:
    """Version, identities, root key and our epoch's keys (both encodings)."""
    w = Writer().u8(version).raw(s.session_id).u8(s.role).u8(s.mode.octet)
    w.text8(s.own_name).text8(s.peer_name).var16(s.peer_identity)
    w.u64(s.created_ms).raw(s.root_key).u32(s.epoch)
    w.u32(s.send_epoch).var8(s.send_kem_seed).var16(s.send_ek).var16(s.send_ct)
    return w.raw(QKDRef.encode(s.send_epoch_qkd))


def _read_send_keys(r: Reader, state: SessionState) -> None:
    state.send_epoch = r.u32("send_epoch")
    state.send_kem_seed = _sized(r, r.var8("send_kem_seed"), "send_kem_seed", _SEED)
    state.send_ek = _sized(r, r.var16("send_ek", _EK), "send_ek", _EK)
    state.send_ct = _sized(r, r.var16("send_ct", _CT), "send_ct", _CT)
    state.send_epoch_qkd = QKDRef.read(r, "send_epoch_qkd")


def _write_send_chain(w: Writer, s: SessionState) -> None:
    """The sending generation and chain (both encodings)."""
    w.u32(s.send_generation).raw(QKDRef.encode(s.send_generation_qkd))
    if s.send_chain is None:
        w.u8(0)
    else:
        w.u8(1).raw(s.send_chain.key).u32(s.send_chain.next_index)
    w.var8(s.send_generation_seed).u32(s.send_prev_generation).u32(s.send_prev_length)


def _read_send_chain(r: Reader, state: SessionState) -> None:
    state.send_generation = r.u32("send_generation")
    state.send_generation_qkd = QKDRef.read(r, "send_generation_qkd")
    if r.flag("send_chain"):
        state.send_chain = Chain(r.raw(CHAIN_KEY_LEN, "send_chain"), r.u32("send_chain"))
    seed = r.var8("send_generation_seed")
    state.send_generation_seed = _sized(r, seed, "send_generation_seed", CHAIN_KEY_LEN)
    state.send_prev_generation = r.u32("send_prev_generation")
    state.send_prev_length = r.u32("send_prev_length")


def _write_chains(w: Writer, state: SessionState) -> None:
    """The receiving chains, generations seen and skipped keys (both encodings)."""
    w.u16(len(state.recv_chains))
    for generation in sorted(state.recv_chains):
        chain = state.recv_chains[generation]
        w.u32(generation).raw(chain.key).u32(chain.next_index)
    w.u16(len(state.recv_generations_seen))
    for generation in sorted(state.recv_generations_seen):
        w.u32(generation)
    w.u32(len(state.skipped))
    for (epoch, generation, index), skipped in state.skipped.items():
        w.u32(epoch).u32(generation).u32(index).raw(skipped.material).u64(skipped.stored_ms)


def _read_chains(r: Reader, state: SessionState) -> None:
    for _ in range(_count(r, r.u16("recv_chains"), _MAX_CHAINS, "recv_chains")):
        generation = r.u32("recv_chains.generation")
        state.recv_chains[generation] = Chain(
            r.raw(CHAIN_KEY_LEN, "recv_chains.key"), r.u32("recv_chains.next_index")
        )
    for _ in range(_count(r, r.u16("recv_generations_seen"), _MAX_CHAINS, "generations")):
        state.recv_generations_seen.add(r.u32("recv_generations_seen"))
    for _ in range(_count(r, r.u32("skipped"), _MAX_SKIPPED, "skipped")):
        key = (r.u32("skipped.epoch"), r.u32("skipped.generation"), r.u32("skipped.index"))
        state.skipped[key] = SkippedKey(
            r.raw(MESSAGE_KEY_LEN, "skipped.key"), r.u64("skipped.stored_ms")
        )


def _sized(r: Reader, value: bytes, name: str, size: int) -> bytes:
    if value and len(value) != size:
        raise r.error(name, f"must be empty or {size} bytes")
    return value


def _count(r: Reader, n: int, limit: int, name: str) -> int:
    if n > limit:
        raise r.error(name, f"holds more than {limit} entries")
    return n
