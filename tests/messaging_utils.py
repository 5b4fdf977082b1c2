"""Helpers shared by the messaging tests: deterministic users, prekeys, QKD keys, pairs."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field

from qcall import pqc
from qcall.messaging.messages import PrekeyMessage, QKDRef
from qcall.messaging.prekeys import PrekeyBundle, PrekeyKind, SignedPrekey, make_prekey
from qcall.messaging.ratchet import QKDMaterial, Session
from qcall.messaging.session import LocalIdentity, Responder, initiate, respond

BACKEND = pqc.get_backend("cryptography")
#: A fixed clock for the pure cores (2026-01-01T00:00:00Z).
NOW = 1_767_225_600.0


def identity(name: str) -> LocalIdentity:
    """A user whose ML-DSA-65 key comes from a seed derived from its name."""
    seed = hashlib.sha256(b"qcall test identity " + name.encode()).digest()
    return LocalIdentity(name, BACKEND.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, seed))


def qkd_key(sae: str = "alice-sae", size: int = 32) -> QKDMaterial:
    """A fresh random QKD key with a random key_ID (as ``enc_keys`` would give)."""
    return QKDMaterial(QKDRef(sae, str(uuid.uuid4()), size), secrets.token_bytes(size))


@dataclass
class User:
    """A user with a signed prekey and one-time prekeys, all secrets in memory."""

    me: LocalIdentity
    spk: SignedPrekey
    spk_seed: bytes
    opks: dict[int, tuple[SignedPrekey, bytes]] = field(default_factory=dict)
    pins: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def make(cls, name: str, one_time: int = 2, now: float = NOW) -> User:
        me = identity(name)
        spk, seed = make_prekey(
            me.signing_key,
            name,
            PrekeyKind.SIGNED,
            1,
            int(now * 1000),
            backend=BACKEND,
            random=secrets.token_bytes,
        )
        user = cls(me, spk, seed)
        for i in range(one_time):
            opk, opk_seed = make_prekey(
                me.signing_key,
                name,
                PrekeyKind.ONE_TIME,
                100 + i,
                int(now * 1000),
                backend=BACKEND,
                random=secrets.token_bytes,
            )
            user.opks[100 + i] = (opk, opk_seed)
        return user

    def bundle(self, with_one_time: bool = True) -> PrekeyBundle:
        """What the server hands out: at most one one-time prekey (not removed here)."""
        opk = (next(iter(self.opks.values()))[0],) if with_one_time and self.opks else ()
        return PrekeyBundle(self.me.name, self.me.public_key, self.spk, opk)

    def check_peer(self, name: str, public_key: bytes) -> None:
        from qcall.exceptions import IdentityChangedError

        pinned = self.pins.setdefault(name, public_key)
        if pinned != public_key:
            raise IdentityChangedError(f"identity of {name!r} changed")

    def responder(self, message: PrekeyMessage) -> Responder:
        opk = self.opks.get(message.one_time_prekey_id)
        return Responder(
            self.me,
            self.spk.record,
            self.spk_seed,
            opk[0].record if opk else None,
            opk[1] if opk else b"",
        )


def start(
    alice: User, bob: User, qkd: QKDMaterial | None = None, now: float = NOW
) -> tuple[Session, Session, bytes]:
    """alice sets up a session with bob and sends "hello"; bob accepts it.

    Returns ``(alice's session, bob's session, the first wire message)``.
    """
    a = initiate(
        alice.me,
        bob.me.name,
        bob.bundle(),
        now=now,
        check_peer=alice.check_peer,
        qkd=qkd,
        backend=BACKEND,
    )
    wire = a.encrypt(b"hello", now)
    message = PrekeyMessage.parse(wire)
    b, _ = respond(
        bob.responder(message),
        message,
        now=now,
        check_peer=bob.check_peer,
        qkd_key=qkd.key if qkd else None,
        backend=BACKEND,
    )
    return a, b, wire
