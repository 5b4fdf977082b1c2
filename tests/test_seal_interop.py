"""An independent implementation of docs/seal.md §4-5 and §8, checked against the vectors.

Written from the documentation alone: ``hashlib``, ``struct``, ``json`` and the FIPS 204
verifier of ``cryptography`` — no qcall code. If this file and qcall disagree, one of them
does not follow the spec.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.hazmat.primitives.serialization import Encoding

from tests.utils import load_vectors

V = load_vectors("seal_statements.json")
RFC = load_vectors("seal_merkle_rfc6962.json")
BUNDLE = load_vectors("seal_bundle.json")
MLDSAPublicKeyType = (
    type[mldsa.MLDSA44PublicKey] | type[mldsa.MLDSA65PublicKey] | type[mldsa.MLDSA87PublicKey]
)
PUBLIC: dict[str, MLDSAPublicKeyType] = {
    "ML-DSA-44": mldsa.MLDSA44PublicKey,
    "ML-DSA-65": mldsa.MLDSA65PublicKey,
    "ML-DSA-87": mldsa.MLDSA87PublicKey,
}


# --- §4.1, written from the table ---------------------------------------------------------


def vec(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def encode_statement(j: dict[str, Any]) -> bytes:
    kind = {"seal": 1, "approve": 2, "reject": 3}[j["kind"]]
    out = bytes([1, kind]) + bytes.fromhex(j["document_sha384"])
    out += vec(1, j["document_name"].encode()) + struct.pack(">Q", j["signing_time"])
    out += vec(2, j["reason"].encode()) + bytes([len(j["chain"])])
    out += b"".join(bytes.fromhex(c) for c in j["chain"])
    if kind == 1:
        policy = j["policy"]
        if policy is None:
            return out + b"\x00\x00\x00"
        mode = {"ordered": 1, "threshold": 2}[policy["mode"]]
        out += bytes([mode, policy["threshold"], len(policy["approvers"])])
        return out + b"".join(vec(1, a.encode()) for a in policy["approvers"])
    return out + bytes.fromhex(j["seal_digest"]) + bytes.fromhex(j["previous_digest"])


def mldsa_ok(algorithm: str, pk: bytes, sig: bytes, msg: bytes, ctx: bytes) -> bool:
    try:
        PUBLIC[algorithm].from_public_bytes(pk).verify(sig, msg, ctx or None)
    except InvalidSignature:
        return False
    return True


# --- RFC 9162 §2.1, written from the RFC ---------------------------------------------------


def h_leaf(d: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + d).digest()


def h_node(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + a + b).digest()


def root_from_path(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes | None:
    if index >= size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn % 2 == 1 or fn == sn:
            r = h_node(p, r)
            while fn % 2 == 0 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = h_node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def consistent(first: int, second: int, r1: bytes, r2: bytes, path: list[bytes]) -> bool:
    if first == second:
        return not path and r1 == r2
    if first == 0:
        return not path
    if first > second or not path:
        return False
    if first & (first - 1) == 0:
        path = [r1, *path]
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = h_node(c, fr), h_node(c, sr)
            while fn % 2 == 0 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = h_node(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == r1 and sr == r2 and sn == 0


def hexes(items: list[str]) -> list[bytes]:
    return [bytes.fromhex(x) for x in items]


# --- the vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V["statements"], ids=lambda c: c["description"][:30])
def test_statement_bytes_and_signature(case: dict[str, Any]) -> None:
    data = encode_statement(case["json"])
    assert data.hex() == case["canonical"]
    assert hashlib.sha384(data).hexdigest() == case["digest"]
    pk = bytes.fromhex(V["signer"]["public_key"])
    ctx = V["statement_context"].encode()
    assert ctx == b"qcall-seal-v1 statement"
    assert mldsa_ok("ML-DSA-65", pk, bytes.fromhex(case["signature"]), data, ctx)


@pytest.mark.parametrize("case", V["invalid"], ids=lambda c: c["why"])
def test_invalid_statements_fail(case: dict[str, Any]) -> None:
    pk = bytes.fromhex(V["signer"]["public_key"])
    data = encode_statement(case["json"])
    assert not mldsa_ok(
        "ML-DSA-65", pk, bytes.fromhex(case["signature"]), data, V["statement_context"].encode()
    )


def test_log_entries_heads_and_proofs() -> None:
    leaves = []
    for e in V["entries"]:
        st = V["statements"][e["statement"]]
        leaf = (
            bytes([1])
            + struct.pack(">Q", e["timestamp"])
            + vec(4, bytes.fromhex(st["canonical"]))
            + vec(2, bytes.fromhex(st["signature"]))
        )
        assert leaf.hex() == e["leaf_input"]
        assert h_leaf(leaf).hex() == e["leaf_hash"]
        leaves.append(h_leaf(leaf))
    log_pk = bytes.fromhex(V["log"]["public_key"])
    assert hashlib.sha256(log_pk).hexdigest() == V["log"]["log_id"]
    roots = {}
    for head in V["tree_heads"]:
        tbs = (
            b"\x01"
            + bytes.fromhex(V["log"]["log_id"])
            + struct.pack(">QQ", head["tree_size"], head["timestamp"])
            + bytes.fromhex(head["root_hash"])
        )
        assert tbs.hex() == head["tbs"]
        assert mldsa_ok(
            "ML-DSA-87", log_pk, bytes.fromhex(head["signature"]), tbs, b"qcall-seal-v1 tree head"
        )
        roots[head["tree_size"]] = bytes.fromhex(head["root_hash"])
    for case in V["inclusion"]:
        n, i = case["tree_size"], case["index"]
        assert root_from_path(i, n, leaves[i], hexes(case["proof"])) == roots[n]
        assert root_from_path(i, n, leaves[(i + 1) % 7], hexes(case["proof"])) != roots[n]
    for case in V["consistency"]:
        m, n = case["first"], case["second"]
        assert consistent(m, n, roots[m], roots[n], hexes(case["proof"]))
        assert not consistent(m, n, roots[n], roots[m], hexes(case["proof"]))


def test_the_rfc6962_reference_vectors() -> None:
    leaves = [h_leaf(bytes.fromhex(x)) for x in RFC["leaves"]]
    roots = hexes(RFC["roots"])
    for case in RFC["inclusion"]:
        n, i = case["tree_size"], case["index"]
        assert root_from_path(i, n, leaves[i], hexes(case["proof"])) == roots[n - 1]
    for case in RFC["consistency"]:
        m, n = case["first"], case["second"]
        assert consistent(m, n, roots[m - 1], roots[n - 1], hexes(case["proof"]))


def test_a_whole_bundle_per_section_8() -> None:
    """Steps 1-4 of §8 and the document check, on a real seal with an approval."""
    b = BUNDLE["bundle"]
    assert b["format"] == "qcall-seal" and b["version"] == 1
    document = base64.b64decode(BUNDLE["document"])
    certs = {}
    for c in b["certificates"]:
        der = base64.b64decode(c)
        certs[hashlib.sha256(der).hexdigest()] = x509.load_der_x509_certificate(der)
    authority = x509.load_pem_x509_certificate(BUNDLE["authority_certificate"].encode())
    authority_key = authority.public_key()
    assert isinstance(authority_key, mldsa.MLDSA87PublicKey)  # for mypy
    ca_pk = PUBLIC["ML-DSA-87"].from_public_bytes(authority_key.public_bytes_raw())
    log_pk = bytes.fromhex(BUNDLE["log_public_key"])
    log_id = hashlib.sha256(log_pk).digest()
    records = [b["seal"], *b["decisions"]]
    assert len(records) == 2
    seal_digest = None
    for record in records:
        st = record["statement"]
        data = encode_statement(st)
        sig = base64.b64decode(record["signature"])
        cert = certs[st["chain"][0]]  # 1. the certificate
        ca_pk.verify(cert.signature, cert.tbs_certificate_bytes)  # 3. the authority (RFC 9881)
        assert st["chain"][-1] == hashlib.sha256(authority.public_bytes(Encoding.DER)).hexdigest()
        cert_key = cert.public_key()
        assert isinstance(cert_key, mldsa.MLDSA65PublicKey)  # for mypy
        pk = cert_key.public_bytes_raw()
        assert mldsa_ok("ML-DSA-65", pk, sig, data, b"qcall-seal-v1 statement")  # 2.
        r = record["receipt"]  # 4. the log
        head = r["tree_head"]
        leaf = b"\x01" + struct.pack(">Q", r["timestamp"]) + vec(4, data) + vec(2, sig)
        root = root_from_path(
            r["leaf_index"], head["tree_size"], h_leaf(leaf), hexes(r["inclusion_proof"])
        )
        assert root == bytes.fromhex(head["root_hash"])
        tbs = b"\x01" + log_id + struct.pack(">QQ", head["tree_size"], head["timestamp"]) + root
        assert mldsa_ok(
            "ML-DSA-87",
            log_pk,
            base64.b64decode(head["signature"]),
            tbs,
            b"qcall-seal-v1 tree head",
        )
        if st["kind"] == "seal":
            assert hashlib.sha384(document).hexdigest() == st["document_sha384"]
            seal_digest = hashlib.sha384(data).hexdigest()
        else:  # §4.1: the first decision of an ordered workflow follows the seal
            assert st["kind"] == "approve"
            assert st["seal_digest"] == st["previous_digest"] == seal_digest


def test_qcall_verifies_the_bundle_too(tmp_path: Path) -> None:
    from qcall.org import OrgTrust
    from qcall.seal.bundle import SealBundle
    from qcall.seal.logformat import LogKey
    from qcall.seal.verify import verify_bundle

    trust = OrgTrust(tmp_path / "org")
    trust.trust(BUNDLE["authority_certificate"].encode())
    trust.update_crl(BUNDLE["authority_crl"].encode())
    key = LogKey("vector log", bytes.fromhex(BUNDLE["log_public_key"]))
    bundle = SealBundle.parse(json.dumps(BUNDLE["bundle"]).encode())
    document = hashlib.sha384(base64.b64decode(BUNDLE["document"])).digest()
    report = verify_bundle(bundle, trust, {key.log_id: key}, document_hash=document)
    assert report.ok, report.failures
    assert report.workflow_state == "approved"


def test_the_vectors_are_what_the_code_produces() -> None:
    """``python scripts/gen_seal_vectors.py --check`` as a test: qcall still writes these bytes."""
    from scripts.gen_seal_vectors import build, signatures_of

    assert build(signatures_of(V)) == V
    assert "scripts/gen_seal_vectors.py" in V["source"]
