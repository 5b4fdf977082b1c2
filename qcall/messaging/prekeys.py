"""Prekeys: ML-KEM-768 keys signed with the owner's ML-DSA identity (``docs/messaging.md`` §2).

Each user publishes to the server a *bundle*: its identity public key, one
signed prekey (rotated weekly) and a batch of one-time prekeys (replenished when
few are left). The server hands a sender the identity key, the signed prekey and
at most one one-time prekey (each one-time prekey once). The sender checks
every signature against the identity key, and the identity key against the
pinned contact, before it encapsulates to them (FIPS 203 §7.2)::

    PrekeyRecord := u8 kind ‖ u8 kem ‖ u32 prekey_id ‖ u64 created_ms ‖ var16 ek
    SignedPrekey := PrekeyRecord ‖ var16 signature
    signature    = ML-DSA.Sign(IK, TH("qmsg1 prekey", owner, IK_pub, PrekeyRecord),
                               ctx = "qmsg1 prekey")                 (FIPS 204 §5.2)
    PrekeyBundle := u8 version ‖ text8 owner ‖ var16 IK_pub ‖ SignedPrekey
                    ‖ u16 count ‖ count × SignedPrekey

The signature binds the owner's *name* as well as its key, so a server cannot
present carol's genuine bundle as bob's.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qcall import pqc
from qcall.exceptions import ConfigError, InvalidKeyError, MessageFormatError, PrekeyError
from qcall.identity import scheme_for_public_key, short_fingerprint, validate_name
from qcall.messaging.keyschedule import th
from qcall.messaging.wire import Reader, Writer

__all__ = [
    "BUNDLE_VERSION",
    "KEM_ML_KEM_768",
    "MAX_ONE_TIME_PREKEYS",
    "PREKEY_CONTEXT",
    "PrekeyBundle",
    "PrekeyKind",
    "PrekeyRecord",
    "SignedPrekey",
    "check_name",
    "make_prekey",
    "parse_identity_key",
]

#: ``kem`` octet of ML-KEM-768 (FIPS 203, parameter set ML-KEM-768).
KEM_ML_KEM_768 = 1
#: The ML-DSA context string of prekey signatures (FIPS 204 §5.2, ``ctx``).
PREKEY_CONTEXT = b"qmsg1 prekey"
#: Transcript-hash domain of the data a prekey signature covers.
PREKEY_DOMAIN = b"qmsg1 prekey"
#: Version octet of a bundle.
BUNDLE_VERSION = 1
#: Most one-time prekeys in one bundle (a publication; a claimed bundle holds ≤ 1).
MAX_ONE_TIME_PREKEYS = 200
#: Clock skew tolerated on ``created_ms`` (a prekey from the future), in ms.
MAX_SKEW_MS = 24 * 3600 * 1000

KEM = pqc.KEM.ML_KEM_768
_EK_LEN = KEM.sizes.encapsulation_key
_MAX_SIG = max(s.sizes.signature for s in pqc.SignatureScheme)
_MAX_PK = max(s.sizes.public_key for s in pqc.SignatureScheme)


class PrekeyKind(enum.IntEnum):
    """``kind`` octet of a prekey record."""

    SIGNED = 1
    ONE_TIME = 2


def check_name(name: object, what: str) -> str:
    """A user name (:func:`qcall.identity.validate_name`), as a format error."""
    try:
        return validate_name(name, what)
    except ConfigError as exc:
        raise MessageFormatError(str(exc)) from None


def parse_identity_key(public_key: bytes, what: str) -> pqc.SignatureScheme:
    """The ML-DSA parameter set of an identity public key, or a format error."""
    try:
        return scheme_for_public_key(public_key)
    except InvalidKeyError as exc:
        raise MessageFormatError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class PrekeyRecord:
    """The signed part of one prekey."""

    kind: PrekeyKind
    prekey_id: int
    created_ms: int
    public_key: bytes  # ML-KEM-768 encapsulation key ek (FIPS 203 §7.1)

    def __post_init__(self) -> None:
        if not 1 <= self.prekey_id <= 0xFFFFFFFF:
            raise ValueError("field 'prekey_id' must be 1..2^32-1")
        if not 0 <= self.created_ms < 1 << 63:
            raise ValueError("field 'created_ms' out of range")
        if len(self.public_key) != _EK_LEN:
            raise ValueError(f"field 'public_key' must be {_EK_LEN} bytes (ML-KEM-768)")

    def serialize(self) -> bytes:
        w = Writer().u8(self.kind).u8(KEM_ML_KEM_768).u32(self.prekey_id).u64(self.created_ms)
        return w.var16(self.public_key).bytes()

    @classmethod
    def read(cls, r: Reader) -> PrekeyRecord:
        kind = PrekeyKind(r.choice("kind", [k.value for k in PrekeyKind]))
        r.choice("kem", [KEM_ML_KEM_768])
        prekey_id = r.u32("prekey_id")
        created = r.u64("created_ms")
        ek = r.var16("public_key", _EK_LEN)
        try:
            return cls(kind, prekey_id, created, ek)
        except ValueError as exc:
            raise MessageFormatError(f"{r.what}: {exc}") from None

    def signed_data(self, owner: str, identity_key: bytes) -> bytes:
        """``TH("qmsg1 prekey", owner, IK_pub, PrekeyRecord)``: what the owner signs."""
        return th(PREKEY_DOMAIN, owner.encode("utf-8"), identity_key, self.serialize())


@dataclass(frozen=True)
class SignedPrekey:
    """A prekey record and its owner's ML-DSA signature."""

    record: PrekeyRecord
    signature: bytes

    def serialize(self) -> bytes:
        return self.record.serialize() + Writer().var16(self.signature).bytes()

    @classmethod
    def read(cls, r: Reader) -> SignedPrekey:
        record = PrekeyRecord.read(r)
        return cls(record, r.var16("signature", _MAX_SIG))

    @classmethod
    def parse(cls, data: bytes) -> SignedPrekey:
        r = Reader(data, "signed prekey")
        out = cls.read(r)
        r.end()
        return out

    def verify(self, owner: str, identity_key: bytes, backend: pqc.Backend) -> bool:
        """Whether the signature verifies (FIPS 204 Algorithm 3) for ``owner``'s key."""
        scheme = scheme_for_public_key(identity_key)
        data = self.record.signed_data(owner, identity_key)
        return backend.verify(scheme, identity_key, self.signature, data, PREKEY_CONTEXT)


