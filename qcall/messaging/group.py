"""Groups: signed membership changes and per-member sender keys (``docs/messaging.md`` §9).

A group is a list of members (name and identity hash) at an *epoch*. Every
change — create, add, remove, leave — is a :class:`GroupChange` signed with the
author's ML-DSA identity and sent to every member over the 1:1 sessions, so the
server can neither forge nor insert one. :func:`apply_change` holds the rules
in one table (:data:`CHANGE_RULES`) and refuses anything else:

    action  author must be     members afterwards
    CREATE  in the new list    any list with the author and the receiver (epoch 1)
    ADD     a member           a strict superset of the current list
    REMOVE  a member, staying  a strict subset of the current list
    LEAVE   a member           the current list without the author

After every change each member makes a fresh random *sender chain* for the
new epoch and sends it (a SENDER_KEY content) to each other member over the 1:1
sessions: a removed member never receives the new chains, so it cannot read
what is sent after its removal. A group message is encrypted under the
sender's chain (the symmetric step of §6) and signed with the sender's identity
(so one member cannot write as another):

    GroupMessage := u8 version ‖ u8 type=3 ‖ 16 group_id ‖ u32 epoch ‖ text8 sender
                    ‖ u32 index ‖ var32 ciphertext ‖ var16 signature
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qcall import pqc
from qcall.exceptions import (
    GroupError,
    MessageAuthError,
    MessageFormatError,
    ReplayedMessageError,
    SkippedMessagesError,
)
from qcall.messaging.keyschedule import CHAIN_KEY_LEN, MESSAGE_KEY_LEN, MessageKey, chain_step, th
from qcall.messaging.messages import (
    MAX_CIPHERTEXT,
    VERSION,
    MessageType,
    identity_hash,
    message_type,
)
from qcall.messaging.prekeys import check_name, parse_identity_key
from qcall.messaging.session import LocalIdentity
from qcall.messaging.wire import Reader, Writer

__all__ = [
    "CHANGE_CONTEXT",
    "CHANGE_RULES",
    "GROUP_ID_LEN",
    "MAX_MEMBERS",
    "MESSAGE_CONTEXT",
    "GroupAction",
    "GroupChange",
    "GroupMember",
    "GroupMessage",
    "GroupState",
    "SenderChain",
    "apply_change",
    "decrypt_group",
    "encrypt_group",
    "new_group_id",
]

#: ML-DSA context strings (FIPS 204 §5.2).
CHANGE_CONTEXT = b"qmsg1 group change"
MESSAGE_CONTEXT = b"qmsg1 group message"
GROUP_ID_LEN = 16
MAX_MEMBERS = 1000
_ZERO_HASH = bytes(48)
_MAX_SIG = max(s.sizes.signature for s in pqc.SignatureScheme)


def new_group_id() -> bytes:
    return secrets.token_bytes(GROUP_ID_LEN)


class GroupAction(enum.IntEnum):
    CREATE = 1
    ADD = 2
    REMOVE = 3
    LEAVE = 4


@dataclass(frozen=True, order=True)
class GroupMember:
    """A member: name and SHA-256 of the identity public key."""

    name: str
    identity_hash: bytes

    def encode(self, w: Writer) -> None:
        w.text8(self.name).raw(self.identity_hash)

    @classmethod
    def read(cls, r: Reader) -> GroupMember:
        name = check_name(r.text8("members.name"), "group: member name")
        return cls(name, r.raw(32, "members.identity_hash"))


def _members(members: Sequence[GroupMember], what: str) -> tuple[GroupMember, ...]:
    ordered = tuple(sorted(members))
    names = [m.name for m in ordered]
    if len(set(names)) != len(names):
        raise GroupError(f"{what}: a member is listed twice")
    if not 1 <= len(ordered) <= MAX_MEMBERS:
        raise GroupError(f"{what}: a group has 1..{MAX_MEMBERS} members")
    return ordered


def _encode_members(w: Writer, members: Sequence[GroupMember]) -> None:
    w.u16(len(members))
    for member in members:
        member.encode(w)


def _read_members(r: Reader) -> tuple[GroupMember, ...]:
    n = r.u16("members")
    if n > MAX_MEMBERS:
        raise r.error("members", f"more than {MAX_MEMBERS}")
    return tuple(GroupMember.read(r) for _ in range(n))


@dataclass(frozen=True)
class GroupState:
    """A group at one epoch (``state_hash`` chains every epoch to the one before)."""

    group_id: bytes
    name: str
    epoch: int
    members: tuple[GroupMember, ...]
    prev_hash: bytes
    state_hash: bytes = field(init=False)

    def __post_init__(self) -> None:
        w = Writer()
        _encode_members(w, self.members)
        digest = th(
            b"qmsg1 group state",
            self.group_id,
            self.epoch.to_bytes(4, "big"),
            self.name.encode("utf-8"),
            w.bytes(),
            self.prev_hash,
        )
        object.__setattr__(self, "state_hash", digest)

    def member(self, name: str) -> GroupMember | None:
        for m in self.members:
            if m.name == name:
                return m
        return None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def serialize(self) -> bytes:
        w = Writer().raw(self.group_id).text8(self.name).u32(self.epoch)
        _encode_members(w, self.members)
        return w.raw(self.prev_hash).bytes()

    @classmethod
    def parse(cls, data: bytes) -> GroupState:
        r = Reader(data, "group state")
        out = cls(
            r.raw(GROUP_ID_LEN, "group_id"),
            r.text8("name"),
            r.u32("epoch"),
            _read_members(r),
            r.raw(48, "prev_hash"),
        )
        r.end()
        return out


@dataclass(frozen=True)
class GroupChange:
    """A membership change, signed by its author (``docs/messaging.md`` §9.2)."""

    group_id: bytes
    epoch: int  # the epoch this change creates
    prev_hash: bytes  # state_hash of the epoch before (zeros for CREATE)
    action: GroupAction
    author: str
    name: str
    members: tuple[GroupMember, ...]  # the full list after the change
    time_ms: int
    signature: bytes = b""

    def signed_part(self) -> bytes:
        w = Writer().u8(VERSION).raw(self.group_id).u32(self.epoch).raw(self.prev_hash)
        w.u8(self.action).text8(self.author).text8(self.name)
        _encode_members(w, self.members)
        return w.u64(self.time_ms).bytes()

    def signed_data(self) -> bytes:
        return th(b"qmsg1 group change", self.signed_part())

    def serialize(self) -> bytes:
        return self.signed_part() + Writer().var16(self.signature).bytes()

    @classmethod
    def parse(cls, data: bytes) -> GroupChange:
        r = Reader(data, "group change")
        r.choice("version", [VERSION])
        group_id, epoch, prev = r.raw(GROUP_ID_LEN, "group_id"), r.u32("epoch"), r.raw(48, "prev")
        action = GroupAction(r.choice("action", [a.value for a in GroupAction]))
        author = check_name(r.text8("author"), "group change: field 'author'")
        name = r.text8("name")
        members = _read_members(r)
        out = cls(
            group_id,
            epoch,
            prev,
            action,
            author,
            name,
            members,
            r.u64("time_ms"),
            r.var16("signature", _MAX_SIG),
        )
        r.end()
        return out

    @classmethod
    def make(
        cls,
        me: LocalIdentity,
        state: GroupState | None,
        action: GroupAction,
        members: Sequence[GroupMember],
        now: float,
        *,
        name: str = "",
        group_id: bytes = b"",
    ) -> GroupChange:
        """Make and sign a change of ``state`` (``None`` with CREATE)."""
        if state is None:
            change = cls(
                group_id or new_group_id(),
                1,
                _ZERO_HASH,
                action,
                me.name,
                name,
                tuple(sorted(members)),
                int(now * 1000),
            )
        else:
            change = cls(
                state.group_id,
                state.epoch + 1,
                state.state_hash,
                action,
                me.name,
                state.name,
                tuple(sorted(members)),
                int(now * 1000),
            )
        signature = me.signing_key.sign(change.signed_data(), CHANGE_CONTEXT)
        return cls(**{**change.__dict__, "signature": signature})

    def __repr__(self) -> str:
        return (
            f"<GroupChange {self.name} {self.action.name} by {self.author} epoch={self.epoch} "
            f"members={[m.name for m in self.members]}>"
        )


_Members = frozenset[GroupMember]


def _create(old: GroupState | None, new: _Members, author: str) -> str | None:
    return "the group exists already" if old is not None else None


def _add(old: GroupState | None, new: _Members, author: str) -> str | None:
    assert old is not None
    return None if set(old.members) < new else "an ADD must keep every member and add one"


def _remove(old: GroupState | None, new: _Members, author: str) -> str | None:
    assert old is not None
    if author not in {m.name for m in new}:
        return "the author cannot remove itself (use LEAVE)"
    return None if new < set(old.members) else "a REMOVE must only drop members"


def _leave(old: GroupState | None, new: _Members, author: str) -> str | None:
    assert old is not None
    left = {m for m in old.members if m.name != author}
    return None if new == left else "a LEAVE drops exactly its author"


#: The rules of membership changes, in one place: action -> check(old, new members, author)
#: returning what is wrong, or ``None``. Members are (name, identity hash) pairs, so a
#: change cannot swap a member's identity either.
CHANGE_RULES: dict[GroupAction, Callable[[GroupState | None, _Members, str], str | None]] = {
    GroupAction.CREATE: _create,
    GroupAction.ADD: _add,
    GroupAction.REMOVE: _remove,
    GroupAction.LEAVE: _leave,
}


def apply_change(
    state: GroupState | None,
    change: GroupChange,
    author_public_key: bytes,
    me: str,
    backend: pqc.Backend,
) -> GroupState:
    """Check ``change`` against the current ``state`` and return the new state.

    Args:
        state: the group as we know it, or ``None`` (a creation, or an ADD of us).
        change: the parsed change.
        author_public_key: the author's pinned identity key (the 1:1 peer it came from).
        me: our name.
        backend: verifies the ML-DSA signature.

    Raises:
        GroupError: naming the rule broken (bad signature, not a member, wrong
            epoch or previous state, a member list the action does not allow).
    """
    what = f"group change {change.action.name} of {change.name or '?'!r} by {change.author!r}"
    scheme = parse_identity_key(author_public_key, what)
    if not backend.verify(
        scheme, author_public_key, change.signature, change.signed_data(), CHANGE_CONTEXT
    ):
        raise GroupError(f"{what}: the signature does not verify (forged or tampered with)")
    members = _members(change.members, what)
    new_names = {m.name for m in members}
    joining = state is None and change.action is GroupAction.ADD and me in new_names
    if state is None and change.action is not GroupAction.CREATE and not joining:
        raise GroupError(f"{what}: we do not know this group")
    if state is not None:
        if change.group_id != state.group_id:
            raise GroupError(f"{what}: for another group")
        if change.epoch <= state.epoch:
            raise GroupError(f"{what}: epoch {change.epoch} is not newer than {state.epoch}")
        if change.epoch != state.epoch + 1 or change.prev_hash != state.state_hash:
            raise GroupError(
                f"{what}: it does not follow our epoch {state.epoch} (missed or conflicting "
                "change: ask a member to re-add you)"
            )
        if change.name != state.name:
            raise GroupError(f"{what}: the group name cannot change")
        reference = state.member(change.author)
        if reference is None:
            raise GroupError(f"{what}: {change.author!r} is not a member (inserted by the server?)")
    else:
        if change.action is GroupAction.CREATE and (
            change.epoch != 1 or change.prev_hash != _ZERO_HASH
        ):
            raise GroupError(f"{what}: a creation makes epoch 1")
        check_name(change.name, f"{what}: group name")
        reference = next((m for m in members if m.name == change.author), None)
        if reference is None or me not in new_names:
            raise GroupError(f"{what}: the author and the receiver must be members")
    if reference.identity_hash != identity_hash(author_public_key):
        raise GroupError(f"{what}: the author's identity differs from the member list's")
    problem = (
        None if joining else CHANGE_RULES[change.action](state, frozenset(members), change.author)
    )
    if problem:
        raise GroupError(f"{what}: {problem}")
    for m in members:
        check_name(m.name, f"{what}: member name")
    return GroupState(change.group_id, change.name, change.epoch, members, change.prev_hash)


# --- sender chains and group messages ------------------------------------------------------


@dataclass(repr=False)
class SenderChain:
    """One member's sending chain in one group epoch, and the keys skipped on it (secret)."""

    chain_key: bytes
    next_index: int = 0
    skipped: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def new(cls) -> SenderChain:
        return cls(secrets.token_bytes(CHAIN_KEY_LEN))

    def serialize(self) -> bytes:
        w = Writer().raw(self.chain_key).u32(self.next_index).u32(len(self.skipped))
        for index, material in self.skipped.items():
            w.u32(index).raw(material)
        return w.bytes()

    @classmethod
    def parse(cls, data: bytes) -> SenderChain:
        r = Reader(data, "sender chain")
        chain = cls(r.raw(CHAIN_KEY_LEN, "chain_key"), r.u32("next_index"))
        count = r.u32("skipped")
        if count > 100_000:
            raise r.error("skipped", "too many entries")
        for _ in range(count):
            chain.skipped[r.u32("skipped.index")] = r.raw(MESSAGE_KEY_LEN, "skipped.key")
        r.end()
        return chain

    def __repr__(self) -> str:
        return f"<SenderChain next={self.next_index} skipped={len(self.skipped)}>"


