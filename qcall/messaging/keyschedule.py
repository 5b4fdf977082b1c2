"""The messaging key schedule: session set-up, KEM ratchet, QKD generations, chains.

Pure functions over bytes, modelled on :mod:`qcall.handshake.keyschedule` (the
same HKDF-SHA-384 and transcript hash, but the label prefix ``"qmsg1 "``).
``docs/messaging.md`` §3-§6 is the normative description and
``tests/vectors/messaging_kdf.json`` the vectors::

    RK_0      = HKDF-Extract(TH_init, framed(K_qkd, SS_spk, SS_opk))      session set-up
    PRK_n     = HKDF-Extract(RK_n-1, framed(K_qkd_n, SS_n))               epoch n ≥ 1
    RK_n      = Expand-Label(PRK_n, "root", EH_n, 48)
    CK_n,0    = Expand-Label(PRK_n, "chain", EH_n, 48)
    GS_n      = Expand-Label(PRK_n, "generations", EH_n, 48)
    CK_n,g    = Expand-Label(HKDF-Extract(GS_n, framed(K_qkd_n,g)), "chain", GH_n,g, 48)
    MK_i      = Expand-Label(CK_i, "message", "", 44)     AES-256-GCM key ‖ nonce
    CK_i+1    = Expand-Label(CK_i, "next", "", 48)

where ``framed(a, b, …) = u32(len a) ‖ a ‖ u32(len b) ‖ b ‖ …`` (an absent
secret is the empty string, still framed), so no two input lists collide.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from qcall import pqc
from qcall.handshake.keyschedule import transcript_hash
from qcall.messaging.wire import framed

__all__ = [
    "CHAIN_KEY_LEN",
    "LABEL_PREFIX",
    "MESSAGE_KEY_LEN",
    "SESSION_ID_LEN",
    "EpochSecrets",
    "MessageKey",
    "chain_step",
    "epoch_hash",
    "epoch_secrets",
    "expand_label",
    "generation_chain",
    "generation_hash",
    "root_key_0",
    "session_id",
    "store_key",
    "th",
]

#: Prefix of every Expand-Label label (``docs/messaging.md`` §1).
LABEL_PREFIX = b"qmsg1 "
#: Root, chain and generation-seed keys: 48 bytes (SHA-384).
CHAIN_KEY_LEN = pqc.HASH_LEN
#: Message key material: a 32-byte AES-256-GCM key and a 12-byte nonce.
MESSAGE_KEY_LEN = pqc.AEAD_KEY_LEN + pqc.AEAD_NONCE_LEN
#: A session is named by 16 bytes derived from its set-up transcript.
SESSION_ID_LEN = 16

_U32 = struct.Struct(">I")


def th(domain: bytes, *parts: bytes) -> bytes:
    """``TH(domain, p1, …)``: SHA-384 of the framed domain and parts (48 bytes).

    The transcript hash of ``docs/key-schedule.md`` §2, with the messaging domains.
    """
    return transcript_hash(domain, *parts)


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha384).digest()


def expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) with SHA-384 and the ``"qmsg1 "`` prefix.

    ``info = u16(length) ‖ u8(len L) ‖ L ‖ u8(len context) ‖ context`` with
    ``L = "qmsg1 " ‖ label``; HKDF-Expand (RFC 5869 §2.3) computed with HMAC
    directly (the same bytes as :func:`qcall.pqc.hkdf_expand`).
    """
    full = LABEL_PREFIX + label
    if len(full) > 255 or len(context) > 255:
        raise ValueError("HKDF label or context longer than 255 bytes")
    if not 0 < length <= 255 * pqc.HASH_LEN:
        raise ValueError(f"HKDF-Expand length must be 1..{255 * pqc.HASH_LEN}")
    info = struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context
    if length <= pqc.HASH_LEN:  # one block, T(1) = HMAC(secret, info ‖ 0x01): the C path
        return hmac.digest(secret, info + b"\x01", "sha384")[:length]
    mac = hmac.new(secret, digestmod=hashlib.sha384)
    out, block, i = b"", b"", 1
    while len(out) < length:
        m = mac.copy()
        m.update(block + info + bytes([i]))
        block = m.digest()
        out += block
        i += 1
    return out[:length]


# --- §3 session set-up ---------------------------------------------------------------


def root_key_0(th_init: bytes, k_qkd: bytes, ss_spk: bytes, ss_opk: bytes) -> bytes:
    """``RK_0 = HKDF-Extract(salt = TH_init, IKM = framed(K_qkd, SS_spk, SS_opk))``."""
    return pqc.hkdf_extract(th_init, framed(k_qkd, ss_spk, ss_opk))


def session_id(th_init: bytes) -> bytes:
    """``TH("qmsg1 session id", TH_init)[:16]``: the public name of a session."""
    return th(b"qmsg1 session id", th_init)[:SESSION_ID_LEN]


# --- §4 epochs and §5 generations ------------------------------------------------------


def epoch_hash(sid: bytes, epoch: int, ek: bytes, ct: bytes, qkd_ref: bytes) -> bytes:
    """``EH_n = TH("qmsg1 epoch", session_id, u32(n), ek_n, ct_n, QKDRef_n)``."""
    return th(b"qmsg1 epoch", sid, _U32.pack(epoch), ek, ct, qkd_ref)


def generation_hash(sid: bytes, epoch: int, generation: int, qkd_ref: bytes) -> bytes:
    """``GH_n,g = TH("qmsg1 generation", session_id, u32(n), u32(g), QKDRef_n,g)``."""
    return th(b"qmsg1 generation", sid, _U32.pack(epoch), _U32.pack(generation), qkd_ref)


