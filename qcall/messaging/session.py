"""Session set-up with no round trip: ML-KEM to signed prekeys, plus a QKD key.

``docs/messaging.md`` §3.

PQXDH-like, with ML-KEM-768 only. The initiator (alice) claims bob's prekey
bundle from the server, checks it (:meth:`PrekeyBundle.verify`, and bob's
identity key against her pinned contact), encapsulates to bob's signed prekey
and, if the server had one, to a one-time prekey (FIPS 203 §7.2); with a QKD
key source she also takes a fresh key (ETSI 014 ``enc_keys``) and names it by
key_ID. She signs the set-up transcript with her ML-DSA identity::

    TH_init = TH("qmsg1 session", PrekeyMessage⁻, SPK record, OPK record or "")
    sig     = ML-DSA.Sign(IK_alice, TH_init, ctx = "qmsg1 session")   (FIPS 204 §5.2)
    RK_0    = HKDF-Extract(TH_init, framed(K_qkd, SS_spk, SS_opk))

``PrekeyMessage⁻`` is the prekey message up to its signature: names, both
identities, the mode, prekey ids, KEM ciphertexts, the QKD reference and the
time. Bob (:func:`respond`) verifies it all, decapsulates (FIPS 203 §7.3),
fetches the QKD key by key_ID (ETSI 014 ``dec_keys``) and derives the same
``RK_0``. A session with no QKD key is mode ``pqc``: the mode is signed into
``TH_init``, stored with the session and shown to the user, never silent.

Authentication: bob knows alice by her signature; alice knows only bob can
read, because only he holds the private keys of prekeys signed by his identity.
Unlike Signal's X3DH/PQXDH this is not deniable (ML-DSA signatures are
transferable): docs/messaging.md §11 discusses it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from qcall import pqc
from qcall.exceptions import (
    MessageAuthError,
    PrekeyError,
    QKDKeyMismatchError,
    SecurityPolicyError,
)
from qcall.identity import short_fingerprint
from qcall.messaging.keyschedule import epoch_hash, epoch_secrets, root_key_0, session_id, th
from qcall.messaging.messages import Mode, PrekeyMessage, QKDRef, identity_hash
from qcall.messaging.prekeys import PrekeyBundle, PrekeyKind, PrekeyRecord, parse_identity_key
from qcall.messaging.ratchet import QKDMaterial, QKDPolicy, RatchetLimits, Session
from qcall.messaging.state import Chain, Role, SessionState

__all__ = [
    "SESSION_CONTEXT",
    "SESSION_DOMAIN",
    "CheckPeer",
    "LocalIdentity",
    "Responder",
    "check_prekey_message",
    "init_transcript",
    "initiate",
    "respond",
]

logger = logging.getLogger("qcall.messaging")

#: ML-DSA context string of the set-up signature (FIPS 204 §5.2).
SESSION_CONTEXT = b"qmsg1 session"
#: Transcript-hash domain of ``TH_init``.
SESSION_DOMAIN = b"qmsg1 session"
#: Largest age of a signed prekey a sender accepts (the owner rotates it weekly).
MAX_SIGNED_PREKEY_AGE_MS = 35 * 86_400_000

KEM = pqc.KEM.ML_KEM_768

#: ``check_peer(name, public_key)`` raises UnknownIdentityError / IdentityChangedError.
CheckPeer = Callable[[str, bytes], None]


@dataclass(frozen=True, repr=False)
class LocalIdentity:
    """This user: name and ML-DSA signing key."""

    name: str
    signing_key: pqc.SigningKey

    @property
    def public_key(self) -> bytes:
        return self.signing_key.public_bytes()

    def __repr__(self) -> str:
        return f"<LocalIdentity {self.name} {short_fingerprint(self.public_key)}>"


def init_transcript(message: PrekeyMessage, spk: PrekeyRecord, opk: PrekeyRecord | None) -> bytes:
    """``TH_init`` (``docs/messaging.md`` §3.2)."""
    return th(
        SESSION_DOMAIN,
        message.signed_part(),
        spk.serialize(),
        opk.serialize() if opk is not None else b"",
    )


def initiate(
    me: LocalIdentity,
    peer: str,
    bundle: PrekeyBundle,
    *,
    now: float,
    check_peer: CheckPeer,
    qkd: QKDMaterial | None = None,
    backend: pqc.Backend | None = None,
    random: Callable[[int], bytes] = secrets.token_bytes,
    limits: RatchetLimits | None = None,
    policy: QKDPolicy | None = None,
) -> Session:
    """Start a session with the owner of ``bundle`` (alice's side, §3.1).

    Args:
        me: this user.
        peer: the name whose bundle was asked for.
        bundle: the claimed bundle (≤ 1 one-time prekey), not yet verified.
        now: current time, seconds since the epoch.
        check_peer: pins or checks the peer's identity key (contacts, TOFU).
        qkd: a fresh QKD key from ``enc_keys`` for mode ``hybrid``; ``None``: ``pqc``.
        backend: ML-KEM/ML-DSA backend.
        random: randomness for the ratchet key seed.
        limits: skipped-key bounds of the session.
        policy: the QKD policy of the session.

    Raises:
        PrekeyError: a signature, kind or date of the bundle is wrong.
        IdentityChangedError / UnknownIdentityError: from ``check_peer``.

    After calling this method: persist the session, then send
    :meth:`Session.encrypt`'s output (a prekey message).
    """
    backend = backend or pqc.get_backend()
    now_ms = int(now * 1000)
    bundle.verify(backend, now_ms, owner=peer, max_age_ms=MAX_SIGNED_PREKEY_AGE_MS)
    if len(bundle.one_time_prekeys) > 1:
        raise PrekeyError(
            f"a claimed bundle holds one one-time prekey at most, "
            f"not {len(bundle.one_time_prekeys)}"
        )
    check_peer(bundle.owner, bundle.identity_key)
    spk = bundle.signed_prekey.record
    opk = bundle.one_time_prekeys[0].record if bundle.one_time_prekeys else None
    ss_spk, ct_spk = backend.kem_encapsulate(KEM, spk.public_key)
    ss_opk, ct_opk = backend.kem_encapsulate(KEM, opk.public_key) if opk else (b"", b"")
    message = PrekeyMessage(
        sender=me.name,
        recipient=bundle.owner,
        sender_identity=me.public_key,
        recipient_identity_hash=identity_hash(bundle.identity_key),
        mode=Mode.HYBRID if qkd is not None else Mode.PQC,
        signed_prekey_id=spk.prekey_id,
        signed_prekey_ciphertext=ct_spk,
        one_time_prekey_id=opk.prekey_id if opk else 0,
        one_time_prekey_ciphertext=ct_opk,
        qkd=qkd.ref if qkd else None,
        time_ms=now_ms,
        signature=b"",
        inner=b"",
    )
    th_init = init_transcript(message, spk, opk)
    message = replace(message, signature=me.signing_key.sign(th_init, SESSION_CONTEXT))
    sid = session_id(th_init)
    rk0 = root_key_0(th_init, qkd.key if qkd else b"", ss_spk, ss_opk)
    # Epoch 1 (ours): no KEM of its own, its ratchet key ek_1 is new.
    seed = random(KEM.sizes.seed)
    ek = backend.kem_from_seed(KEM, seed).public_bytes()
    es = epoch_secrets(rk0, epoch_hash(sid, 1, ek, b"", QKDRef.encode(None)), b"", b"")
    state = SessionState(
        session_id=sid,
        role=Role.INITIATOR,
        mode=message.mode,
        own_name=me.name,
        peer_name=bundle.owner,
        peer_identity=bundle.identity_key,
        created_ms=now_ms,
        root_key=es.root_key,
        epoch=1,
        send_epoch=1,
        send_kem_seed=seed,
        send_ek=ek,
        send_chain=Chain(es.chain_key),
        send_generation_seed=es.generation_seed,
        pending_init=message.serialize(),
        last_qkd_ms=now_ms,
    )
    logger.info(
        "= session %s with %s set up (%s, spk #%d, otpk %s)",
        sid.hex()[:8],
        bundle.owner,
        message.mode.value,
        spk.prekey_id,
        f"#{opk.prekey_id}" if opk else "none",
    )
    return Session(state, backend=backend, random=random, limits=limits, policy=policy)


@dataclass(frozen=True, repr=False)
class Responder:
    """What :func:`respond` needs from bob's store: his identity and prekey secrets.

    Attributes:
        me: bob.
        signed_prekey: the record of the signed prekey the message names.
        signed_prekey_seed: its 64-byte ML-KEM seed.
        one_time_prekey: the record of the one-time prekey it names, or ``None``.
        one_time_prekey_seed: its seed (``b""`` when there is none).
    """

    me: LocalIdentity
    signed_prekey: PrekeyRecord
    signed_prekey_seed: bytes
    one_time_prekey: PrekeyRecord | None = None
    one_time_prekey_seed: bytes = b""

    def __repr__(self) -> str:
        return f"<Responder {self.me.name} spk=#{self.signed_prekey.prekey_id}>"


def check_prekey_message(
    me: LocalIdentity,
    message: PrekeyMessage,
    signed_prekey: PrekeyRecord,
    one_time_prekey: PrekeyRecord | None,
    *,
    check_peer: CheckPeer,
    accept_pqc: bool = True,
    backend: pqc.Backend | None = None,
) -> bytes:
    """Bob's checks of a prekey message that need no secret (§3.2 steps 1-7).

    A client runs them before it asks its KME for the QKD key the message names,
    so a forged message cannot make it spend a key.

    Returns:
        ``TH_init``.

    Raises:
        PrekeyError: addressed to another identity, or naming other prekeys.
        MessageAuthError: the set-up signature does not verify.
        SecurityPolicyError: mode ``pqc`` while ``accept_pqc`` is false.
        IdentityChangedError / UnknownIdentityError: from ``check_peer``.
    """
    backend = backend or pqc.get_backend()
    who = f"prekey message from {message.sender!r}"
    if message.recipient != me.name or message.recipient_identity_hash != identity_hash(
        me.public_key
    ):
        raise PrekeyError(f"{who} is addressed to {message.recipient!r}, another identity")
    if message.signed_prekey_id != signed_prekey.prekey_id or (
        signed_prekey.kind is not PrekeyKind.SIGNED
    ):
        raise PrekeyError(f"{who} names signed prekey #{message.signed_prekey_id}, not ours")
    if message.one_time_prekey_id != (one_time_prekey.prekey_id if one_time_prekey else 0):
        raise PrekeyError(f"{who} names one-time prekey #{message.one_time_prekey_id}, not ours")
    th_init = init_transcript(message, signed_prekey, one_time_prekey)
    scheme = parse_identity_key(message.sender_identity, who)
    if not backend.verify(
        scheme, message.sender_identity, message.signature, th_init, SESSION_CONTEXT
    ):
        raise MessageAuthError(
            f"{who}: the set-up signature does not verify with identity "
            f"{short_fingerprint(message.sender_identity)} (forged or tampered with)"
        )
    check_peer(message.sender, message.sender_identity)
    if message.mode is Mode.PQC and not accept_pqc:
        raise SecurityPolicyError(
            f"{message.sender} set up a 'pqc' session (no QKD key) and your policy "
            "requires 'hybrid'"
        )
    return th_init


def respond(
    keys: Responder,
    message: PrekeyMessage,
    *,
    now: float,
    check_peer: CheckPeer,
    qkd_key: bytes | None = None,
    accept_pqc: bool = True,
    backend: pqc.Backend | None = None,
    random: Callable[[int], bytes] = secrets.token_bytes,
    limits: RatchetLimits | None = None,
    policy: QKDPolicy | None = None,
) -> tuple[Session, bytes]:
    """Accept alice's prekey message (bob's side, §3.3).

    Args:
        keys: bob's identity and the prekeys the message names (looked up by the
            store, which refuses a one-time prekey already used).
        message: the parsed prekey message.
        now: current time, seconds since the epoch.
        check_peer: pins or checks alice's identity key (after her signature verified).
        qkd_key: the key of ``message.qkd``, fetched with ``dec_keys`` (mode ``hybrid``).
        accept_pqc: whether a ``pqc`` session (no QKD key) is acceptable.
        backend: ML-KEM/ML-DSA backend.
        random: randomness for the ratchet key seeds.
        limits: skipped-key bounds of the session.
        policy: the QKD policy of the session.

    Returns:
        ``(session, TH_init)``; then decrypt ``message.inner`` with the session.

    Raises:
        PrekeyError: the message is for someone else or names other prekeys.
        MessageAuthError: alice's signature does not verify.
        SecurityPolicyError: mode ``pqc`` while ``accept_pqc`` is false.
        QKDKeyMismatchError: the QKD key is missing or of the wrong size.
        IdentityChangedError / UnknownIdentityError: from ``check_peer``.
    """
    backend = backend or pqc.get_backend()
    me, opk = keys.me, keys.one_time_prekey
    who = f"prekey message from {message.sender!r}"
    th_init = check_prekey_message(
        me,
        message,
        keys.signed_prekey,
        opk,
        check_peer=check_peer,
        accept_pqc=accept_pqc,
        backend=backend,
    )
    k_qkd = b""
    if message.qkd is not None:
        if qkd_key is None or len(qkd_key) != message.qkd.size:
            raise QKDKeyMismatchError(
                f"{who}: QKD key {message.qkd.key_id} missing or not {message.qkd.size} bytes"
            )
        k_qkd = bytes(qkd_key)
    ss_spk = backend.kem_from_seed(KEM, keys.signed_prekey_seed).decapsulate(
        message.signed_prekey_ciphertext
    )
    ss_opk = b""
    if opk is not None:
        ss_opk = backend.kem_from_seed(KEM, keys.one_time_prekey_seed).decapsulate(
            message.one_time_prekey_ciphertext
        )
    sid = session_id(th_init)
    state = SessionState(
        session_id=sid,
        role=Role.RESPONDER,
        mode=message.mode,
        own_name=me.name,
        peer_name=message.sender,
        peer_identity=message.sender_identity,
        created_ms=int(now * 1000),
        root_key=root_key_0(th_init, k_qkd, ss_spk, ss_opk),
        last_qkd_ms=int(now * 1000),
    )
    logger.info(
        "= session %s from %s accepted (%s, spk #%d, otpk %s)",
        sid.hex()[:8],
        message.sender,
        message.mode.value,
        message.signed_prekey_id,
        f"#{message.one_time_prekey_id}" if opk else "none",
    )
    session = Session(state, backend=backend, random=random, limits=limits, policy=policy)
    return session, th_init