@dataclass(frozen=True)
class GroupMessage:
    """A message to a group (``docs/messaging.md`` §9.4)."""

    group_id: bytes
    epoch: int
    sender: str
    index: int
    ciphertext: bytes
    signature: bytes = b""

    def header(self) -> bytes:
        w = Writer().u8(VERSION).u8(MessageType.GROUP).raw(self.group_id).u32(self.epoch)
        return w.text8(self.sender).u32(self.index).bytes()

    def signed_data(self) -> bytes:
        return th(b"qmsg1 group message", self.header() + Writer().var32(self.ciphertext).bytes())

    def serialize(self) -> bytes:
        return self.header() + Writer().var32(self.ciphertext).var16(self.signature).bytes()

    @classmethod
    def parse(cls, data: bytes) -> GroupMessage:
        if message_type(data) is not MessageType.GROUP:
            raise MessageFormatError("group message: wrong type octet")
        r = Reader(data, "group message")
        r.raw(2, "version")
        out = cls(
            r.raw(GROUP_ID_LEN, "group_id"),
            r.u32("epoch"),
            check_name(r.text8("sender"), "group message: field 'sender'"),
            r.u32("index"),
            r.var32("ciphertext", MAX_CIPHERTEXT),
            r.var16("signature", _MAX_SIG),
        )
        r.end()
        if len(out.ciphertext) < pqc.AEAD_TAG_LEN:
            raise MessageFormatError("group message: field 'ciphertext' is too short")
        return out


