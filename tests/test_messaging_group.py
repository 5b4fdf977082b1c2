"""Groups: signed membership changes, sender keys, removed and inserted members."""

from __future__ import annotations

import dataclasses

import pytest

from qcall.exceptions import (
    GroupError,
    MessageAuthError,
    MessageFormatError,
    ReplayedMessageError,
    SkippedMessagesError,
)
from qcall.messaging.content import Content
from qcall.messaging.group import (
    GroupAction,
    GroupChange,
    GroupMember,
    GroupMessage,
    GroupState,
    SenderChain,
    apply_change,
    decrypt_group,
    encrypt_group,
)
from qcall.messaging.messages import identity_hash
from tests.messaging_utils import BACKEND, NOW, identity

USERS = {name: identity(name) for name in ("alice", "bob", "carol", "dave", "mallory")}


def member(name: str) -> GroupMember:
    return GroupMember(name, identity_hash(USERS[name].public_key))


def members(*names: str) -> list[GroupMember]:
    return [member(n) for n in names]


def apply(state: GroupState | None, change: GroupChange, me: str) -> GroupState:
    return apply_change(state, change, USERS[change.author].public_key, me, BACKEND)


def created(*names: str) -> tuple[GroupChange, dict[str, GroupState]]:
    change = GroupChange.make(
        USERS[names[0]], None, GroupAction.CREATE, members(*names), NOW, name="team"
    )
    return change, {n: apply(None, change, n) for n in names}


def send(state: GroupState, sender: str, chain: SenderChain, text: str) -> bytes:
    return encrypt_group(state, USERS[sender], chain, Content.text_message(text, NOW).padded())


def receive(state: GroupState, wire: bytes, chain: SenderChain) -> str:
    message = GroupMessage.parse(wire)
    plain = decrypt_group(state, message, chain, USERS[message.sender].public_key, BACKEND)
    return Content.parse(plain).text


def copy(chain: SenderChain) -> SenderChain:
    return SenderChain.parse(chain.serialize())  # what a SENDER_KEY content carries


def test_create_send_and_receive() -> None:
    change, states = created("alice", "bob", "carol")
    assert GroupChange.parse(change.serialize()) == change
    assert len({s.state_hash for s in states.values()}) == 1
    assert states["bob"].names == ["alice", "bob", "carol"]
    chain = SenderChain.new()
    at_bob, at_carol = copy(chain), copy(chain)
    wires = [send(states["alice"], "alice", chain, f"hi {i}") for i in range(3)]
    assert receive(states["bob"], wires[0], at_bob) == "hi 0"
    assert receive(states["carol"], wires[2], at_carol) == "hi 2"  # out of order
    assert receive(states["carol"], wires[1], at_carol) == "hi 1"
    with pytest.raises(ReplayedMessageError):
        receive(states["bob"], wires[0], at_bob)


def test_removed_member_cannot_read_new_messages() -> None:
    _, states = created("alice", "bob", "carol")
    removal = GroupChange.make(
        USERS["bob"], states["bob"], GroupAction.REMOVE, members("alice", "bob"), NOW
    )
    new = {n: apply(states[n], removal, n) for n in ("alice", "bob", "carol")}
    assert new["alice"].epoch == 2 and "carol" not in new["carol"].names
    # Alice's fresh chain for epoch 2 goes to bob only; carol keeps her old one.
    old_chain, chain = SenderChain.new(), SenderChain.new()
    carols_old, bobs = copy(old_chain), copy(chain)
    wire = send(new["alice"], "alice", chain, "carol is gone")
    assert receive(new["bob"], wire, bobs) == "carol is gone"
    with pytest.raises(GroupError):
        receive(states["carol"], wire, carols_old)  # epoch 1 state: wrong epoch
    with pytest.raises(MessageAuthError):  # even with a forced epoch her old key fails
        decrypt_group(
            new["bob"], GroupMessage.parse(wire), carols_old, USERS["alice"].public_key, BACKEND
        )
    # Carol can no longer send to the group either.
    with pytest.raises(GroupError, match="not a member"):
        send(new["carol"], "carol", SenderChain.new(), "still here?")


