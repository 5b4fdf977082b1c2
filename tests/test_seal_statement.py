"""Statements, log entries, tree heads, receipts: canonical bytes and hostile parsing."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from qcall.exceptions import NotInLogError, SealFormatError
from qcall.seal.logformat import LogEntry, LogKey, Receipt, TreeHead
from qcall.seal.statement import Kind, Mode, Policy, SignedStatement, Statement

CHAIN = (b"\x01" * 32, b"\x02" * 32)


def seal(**kw: object) -> Statement:
    args: dict[str, object] = dict(
        kind=Kind.SEAL,
        document_hash=b"\x11" * 48,
        document_name="合同.pdf",
        signing_time=1_767_225_600_000,
        reason="approved by the board",
        chain=CHAIN,
        policy=Policy(Mode.THRESHOLD, 2, ("bob", "carol", "dave")),
    )
    args.update(kw)
    return Statement(**args)  # type: ignore[arg-type]


def approval(**kw: object) -> Statement:
    args: dict[str, object] = dict(
        kind=Kind.APPROVE,
        document_hash=b"\x11" * 48,
        document_name="合同.pdf",
        signing_time=1_767_225_700_000,
        reason="",
        chain=CHAIN,
        seal_digest=b"\x22" * 48,
        previous_digest=b"\x33" * 48,
    )
    args.update(kw)
    return Statement(**args)  # type: ignore[arg-type]


def test_canonical_encoding_layout() -> None:
    s = seal(policy=None, reason="ok", document_name="a")
    data = s.encode()
    assert data == (
        bytes([1, 1])
        + b"\x11" * 48
        + b"\x01a"
        + (1_767_225_600_000).to_bytes(8, "big")
        + b"\x00\x02ok"
        + b"\x02"
        + CHAIN[0]
        + CHAIN[1]
        + b"\x00\x00\x00"
    )
    assert Statement.parse(data) == s
    assert len(s.digest()) == 48


@pytest.mark.parametrize("make", [seal, approval, lambda: seal(policy=None)])
def test_round_trips(make: Callable[[], Statement]) -> None:
    s = make()
    assert Statement.parse(s.encode()) == s
    assert Statement.from_json(s.to_json()) == s
    assert Statement.parse(Statement.from_json(s.to_json()).encode()).encode() == s.encode()


def test_every_truncation_and_extension_is_refused() -> None:
    for s in (seal(), approval()):
        data = s.encode()
        for n in range(len(data)):
            with pytest.raises(SealFormatError):
                Statement.parse(data[:n])
        with pytest.raises(SealFormatError, match="trailing"):
            Statement.parse(data + b"\x00")


def test_random_mutations_raise_only_format_errors() -> None:
    rng = random.Random(1)
    data = bytearray(seal().encode())
    for _ in range(2000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            parsed = Statement.parse(bytes(mutated))
        except SealFormatError:
            continue
        assert parsed.encode() == bytes(mutated)  # one encoding per statement


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"document_hash": b"\x11" * 32}, "48 bytes"),
        ({"document_name": "x" * 256}, "longer than 255"),
        ({"reason": "r" * 1025}, "longer than 1024"),
        ({"chain": ()}, "1..4"),
        ({"chain": (b"x" * 31,)}, "32 bytes"),
        ({"signing_time": -1}, "out of range"),
        ({"seal_digest": b"\x22" * 48}, "names no seal"),
    ],
)
def test_field_limits(change: dict[str, Any], match: str) -> None:
    with pytest.raises(SealFormatError, match=match):
        seal(**change)


def test_policy_rules() -> None:
    with pytest.raises(SealFormatError, match="every approver"):
        Policy(Mode.ORDERED, 1, ("bob", "carol"))
    with pytest.raises(SealFormatError, match="threshold"):
        Policy(Mode.THRESHOLD, 3, ("bob", "carol"))
    with pytest.raises(SealFormatError, match="twice"):
        Policy(Mode.THRESHOLD, 1, ("bob", "bob"))
    with pytest.raises(SealFormatError, match="approver name"):
        Policy(Mode.THRESHOLD, 1, ("bob\n",))
    with pytest.raises(SealFormatError, match="only a seal"):
        approval(policy=Policy(Mode.ORDERED, 1, ("bob",)))


def test_json_is_strict() -> None:
    good = seal().to_json()
    for bad, match in [
        ({**good, "extra": 1}, "unknown statement field"),
        ({**good, "kind": "stamp"}, "kind"),
        ({**good, "signing_time": True}, "signing_time"),
        ({**good, "signing_time": "1"}, "signing_time"),
        ({**good, "document_sha384": "zz" * 48}, "not hex"),
        ({**good, "chain": "ab"}, "chain"),
        ({**good, "policy": {"mode": "any"}}, "policy.mode"),
    ]:
        with pytest.raises(SealFormatError, match=match):
            Statement.from_json(bad)


def test_log_entry_and_tree_head_round_trip() -> None:
    signed = SignedStatement(approval(), b"\x55" * 3309)
    entry = LogEntry(1_767_225_800_000, signed)
    data = entry.encode()
    assert data[:13] == bytes([1]) + (1_767_225_800_000).to_bytes(8, "big") + len(
        signed.statement.encode()
    ).to_bytes(4, "big")
    assert LogEntry.parse(data) == entry
    for n in (0, 5, 20, len(data) - 1):
        with pytest.raises(SealFormatError):
            LogEntry.parse(data[:n])
    head = TreeHead(b"\x01" * 32, 5, 7, b"\x02" * 32, b"\x03" * 10)
    assert TreeHead.from_json(head.to_json()) == head
    receipt = Receipt(3, 7, head, (b"\x04" * 32,))
    assert Receipt.from_json(receipt.to_json()) == receipt
    with pytest.raises(NotInLogError):
        Receipt.from_json(None)
    with pytest.raises(SealFormatError, match="inclusion_proof"):
        Receipt.from_json({**receipt.to_json(), "inclusion_proof": ["00"] * 65})
    with pytest.raises(SealFormatError, match="log_id"):
        LogKey.from_json({**LogKey("l", b"\x00" * 2592).to_json(), "log_id": "00" * 32})
