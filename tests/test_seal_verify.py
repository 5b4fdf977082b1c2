"""Offline verification of .qseal bundles, and every attack of issue #11 refused with its cause."""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qcall import pqc
from qcall.exceptions import SealFormatError, WorkflowError
from qcall.identity import Identity
from qcall.org import Authority
from qcall.seal.bundle import Record, SealBundle
from qcall.seal.log import Submission, TransparencyLog
from qcall.seal.service import LocalLog, Signer, decide, seal_document
from qcall.seal.statement import Kind, Mode, Policy
from qcall.seal.verify import verify_bundle
from tests.seal_helpers import World, make_world, statement, write_document

DAY = datetime.timedelta(days=1)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def doc(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "contract.txt"
    return path, write_document(path)


async def sealed(world: World, doc: tuple[Path, bytes], policy: Policy | None = None) -> SealBundle:
    return await seal_document(
        world.signers["alice"], doc[0], world.sink, world.logs, reason="approved", policy=policy
    )


async def decide_as(world: World, who: str, bundle: SealBundle, **kw: Any) -> Any:
    """``who`` decides on ``bundle`` with their own home's trust, through the world's log."""
    return await decide(
        world.signers[who],
        bundle,
        world.trust(who),
        world.sink,
        world.logs,
        **kw,
    )


def causes(world: World, bundle: SealBundle, document_hash: bytes | None = None) -> list[str]:
    report = verify_bundle(bundle, world.trust(), world.logs, document_hash=document_hash)
    return [f.cause for f in report.failures]


def edit(bundle: SealBundle, change: Callable[[dict[str, Any]], None]) -> SealBundle:
    obj = json.loads(bundle.serialize())
    change(obj)
    return SealBundle.parse(json.dumps(obj).encode())


async def test_a_seal_verifies_and_says_who_when_why(world: World, doc: tuple[Path, bytes]) -> None:
    bundle = await sealed(world, doc)
    bundle = SealBundle.parse(bundle.serialize())
    report = verify_bundle(bundle, world.trust(), world.logs, document_hash=doc[1])
    assert report.ok and report.inclusion_verified
    out = report.to_json()
    assert out["seal"]["signer"] == "alice" and out["seal"]["organisation"] == "Hefei Municipal"
    assert out["seal"]["reason"] == "approved" and out["seal"]["log"] == "test log"
    assert out["log_size"] == 1 and out["document"]["name"] == "contract.txt"
    assert report.tree_heads()[0].tree_size == 1


async def test_tampered_document(world: World, doc: tuple[Path, bytes]) -> None:
    bundle = await sealed(world, doc)
    doc[0].write_text("contract: 9000 yuan")
    assert causes(world, bundle, hashlib.sha384(doc[0].read_bytes()).digest()) == [
        "document_changed"
    ]


@pytest.mark.parametrize(
    "field_change",
    [
        ("reason", "rejected"),
        ("document_name", "other.txt"),
        ("signing_time", 1),
        ("document_sha384", "00" * 48),
        ("policy", {"mode": "threshold", "threshold": 1, "approvers": ["bob"]}),
    ],
    ids=lambda c: c[0],
)
async def test_tampered_bundle_field(
    world: World, doc: tuple[Path, bytes], field_change: tuple[str, Any]
) -> None:
    name, value = field_change
    bundle = edit(await sealed(world, doc), lambda o: o["seal"]["statement"].update({name: value}))
    got = causes(world, bundle)
    assert "signature_invalid" in got


async def test_tampered_signature_receipt_and_garbage(
    world: World, doc: tuple[Path, bytes]
) -> None:
    bundle = await sealed(world, doc)

    def flip_signature(o: dict[str, Any]) -> None:
        sig = bytearray(__import__("base64").b64decode(o["seal"]["signature"]))
        sig[100] ^= 1
        o["seal"]["signature"] = __import__("base64").b64encode(bytes(sig)).decode()

    assert causes(world, edit(bundle, flip_signature)) == ["signature_invalid", "log_proof_invalid"]

    def flip_proof_time(o: dict[str, Any]) -> None:
        o["seal"]["receipt"]["timestamp"] += 1

    assert causes(world, edit(bundle, flip_proof_time)) == ["log_proof_invalid"]
    for garbage in (b"", b"{", b"[]", b'{"format": "qcall-seal", "version": 2}'):
        with pytest.raises(SealFormatError):
            SealBundle.parse(garbage)


async def test_signature_from_a_non_certified_key(world: World, doc: tuple[Path, bytes]) -> None:
    alice = world.signers["alice"]
    mallory = Signer(Identity.generate("alice"), alice.member, alice.authority)  # alice's cert
    bundle = await sealed(world, doc)
    forged = mallory.sign(bundle.seal.statement)
    forged_bundle = SealBundle(Record(forged, bundle.seal.receipt), (), bundle.certificates)
    assert causes(world, forged_bundle) == ["signature_invalid", "log_proof_invalid"]
    # The log itself refuses to record it.
    with pytest.raises(Exception, match="signature does not verify"):
        await world.sink.add(Submission(forged, alice.chain_ders))


async def test_certificate_from_another_authority(
    world: World, doc: tuple[Path, bytes], tmp_path: Path
) -> None:
    evil = Authority.create(tmp_path / "evil", "Hefei Municipal")  # same name, other key
    identity = Identity.generate("alice")
    member = evil.issue("alice", identity.public_key)
    mallory = Signer(identity, member, evil.certificate)
    lenient = TransparencyLog.create(tmp_path / "lenient", "lenient log")
    lenient.trust = None  # a log that accepts anyone: the verifier must still refuse
    bundle = await seal_document(
        mallory, doc[0], LocalLog(lenient), {lenient.log_id: lenient.log_key}
    )
    report = verify_bundle(bundle, world.trust(), {lenient.log_id: lenient.log_key})
    assert [f.cause for f in report.failures] == ["certificate_untrusted"]
    assert "which you do not trust" in report.failures[0].message
    with pytest.raises(Exception, match="not an authenticated member"):
        await world.sink.add(mallory.submission(bundle.seal.signed))


async def test_revoked_signer(world: World, doc: tuple[Path, bytes]) -> None:
    bundle = await sealed(world, doc)
    # Revoked after sealing: the seal stays valid, the verdict says so. (CRL times have
    # 1 s resolution: a revocation in the seal's own second counts as before it.)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    world.revoke("alice", "affiliation-changed", now=later)
    report = verify_bundle(bundle, world.trust(), world.logs)
    assert report.ok and report.seal.member is not None
    assert report.seal.member.revoked_later is not None
    # Key compromise backdated to before the seal: refused, naming the revocation.
    world2 = make_world(doc[0].parent / "w2")
    bundle2 = await seal_document(world2.signers["alice"], doc[0], world2.sink, world2.logs)
    world2.revoke("alice", invalid_since=datetime.datetime.now(datetime.UTC) - DAY)
    report2 = verify_bundle(bundle2, world2.trust(), world2.logs)
    assert [f.cause for f in report2.failures] == ["certificate_revoked"]
    assert "revoked (key-compromise)" in report2.failures[0].message
    # And a revoked signer can no longer log anything.
    with pytest.raises(Exception, match="revoked"):
        await seal_document(world2.signers["alice"], doc[0], world2.sink, world2.logs)


async def test_certificate_expired_at_signing_time(
    world: World, doc: tuple[Path, bytes], tmp_path: Path
) -> None:
    identity = Identity.generate("erin")
    now = datetime.datetime.now(datetime.UTC)
    member = world.org.issue(
        "erin", identity.public_key, days=1, now=now - 3 * DAY, not_before=now - 3 * DAY
    )
    erin = Signer(identity, member, world.org.certificate)
    lenient = TransparencyLog.create(tmp_path / "lenient", "lenient log")
    lenient.trust = None
    logs = {lenient.log_id: lenient.log_key}
    bundle = await seal_document(erin, doc[0], LocalLog(lenient), logs)
    report = verify_bundle(bundle, world.trust(), logs)
    assert [f.cause for f in report.failures] == ["certificate_expired"]
    assert "expired on" in report.failures[0].message


async def test_not_in_the_log(world: World, doc: tuple[Path, bytes]) -> None:
    bundle = await sealed(world, doc)
    unlogged = SealBundle(Record(bundle.seal.signed, None), (), bundle.certificates)
    assert causes(world, unlogged) == ["not_in_log"]
    other_log = make_world(doc[0].parent / "other", members=())
    report = verify_bundle(bundle, world.trust(), other_log.logs)
    assert [f.cause for f in report.failures] == ["log_proof_invalid"]
    assert "unknown log" in report.failures[0].message


async def test_receipt_for_a_different_tree(world: World, doc: tuple[Path, bytes]) -> None:
    bundle = await sealed(world, doc)
    # The log grows; a genuine, signed head of another tree is put into the receipt.
    for _ in range(3):
        await world.sink.add(world.signers["bob"].submission(statement(world.signers["bob"])))
    receipt = bundle.seal.receipt
    assert receipt is not None
    other = Record(
        bundle.seal.signed,
        type(receipt)(
            receipt.leaf_index, receipt.timestamp, world.log.head, receipt.inclusion_proof
        ),
    )
    report = verify_bundle(SealBundle(other, (), bundle.certificates), world.trust(), world.logs)
    assert [f.cause for f in report.failures] == ["log_proof_invalid"]
    # A receipt for another entry of the same log.
    bob_receipt = world.log.receipt(1, world.log.store.entry(1).timestamp)  # type: ignore[union-attr]
    swapped = Record(bundle.seal.signed, bob_receipt)
    assert causes(world, SealBundle(swapped, (), bundle.certificates)) == ["log_proof_invalid"]


# --- approval workflows ----------------------------------------------------------------------


async def test_ordered_approvals_chain(world: World, doc: tuple[Path, bytes]) -> None:
    policy = Policy(Mode.ORDERED, 2, ("bob", "carol"))
    bundle = await sealed(world, doc, policy)
    report = verify_bundle(bundle, world.trust(), world.logs, document_hash=doc[1])
    assert report.ok and report.workflow == "pending (0 of 2; waiting for bob)"
    with pytest.raises(WorkflowError, match="out of order: waiting for bob, not carol"):
        await decide_as(
            world,
            "carol",
            bundle,
            approve=True,
        )
    bundle, report, _ = await decide_as(
        world,
        "bob",
        bundle,
        approve=True,
        reason="checked the figures",
        document_hash=doc[1],
    )
    assert report.workflow == "pending (1 of 2: bob; waiting for carol)"
    bundle, report, _ = await decide_as(
        world,
        "carol",
        bundle,
        approve=True,
        document_hash=doc[1],
    )
    report = verify_bundle(
        SealBundle.parse(bundle.serialize()), world.trust(), world.logs, document_hash=doc[1]
    )
    assert report.ok and report.workflow_state == "approved"
    assert [d.signer for d in report.decisions] == ["bob", "carol"]
    assert report.decisions[0].reason == "checked the figures"
    assert report.inclusion_verified


async def test_replayed_and_out_of_order_approvals_in_a_bundle(
    world: World, doc: tuple[Path, bytes]
) -> None:
    policy = Policy(Mode.ORDERED, 2, ("bob", "carol"))
    bundle = await sealed(world, doc, policy)
    approved, _, _ = await decide_as(world, "bob", bundle, approve=True)
    bob_approval = approved.decisions[0]
    # The same approval twice.
    twice = SealBundle(approved.seal, (bob_approval, bob_approval), approved.certificates)
    report = verify_bundle(twice, world.trust(), world.logs)
    assert [f.cause for f in report.failures] == ["approval_invalid"]
    assert "replayed" in report.failures[0].message
    # Replayed into another workflow (another seal of the same document).
    other = await sealed(world, doc, policy)
    moved = SealBundle(other.seal, (bob_approval,), approved.certificates)
    report = verify_bundle(moved, world.trust(), world.logs)
    assert "for another seal" in report.failures[0].message
    # Carol signs first (a statement built by hand, logged): out of order.
    carol = world.signers["carol"]
    digest = bundle.seal.statement.digest()
    early = statement(
        carol, Kind.APPROVE, document_hash=doc[1], seal_digest=digest, previous=digest
    )
    receipt = await world.sink.add(carol.submission(early))
    out_of_order = bundle.with_decision(Record(early, receipt), list(carol.chain_ders))
    report = verify_bundle(out_of_order, world.trust(), world.logs)
    assert [f.cause for f in report.failures] == ["approval_invalid"]
    assert "out of order: waiting for bob, not carol" in report.failures[0].message
    # Decisions on a seal that asked for none.
    plain = await sealed(world, doc)
    report = verify_bundle(
        SealBundle(plain.seal, (bob_approval,), approved.certificates), world.trust(), world.logs
    )
    assert "asks for no approvals" in report.failures[0].message


async def test_threshold_and_rejection(world: World, doc: tuple[Path, bytes]) -> None:
    policy = Policy(Mode.THRESHOLD, 1, ("bob", "carol"))
    bundle = await sealed(world, doc, policy)
    bundle, report, _ = await decide_as(
        world,
        "carol",
        bundle,
        approve=False,
        reason="wrong total",
    )
    assert report.workflow_state == "pending"
    bundle, report, _ = await decide_as(world, "bob", bundle, approve=True)
    assert report.workflow_state == "approved"
    with pytest.raises(WorkflowError, match="after the workflow was approved"):
        await decide_as(
            world,
            "carol",
            bundle,
            approve=True,
        )


def test_statement_signature_is_plain_fips204(world: World) -> None:
    signed = statement(world.signers["alice"])
    backend = pqc.get_backend("cryptography")
    assert backend.verify(
        pqc.SignatureScheme.ML_DSA_65,
        world.signers["alice"].identity.public_key,
        signed.signature,
        signed.statement.encode(),
        b"qcall-seal-v1 statement",
    )
    assert time.time() > 0
