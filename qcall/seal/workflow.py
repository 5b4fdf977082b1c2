"""Approval workflows: ordered or k-of-n approvals of a seal, as a pure state machine.

A seal whose statement carries a :class:`~qcall.seal.statement.Policy` opens a
workflow, named by the seal statement's SHA-384 (its *workflow ID*)::

    sealer                        approvers (ordered: one at a time; threshold: all at once)
    Workflow(seal).start() ──── Notify(review) ──▶ bob
                                                   bob signs APPROVE(seal_digest, previous)
    receive(Decision) ◀──────────────────────────── (logged, then added to the bundle)
      ordered:   Notify(review) ──▶ carol          previous = bob's approval digest
      threshold: nothing new; APPROVED after k approvals, REJECTED once k is out of reach
    Notify(approved | rejected) ──▶ sealer

The same object replays a bundle's decisions at verification time, so a
``.qseal`` is checked by exactly the rules that built it. Every rule lives in
:data:`DECISION_RULES` and :meth:`Workflow.check`; a decision that breaks one
raises :class:`~qcall.exceptions.WorkflowError` naming it (out of order,
replayed, not an approver, another organisation, another seal or document,
workflow closed) and changes nothing. Decisions reach this core only after
their signature and certificate were verified (:mod:`qcall.seal.verify`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qcall.exceptions import WorkflowError
from qcall.seal.statement import Kind, Mode, Policy, Statement

__all__ = ["DECISION_RULES", "Decision", "Notify", "State", "Workflow"]


class State(enum.IntEnum):
    """Where a workflow is."""

    PENDING = 1
    APPROVED = 2
    REJECTED = 3


#: The state rules: decision kind -> states in which it is accepted. Anything else
#: is refused with "the workflow is already approved/rejected".
DECISION_RULES: dict[Kind, frozenset[State]] = {
    Kind.APPROVE: frozenset({State.PENDING}),
    Kind.REJECT: frozenset({State.PENDING}),
}


@dataclass(frozen=True)
class Decision:
    """A verified approval or rejection.

    Attributes:
        approver: the signer's name, from its validated certificate.
        authority: SHA-256 of the authority certificate that certified the signer.
        statement: the signed statement (kind approve or reject).
    """

    approver: str
    authority: bytes
    statement: Statement


@dataclass(frozen=True)
class Notify:
    """Output: tell ``recipient`` about workflow ``workflow_id``.

    ``what`` is ``review`` (your approval is asked), ``approved`` or ``rejected``
    (to the sealer; ``detail`` names who decided and why).
    """

    recipient: str
    workflow_id: str
    what: str
    detail: str = ""


class Workflow:
    """The approval state of one seal (pure: no I/O, no clock).

    Args:
        seal: the seal statement (must carry a policy).
        sealer: the sealer's name (from its certificate): gets the outcome.
        authority: SHA-256 of the sealer's authority; approvers must share it.

    Raises:
        WorkflowError: the seal asks for no approvals.
    """

    def __init__(self, seal: Statement, sealer: str, authority: bytes) -> None:
        if seal.kind is not Kind.SEAL or seal.policy is None:
            raise WorkflowError("this seal asks for no approvals")
        self.seal = seal
        self.policy: Policy = seal.policy
        self.sealer = sealer
        self.authority = authority
        self.seal_digest = seal.digest()
        self.id = self.seal_digest.hex()
        self.state = State.PENDING
        self.decisions: list[Decision] = []
        self._digests: set[bytes] = set()

    def __repr__(self) -> str:
        return f"Workflow({self.id[:16]}, {self.state.name}, {len(self.approvals)} approvals)"

    @property
    def approvals(self) -> list[str]:
        return [d.approver for d in self.decisions if d.statement.kind is Kind.APPROVE]

    @property
    def rejections(self) -> list[Decision]:
        return [d for d in self.decisions if d.statement.kind is Kind.REJECT]

    def expected_previous(self) -> bytes:
        """The ``previous_digest`` the next decision must carry."""
        if self.policy.mode is Mode.ORDERED and self.decisions:
            return self.decisions[-1].statement.digest()
        return self.seal_digest

    def waiting_for(self) -> list[str]:
        """Who may decide now (empty once the workflow is closed)."""
        if self.state is not State.PENDING:
            return []
        if self.policy.mode is Mode.ORDERED:
            return [self.policy.approvers[len(self.decisions)]]
        decided = {d.approver for d in self.decisions}
        return [a for a in self.policy.approvers if a not in decided]

    def start(self) -> list[Notify]:
        """The first notifications: ask the approvers who may decide now."""
        return [Notify(a, self.id, "review") for a in self.waiting_for()]

    def check(self, decision: Decision) -> None:
        """Raise :class:`WorkflowError` if ``decision`` may not be applied now."""
        s = decision.statement
        who = decision.approver
        allowed = DECISION_RULES.get(s.kind)
        if allowed is None:
            raise WorkflowError(f"a {s.kind.label} statement is not a decision")
        if self.state not in allowed:
            raise WorkflowError(
                f"{who}'s {s.kind.label} arrived after the workflow was {self.state.name.lower()}"
            )
        if s.seal_digest != self.seal_digest:
            raise WorkflowError(
                f"{who}'s {s.kind.label} is for another seal (workflow "
                f"{s.seal_digest.hex()[:16]}, not {self.id[:16]}): replayed from elsewhere"
            )
        if s.document_hash != self.seal.document_hash:
            raise WorkflowError(f"{who}'s {s.kind.label} is about another document")
        if who not in self.policy.approvers:
            raise WorkflowError(f"{who} is not an approver of this seal")
        if decision.authority != self.authority:
            raise WorkflowError(f"{who}'s certificate is from another organisation")
        if s.digest() in self._digests or who in {d.approver for d in self.decisions}:
            raise WorkflowError(f"replayed decision: {who} has already decided")
        if self.policy.mode is Mode.ORDERED:
            expected = self.policy.approvers[len(self.decisions)]
            if who != expected:
                raise WorkflowError(f"out of order: waiting for {expected}, not {who}")
        if s.previous_digest != self.expected_previous():
            raise WorkflowError(
                f"{who}'s {s.kind.label} follows another decision than the last one "
                "(out of order or replayed)"
            )

    def receive(self, decision: Decision) -> list[Notify]:
        """Apply a verified decision; return the notifications to send.

        Raises:
            WorkflowError: the decision breaks a rule (nothing changes).
        """
        self.check(decision)
        self.decisions.append(decision)
        self._digests.add(decision.statement.digest())
        s = decision.statement
        n, k = len(self.policy.approvers), self.policy.threshold
        if s.kind is Kind.APPROVE and len(self.approvals) >= k:
            self.state = State.APPROVED
        elif s.kind is Kind.REJECT and n - len(self.rejections) < k:
            self.state = State.REJECTED
        if self.state is State.APPROVED:
            detail = f"approved by {', '.join(self.approvals)}"
            return [Notify(self.sealer, self.id, "approved", detail)]
        if self.state is State.REJECTED:
            detail = f"rejected by {decision.approver}: {s.reason}"
            return [Notify(self.sealer, self.id, "rejected", detail)]
        if self.policy.mode is Mode.ORDERED:
            return self.start()
        return []

    def status(self) -> str:
        """``approved (2 of 2: bob, carol)``, ``pending (1 of 2; waiting for carol)``, ..."""
        k = self.policy.threshold
        got = self.approvals
        if self.state is State.REJECTED:
            last = self.rejections[-1]
            return f"rejected by {last.approver}: {last.statement.reason!r}"
        names = f": {', '.join(got)}" if got else ""
        if self.state is State.APPROVED:
            return f"approved ({len(got)} of {k}{names})"
        return f"pending ({len(got)} of {k}{names}; waiting for {', '.join(self.waiting_for())})"
