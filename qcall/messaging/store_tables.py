"""The client store's group and file-transfer tables (:class:`ClientStore` inherits them).

Split from :mod:`qcall.messaging.store` (module size); ``docs/messaging.md`` §10.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from qcall.exceptions import MessageFormatError, MessageStoreError
from qcall.messaging.group import GroupState, SenderChain
from qcall.messaging.records import Transfer
from qcall.messaging.wire import Reader, framed

__all__ = ["GroupAndTransferTables"]


class GroupAndTransferTables:
    """Groups, sender chains and transfers, over the store's sealed rows."""

    path: Path

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        raise NotImplementedError

    def _seal(self, table: str, row: bytes, data: bytes) -> bytes:
        raise NotImplementedError

    def _open(self, table: str, row: bytes, blob: bytes) -> bytes:
        raise NotImplementedError

    def tag(self, name: str) -> bytes:
        raise NotImplementedError

    # --- groups ----------------------------------------------------------------------------------

    def save_group(self, state: GroupState) -> None:
        sealed = self._seal("groups", state.group_id, state.serialize())
        self._exec(
            "INSERT OR REPLACE INTO groups VALUES (?,?,?)",
            (state.group_id, self.tag("@" + state.name), sealed),
        )

    def _group(self, row: tuple[bytes, bytes] | None) -> GroupState | None:
        if row is None:
            return None
        try:
            return GroupState.parse(self._open("groups", bytes(row[0]), row[1]))
        except MessageFormatError as exc:
            raise MessageStoreError(f"{self.path}: a stored group is corrupt: {exc}") from None

    def group(self, group_id: bytes) -> GroupState | None:
        row = self._exec("SELECT group_id, state FROM groups WHERE group_id = ?", (group_id,))
        return self._group(row.fetchone())

    def group_by_name(self, name: str) -> GroupState | None:
        row = self._exec(
            "SELECT group_id, state FROM groups WHERE name = ?", (self.tag("@" + name),)
        )
        return self._group(row.fetchone())

    def groups(self) -> list[GroupState]:
        rows = self._exec("SELECT group_id, state FROM groups").fetchall()
        return sorted((g for g in map(self._group, rows) if g), key=lambda g: g.name)

    def save_sender_chain(
        self, group_id: bytes, epoch: int, sender: str, chain: SenderChain
    ) -> None:
        row = group_id + epoch.to_bytes(4, "big") + self.tag(sender)
        self._exec(
            "INSERT OR REPLACE INTO sender_chains VALUES (?,?,?,?)",
            (
                group_id,
                epoch,
                self.tag(sender),
                self._seal("sender_chains", row, chain.serialize()),
            ),
        )

    def sender_chain(self, group_id: bytes, epoch: int, sender: str) -> SenderChain | None:
        tag = self.tag(sender)
        row = self._exec(
            "SELECT chain FROM sender_chains WHERE group_id = ? AND epoch = ? AND sender = ?",
            (group_id, epoch, tag),
        ).fetchone()
        if row is None:
            return None
        data = self._open("sender_chains", group_id + epoch.to_bytes(4, "big") + tag, row[0])
        try:
            return SenderChain.parse(data)
        except MessageFormatError as exc:
            raise MessageStoreError(
                f"{self.path}: a stored sender chain is corrupt: {exc}"
            ) from None

    def delete_sender_chains_before(self, group_id: bytes, epoch: int) -> None:
        """Forget the chains of epochs before ``epoch`` (forward secrecy after a change)."""
        self._exec("DELETE FROM sender_chains WHERE group_id = ? AND epoch < ?", (group_id, epoch))

    # --- file transfers (resume) -------------------------------------------------------------

    def save_transfer(self, transfer: Transfer, now: float) -> None:
        """Record a transfer and its progress: the next chunk to send or receive.

        The conversation, the peer and the offer (with the file key) are sealed;
        the path is the local file (sent, or being received).
        """
        t = transfer
        value = framed(t.conversation.encode(), t.peer.encode(), t.offer)
        sealed = self._seal("transfers", t.file_id, value)
        self._exec(
            "INSERT OR REPLACE INTO transfers VALUES (?,?,?,?,?,?,?)",
            (t.file_id, self.tag(t.conversation), int(t.outgoing), sealed, t.next_chunk, t.path,
             int(now * 1000)),
        )  # fmt: skip

    def transfer(self, file_id: bytes) -> Transfer | None:
        """The transfer of ``file_id``, or ``None``."""
        row = self._exec(
            "SELECT offer, next_chunk, path, outgoing FROM transfers WHERE file_id = ?", (file_id,)
        ).fetchone()
        if row is None:
            return None
        r = Reader(self._open("transfers", file_id, row[0]), f"{self.path}: a stored transfer")
        try:
            conversation, peer = r.text(r.var32("conversation", 1024), "c"), r.var32("peer", 1024)
            offer = r.var32("offer", 1 << 20)
            r.end()
        except MessageFormatError as exc:
            raise MessageStoreError(str(exc)) from None
        return Transfer(
            file_id, conversation, peer.decode(), bool(row[3]), offer, int(row[1]), row[2]
        )

    def transfers(self, *, outgoing: bool) -> list[bytes]:
        """The file ids of the transfers in one direction, oldest first."""
        rows = self._exec(
            "SELECT file_id FROM transfers WHERE outgoing = ? ORDER BY updated_ms", (int(outgoing),)
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def delete_transfer(self, file_id: bytes) -> None:
        self._exec("DELETE FROM transfers WHERE file_id = ?", (file_id,))