def test_member_inserted_by_the_server_is_detected() -> None:
    _, states = created("alice", "bob")
    # 1. A change signed by a non-member (the server's own identity "mallory").
    insert = GroupChange.make(
        USERS["mallory"], states["bob"], GroupAction.ADD, members("alice", "bob", "mallory"), NOW
    )
    with pytest.raises(GroupError, match="'mallory' is not a member"):
        apply(states["bob"], insert, "bob")
    # 2. A change claiming alice as author, signed by someone else.
    forged = dataclasses.replace(insert, author="alice")
    with pytest.raises(GroupError, match="signature does not verify"):
        apply(states["bob"], forged, "bob")
    # 3. A message from a non-member sent straight into the group.
    wire = send(
        dataclasses.replace(states["bob"], members=tuple(members("bob", "mallory"))),
        "mallory",
        SenderChain.new(),
        "let me in",
    )
    with pytest.raises(GroupError, match="'mallory' is not a member"):
        receive(states["alice"], wire, SenderChain.new())
    assert states["alice"].names == ["alice", "bob"]


def test_membership_rules() -> None:
    _, states = created("alice", "bob", "carol")
    s = states["alice"]
    cases = [
        (GroupAction.ADD, members("alice", "bob"), "ADD must keep"),
        (GroupAction.REMOVE, members("bob", "carol"), "cannot remove itself"),
        (GroupAction.REMOVE, members("alice", "bob", "carol", "dave"), "only drop"),
        (GroupAction.LEAVE, members("alice", "carol"), "drops exactly its author"),
        (GroupAction.CREATE, members("alice", "bob"), r"not newer|exists"),
    ]
    for action, new_members, error in cases:
        if action is GroupAction.CREATE:  # a second creation of the same group
            change = GroupChange.make(
                USERS["alice"], None, action, new_members, NOW, name="team", group_id=s.group_id
            )
        else:
            change = GroupChange.make(USERS["alice"], s, action, new_members, NOW)
        with pytest.raises(GroupError, match=error):
            apply(s, change, "bob")
    # An ADD that swaps bob's identity key is not an ADD.
    swapped = [*members("alice", "carol", "dave"), GroupMember("bob", bytes(32))]
    change = GroupChange.make(USERS["alice"], s, GroupAction.ADD, swapped, NOW)
    with pytest.raises(GroupError, match="ADD must keep"):
        apply(s, change, "bob")


def test_add_leave_and_a_conflicting_change() -> None:
    _, states = created("alice", "bob")
    add = GroupChange.make(
        USERS["alice"], states["alice"], GroupAction.ADD, members("alice", "bob", "dave"), NOW
    )
    dave = apply(None, add, "dave")  # dave joins from the ADD itself
    bob = apply(states["bob"], add, "bob")
    assert dave.state_hash == bob.state_hash and dave.epoch == 2
    rival = GroupChange.make(
        USERS["bob"], states["bob"], GroupAction.ADD, members("alice", "bob", "carol"), NOW
    )
    with pytest.raises(GroupError, match=r"does not follow|not newer"):
        apply(bob, rival, "bob")
    leave = GroupChange.make(USERS["dave"], dave, GroupAction.LEAVE, members("alice", "bob"), NOW)
    assert apply(bob, leave, "bob").names == ["alice", "bob"]
    with pytest.raises(GroupError, match="we do not know"):
        apply(None, leave, "carol")


def test_group_message_tampering_and_limits() -> None:
    _, states = created("alice", "bob")
    chain = SenderChain.new()
    at_bob = copy(chain)
    wire = send(states["alice"], "alice", chain, "x")
    message = GroupMessage.parse(wire)
    for forged in (
        dataclasses.replace(message, ciphertext=message.ciphertext[:-1] + b"\0"),
        dataclasses.replace(message, index=1),
    ):
        with pytest.raises(MessageAuthError, match="signature"):
            decrypt_group(states["bob"], forged, at_bob, USERS["alice"].public_key, BACKEND)
    with pytest.raises(GroupError, match="identity"):
        decrypt_group(states["bob"], message, at_bob, USERS["bob"].public_key, BACKEND)
    with pytest.raises(GroupError, match="no sender key"):
        decrypt_group(states["bob"], message, None, USERS["alice"].public_key, BACKEND)
    far = [send(states["alice"], "alice", chain, "y") for _ in range(5)]
    with pytest.raises(SkippedMessagesError):
        decrypt_group(
            states["bob"],
            GroupMessage.parse(far[-1]),
            at_bob,
            USERS["alice"].public_key,
            BACKEND,
            max_skip=3,
        )
    assert receive(states["bob"], wire, at_bob) == "x"
    for cut in range(0, len(wire), 101):
        with pytest.raises(MessageFormatError):
            GroupMessage.parse(wire[:cut])
    state = states["bob"]
    assert GroupState.parse(state.serialize()) == state