def make_prekey(
    identity: pqc.SigningKey,
    owner: str,
    kind: PrekeyKind,
    prekey_id: int,
    now_ms: int,
    *,
    backend: pqc.Backend,
    random: Callable[[int], bytes],
) -> tuple[SignedPrekey, bytes]:
    """Make and sign one prekey.

    Returns:
        ``(signed prekey, seed)``: the 64-byte ML-KEM seed ``d ‖ z`` (FIPS 203
        §7.1) is the private key; keep it secret, delete a one-time one once used.
    """
    seed = random(KEM.sizes.seed)
    key = backend.kem_from_seed(KEM, seed)
    record = PrekeyRecord(kind, prekey_id, now_ms, key.public_bytes())
    signature = identity.sign(record.signed_data(owner, identity.public_bytes()), PREKEY_CONTEXT)
    return SignedPrekey(record, signature), seed


@dataclass(frozen=True)
class PrekeyBundle:
    """What a user publishes (many one-time prekeys) or a sender claims (at most one).

    Attributes:
        owner: the user's name.
        identity_key: the owner's ML-DSA public key (FIPS 204 ``pk``).
        signed_prekey: the current signed prekey (``kind`` SIGNED).
        one_time_prekeys: one-time prekeys (``kind`` ONE_TIME).
    """

    owner: str
    identity_key: bytes
    signed_prekey: SignedPrekey
    one_time_prekeys: tuple[SignedPrekey, ...] = ()

    def serialize(self) -> bytes:
        w = Writer().u8(BUNDLE_VERSION).text8(self.owner).var16(self.identity_key)
        w.raw(self.signed_prekey.serialize()).u16(len(self.one_time_prekeys))
        for prekey in self.one_time_prekeys:
            w.raw(prekey.serialize())
        return w.bytes()

    @classmethod
    def parse(cls, data: bytes, *, max_one_time: int = MAX_ONE_TIME_PREKEYS) -> PrekeyBundle:
        """Parse a bundle (hostile input: only :class:`MessageFormatError` escapes)."""
        r = Reader(data, "prekey bundle")
        r.choice("version", [BUNDLE_VERSION])
        owner = check_name(r.text8("owner"), "prekey bundle: field 'owner'")
        identity_key = r.var16("identity_key", _MAX_PK)
        parse_identity_key(identity_key, "prekey bundle: field 'identity_key'")
        signed = SignedPrekey.read(r)
        count = r.u16("count")
        if count > max_one_time:
            raise r.error("count", f"exceeds {max_one_time} one-time prekeys")
        one_time = tuple(SignedPrekey.read(r) for _ in range(count))
        r.end()
        return cls(owner, identity_key, signed, one_time)

    def verify(
        self,
        backend: pqc.Backend,
        now_ms: int,
        *,
        owner: str | None = None,
        max_age_ms: int | None = None,
    ) -> None:
        """Check every signature, kind and date (``docs/messaging.md`` §2.3).

        Args:
            backend: verifies ML-DSA signatures.
            now_ms: the current time in milliseconds since the epoch.
            owner: the name the bundle was asked for (must equal :attr:`owner`).
            max_age_ms: refuse a signed prekey older than this.

        Raises:
            PrekeyError: naming the owner and the prekey at fault.
        """
        who = f"prekey bundle of {self.owner!r} (identity {short_fingerprint(self.identity_key)})"
        if owner is not None and owner != self.owner:
            raise PrekeyError(f"asked for {owner!r}'s prekeys, got the {who}")
        prekeys: Sequence[tuple[SignedPrekey, PrekeyKind]] = [
            (self.signed_prekey, PrekeyKind.SIGNED),
            *((p, PrekeyKind.ONE_TIME) for p in self.one_time_prekeys),
        ]
        seen: set[tuple[int, int]] = set()
        for prekey, kind in prekeys:
            rec = prekey.record
            name = f"{rec.kind.name.lower().replace('_', '-')} prekey #{rec.prekey_id}"
            if rec.kind is not kind:
                raise PrekeyError(f"{who}: {name} is in the place of a {kind.name} prekey")
            if (rec.kind, rec.prekey_id) in seen:
                raise PrekeyError(f"{who}: {name} appears twice")
            seen.add((rec.kind, rec.prekey_id))
            try:
                valid = prekey.verify(self.owner, self.identity_key, backend)
            except InvalidKeyError:
                valid = False
            if not valid:
                raise PrekeyError(
                    f"{who}: the signature on {name} does not verify with the bundle's identity "
                    "key (signed by another identity, or tampered with)"
                )
            if rec.created_ms > now_ms + MAX_SKEW_MS:
                raise PrekeyError(f"{who}: {name} is dated in the future")
        age = now_ms - self.signed_prekey.record.created_ms
        if max_age_ms is not None and age > max_age_ms:
            raise PrekeyError(
                f"{who}: signed prekey #{self.signed_prekey.record.prekey_id} is "
                f"{age // 86_400_000} days old (limit {max_age_ms // 86_400_000}): "
                "the owner has not been online to rotate it"
            )

    def __repr__(self) -> str:
        return (
            f"<PrekeyBundle {self.owner} {short_fingerprint(self.identity_key)} "
            f"spk=#{self.signed_prekey.record.prekey_id} "
            f"otpk={[p.record.prekey_id for p in self.one_time_prekeys]}>"
        )