def encrypt_group(state: GroupState, me: LocalIdentity, chain: SenderChain, padded: bytes) -> bytes:
    """Encrypt and sign one group message under our sender ``chain`` (advanced in place).

    After calling this method: persist ``chain`` before sending the bytes.
    """
    if state.member(me.name) is None:
        raise GroupError(f"you are not a member of {state.name!r}")
    mk, next_key = chain_step(chain.chain_key)
    message = GroupMessage(state.group_id, state.epoch, me.name, chain.next_index, b"")
    sealed = pqc.AES256GCM(mk.key).seal(mk.nonce, padded, message.header())
    message = GroupMessage(state.group_id, state.epoch, me.name, chain.next_index, sealed)
    signature = me.signing_key.sign(message.signed_data(), MESSAGE_CONTEXT)
    chain.chain_key, chain.next_index = next_key, chain.next_index + 1
    return GroupMessage(**{**message.__dict__, "signature": signature}).serialize()


def decrypt_group(
    state: GroupState,
    message: GroupMessage,
    chain: SenderChain | None,
    sender_public_key: bytes | None,
    backend: pqc.Backend,
    *,
    max_skip: int = 1000,
) -> bytes:
    """Check and decrypt one group message; ``chain`` advances only on success.

    Args:
        state: the group at ``message.epoch``.
        message: the parsed message.
        chain: the sender's chain for that epoch (``None``: none received yet).
        sender_public_key: the sender's pinned identity key (``None``: unknown).
        backend: verifies the signature.
        max_skip: most message keys derived past the next one.

    Raises:
        GroupError: the sender is not a member of that epoch, or no chain from it.
        MessageAuthError: a bad signature, or a tampered ciphertext.
        ReplayedMessageError: the message key was used already.
        SkippedMessagesError: too far ahead.
    """
    what = f"group message #{message.index} from {message.sender!r} to {state.name!r}"
    if message.group_id != state.group_id or message.epoch != state.epoch:
        raise GroupError(f"{what}: for epoch {message.epoch}, the group is at {state.epoch}")
    member = state.member(message.sender)
    if member is None:
        raise GroupError(f"{what}: {message.sender!r} is not a member (inserted by the server?)")
    if sender_public_key is None or identity_hash(sender_public_key) != member.identity_hash:
        raise GroupError(f"{what}: the sender's identity is not the member's")
    scheme = parse_identity_key(sender_public_key, what)
    if not backend.verify(
        scheme, sender_public_key, message.signature, message.signed_data(), MESSAGE_CONTEXT
    ):
        raise MessageAuthError(f"{what}: the signature does not verify")
    if chain is None:
        raise GroupError(f"{what}: no sender key from {message.sender!r} for epoch {state.epoch}")
    i = message.index
    skipped: dict[int, bytes] = {}
    if i in chain.skipped:
        mk, key, n = MessageKey.from_bytes(chain.skipped[i]), chain.chain_key, chain.next_index
    elif i < chain.next_index:
        raise ReplayedMessageError(f"{what} was already received (replay or duplicate)")
    else:
        if i - chain.next_index > max_skip:
            raise SkippedMessagesError(f"{what} is {i - chain.next_index} messages ahead")
        key, n = chain.chain_key, chain.next_index
        while n < i:
            skip, key = chain_step(key)
            skipped[n] = skip.to_bytes()
            n += 1
        mk, key = chain_step(key)
        n += 1
    plaintext = pqc.AES256GCM(mk.key).open(mk.nonce, message.ciphertext, message.header())
    if plaintext is None:
        raise MessageAuthError(f"{what} does not authenticate (tampered)")
    chain.skipped.pop(i, None)
    chain.skipped.update(skipped)
    while len(chain.skipped) > max_skip:
        del chain.skipped[next(iter(chain.skipped))]
    chain.chain_key, chain.next_index = key, n
    return plaintext
