#!/usr/bin/env python3
"""Generate (or check) the Quantum Cloud Seal interop vectors of docs/seal.md.

Writes ``tests/vectors/seal_statements.json`` (statements, their canonical bytes,
digests and ML-DSA signatures; log entries; a 7-entry log's tree heads, inclusion
and consistency proofs; invalid cases) and ``tests/vectors/seal_bundle.json`` (a
complete ``.qseal`` with an approval, the document, the authority certificate and
the log key).

Keys come from fixed seeds, so everything but the signatures (hedged ML-DSA) and
the certificates (random serials, times) is reproducible: ``--check`` rebuilds
every deterministic value, compares it with the files and verifies every
signature in them; it exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.seal.logformat import TREE_HEAD_CONTEXT, LogEntry, TreeHead, log_id  # noqa: E402
from qcall.seal.merkle import MerkleTree  # noqa: E402
from qcall.seal.statement import (  # noqa: E402
    STATEMENT_CONTEXT,
    Kind,
    Mode,
    Policy,
    SignedStatement,
    Statement,
)

STATEMENTS = ROOT / "tests" / "vectors" / "seal_statements.json"
BUNDLE = ROOT / "tests" / "vectors" / "seal_bundle.json"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def seed(label: str) -> bytes:
    return hashlib.sha256(f"qcall-seal vector {label}".encode()).digest()


def cert_id(label: str) -> bytes:
    return hashlib.sha256(f"certificate {label}".encode()).digest()


def statements() -> list[tuple[str, Statement]]:
    doc = hashlib.sha384(b"The contract: 1000 yuan.\n").digest()
    chain = (cert_id("alice"), cert_id("authority"))
    seal = Statement(Kind.SEAL, doc, "contract.txt", T0, "approved", chain)
    ordered = Statement(
        Kind.SEAL,
        doc,
        "合同.pdf",
        T0 + 1,
        "请审批 (please approve)",
        chain,
        Policy(Mode.ORDERED, 2, ("bob", "carol")),
    )
    threshold = Statement(
        Kind.SEAL,
        doc,
        "budget.xlsx",
        T0 + 2,
        "",
        chain[:1],
        Policy(Mode.THRESHOLD, 2, ("bob", "carol", "dave")),
    )
    bob = (cert_id("bob"), cert_id("authority"))
    approve = Statement(
        Kind.APPROVE,
        doc,
        "合同.pdf",
        T0 + 3,
        "figures checked",
        bob,
        seal_digest=ordered.digest(),
        previous_digest=ordered.digest(),
    )
    reject = Statement(
        Kind.REJECT,
        doc,
        "合同.pdf",
        T0 + 4,
        "wrong total",
        (cert_id("carol"), cert_id("authority")),
        seal_digest=ordered.digest(),
        previous_digest=approve.digest(),
    )
    return [
        ("a seal asking for no approvals", seal),
        ("a seal asking bob then carol (ordered), UTF-8 name and reason", ordered),
        ("a seal asking any 2 of 3, empty reason, chain of one", threshold),
        ("bob's approval of the ordered seal (first decision: previous = seal)", approve),
        ("carol's rejection after bob (previous = bob's approval)", reject),
    ]


def build(signatures: dict[str, str] | None = None) -> dict[str, Any]:
    """The deterministic vectors; fresh signatures unless ``signatures`` reuses them."""
    backend = pqc.get_backend("cryptography")
    signer = backend.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, seed("signer"))
    log_key = backend.signing_from_seed(pqc.SignatureScheme.ML_DSA_87, seed("log"))
    sigs = signatures or {}

    def sign(key: pqc.SigningKey, tbs: bytes, ctx: bytes, name: str) -> bytes:
        if name in sigs:
            return bytes.fromhex(sigs[name])
        return key.sign(tbs, ctx)

    out: dict[str, Any] = {
        "source": (
            "qcall scripts/gen_seal_vectors.py from the spec docs/seal.md §4-5; keys from the "
            "fixed seeds below; ML-DSA signatures are hedged (FIPS 204 algorithm 2), so they "
            "differ on each generation but always verify"
        ),
        "statement_context": STATEMENT_CONTEXT.decode(),
        "tree_head_context": TREE_HEAD_CONTEXT.decode(),
        "signer": {
            "algorithm": "ML-DSA-65",
            "seed": seed("signer").hex(),
            "public_key": signer.public_bytes().hex(),
        },
        "log": {
            "algorithm": "ML-DSA-87",
            "seed": seed("log").hex(),
            "public_key": log_key.public_bytes().hex(),
            "log_id": log_id(log_key.public_bytes()).hex(),
        },
        "statements": [],
        "entries": [],
        "tree_heads": [],
        "inclusion": [],
        "consistency": [],
        "invalid": [],
    }
    signed_list = []
    for i, (description, s) in enumerate(statements()):
        name = f"statement{i}"
        sig = sign(signer, s.encode(), STATEMENT_CONTEXT, name)
        signed_list.append(SignedStatement(s, sig))
        out["statements"].append(
            {
                "description": description,
                "json": s.to_json(),
                "canonical": s.encode().hex(),
                "digest": s.digest().hex(),
                "signature": sig.hex(),
            }
        )
    # A log of 7 entries: statements 0-4, then 0 and 1 again with later timestamps.
    tree = MerkleTree()
    for i in range(7):
        entry = LogEntry(T0 + 1000 * (i + 1), signed_list[i % 5])
        tree.append(entry.leaf_hash())
        out["entries"].append(
            {
                "timestamp": entry.timestamp,
                "statement": i % 5,
                "leaf_input": entry.encode().hex(),
                "leaf_hash": entry.leaf_hash().hex(),
            }
        )
    for size in range(1, 8):
        root = tree.root(size)
        stamp = T0 + 1000 * size + 1
        tbs = TreeHead.tbs(log_id(log_key.public_bytes()), size, stamp, root)
        sig = sign(log_key, tbs, TREE_HEAD_CONTEXT, f"head{size}")
        out["tree_heads"].append(
            {
                "tree_size": size,
                "timestamp": stamp,
                "root_hash": root.hex(),
                "tbs": tbs.hex(),
                "signature": sig.hex(),
            }
        )
    for size in range(1, 8):
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            out["inclusion"].append(
                {"index": index, "tree_size": size, "proof": [h.hex() for h in proof]}
            )
        for first in range(1, size):
            proof = tree.consistency_proof(first, size)
            out["consistency"].append(
                {"first": first, "second": size, "proof": [h.hex() for h in proof]}
            )
    good = out["statements"][1]
    out["invalid"] = [
        {
            "why": "reason changed after signing",
            "json": {**good["json"], "reason": "rejected"},
            "signature": good["signature"],
        },
        {
            "why": "approver order changed",
            "json": {
                **good["json"],
                "policy": {**good["json"]["policy"], "approvers": ["carol", "bob"]},
            },
            "signature": good["signature"],
        },
        {
            "why": "signed with another context string",
            "json": good["json"],
            "signature": sign(
                signer, statements()[1][1].encode(), b"qcall-seal-v1 other", "bad0"
            ).hex(),
        },
    ]
    return out


def signatures_of(vectors: dict[str, Any]) -> dict[str, str]:
    sigs = {f"statement{i}": s["signature"] for i, s in enumerate(vectors["statements"])}
    sigs |= {f"head{h['tree_size']}": h["signature"] for h in vectors["tree_heads"]}
    sigs["bad0"] = vectors["invalid"][2]["signature"]
    return sigs


async def bundle_vectors() -> dict[str, Any]:
    """A real organisation, log, seal and approval (certificates are random)."""
    from qcall.identity import Identity
    from qcall.org import Authority, OrgTrust
    from qcall.seal.log import TransparencyLog
    from qcall.seal.service import LocalLog, Signer, decide, seal_document

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        org = Authority.create(root / "ca", "Hefei Municipal")
        log = TransparencyLog.create(root / "log", "vector log")
        assert log.trust is not None
        log.trust.trust(pqc.x509_pem(org.certificate))
        log.trust.update_crl((org.directory / "crl.pem").read_bytes())
        signers = {}
        for name in ("alice", "bob"):
            identity = Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed(name))
            member = org.issue(name, identity.public_key, department="Finance")
            signers[name] = Signer(identity, member, org.certificate)
        doc = root / "contract.txt"
        doc.write_text("The contract: 1000 yuan.\n")
        logs = {log.log_id: log.log_key}
        bundle = await seal_document(
            signers["alice"],
            doc,
            LocalLog(log),
            logs,
            reason="approved",
            policy=Policy(Mode.ORDERED, 1, ("bob",)),
        )
        trust = OrgTrust(root / "trust")
        trust.trust(pqc.x509_pem(org.certificate))
        trust.update_crl((org.directory / "crl.pem").read_bytes())
        bundle, _, _ = await decide(
            signers["bob"], bundle, trust, LocalLog(log), logs, approve=True, reason="ok"
        )
        return {
            "source": "qcall scripts/gen_seal_vectors.py: a real seal with bob's approval",
            "document": base64.b64encode(doc.read_bytes()).decode(),
            "authority_certificate": pqc.x509_pem(org.certificate).decode(),
            "authority_crl": (org.directory / "crl.pem").read_text(),
            "log_public_key": log.log_key.public_key.hex(),
            "bundle": json.loads(bundle.serialize()),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the files, write nothing")
    args = parser.parse_args()
    if args.check:
        stored = json.loads(STATEMENTS.read_text())
        rebuilt = build(signatures_of(stored))
        if rebuilt != stored:
            print(f"{STATEMENTS} differs from what the code produces", file=sys.stderr)
            return 1
        backend = pqc.get_backend("cryptography")
        pk = bytes.fromhex(stored["signer"]["public_key"])
        for s in stored["statements"]:
            assert backend.verify(
                pqc.SignatureScheme.ML_DSA_65,
                pk,
                bytes.fromhex(s["signature"]),
                bytes.fromhex(s["canonical"]),
                STATEMENT_CONTEXT,
            ), s["description"]
        print(
            f"{STATEMENTS}: {len(stored['statements'])} statements, "
            f"{len(stored['inclusion'])} inclusion and {len(stored['consistency'])} "
            "consistency proofs: all match"
        )
        return 0
    STATEMENTS.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")
    BUNDLE.write_text(json.dumps(asyncio.run(bundle_vectors()), indent=1) + "\n")
    print(f"wrote {STATEMENTS} and {BUNDLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
