"""Groups of the messaging client: membership changes and sender keys (docs/messaging.md §9).

:class:`GroupOps` is a part of :class:`qcall.messaging.client.MessagingClient`, kept in
its own module: creating and changing a group (a signed :class:`GroupChange` sent to
every member over the 1:1 sessions), accepting the members' sender keys, and
encrypting and decrypting group messages under them. A member's sending chain is
replaced at every change of membership, so a removed member cannot read what follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from qcall import pqc
from qcall.exceptions import GroupError, UnknownSessionError
from qcall.messaging.api import (
    ClientConfig,
    Contacts,
    Envelope,
    Event,
    GroupChanged,
    MessageReceived,
    PendingError,
)
from qcall.messaging.content import Content, ContentKind, SenderKeyBody, new_message_id, pad
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
from qcall.messaging.messages import Mode, identity_hash
from qcall.messaging.session import LocalIdentity
from qcall.messaging.store import ClientStore

if TYPE_CHECKING:
    from qcall.messaging.ratchet import Session
    from qcall.messaging.transfer import FileTransfers

__all__ = ["GroupOps"]

logger = logging.getLogger("qcall.messaging.client")


class GroupOps:
    """The group half of :class:`~qcall.messaging.client.MessagingClient`."""

    me: LocalIdentity
    store: ClientStore
    contacts: Contacts
    config: ClientConfig
    clock: Callable[[], float]
    backend: pqc.Backend
    files: FileTransfers

    if TYPE_CHECKING:

        async def _session_for(self, peer: str) -> Session: ...

        def _write_received(self) -> None: ...

        async def send_content(
            self, to: str, content: Content, *, history: bool = True
        ) -> bytes: ...

    # --- groups (docs/messaging.md §9) ---------------------------------------------------------

    async def _members(self, names: Sequence[str]) -> list[GroupMember]:
        out = []
        for name in names:
            if name == self.me.name:
                out.append(GroupMember(name, identity_hash(self.me.public_key)))
                continue
            session = await self._session_for(name)  # pins the key (claims a bundle if needed)
            out.append(GroupMember(name, identity_hash(session.state.peer_identity)))
        return out

    async def create_group(self, name: str, members: Sequence[str]) -> GroupState:
        """Create ``@name`` with ``members`` (we are added); tells every member."""
        if self.store.group_by_name(name) is not None:
            raise GroupError(f"you already have a group named {name!r}")
        listed = await self._members([self.me.name, *[m for m in members if m != self.me.name]])
        change = GroupChange.make(
            self.me, None, GroupAction.CREATE, listed, self.clock(), name=name
        )
        return await self._commit_change(None, change)

    async def add_members(self, group: str, names: Sequence[str]) -> GroupState:
        state = self._group(group)
        added = await self._members([n for n in names if state.member(n) is None])
        change = GroupChange.make(
            self.me, state, GroupAction.ADD, [*state.members, *added], self.clock()
        )
        return await self._commit_change(state, change)

    async def remove_members(self, group: str, names: Sequence[str]) -> GroupState:
        state = self._group(group)
        kept = [m for m in state.members if m.name not in names]
        change = GroupChange.make(self.me, state, GroupAction.REMOVE, kept, self.clock())
        return await self._commit_change(state, change)

    async def leave_group(self, group: str) -> GroupState:
        state = self._group(group)
        kept = [m for m in state.members if m.name != self.me.name]
        change = GroupChange.make(self.me, state, GroupAction.LEAVE, kept, self.clock())
        return await self._commit_change(state, change)

    def groups(self) -> list[GroupState]:
        return self.store.groups()

    def _group(self, name: str) -> GroupState:
        state = self.store.group_by_name(name.removeprefix("@"))
        if state is None:
            raise GroupError(f"no group named {name!r}")
        if state.member(self.me.name) is None:
            raise GroupError(f"you are no longer a member of {name!r}")
        return state

    async def _commit_change(self, state: GroupState | None, change: GroupChange) -> GroupState:
        new = apply_change(state, change, self.me.public_key, self.me.name, self.backend)
        self.store.save_group(new)
        notify = {m.name for m in change.members} | {
            m.name for m in (state.members if state else ())
        }
        content = Content(
            ContentKind.GROUP_CHANGE,
            new_message_id(),
            int(self.clock() * 1000),
            body=change.serialize(),
        )
        for name in sorted(notify - {self.me.name}):
            await self.send_content(name, content, history=False)
        return new

    def _apply_group_change(self, peer: str, key: bytes, body: bytes) -> GroupChanged:
        change = GroupChange.parse(body)
        if change.author != peer:
            raise GroupError(
                f"{peer} forwarded a change by {change.author}: only authors send them"
            )
        state = self.store.group(change.group_id)
        new = apply_change(state, change, key, self.me.name, self.backend)
        self.store.save_group(new)
        self.store.delete_sender_chains_before(new.group_id, new.epoch - 1)
        left = new.member(self.me.name) is None
        logger.info("= @%s: %s by %s, epoch %d", new.name, change.action.name, peer, new.epoch)
        return GroupChanged(new.name, change, left)

    def _accept_sender_key(self, peer: str, content: Content) -> list[Event]:
        body = content.sender_key
        assert body is not None
        state = self.store.group(body.group_id)
        if state is None or state.epoch != body.epoch or state.state_hash != body.state_hash:
            raise PendingError(f"sender key of {peer} for a group epoch we do not have yet")
        if state.member(peer) is None:
            raise GroupError(f"{peer} sent a sender key for {state.name!r} but is not a member")
        chain = SenderChain(body.chain_key, body.index)
        self.store.save_sender_chain(body.group_id, body.epoch, peer, chain)
        return []

    async def _send_group(self, name: str, contents: Sequence[Content], history: bool) -> None:
        """A burst to a group: the chain advances once per content, and the chain, the
        history rows and every member's outbox entries are committed in ONE transaction
        before any envelope leaves (docs/messaging.md §10.3); the caller flushes them."""
        state = self._group(name)
        chain = self.store.sender_chain(state.group_id, state.epoch, self.me.name)
        others = [m.name for m in state.members if m.name != self.me.name]
        if chain is None:  # first message of this epoch: a fresh chain to every member
            chain = SenderChain.new()
            self.store.save_sender_chain(state.group_id, state.epoch, self.me.name, chain)
            body = SenderKeyBody(state.group_id, state.epoch, state.state_hash, chain.chain_key, 0)
            key_content = Content(
                ContentKind.SENDER_KEY, new_message_id(), int(self.clock() * 1000), sender_key=body
            )
            for other in others:
                await self.send_content(other, key_content, history=False)
        now = self.clock()
        bodies = [content.serialize() for content in contents]
        wires = [encrypt_group(state, self.me, chain, pad(body)) for body in bodies]
        with self.store.transaction():
            self.store.save_sender_chain(state.group_id, state.epoch, self.me.name, chain)
            if history:
                ids = [content.message_id for content in contents]
                rows = list(zip(ids, bodies, strict=True))
                self.store.add_histories("@" + state.name, rows, outgoing=True, now=now)
            for other in others:
                self.store.add_outboxes(other, wires, now)

    def _process_group(self, envelope: Envelope) -> list[Event]:
        message = GroupMessage.parse(envelope.data)
        state = self.store.group(message.group_id)
        if state is None:
            raise UnknownSessionError(f"group message from {envelope.sender} for an unknown group")
        if message.sender != envelope.sender:
            raise GroupError(
                f"{envelope.sender} relayed a group message signed as {message.sender}"
            )
        if message.epoch > state.epoch:
            raise PendingError(f"group message for epoch {message.epoch}; we are at {state.epoch}")
        at = state
        if message.epoch == state.epoch - 1:  # sent before the change reached the sender
            at = replace(state, epoch=message.epoch)
        chain = self.store.sender_chain(state.group_id, message.epoch, message.sender)
        if chain is None and at.member(message.sender) is not None and message.epoch == state.epoch:
            raise PendingError(f"no sender key from {message.sender} yet")
        pinned = self.contacts.get(message.sender)
        key = pinned.public_key if pinned is not None else None
        now = self.clock()
        plain = decrypt_group(
            at, message, chain, key, self.backend, max_skip=self.config.limits.max_skip
        )
        content = Content.parse(plain)
        conversation = "@" + state.name
        assert chain is not None
        self._write_received()  # a batch's earlier texts first: history keeps their order
        with self.store.transaction():
            self.store.save_sender_chain(state.group_id, message.epoch, message.sender, chain)
            self.store.add_history(
                conversation, content.message_id, outgoing=False, now=now, body=content.serialize()
            )
            if content.kind is ContentKind.FILE:
                self.files.offer_received(conversation, message.sender, content, now)
            self.store.mark_processed(envelope.id, now)
        carrier = self.store.active_session(message.sender)  # the sender key came over it
        mode = carrier.mode if carrier is not None else Mode.PQC
        return [MessageReceived(conversation, message.sender, content, mode, envelope.id)]