@dataclass(frozen=True, repr=False)
class EpochSecrets:
    """What one epoch step yields: the next root key, the epoch's first chain key and
    its generation seed (all secret, never printed)."""

    root_key: bytes
    chain_key: bytes
    generation_seed: bytes

    def __repr__(self) -> str:
        return "<EpochSecrets>"


def epoch_secrets(root_key: bytes, eh: bytes, k_qkd: bytes, ss_kem: bytes) -> EpochSecrets:
    """One KEM-ratchet step (``docs/messaging.md`` §4).

    Args:
        root_key: ``RK_n-1``.
        eh: ``EH_n`` (:func:`epoch_hash`).
        k_qkd: the epoch's QKD key, or ``b""``.
        ss_kem: the epoch's ML-KEM shared secret (FIPS 203 §7.3), ``b""`` for epoch 1.
    """
    prk = pqc.hkdf_extract(root_key, framed(k_qkd, ss_kem))
    return EpochSecrets(
        root_key=expand_label(prk, b"root", eh, CHAIN_KEY_LEN),
        chain_key=expand_label(prk, b"chain", eh, CHAIN_KEY_LEN),
        generation_seed=expand_label(prk, b"generations", eh, CHAIN_KEY_LEN),
    )


def generation_chain(generation_seed: bytes, gh: bytes, k_qkd: bytes) -> bytes:
    """``CK_n,g = Expand-Label(HKDF-Extract(GS_n, framed(K_qkd_n,g)), "chain", GH_n,g, 48)``."""
    prk = pqc.hkdf_extract(generation_seed, framed(k_qkd))
    return expand_label(prk, b"chain", gh, CHAIN_KEY_LEN)


# --- §6 symmetric chains ------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class MessageKey:
    """An AES-256-GCM key and nonce for exactly one message (``MK_i``)."""

    key: bytes
    nonce: bytes

    @classmethod
    def from_bytes(cls, material: bytes) -> MessageKey:
        if len(material) != MESSAGE_KEY_LEN:
            raise ValueError(f"message key material must be {MESSAGE_KEY_LEN} bytes")
        return cls(material[: pqc.AEAD_KEY_LEN], material[pqc.AEAD_KEY_LEN :])

    def to_bytes(self) -> bytes:
        return self.key + self.nonce

    def __repr__(self) -> str:
        return "<MessageKey>"


def _one_block_info(label: bytes, length: int) -> bytes:
    """``info ‖ 0x01`` of a one-block :func:`expand_label` with an empty context."""
    full = LABEL_PREFIX + label
    return struct.pack(">HB", length, len(full)) + full + b"\x00\x01"


_MESSAGE_INFO = _one_block_info(b"message", MESSAGE_KEY_LEN)
_NEXT_INFO = _one_block_info(b"next", CHAIN_KEY_LEN)
_AEAD_KEY_LEN = pqc.AEAD_KEY_LEN
# HMAC (RFC 2104) by hand for the chain step: SHA-384's block is 128 bytes.
_BLOCK = 128
_IPAD = bytes(x ^ 0x36 for x in range(256))  # translate tables: key XOR ipad / opad
_OPAD = bytes(x ^ 0x5C for x in range(256))
_sha384 = hashlib.sha384
_new_key = object.__new__


def chain_step(chain_key: bytes) -> tuple[MessageKey, bytes]:
    """``(MK_i, CK_i+1)`` from ``CK_i``: the symmetric ratchet (``docs/messaging.md`` §6).

    ``MK_i = Expand-Label(CK_i, "message", "", 44)`` and ``CK_i+1 = Expand-Label(CK_i,
    "next", "", 48)``, each one HMAC-SHA-384 block (:func:`expand_label` gives the same
    bytes). This is the per-message path: both HMACs share one keying, the inner and
    outer hashes of ``CK_i`` computed once and copied (RFC 2104, byte for byte what
    :func:`hmac.digest` returns; the vectors check it).
    """
    key = chain_key if len(chain_key) <= _BLOCK else _sha384(chain_key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner, outer = _sha384(key.translate(_IPAD)), _sha384(key.translate(_OPAD))
    inner_next, outer_next = inner.copy(), outer.copy()
    inner.update(_MESSAGE_INFO)
    inner_next.update(_NEXT_INFO)
    outer.update(inner.digest())
    outer_next.update(inner_next.digest())
    mk = outer.digest()
    out = _new_key(MessageKey)  # MessageKey(key, nonce), without the frozen __init__
    out.__dict__.update(key=mk[:_AEAD_KEY_LEN], nonce=mk[_AEAD_KEY_LEN:MESSAGE_KEY_LEN])
    return out, outer_next.digest()


# --- §10 the client store key --------------------------------------------------------------


def store_key(identity_seed: bytes, store_salt: bytes, label: bytes = b"store key") -> bytes:
    """``SK = Expand-Label(HKDF-Extract(salt, framed(seed)), "store key", "", 32)``.

    ``seed`` is the user's ML-DSA identity seed ξ (FIPS 204 §6.1), ``salt`` the
    store's random 32-byte salt kept in its ``meta`` table. SK is never written.
    With ``label = "store names"`` the same recipe gives ``NK``, the key of the
    keyed hashes under which names are stored.
    """
    prk = pqc.hkdf_extract(store_salt, framed(identity_seed))
    return expand_label(prk, label, b"", pqc.AEAD_KEY_LEN)
