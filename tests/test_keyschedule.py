"""Key schedule: vectors, an independent re-implementation of docs/key-schedule.md, properties."""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from qcall.handshake.keyschedule import (
    KeySchedule,
    SRTPProfile,
    expand_label,
    format_sas,
    sas_commitment,
    transcript_hash,
)
from tests.utils import load_vectors

VECTORS = load_vectors("key_schedule.json")
CASES = VECTORS["cases"]


# --- an independent implementation, written from docs/key-schedule.md only ----------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha384).digest()


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return _hmac(salt or b"\0" * 48, ikm)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = _hmac(prk, block + info + bytes([i]))
        out += block
        i += 1
    return out[:length]


def _label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    full = b"qcall2 " + label.encode()
    info = struct.pack(">H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context
    return _expand(secret, info, length)


def _th(domain: bytes, *parts: bytes) -> bytes:
    data = struct.pack(">I", len(domain)) + domain
    for part in parts:
        data += struct.pack(">I", len(part)) + part
    return hashlib.sha384(data).digest()


def _f(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def _independent_epoch(
    profile: str, secret: bytes, th: bytes, k_qkd: bytes, ids: list[str]
) -> dict[str, str]:
    key_len, salt_len = {"AEAD_AES_256_GCM": (32, 12), "AES128_CM_HMAC_SHA1_80": (16, 14)}[profile]
    out = {"secret": secret.hex()}
    for d in ("c2s", "s2c"):
        out[f"{d}_key"] = _label(secret, f"{d} srtp key", th, key_len).hex()
        out[f"{d}_salt"] = _label(secret, f"{d} srtp salt", th, salt_len).hex()
    for role in ("caller", "callee"):
        fk = _label(secret, f"{role} finished", b"", 48)
        out[f"{role}_finished"] = _hmac(fk, th).hex()
    for role in ("caller", "callee"):
        if k_qkd:
            q = _extract(_th(b"qcall-v2 qkd check", *(i.lower().encode() for i in ids)), k_qkd)
            out[f"{role}_qkd_check"] = _label(q, f"qkd check {role}", b"", 16).hex()
        else:
            out[f"{role}_qkd_check"] = ""
    out["transcript_check"] = _th(b"qcall-v2 transcript check", th)[:16].hex()
    return out


def _independent_case(case: dict[str, Any]) -> list[dict[str, str]]:
    results = []
    secret = b""
    for epoch in case["epochs"]:
        ids = epoch["inputs"]["qkd_key_ids"]
        inp = {k: bytes.fromhex(v) for k, v in epoch["inputs"].items() if k != "qkd_key_ids"}
        th = inp["transcript_hash"]
        if epoch["epoch"] == 0:
            hs = _extract(th, _f(inp["k_qkd"], inp["k_kem"]))
            secret = _extract(hs, _f(inp["k_dtls"]))
            value = _label(hs, "sas", _th(b"qcall-v2 sas", th, inp["sas_nonce"]), 8)
            digits = f"{int.from_bytes(value, 'big') % 1_000_000:06d}"
            extra = {
                "handshake_secret": hs.hex(),
                "sas_commit": _th(b"qcall-v2 sas commit", inp["sas_nonce"]).hex(),
                "sas": f"{digits[:3]} {digits[3:]}",
            }
        else:
            secret = _extract(secret, _f(inp["k_qkd"], inp["k_kem"], th))
            extra = {}
        results.append(
            {**extra, **_independent_epoch(case["profile"], secret, th, inp["k_qkd"], ids)}
        )
    return results


# --- the vectors ------------------------------------------------------------------------


def test_vector_file_shape() -> None:
    assert "scripts/gen_key_schedule_vectors.py" in VECTORS["source"]
    assert len(CASES) >= 8
    assert {c["policy"] for c in CASES} == {"hybrid", "pqc"}
    assert {c["profile"] for c in CASES} == {p.value for p in SRTPProfile}
    assert max(len(c["epochs"]) for c in CASES) >= 4  # several rekey steps
    for case in CASES:
        qkd0 = case["epochs"][0]["inputs"]["k_qkd"]
        assert bool(qkd0) == (case["policy"] == "hybrid")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vectors_match_implementation(case: dict[str, Any]) -> None:
    profile = SRTPProfile(case["profile"])
    schedule: KeySchedule | None = None
    for epoch in case["epochs"]:
        ids = epoch["inputs"]["qkd_key_ids"]
        inp = {k: bytes.fromhex(v) for k, v in epoch["inputs"].items() if k != "qkd_key_ids"}
        out = epoch["outputs"]
        if schedule is None:
            schedule = KeySchedule(
                profile,
                inp["transcript_hash"],
                inp["k_qkd"],
                inp["k_kem"],
                inp["k_dtls"],
                qkd_key_ids=ids,
            )
            keys = schedule.current
            assert schedule.handshake_secret is not None
            assert schedule.handshake_secret.hex() == out["handshake_secret"]
            assert sas_commitment(inp["sas_nonce"]).hex() == out["sas_commit"]
            assert schedule.sas(inp["sas_nonce"]) == out["sas"]
            assert schedule.handshake_secret is None  # dropped once the SAS exists
        else:
            keys = schedule.ratchet(
                inp["transcript_hash"], inp["k_qkd"], inp["k_kem"], qkd_key_ids=ids
            )
        assert keys.epoch == epoch["epoch"]
        assert keys.secret.hex() == out["secret"]
        assert keys.caller_to_callee.key.hex() == out["c2s_key"]
        assert keys.caller_to_callee.salt.hex() == out["c2s_salt"]
        assert keys.callee_to_caller.key.hex() == out["s2c_key"]
        assert keys.callee_to_caller.salt.hex() == out["s2c_salt"]
        assert keys.caller_finished.hex() == out["caller_finished"]
        assert keys.callee_finished.hex() == out["callee_finished"]
        assert keys.caller_qkd_check.hex() == out["caller_qkd_check"]
        assert keys.callee_qkd_check.hex() == out["callee_qkd_check"]
        assert keys.transcript_check.hex() == out["transcript_check"]
        assert len(keys.caller_to_callee.key) == profile.key_len
        assert len(keys.caller_to_callee.salt) == profile.salt_len


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vectors_match_independent_implementation(case: dict[str, Any]) -> None:
    assert _independent_case(case) == [e["outputs"] for e in case["epochs"]]


def test_vector_file_is_reproducible(tmp_path: Any) -> None:
    from scripts.gen_key_schedule_vectors import build

    assert build() == VECTORS


# --- properties and edges ----------------------------------------------------------------


def test_expand_label_matches_rfc8446_layout() -> None:
    # info for L=12, label "qcall2 sas", empty context.
    info = b"\x00\x0c\x0aqcall2 sas\x00"
    assert expand_label(b"k" * 48, b"sas", b"", 12) == _expand(b"k" * 48, info, 12)


def test_transcript_hash_is_length_prefixed() -> None:
    assert transcript_hash(b"d", b"ab", b"c") != transcript_hash(b"d", b"a", b"bc")
    assert transcript_hash(b"d", b"ab") == hashlib.sha384(b"\0\0\0\x01d\0\0\0\x02ab").digest()


def test_format_sas() -> None:
    assert format_sas((42).to_bytes(8, "big")) == "000 042"
    assert format_sas((1_000_000 + 123_456).to_bytes(8, "big")) == "123 456"


@settings(max_examples=40, deadline=None)
@given(
    th=st.binary(min_size=48, max_size=48),
    k_qkd=st.one_of(st.just(b""), st.binary(min_size=16, max_size=64)),
    k_kem=st.binary(min_size=32, max_size=32),
    k_dtls=st.binary(min_size=32, max_size=100),
    flip=st.sampled_from(["th", "qkd", "kem", "dtls"]),
)
def test_every_input_changes_every_output(
    th: bytes, k_qkd: bytes, k_kem: bytes, k_dtls: bytes, flip: str
) -> None:
    base = KeySchedule(SRTPProfile.AEAD_AES_256_GCM, th, k_qkd, k_kem, k_dtls).current
    args = {"th": th, "qkd": k_qkd, "kem": k_kem, "dtls": k_dtls}
    value = args[flip] or b"\0" * 16
    args[flip] = bytes([value[0] ^ 0x80]) + value[1:]
    other = KeySchedule(
        SRTPProfile.AEAD_AES_256_GCM, args["th"], args["qkd"], args["kem"], args["dtls"]
    ).current
    assert other.caller_to_callee.key != base.caller_to_callee.key
    assert other.callee_to_caller.key != base.callee_to_caller.key
    assert other.caller_finished != base.caller_finished


def test_directions_and_roles_are_distinct() -> None:
    keys = KeySchedule(SRTPProfile.AEAD_AES_256_GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88)
    c = keys.current
    assert c.caller_to_callee.key != c.callee_to_caller.key
    assert c.caller_finished != c.callee_finished
    assert c.caller_qkd_check != c.callee_qkd_check


def test_ratchet_is_one_way_and_counts() -> None:
    ks = KeySchedule(SRTPProfile.AES128_CM_HMAC_SHA1_80, b"t" * 48, b"", b"k" * 32, b"d" * 60)
    first = ks.current
    second = ks.ratchet(b"u" * 48, b"", b"")
    assert ks.epoch == 1 and second.secret != first.secret
    assert ks.ratchet(b"u" * 48).epoch == 2


@pytest.mark.parametrize(
    ("th", "qkd", "kem", "dtls", "field"),
    [
        (b"t" * 47, b"", b"k" * 32, b"d" * 60, "transcript_hash"),
        (b"t" * 48, b"q" * 1025, b"k" * 32, b"d" * 60, "k_qkd"),
        (b"t" * 48, b"", b"k" * 31, b"d" * 60, "k_kem"),
        (b"t" * 48, b"", b"k" * 32, b"d" * 31, "k_dtls"),
        (b"t" * 48, b"", b"k" * 32, b"d" * 256, "k_dtls"),
    ],
)
def test_bad_input_lengths(th: bytes, qkd: bytes, kem: bytes, dtls: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KeySchedule(SRTPProfile.AEAD_AES_256_GCM, th, qkd, kem, dtls)


def test_reprs_hide_secrets() -> None:
    ks = KeySchedule(SRTPProfile.AEAD_AES_256_GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88)
    c = ks.current
    text = repr(ks) + repr(c) + repr(c.caller_to_callee)
    for secret in (c.secret, c.caller_to_callee.key, c.caller_to_callee.salt):
        assert secret.hex() not in text


@pytest.mark.parametrize("length", [1, 12, 16, 32, 48, 49, 96, 200])
def test_fast_expander_equals_pqc_hkdf_expand(length: int) -> None:
    from qcall import pqc
    from qcall.handshake.keyschedule import _Expander

    prk = hashlib.sha384(b"prk").digest()
    info = b"info" * length
    assert _Expander(prk).expand(info, length) == pqc.hkdf_expand(prk, info, length)
    assert _Expander(prk).label(b"sas", b"ctx", length) == expand_label(prk, b"sas", b"ctx", length)


def test_running_transcript_equals_transcript_hash() -> None:
    from qcall.handshake.keyschedule import Transcript

    t = Transcript(b"dom").add(b"offer")
    assert t.hash_with(b"answer") == transcript_hash(b"dom", b"offer", b"answer")
    assert t.hash_with() == transcript_hash(b"dom", b"offer")  # hash_with does not consume


# --- version 2: what the audit found in version 1 (docs/key-schedule.md §8) ---------------

GCM = SRTPProfile.AEAD_AES_256_GCM


@pytest.mark.parametrize("length", [1, 8, 15])
def test_short_qkd_key_is_refused(length: int) -> None:
    # The docs allow K_qkd of 0 or 16..1024 bytes; 1..15 bytes used to be accepted.
    with pytest.raises(ValueError, match=r"k_qkd must be empty or 16\.\.1024"):
        KeySchedule(GCM, b"t" * 48, b"q" * length, b"k" * 32, b"d" * 88)
    ks = KeySchedule(GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88)
    with pytest.raises(ValueError, match=r"k_qkd must be empty or 16\.\.1024"):
        ks.ratchet(b"u" * 48, b"q" * length, b"")
    assert ks.epoch == 0  # the refused rekey changed nothing


def test_rekey_inputs_are_framed() -> None:
    # Version 1 hashed K_qkd ‖ K_kem unframed: 64 QKD bytes and 32 QKD bytes + a
    # 32-byte KEM secret made of the same bytes gave the same next epoch secret.
    both = hashlib.sha384(b"64 bytes").digest() + hashlib.sha256(b"more").digest()[:16]
    a = KeySchedule(GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88)
    b = KeySchedule(GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88)
    assert a.current.secret == b.current.secret
    one = a.ratchet(b"u" * 48, both, b"")
    two = b.ratchet(b"u" * 48, both[:32], both[32:])
    assert one.secret != two.secret
    assert one.caller_to_callee.key != two.caller_to_callee.key


def test_rekey_transcript_is_bound_into_the_chain() -> None:
    # S_n+1 depends on TH_n+1 itself, so every later epoch depends on every
    # rekey transcript (version 1 used TH_n+1 only for that epoch's outputs).
    a = KeySchedule(GCM, b"t" * 48, b"", b"k" * 32, b"d" * 88)
    b = KeySchedule(GCM, b"t" * 48, b"", b"k" * 32, b"d" * 88)
    one, two = a.ratchet(b"u" * 48, b"", b"k" * 32), b.ratchet(b"v" * 48, b"", b"k" * 32)
    assert one.secret != two.secret
    assert a.ratchet(b"w" * 48).secret != b.ratchet(b"w" * 48).secret


def test_sas_does_not_depend_on_the_dtls_exporter() -> None:
    # A man in the middle that answers as the DTLS client sends its key share
    # last and picks K_dtls after seeing everything else: the SAS must not move.
    nonce = b"r" * 32
    sases = {
        KeySchedule(GCM, b"t" * 48, b"q" * 32, b"k" * 32, dtls).sas(nonce)
        for dtls in (b"d" * 88, b"e" * 88, b"f" * 60)
    }
    assert len(sases) == 1


def test_sas_depends_on_the_committed_nonce_and_the_handshake() -> None:
    def sas(th: bytes = b"t" * 48, qkd: bytes = b"q" * 32, kem: bytes = b"k" * 32,
            nonce: bytes = b"r" * 32) -> str:  # fmt: skip
        return KeySchedule(GCM, th, qkd, kem, b"d" * 88).sas(nonce)

    base = sas()
    assert sas(nonce=b"s" * 32) != base
    assert sas(th=b"u" * 48) != base
    assert sas(qkd=b"p" * 32) != base
    assert sas(kem=b"j" * 32) != base
    ks = KeySchedule(GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88)
    assert ks.sas(b"r" * 32) == ks.sas(b"r" * 32) == base
    with pytest.raises(ValueError, match="another nonce"):
        ks.sas(b"s" * 32)
    with pytest.raises(ValueError, match="sas_nonce"):
        sas_commitment(b"short")


def test_qkd_check_depends_on_the_qkd_key_not_the_transcript() -> None:
    # A first-contact man in the middle makes the transcripts differ while the
    # QKD keys are equal: the QKD check must say "equal" then (version 1 keyed it
    # with TH_0, so it reported a KME fault).
    ids = ["0a7f3c52-9a4e-4f0e-8c36-2b0d3e4f5a6b"]
    a = KeySchedule(GCM, b"t" * 48, b"q" * 32, b"k" * 32, b"d" * 88, qkd_key_ids=ids).current
    b = KeySchedule(GCM, b"u" * 48, b"q" * 32, b"j" * 32, b"e" * 88, qkd_key_ids=ids).current
    c = KeySchedule(GCM, b"t" * 48, b"p" * 32, b"k" * 32, b"d" * 88, qkd_key_ids=ids).current
    assert a.caller_qkd_check == b.caller_qkd_check and a.callee_qkd_check == b.callee_qkd_check
    assert a.caller_qkd_check != c.caller_qkd_check
    assert a.transcript_check != b.transcript_check and a.transcript_check == c.transcript_check
