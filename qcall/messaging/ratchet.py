"""The double ratchet of a 1:1 session: symmetric chains, ML-KEM epochs, QKD generations.

:class:`Session` is Sans-I/O: no clock (``now`` is an argument), no KME (the
shell fetches QKD keys and passes them in), no storage (the shell persists
:attr:`Session.state` after every call that changed it). ``docs/messaging.md``
§4-§6 specify it::

    alice (initiator, odd epochs)                   bob (responder, even epochs)
    epoch 1: RK_0 from the set-up, ek_1  ── m1 ──▶  opens epoch 1 (no KEM: set-up did it)
                                         ◀── m2 ──  epoch 2: Encaps(ek_1) → SS_2, new ek_2
    opens epoch 2: Decaps(dk_1, ct_2)
    epoch 3: Encaps(ek_2), new ek_3      ── m3 ──▶  opens epoch 3: Decaps(dk_2, ct_3)

A *full* message (the first of a chain, every ``full_every``-th after it, and
every message until the peer answered) repeats the epoch's ``ek`` and ``ct``, so
any one of them opens it; the others are *short* (§7.4: 2,272 bytes less) and
open only once their epoch is open (:class:`EpochNotOpenError` before: the
shell keeps them for later, so loss and reordering stay harmless). Within an
epoch the sender may start a new *generation* carrying a fresh QKD key (policy:
every N messages or T seconds, :class:`QKDPolicy`); generations derive from the
epoch's seed, not from each other, so a receiver can open them in any order.

Error policy: input from the peer never changes the state unless the message
authenticates. :meth:`Session.decrypt` either returns the plaintext and advances
the state, or raises a :class:`~qcall.exceptions.MessagingError` subclass
(``MessageAuthError``, ``ReplayedMessageError``, ``SkippedMessagesError``,
``UnknownSessionError``, ``MessageFormatError``) and changes nothing: the shell
shows the error and the session goes on. Misuse by the shell (a missing QKD key
it was told about) raises :class:`~qcall.exceptions.QKDError` or ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from qcall import pqc
from qcall.exceptions import (
    EpochNotOpenError,
    KeyNotFoundError,
    MessageAuthError,
    QKDKeyMismatchError,
    ReplayedMessageError,
    SkippedMessagesError,
    UnknownSessionError,
)
from qcall.messaging.keyschedule import (
    EpochSecrets,
    MessageKey,
    chain_step,
    epoch_hash,
    epoch_secrets,
    generation_chain,
    generation_hash,
)
from qcall.messaging.messages import (
    Mode,
    PrekeyMessage,
    QKDRef,
    RatchetMessage,
    ratchet_header,
)
from qcall.messaging.state import Chain, Role, SessionState, SkippedKey

__all__ = ["QKDMaterial", "QKDPolicy", "RatchetLimits", "Session"]

logger = logging.getLogger("qcall.messaging")

KEM = pqc.KEM.ML_KEM_768


@dataclass(frozen=True)
class QKDPolicy:
    """When a sender mixes a fresh QKD key into its chain (``docs/messaging.md`` §5.5).

    A key is due once ``every_messages`` messages were sent since the last one,
    or ``every_seconds`` passed; the shell then fetches ``key_size`` bytes with
    ETSI 014 ``enc_keys`` and passes them to :meth:`Session.encrypt`.
    """

    every_messages: int = 64
    every_seconds: float = 600.0
    key_size: int = 32

    def __post_init__(self) -> None:
        if self.every_messages < 1 or not self.every_seconds > 0:
            raise ValueError("QKD policy: every_messages and every_seconds must be positive")
        if not 16 <= self.key_size <= 1024:
            raise ValueError("QKD policy: key_size must be 16..1024 bytes")


@dataclass(frozen=True)
class RatchetLimits:
    """Bounds on what a peer can make a session keep (``docs/messaging.md`` §6.2)."""

    max_skip: int = 1000  # message keys derived past the next one for one message
    max_skipped_keys: int = 2000  # skipped keys kept in all (oldest dropped first)
    skipped_key_lifetime: float = 14 * 86400.0  # seconds a skipped key is kept
    max_open_generations: int = 8  # receiving chains kept open in one epoch
    #: Sending: a message whose index in its chain is a multiple of this (and every
    #: prekey message) carries the epoch's ek/ct in full (type 2); the others are short
    #: (type 5, docs/messaging.md §7.4). 1: every message in full.
    full_every: int = 16

    def __post_init__(self) -> None:
        if self.full_every < 1:
            raise ValueError("ratchet limits: full_every must be at least 1")


@dataclass(frozen=True, repr=False)
class QKDMaterial:
    """A QKD key and where it came from (secret: the key never appears in ``repr``)."""

    ref: QKDRef
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != self.ref.size:
            raise QKDKeyMismatchError(
                f"QKD key {self.ref.key_id} is {len(self.key)} bytes, announced {self.ref.size}"
            )

    def __repr__(self) -> str:
        return f"<QKDMaterial {self.ref}>"


def _not_authentic(epoch: int, generation: int, index: int, peer: str) -> MessageAuthError:
    """The error of a message whose AEAD tag does not verify (both decrypt paths)."""
    return MessageAuthError(
        f"message #{index} (epoch {epoch}, generation {generation}) from {peer} does not "
        "authenticate: tampered ciphertext or header, or a forged message"
    )


def _ms(now: float) -> int:
    return max(0, int(now * 1000))


class Session:
    """One 1:1 session: encrypt and decrypt under the double ratchet.

    Create it with :func:`qcall.messaging.session.initiate` or
    :func:`~qcall.messaging.session.respond`, or from a stored state.

    Args:
        state: the session state (changed in place by successful calls).
        backend: ML-KEM backend (default :func:`qcall.pqc.get_backend`).
        random: randomness for ML-KEM seeds (default :func:`secrets.token_bytes`).
        limits: skipped-key bounds.
        policy: the QKD policy of this sender.
    """

    def __init__(
        self,
        state: SessionState,
        *,
        backend: pqc.Backend | None = None,
        random: Callable[[int], bytes] = secrets.token_bytes,
        limits: RatchetLimits | None = None,
        policy: QKDPolicy | None = None,
    ) -> None:
        self.state = state
        self.backend = backend or pqc.get_backend()
        self.random = random
        self.limits = limits or RatchetLimits()
        self.policy = policy or QKDPolicy()
        self._init: PrekeyMessage | None = None
        self.debug = logger.isEnabledFor(logging.DEBUG)

    # --- observers ------------------------------------------------------------------------

    @property
    def session_id(self) -> bytes:
        return self.state.session_id

    @property
    def mode(self) -> Mode:
        """``hybrid`` (QKD + ML-KEM) or ``pqc`` (ML-KEM only), fixed at set-up and shown."""
        return self.state.mode

    @property
    def peer(self) -> str:
        return self.state.peer_name

    @property
    def acknowledged(self) -> bool:
        """Whether the peer has answered (no more prekey messages are sent)."""
        return not self.state.pending_init

    def qkd_due(self, now: float) -> bool:
        """Whether the next :meth:`encrypt` should carry a fresh QKD key (policy)."""
        s = self.state
        return (
            s.sent_since_qkd >= self.policy.every_messages
            or _ms(now) - s.last_qkd_ms >= self.policy.every_seconds * 1000
        )

    def qkd_refs_needed(self, message: RatchetMessage) -> list[QKDRef]:
        """The QKD keys :meth:`decrypt` will need for ``message`` (fetch with ``dec_keys``).

        Empty when the message's chain is already open (or the message is unusable:
        :meth:`decrypt` then says why).
        """
        s = self.state
        n = message.epoch
        if n == s.recv_epoch:
            if message.generation in s.recv_generations_seen:
                return []  # the common case: its chain is open (or closed: decrypt says so)
            refs = [message.generation_qkd]
        elif n > s.recv_epoch and n == s.epoch + 1 and not message.compact:
            refs = [message.epoch_qkd, message.generation_qkd]
        else:
            return []
        return [ref for ref in refs if ref is not None]

    # --- sending ------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, now: float, qkd: QKDMaterial | None = None) -> bytes:
        """Encrypt one message; returns its wire bytes (a prekey message until acknowledged).

        Starts a new epoch (fresh ML-KEM encapsulation and key pair) when the peer
        opened one since our last message; with ``qkd`` the key enters that epoch,
        or else a new generation of the current chain.

        After calling this method: persist :attr:`state` *before* sending the
        bytes, so that a crash can never make the same message key encrypt twice.
        """
        s = self.state
        if s.send_chain is None or s.send_epoch < s.epoch:
            self._start_epoch(now, qkd)
        elif qkd is not None:
            self._start_generation(now, qkd)
        chain = s.send_chain
        assert chain is not None
        mk, next_key = chain_step(chain.key)
        # §7.4: the first message of a chain and every full_every-th carry ek/ct in full.
        compact = not s.pending_init and chain.next_index % self.limits.full_every != 0
        header = ratchet_header(
            s.session_id, s.send_epoch, s.send_generation, chain.next_index,
            s.send_prev_generation, s.send_prev_length, s.send_generation_qkd,
            None if compact else (s.send_ek, s.send_ct, s.send_epoch_qkd),
        )  # fmt: skip
        sealed = pqc.aead_seal_once(mk.key, mk.nonce, plaintext, header)
        s.send_chain = Chain(next_key, chain.next_index + 1)
        s.sent_since_qkd += 1
        data = RatchetMessage.encode(header, sealed)
        if self.debug:
            logger.debug("> %r", RatchetMessage.parse(data))
        if s.pending_init:
            if self._init is None:
                self._init = PrekeyMessage.parse(s.pending_init)
            return dataclasses.replace(self._init, inner=data).serialize()
        return data

    def _start_epoch(self, now: float, qkd: QKDMaterial | None) -> None:
        s = self.state
        if not s.peer_ek:
            raise UnknownSessionError(f"session with {s.peer_name} has no peer ratchet key yet")
        n = s.epoch + 1
        ss, ct = self.backend.kem_encapsulate(KEM, s.peer_ek)  # FIPS 203 §7.2
        seed = self.random(KEM.sizes.seed)
        ek = self.backend.kem_from_seed(KEM, seed).public_bytes()
        ref = qkd.ref if qkd else None
        eh = epoch_hash(s.session_id, n, ek, ct, QKDRef.encode(ref))
        es = epoch_secrets(s.root_key, eh, qkd.key if qkd else b"", ss)
        prev_generation, prev_length = (
            s.send_generation,
            (s.send_chain.next_index if s.send_chain else 0),
        )
        s.root_key, s.epoch, s.send_epoch = es.root_key, n, n
        s.send_kem_seed, s.send_ek, s.send_ct, s.send_epoch_qkd = seed, ek, ct, ref
        s.send_generation, s.send_generation_qkd = 0, None
        s.send_chain = Chain(es.chain_key)
        s.send_generation_seed = es.generation_seed
        s.send_prev_generation, s.send_prev_length = prev_generation, prev_length
        if qkd is not None:
            s.sent_since_qkd, s.last_qkd_ms = 0, _ms(now)
        if self.debug:
            logger.debug("= %s: epoch %d started%s", s.peer_name, n, f", QKD {ref}" if ref else "")

    def _start_generation(self, now: float, qkd: QKDMaterial) -> None:
        s = self.state
        assert s.send_chain is not None
        g = s.send_generation + 1
        gh = generation_hash(s.session_id, s.send_epoch, g, qkd.ref.serialize())
        chain_key = generation_chain(s.send_generation_seed, gh, qkd.key)
        s.send_prev_generation, s.send_prev_length = s.send_generation, s.send_chain.next_index
        s.send_generation, s.send_generation_qkd = g, qkd.ref
        s.send_chain = Chain(chain_key)
        s.sent_since_qkd, s.last_qkd_ms = 0, _ms(now)
        if self.debug:
            logger.debug(
                "= %s: epoch %d generation %d, QKD %s", s.peer_name, s.send_epoch, g, qkd.ref
            )

    # --- receiving ------------------------------------------------------------------------

    def decrypt(
        self,
        message: RatchetMessage,
        now: float,
        qkd_keys: Mapping[str, bytes] | None = None,
    ) -> bytes:
        """Decrypt one message; the state advances only if it authenticates.

        Args:
            message: the parsed message (:meth:`RatchetMessage.parse`).
            now: the current time (seconds; the same clock as :meth:`encrypt`).
            qkd_keys: key bytes by key_ID for :meth:`qkd_refs_needed`.

        Raises:
            UnknownSessionError: the message belongs to another session.
            ReplayedMessageError: its key was used already (a replay or a duplicate).
            SkippedMessagesError: too far ahead, or its skipped key expired.
            EpochNotOpenError: a short message of the peer's next epoch, which only a
                full message opens (keep it and try again after the next message).
            MessageAuthError: tampered ciphertext or header, or a forged epoch.
            KeyNotFoundError: a needed QKD key was not passed in.

        After calling this method: persist :attr:`state` in the same transaction as
        the plaintext, then acknowledge the message.
        """
        s = self.state
        if message.session_id != s.session_id:
            raise UnknownSessionError(
                f"message for another session ({message.session_id.hex()[:8]})"
            )
        n, g, i = message.epoch, message.generation, message.index
        chain = s.recv_chains.get(g) if n == s.recv_epoch and n > 0 else None
        if (
            chain is not None
            and i == chain.next_index
            and (n, g, i) not in s.skipped
            and self.limits.max_skip >= 0
        ):
            # The common case: the next message of an open chain. The same steps and
            # result as the general path below (no skipped key, no chain opened or closed,
            # no key kept), without building its plan.
            key_i, key = chain_step(chain.key)
            plaintext = pqc.aead_open_once(
                key_i.key, key_i.nonce, message.ciphertext, message.header()
            )
            if plaintext is None:
                raise _not_authentic(n, g, i, s.peer_name)
            s.recv_chains[g] = Chain(key, i + 1)
            self._prune()
            if self.debug:
                logger.debug("< %r", message)
            return plaintext
        plan = _Plan(_ms(now))
        mk = self._skipped_key(message, plan)
        if mk is None:
            chain = self._receiving_chain(message, plan, qkd_keys or {})
            mk = self._advance(chain, (n, g), i, plan)
        plaintext = pqc.aead_open_once(mk.key, mk.nonce, message.ciphertext, message.header())
        if plaintext is None:
            raise _not_authentic(n, g, i, s.peer_name)
        self._commit(plan)
        if self.debug:
            logger.debug("< %r", message)
        return plaintext

    def _skipped_key(self, message: RatchetMessage, plan: _Plan) -> MessageKey | None:
        key = (message.epoch, message.generation, message.index)
        skipped = self.state.skipped.get(key)
        if skipped is None:
            return None
        if plan.now_ms - skipped.stored_ms > self.limits.skipped_key_lifetime * 1000:
            raise SkippedMessagesError(
                f"message #{message.index} (epoch {message.epoch}) from {self.state.peer_name} "
                "arrived after its skipped key expired"
            )
        plan.used_skipped = key
        return MessageKey.from_bytes(skipped.material)

    def _receiving_chain(
        self, message: RatchetMessage, plan: _Plan, qkd_keys: Mapping[str, bytes]
    ) -> Chain:
        """The chain of ``message`` (opening its epoch or generation in ``plan`` if new)."""
        s = self.state
        n, g = message.chain
        what = f"message #{message.index} (epoch {n}, generation {g}) from {s.peer_name}"
        if n == s.recv_epoch and n > 0:
            chain = s.recv_chains.get(g)
            if chain is not None:
                if message.index < chain.next_index:
                    raise ReplayedMessageError(f"{what} was already received (replay or duplicate)")
                return Chain(chain.key, chain.next_index)
            if g in s.recv_generations_seen:
                raise ReplayedMessageError(
                    f"{what}: its chain is closed (already received, or dropped)"
                )
            plan.close = (n, message.prev_generation, message.prev_length) if g > 0 else None
            assert message.generation_qkd is not None
            gh = generation_hash(s.session_id, n, g, message.generation_qkd.serialize())
            k = _qkd_key(message.generation_qkd, qkd_keys)
            plan.new_generation = g
            return Chain(generation_chain(s.recv_generation_seed, gh, k))
        peer_parity = 0 if s.role is Role.INITIATOR else 1
        if n < s.recv_epoch or (n <= s.epoch and n % 2 == peer_parity):
            raise ReplayedMessageError(f"{what}: its epoch is over and its key is gone")
        if n != s.epoch + 1 or n % 2 != peer_parity:
            raise MessageAuthError(f"{what}: epoch {n} cannot follow epoch {s.epoch}")
        if message.compact:
            raise EpochNotOpenError(
                f"{what} is a short message of epoch {n}, not opened yet: the message that "
                "carries its ratchet key has not arrived"
            )
        # 4.3 Opening the peer's next epoch.
        if n == 1:
            ss = b""
        else:
            if not s.send_kem_seed:
                raise MessageAuthError(f"{what}: no ratchet key of ours to decapsulate with")
            ss = self.backend.kem_from_seed(KEM, s.send_kem_seed).decapsulate(
                message.kem_ciphertext
            )  # FIPS 203 §7.3: a tampered ct gives a wrong secret, then the AEAD fails
        epoch_ref = QKDRef.encode(message.epoch_qkd)
        eh = epoch_hash(s.session_id, n, message.ratchet_key, message.kem_ciphertext, epoch_ref)
        k_epoch = _qkd_key(message.epoch_qkd, qkd_keys) if message.epoch_qkd else b""
        plan.epoch = epoch_secrets(s.root_key, eh, k_epoch, ss)
        plan.epoch_number, plan.peer_ek = n, message.ratchet_key
        plan.close = (s.recv_epoch, message.prev_generation, message.prev_length)
        plan.chains = {0: Chain(plan.epoch.chain_key)}
        plan.new_generation = 0
        if g == 0:
            return plan.chains[0]
        assert message.generation_qkd is not None
        gh = generation_hash(s.session_id, n, g, message.generation_qkd.serialize())
        k = _qkd_key(message.generation_qkd, qkd_keys)
        plan.new_generation = g
        return Chain(generation_chain(plan.epoch.generation_seed, gh, k))

    def _advance(self, chain: Chain, cid: tuple[int, int], index: int, plan: _Plan) -> MessageKey:
        """Derive the key of message ``index`` on ``chain``, keeping the skipped ones."""
        if index - chain.next_index > self.limits.max_skip:
            raise SkippedMessagesError(
                f"message #{index} from {self.state.peer_name} is {index - chain.next_index} "
                f"messages ahead (limit {self.limits.max_skip})"
            )
        key, n = chain.key, chain.next_index
        while n < index:
            mk, key = chain_step(key)
            plan.skipped[(cid[0], cid[1], n)] = mk.to_bytes()
            n += 1
        mk, key = chain_step(key)
        plan.chain = (cid, Chain(key, index + 1))
        return mk

    def _close_chain(self, plan: _Plan) -> None:
        """Keep the keys of the peer's previous chain up to its announced length."""
        if plan.close is None:
            return
        epoch, generation, length = plan.close
        s = self.state
        chain = s.recv_chains.get(generation) if epoch == s.recv_epoch else None
        if chain is None:
            return
        missing = min(length - chain.next_index, self.limits.max_skip)
        key, n = chain.key, chain.next_index
        for _ in range(max(0, missing)):
            mk, key = chain_step(key)
            plan.skipped[(epoch, generation, n)] = mk.to_bytes()
            n += 1
        plan.closed_generation = generation

    def _commit(self, plan: _Plan) -> None:
        s = self.state
        if plan.used_skipped is not None:
            del s.skipped[plan.used_skipped]
        else:
            self._close_chain(plan)
        if plan.epoch is not None:
            s.root_key, s.epoch, s.recv_epoch = (
                plan.epoch.root_key,
                plan.epoch_number,
                plan.epoch_number,
            )
            s.peer_ek, s.recv_generation_seed = plan.peer_ek, plan.epoch.generation_seed
            s.recv_chains, s.recv_generations_seen = dict(plan.chains), {0}
            if s.pending_init:  # the peer answered: no more prekey messages
                s.pending_init, self._init = b"", None
        elif plan.closed_generation is not None:
            s.recv_chains.pop(plan.closed_generation, None)
        if plan.new_generation is not None:
            s.recv_generations_seen.add(plan.new_generation)
        if plan.chain is not None:
            (_, generation), chain = plan.chain
            s.recv_chains[generation] = chain
        for key, material in plan.skipped.items():
            s.skipped[key] = SkippedKey(material, plan.now_ms)
        self._prune()

    def _prune(self) -> None:
        """Keep the open chains and skipped keys within the limits (§6.2)."""
        s = self.state
        while len(s.recv_chains) > self.limits.max_open_generations:
            del s.recv_chains[min(s.recv_chains)]
        while len(s.skipped) > self.limits.max_skipped_keys:
            del s.skipped[next(iter(s.skipped))]  # oldest first (insertion order)

    def expire(self, now: float) -> int:
        """Drop skipped keys older than their lifetime; returns how many."""
        limit = _ms(now) - int(self.limits.skipped_key_lifetime * 1000)
        old = [k for k, v in self.state.skipped.items() if v.stored_ms < limit]
        for k in old:
            del self.state.skipped[k]
        return len(old)

    def __repr__(self) -> str:
        s = self.state
        return f"<Session {s.own_name}→{s.peer_name} {s.mode.value} epoch={s.epoch}>"


def _qkd_key(ref: QKDRef, keys: Mapping[str, bytes]) -> bytes:
    key = keys.get(ref.key_id)
    if key is None:
        raise KeyNotFoundError(f"QKD key {ref.key_id} was not fetched (dec_keys) for this message")
    if len(key) != ref.size:
        raise QKDKeyMismatchError(f"QKD key {ref.key_id} is {len(key)} bytes, announced {ref.size}")
    return bytes(key)


@dataclass
class _Plan:
    """The changes one message makes, applied only once it authenticates."""

    now_ms: int
    used_skipped: tuple[int, int, int] | None = None
    epoch: EpochSecrets | None = None  # a newly opened epoch
    epoch_number: int = 0
    peer_ek: bytes = b""
    chains: dict[int, Chain] = dataclasses.field(default_factory=dict)
    close: tuple[int, int, int] | None = None
    closed_generation: int | None = None
    new_generation: int | None = None
    chain: tuple[tuple[int, int], Chain] | None = None
    skipped: dict[tuple[int, int, int], bytes] = dataclasses.field(default_factory=dict)
