"""The signaling server's mailbox: offline messages and prekeys (docs/messaging.md §12).

:class:`Mailbox` answers the frames of :mod:`qcall.signaling.mailbox` from a
registered connection, over a :class:`~signaling.store.MessageStore`:

* ``mail_put`` is answered (``mail_stored``) only once the envelope is
  committed, so an acknowledged envelope survives ``kill -9``; then it is
  pushed (``mail``) to the recipient if online and its outbox has room, else
  the recipient is told ``mail_waiting`` once its outbox drains. It stays
  stored until the recipient acknowledges it (``mail_ack``).
* ``prekeys_publish`` is accepted only with the identity key the connection
  registered with (its fingerprint is the pinned one); ``prekeys_claim`` hands
  out each one-time prekey once.

Fairness: each connection has at most :data:`MAX_IN_FLIGHT` requests in
progress; the server stops reading its frames until one finishes, so a client
that floods waits for its own commits while the others' requests join the
same group commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from qcall.exceptions import (
    MailboxFullError,
    MessageStoreError,
    MessageTooLargeError,
    SignalingProtocolError,
)
from qcall.identity import fingerprint
from qcall.signaling.mailbox import (
    MailAck,
    MailAcked,
    MailBatch,
    MailEnvelope,
    MailError,
    MailFetch,
    MailFrame,
    MailPush,
    MailPut,
    MailStored,
    PrekeysBundle,
    PrekeysClaim,
    PrekeysCount,
    PrekeysHeld,
    PrekeysPublish,
    parse_mailbox_frame,
    request_id,
)
from signaling.store import MessageStore, StoredEnvelope

__all__ = ["MAX_BATCH_BYTES", "MAX_IN_FLIGHT", "Mailbox"]

logger = logging.getLogger(__name__)

#: Requests of one connection in progress at once (its next frame waits).
MAX_IN_FLIGHT = 64
#: A ``mail_batch`` stops adding envelopes past this many bytes (at least one).
MAX_BATCH_BYTES = 1024 * 1024
#: Seconds between two expiry passes over the store.
EXPIRE_INTERVAL = 3600.0

#: ``send(connection, text)`` queues a frame; ``push(name, text) -> bool`` queues it
#: for ``name`` if online with room in its outbox (``False``: not queued).
Send = Callable[[int, str], None]
Push = Callable[[str, str], bool]


class Mailbox:
    """Mailbox frames of registered connections (see the module docstring).

    Args:
        store: where envelopes and prekeys live (SQLite by default).
        send: queue a frame on a connection.
        push: queue a frame for an online user if its outbox has room.
        fingerprint_of: the pinned identity fingerprint of a registered name.
        clock: wall-clock seconds (envelope times).
    """

    def __init__(
        self,
        store: MessageStore,
        send: Send,
        push: Push,
        fingerprint_of: Callable[[str], str | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._send = send
        self._push = push
        self._fingerprint_of = fingerprint_of
        self._clock = clock
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_expiry = 0.0

    async def receive(self, cid: int, name: str | None, text: str) -> None:
        """Take one mailbox frame of connection ``cid`` (registered as ``name``).

        Returns once the request is started; waits first while the connection
        has :data:`MAX_IN_FLIGHT` requests in progress.
        """
        if name is None:
            self._error(cid, request_id(text), "auth_required", "register first")
            return
        try:
            frame = parse_mailbox_frame(text, server=True)
        except SignalingProtocolError as exc:
            self._error(cid, request_id(text), "bad_message", str(exc))
            return
        slots = self._slots.get(cid)
        if slots is None:
            slots = self._slots[cid] = asyncio.Semaphore(MAX_IN_FLIGHT)
        await slots.acquire()
        self._spawn(self._run(cid, name, frame, slots))

    def disconnect(self, cid: int) -> None:
        """Forget a closed connection (its requests in progress still finish)."""
        self._slots.pop(cid, None)

    async def close(self) -> None:
        """Wait for the requests in progress, then close the store."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, cid: int, name: str, frame: MailFrame, slots: asyncio.Semaphore) -> None:
        request = getattr(frame, "id", None)
        try:
            answer = await self._handle(cid, name, frame)
        except MessageTooLargeError as exc:
            answer = MailError("too_big", _safe(exc), request)
        except MailboxFullError as exc:
            code = "too_many_prekeys" if isinstance(frame, PrekeysPublish) else "mailbox_full"
            answer = MailError(code, _safe(exc), request)
        except MessageStoreError as exc:
            logger.error("! message store failed: %s", exc)
            answer = MailError("store_error", "the server's message store failed", request)
        except Exception:  # a bug, never bad input: keep serving everyone else
            logger.exception("! mailbox failed on connection %d", cid)
            answer = MailError("store_error", "internal error", request)
        finally:
            slots.release()
        if answer is not None:
            self._send(cid, answer.serialize())

    async def _handle(self, cid: int, name: str, frame: MailFrame) -> MailFrame | None:
        now = self._clock()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_INTERVAL
            self._spawn(self._expire(now))
        if isinstance(frame, MailPut):
            envelope_id = await self.store.put(frame.to, name, frame.data, now, frame.ref)
            logger.debug("< %s → %s #%d %d bytes", name, frame.to, envelope_id, len(frame.data))
            envelope = MailEnvelope(envelope_id, name, int(now * 1000), frame.data)
            self._push(frame.to, MailPush(envelope).serialize())
            return MailStored(frame.id, envelope_id)
        if isinstance(frame, MailFetch):
            stored = await self.store.fetch(name, frame.after, frame.limit)
            return MailBatch(frame.id, _cut(stored))
        if isinstance(frame, MailAck):
            return MailAcked(frame.id, await self.store.ack(name, frame.ids))
        if isinstance(frame, PrekeysPublish):
            if fingerprint(frame.identity_key) != self._fingerprint_of(name):
                return MailError(
                    "wrong_identity", "identity key is not the one you registered with", frame.id
                )
            one_time = [(p.prekey_id, p.data) for p in frame.one_time_prekeys]
            count = await self.store.publish_prekeys(
                name, frame.identity_key, frame.signed_prekey, one_time, now
            )
            return PrekeysHeld(frame.id, count)
        if isinstance(frame, PrekeysCount):
            return PrekeysHeld(frame.id, await self.store.one_time_prekeys(name))
        assert isinstance(frame, PrekeysClaim)
        claimed = await self.store.claim_prekeys(frame.owner)
        if claimed is None:
            return PrekeysBundle(frame.id, frame.owner)
        return PrekeysBundle(
            frame.id,
            frame.owner,
            claimed.identity_key,
            claimed.signed_prekey,
            claimed.one_time_prekey,
        )

    async def _expire(self, now: float) -> None:
        try:
            gone = await self.store.expire(now)
        except MessageStoreError as exc:
            logger.error("! expiring old envelopes failed: %s", exc)
            return
        if gone:
            logger.info("= %d envelopes expired unread", gone)

    def _error(self, cid: int, request: int | None, code: str, text: str) -> None:
        self._send(cid, MailError(code, _safe(text), request).serialize())


def _cut(stored: list[StoredEnvelope]) -> tuple[MailEnvelope, ...]:
    out: list[MailEnvelope] = []
    size = 0
    for e in stored:
        size += len(e.data)
        if out and size > MAX_BATCH_BYTES:
            break
        out.append(MailEnvelope(e.id, e.sender, int(e.received_at * 1000), e.data))
    return tuple(out)


def _safe(exc: object) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in str(exc))[:256]
