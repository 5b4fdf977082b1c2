"""Approval workflows: ordered and k-of-n rules, and every refusal (qcall.seal.workflow)."""

from __future__ import annotations

import pytest

from qcall.exceptions import WorkflowError
from qcall.seal.statement import Kind, Mode, Policy, Statement
from qcall.seal.workflow import DECISION_RULES, Decision, Notify, State, Workflow

ORG = b"\xaa" * 32
DOC = b"\x11" * 48


def make_seal(
    mode: Mode, k: int, approvers: tuple[str, ...] = ("bob", "carol", "dave")
) -> Statement:
    return Statement(Kind.SEAL, DOC, "c.pdf", 1000, "", (b"\x01" * 32,), Policy(mode, k, approvers))


def decision(
    wf: Workflow,
    who: str,
    kind: Kind = Kind.APPROVE,
    *,
    previous: bytes | None = None,
    seal_digest: bytes | None = None,
    org: bytes = ORG,
    time: int = 2000,
) -> Decision:
    s = Statement(
        kind,
        DOC,
        "c.pdf",
        time,
        f"{who} says so",
        (bytes([len(who)]) * 32,),
        seal_digest=seal_digest or wf.seal_digest,
        previous_digest=previous if previous is not None else wf.expected_previous(),
    )
    return Decision(who, org, s)


def test_rules_table_covers_decisions_only() -> None:
    assert set(DECISION_RULES) == {Kind.APPROVE, Kind.REJECT}
    assert all(states == {State.PENDING} for states in DECISION_RULES.values())


def test_ordered_workflow_notifies_one_approver_at_a_time() -> None:
    wf = Workflow(make_seal(Mode.ORDERED, 3), "alice", ORG)
    assert wf.start() == [Notify("bob", wf.id, "review")]
    assert wf.receive(decision(wf, "bob")) == [Notify("carol", wf.id, "review")]
    assert wf.status() == "pending (1 of 3: bob; waiting for carol)"
    assert wf.receive(decision(wf, "carol")) == [Notify("dave", wf.id, "review")]
    out = wf.receive(decision(wf, "dave"))
    assert out == [Notify("alice", wf.id, "approved", "approved by bob, carol, dave")]
    assert wf.state is State.APPROVED and wf.waiting_for() == []
    assert wf.status() == "approved (3 of 3: bob, carol, dave)"


def test_threshold_workflow() -> None:
    wf = Workflow(make_seal(Mode.THRESHOLD, 2), "alice", ORG)
    assert [n.recipient for n in wf.start()] == ["bob", "carol", "dave"]
    assert wf.receive(decision(wf, "dave")) == []
    assert wf.receive(decision(wf, "bob"))[0].what == "approved"
    assert wf.status() == "approved (2 of 2: dave, bob)"


def state_of(wf: Workflow) -> State:
    """The workflow's state, unnarrowed (for mypy: ``receive`` may change it)."""
    return wf.state


def test_threshold_rejection_only_when_out_of_reach() -> None:
    wf = Workflow(make_seal(Mode.THRESHOLD, 2), "alice", ORG)
    assert wf.receive(decision(wf, "bob", Kind.REJECT)) == []
    assert state_of(wf) is State.PENDING
    out = wf.receive(decision(wf, "carol", Kind.REJECT))
    assert out == [Notify("alice", wf.id, "rejected", "rejected by carol: carol says so")]
    assert wf.state is State.REJECTED
    with pytest.raises(WorkflowError, match="after the workflow was rejected"):
        wf.receive(decision(wf, "dave"))


def test_ordered_rejection_ends_it() -> None:
    wf = Workflow(make_seal(Mode.ORDERED, 3), "alice", ORG)
    wf.receive(decision(wf, "bob", Kind.REJECT))
    assert wf.state is State.REJECTED
    assert wf.status() == "rejected by bob: 'bob says so'"


def test_every_refusal_is_named_and_changes_nothing() -> None:
    wf = Workflow(make_seal(Mode.ORDERED, 3), "alice", ORG)
    first = decision(wf, "bob")
    cases = [
        (decision(wf, "carol"), "out of order: waiting for bob, not carol"),
        (decision(wf, "mallory"), "mallory is not an approver"),
        (decision(wf, "bob", org=b"\xbb" * 32), "from another organisation"),
        (decision(wf, "bob", seal_digest=b"\x99" * 48), "for another seal"),
        (decision(wf, "bob", previous=b"\x98" * 48), "follows another decision"),
    ]
    for bad, match in cases:
        with pytest.raises(WorkflowError, match=match):
            wf.receive(bad)
        assert wf.decisions == [] and wf.state is State.PENDING
    wf.receive(first)
    with pytest.raises(WorkflowError, match="replayed decision: bob has already decided"):
        wf.receive(first)  # the same approval again
    with pytest.raises(WorkflowError, match="replayed decision"):
        wf.receive(decision(wf, "bob", time=3000))  # a fresh one by the same approver
    stale = decision(wf, "carol", previous=wf.seal_digest)  # built before bob's was known
    with pytest.raises(WorkflowError, match="follows another decision"):
        wf.receive(stale)


def test_another_document_and_no_policy() -> None:
    wf = Workflow(make_seal(Mode.THRESHOLD, 1), "alice", ORG)
    d = decision(wf, "bob")
    other = Statement(
        Kind.APPROVE,
        b"\x12" * 48,
        "c.pdf",
        1,
        "",
        (b"\x01" * 32,),
        seal_digest=wf.seal_digest,
        previous_digest=wf.seal_digest,
    )
    with pytest.raises(WorkflowError, match="another document"):
        wf.receive(Decision("bob", ORG, other))
    wf.receive(d)
    no_policy = Statement(Kind.SEAL, DOC, "c.pdf", 1, "", (b"\x01" * 32,))
    with pytest.raises(WorkflowError, match="asks for no approvals"):
        Workflow(no_policy, "alice", ORG)
