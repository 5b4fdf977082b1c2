"""The messaging shell: :class:`MessagingClient` over a :class:`Transport`.

Specified in ``docs/messaging.md`` §13.

It ties the pure cores (sessions, ratchet, groups, files) to the client store,
a QKD key source and a transport to the server's mailbox. The transport is an
interface, so the same client runs over the signaling server (phase 2), over
:mod:`signaling.store` directly (the tests) or anything else that can store
and forward opaque envelopes::

    client = MessagingClient(identity, store, transport, contacts)
    await client.ensure_prekeys()                # publish / replenish prekeys
    await client.send_text("bob", "hello")       # or "@team"
    for event in await client.receive():         # MessageReceived, MessageRejected, …
        ...

Durability rules (why ``kill -9`` loses nothing and never reuses a key):

* sending: the session advances, and the history row and outbox entry are
  written, in one transaction; only then does the envelope leave (``client_ref``
  = a hash of it, so a resend after a crash is idempotent at the server). The
  entry is deleted with the next message's transaction, so one message costs
  one commit; a burst (``send_texts``) costs one commit for all its messages,
  then its envelopes leave pipelined (``ClientConfig.send_window``);
* receiving: the session advances, and the message, the envelope id
  (``processed``) and any consumed one-time prekey or QKD key are written, in
  one transaction; only then is the envelope acknowledged. A batch of envelopes
  shares one transaction (a savepoint each; none for a text), committed before any
  KME request and before the batch is acknowledged; each session the batch advanced
  is written once, at its end, in that transaction (a crash before the commit loses
  the whole batch, which the server re-delivers). An envelope id seen again (the
  server re-delivers after our crash) is acknowledged silently;
* a QKD key fetched with ``dec_keys`` is stored before it is used (the KME
  hands it out once).

Bad input never raises out of :meth:`MessagingClient.receive`: it becomes a
:class:`MessageRejected` event (shown clearly, never as a message) and the
envelope is acknowledged; nothing else is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence

from qcall import pqc
from qcall.exceptions import (
    EpochNotOpenError,
    KeyNotFoundError,
    MessageFormatError,
    MessagingError,
    PrekeyError,
    QCallError,
    QKDError,
    UnknownSessionError,
)
from qcall.identity import Identity
from qcall.messaging.api import (
    ClientConfig,
    Contacts,
    Envelope,
    Event,
    MessagePending,
    MessageReceived,
    MessageRejected,
    PendingError,
    ReceiptReceived,
    Transport,
)
from qcall.messaging.content import (
    Content,
    ContentKind,
    ReceiptStatus,
    new_message_id,
    pad,
    unpad,
)
from qcall.messaging.files import FileOffer
from qcall.messaging.group_ops import GroupOps
from qcall.messaging.messages import (
    MessageType,
    PrekeyMessage,
    QKDRef,
    RatchetMessage,
    message_type,
)
from qcall.messaging.prekeys import PrekeyBundle, PrekeyKind, SignedPrekey, make_prekey
from qcall.messaging.ratchet import QKDMaterial, Session
from qcall.messaging.session import (
    LocalIdentity,
    Responder,
    check_prekey_message,
    init_transcript,
    initiate,
    respond,
)
from qcall.messaging.state import SessionState
from qcall.messaging.store import ClientStore, HistoryEntry
from qcall.messaging.transfer import FileTransfers, Progress
from qcall.qkd.client import KeySource

__all__ = ["MessagingClient"]

logger = logging.getLogger(__name__)

#: Acknowledged outbox entries kept before they are deleted on their own.
_SENT_BATCH = 256


class _BatchBreak(Exception):  # noqa: N818 (control flow, never seen outside deliver)
    """A KME request is needed: commit the batch before it (deliver)."""


#: Envelope types of 1:1 sessions.
_DIRECT = (MessageType.PREKEY, MessageType.RATCHET, MessageType.RATCHET_SHORT)


def _client_ref(recipient: str, envelope: bytes) -> bytes:
    """The idempotency key of an outbox entry: the same envelope, the same ref (§12)."""
    return hashlib.sha256(recipient.encode() + b"\0" + envelope).digest()[:16]


def _type_of(envelope: Envelope) -> MessageType | None:
    """The envelope's type, ``None`` if it has none (:meth:`MessagingClient.process` says so)."""
    try:
        return message_type(envelope.data)
    except MessageFormatError:
        return None


class MessagingClient(GroupOps):
    """One user's messaging endpoint (see the module docstring).

    Args:
        identity: the user's ML-DSA identity.
        store: the user's :class:`ClientStore` (opened with the identity's seed).
        transport: the server's mailbox.
        contacts: pinned identities of peers (TOFU, ``check_peer``).
        key_source: a QKD key source (ETSI 014 or a key file), or ``None``: sessions
            are then mode ``pqc`` (marked and shown).
        config: policies.
        clock: seconds since the epoch.
        backend: ML-KEM/ML-DSA backend.
    """

    def __init__(
        self,
        identity: Identity,
        store: ClientStore,
        transport: Transport,
        contacts: Contacts,
        *,
        key_source: KeySource | None = None,
        config: ClientConfig | None = None,
        clock: Callable[[], float] = time.time,
        backend: pqc.Backend | None = None,
    ) -> None:
        self.me = LocalIdentity(identity.name, identity.signing_key)
        self.store = store
        self.transport = transport
        self.contacts = contacts
        self.key_source = key_source
        self.config = config or ClientConfig()
        self.clock = clock
        self.backend = backend or pqc.get_backend()
        self.sae_id = self.config.sae_id or identity.name
        self.files = FileTransfers(self)
        # Outbox entries the server acknowledged, deleted with the next transaction
        # (one commit per message instead of two; a resend is idempotent).
        self._sent: set[int] = set()
        # Inside deliver()'s batch transaction (no KME request may wait in it).
        self._batching = False
        # The sessions a batch advanced, by id, written once at its end (process_batch),
        # and the envelopes of the batch processed without a savepoint, marked there too.
        self._batch: dict[bytes, Session] | None = None
        self._marks: list[int] = []
        # The history rows of the batch's texts, written in one statement (_write_received).
        self._received: list[tuple[str, bytes, bytes]] = []
        # Every outbox entry up to this id was sent and is in _sent (flush_outbox).
        self._flushed = 0

    def __repr__(self) -> str:
        return f"<MessagingClient {self.me.name}>"

    def _session(self, state: SessionState) -> Session:
        return Session(
            state, backend=self.backend, limits=self.config.limits, policy=self.config.policy
        )

    def _stored_session(self, session_id: bytes) -> Session | None:
        """A session by id: the one the current batch advanced, else the stored one."""
        if self._batch is not None and session_id in self._batch:
            return self._batch[session_id]
        state = self.store.session(session_id)
        return self._session(state) if state is not None else None

    # --- prekeys (docs/messaging.md §2.4) ---------------------------------------------------

    async def ensure_prekeys(self) -> int:
        """Rotate the signed prekey when due and replenish one-time prekeys; returns how
        many one-time prekeys were published."""
        now = self.clock()
        signed = self.store.signed_prekeys()
        age = now - signed[0].record.created_ms / 1000 if signed else 0.0
        fresh = bool(signed) and age < self.config.signed_prekey_lifetime
        held = await self.transport.prekey_count()
        if fresh and held >= self.config.low_water:
            return 0
        new = []
        with self.store.transaction():
            if not fresh:
                spk, seed = self._make(PrekeyKind.SIGNED, now)
                self.store.add_prekey(spk, seed)
                signed = [spk]
                self.store.delete_signed_prekeys_before(
                    int((now - self.config.signed_prekey_retention) * 1000)
                )
            for _ in range(max(0, self.config.one_time_prekeys - held)):
                opk, seed = self._make(PrekeyKind.ONE_TIME, now)
                self.store.add_prekey(opk, seed)
                new.append(opk)
        bundle = PrekeyBundle(self.me.name, self.me.public_key, signed[0], tuple(new))
        await self.transport.publish_prekeys(bundle.serialize())
        logger.info(
            "= published signed prekey #%d and %d one-time prekeys",
            signed[0].record.prekey_id,
            len(new),
        )
        return len(new)

    def _make(self, kind: PrekeyKind, now: float) -> tuple[SignedPrekey, bytes]:
        return make_prekey(
            self.me.signing_key,
            self.me.name,
            kind,
            self.store.next_prekey_id(),
            int(now * 1000),
            backend=self.backend,
            random=secrets.token_bytes,
        )

    # --- sending ----------------------------------------------------------------------------

    async def send_text(self, to: str, text: str) -> bytes:
        """Send a text to a peer or ``@group``; returns its message id.

        Raises:
            MessageTooLargeError: over the text limit (before anything is sent).
        """
        return await self.send_content(to, Content.text_message(text, self.clock()))

    async def send_file(
        self, to: str, path: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> FileOffer:
        """Send a file to a peer or ``@group`` (size checked before anything is sent).

        Raises:
            MessageTooLargeError: over ``max_file_size``.
            FileTransferError: the file cannot be read.
        """
        return await self.files.send(to, path, progress=progress)

    async def send_receipt(
        self, to: str, message_ids: Sequence[bytes], status: ReceiptStatus
    ) -> None:
        content = Content(
            ContentKind.RECEIPT,
            new_message_id(),
            int(self.clock() * 1000),
            status=status,
            receipts=tuple(message_ids),
        )
        await self.send_content(to, content, history=False)

    async def send_content(self, to: str, content: Content, *, history: bool = True) -> bytes:
        """Encrypt ``content`` for ``to``, commit, then hand it to the transport."""
        return (await self.send_contents(to, [content], history=history))[0]

    async def send_texts(self, to: str, texts: Sequence[str]) -> list[bytes]:
        """Send a burst of texts to a peer or ``@group`` (:meth:`send_contents`).

        Raises:
            MessageTooLargeError: a text over the limit (before anything is sent).
        """
        now = self.clock()
        return await self.send_contents(to, [Content.text_message(t, now) for t in texts])

    async def send_contents(
        self, to: str, contents: Sequence[Content], *, history: bool = True
    ) -> list[bytes]:
        """Send a burst: one commit for all of it, then the envelopes pipelined.

        For a peer, the session advances once per content (any QKD key the policy
        calls for is taken before, outside the transaction) and the new state, the
        history rows and every outbox entry are committed in ONE transaction before
        any envelope leaves (docs/messaging.md §10.3); then :meth:`flush_outbox`
        sends them without waiting for each answer. A crash before the commit
        leaves nothing sent and nothing stored; after it, the same envelopes are
        resent (idempotent at the server). Returns the message ids.
        """
        if to.startswith("@"):
            if contents:
                await self._send_group(to[1:], contents, history)
        elif contents:
            session = await self._session_for(to)
            wires, bodies = [], [content.serialize() for content in contents]
            for body in bodies:
                # No key source: no QKD policy to check (and no coroutine per message).
                qkd = None if self.key_source is None else await self._qkd_for(session, to)
                wires.append(session.encrypt(pad(body), self.clock(), qkd))
            now = self.clock()
            sent = list(self._sent)
            with self.store.transaction():  # blocking: see docs/messaging.md §10.3
                self.store.remove_outbox(sent)
                self.store.save_session(session.state, now)
                if history:
                    ids = [content.message_id for content in contents]
                    rows = list(zip(ids, bodies, strict=True))
                    self.store.add_histories(to, rows, outgoing=True, now=now)
                self.store.add_outboxes(to, wires, now)
            self._sent.difference_update(sent)
        await self.flush_outbox()
        return [c.message_id for c in contents]

    async def flush_outbox(self) -> int:
        """Send every committed envelope not yet acknowledged by the server.

        Up to :attr:`ClientConfig.send_window` envelopes are in flight at once, sent
        in outbox order (the server answers each after its own commit). An
        acknowledged entry is deleted from the store with the next message's
        transaction (or here, once :data:`_SENT_BATCH` are waiting): after a crash
        it is sent again with the same ``client_ref``, which the server answers
        with the same envelope id without storing it twice.
        """
        # Only the entries above _flushed are read: those below were all sent (ids only grow).
        acked = self._sent
        entries = [e for e in self.store.outbox_rows(self._flushed) if e[0] not in acked]
        window, send = max(1, self.config.send_window), self.transport.send
        for start in range(0, len(entries), window):
            part = entries[start : start + window]
            results = await asyncio.gather(
                *(send(to, data, _client_ref(to, data)) for _, to, data in part),
                return_exceptions=True,
            )
            failed = None
            for (entry_id, _, _), result in zip(part, results, strict=True):
                if isinstance(result, BaseException):
                    failed = failed or result
                else:
                    acked.add(entry_id)
            if failed is not None:
                raise failed
        if entries:
            self._flushed = max(self._flushed, entries[-1][0])
        if len(self._sent) >= _SENT_BATCH:
            sent = list(self._sent)
            with self.store.transaction():
                self.store.remove_outbox(sent)
            self._sent.difference_update(sent)
        return len(entries)

    async def _session_for(self, peer: str) -> Session:
        state = self.store.active_session(peer)
        if state is not None:
            # A batch being processed may hold this session advanced and not yet written:
            # that object is the session (encrypting from the stored row would reuse keys).
            if self._batch is not None and state.session_id in self._batch:
                return self._batch[state.session_id]
            return self._session(state)
        data = await self.transport.claim_prekeys(peer)
        if data is None:
            raise UnknownSessionError(f"{peer} has published no prekeys: not a messaging user yet")
        bundle = PrekeyBundle.parse(data, max_one_time=1)
        qkd = await self._fetch_qkd(peer, required=self.config.require_qkd)
        session = initiate(
            self.me,
            peer,
            bundle,
            now=self.clock(),
            check_peer=self.contacts.check_peer,
            qkd=qkd,
            backend=self.backend,
            limits=self.config.limits,
            policy=self.config.policy,
        )
        with self.store.transaction():
            self.store.save_session(session.state, self.clock())
        return session

    async def _fetch_qkd(self, peer: str, *, required: bool = False) -> QKDMaterial | None:
        if self.key_source is None:
            if required:
                raise QKDError("a QKD key is required, but no key source is configured")
            return None
        try:
            key = await self.key_source.get_key(
                self.config.sae_of(peer), self.config.policy.key_size * 8, application="message"
            )
        except QKDError as exc:
            if required:
                raise
            logger.warning(
                "! no QKD key for %s now (%s): the session goes on with ML-KEM", peer, exc
            )
            return None
        return QKDMaterial(QKDRef(self.sae_id, key.key_id, len(key.key)), key.key)

    async def _qkd_for(self, session: Session, peer: str) -> QKDMaterial | None:
        if self.key_source is None or not session.qkd_due(self.clock()):
            return None
        return await self._fetch_qkd(peer)

    async def _qkd_keys(self, refs: Sequence[QKDRef]) -> dict[str, bytes]:
        """Keys by key_ID: from the store, else ``dec_keys`` (stored before use)."""
        keys = self.store.qkd_keys([r.key_id for r in refs])
        for ref in refs:
            if ref.key_id in keys:
                continue
            if self.key_source is None:
                raise KeyNotFoundError(
                    f"QKD key {ref.key_id} needed, but no key source is configured"
                )
            if self._batching:
                raise _BatchBreak
            key = await self.key_source.get_key_by_id(
                ref.sae_id, ref.key_id, application="message"
            )
            with self.store.transaction():
                self.store.put_qkd_key(ref.key_id, key.key, self.clock())
            keys[ref.key_id] = key.key
        return keys

    # --- receiving --------------------------------------------------------------------------

    async def receive(self) -> list[Event]:
        """Fetch, process and acknowledge everything waiting; returns the events."""
        events: list[Event] = []
        after = 0
        while True:
            envelopes = await self.transport.fetch(after)
            if not envelopes:
                break
            after = max(after, *(e.id for e in envelopes))
            events += await self.deliver(envelopes, retry=False)
        events += await self.retry_pending()
        return events

    async def deliver(self, envelopes: Sequence[Envelope], *, retry: bool = True) -> list[Event]:
        """Process envelopes the transport pushed (or fetched), then acknowledge them.

        Envelopes processed before (the server re-delivers after our crash) are
        only acknowledged. With ``retry``, envelopes kept for later are retried too.
        """
        events = await self.process_batch(envelopes)
        if envelopes:
            await self.transport.ack([e.id for e in envelopes])
        if retry and events:
            events += await self.retry_pending()
        return events

    async def process_batch(self, envelopes: Sequence[Envelope]) -> list[Event]:
        """Process envelopes and commit them, without acknowledging them.

        Once this returns, every envelope is processed and committed (the events can be
        shown) and may be acknowledged; :meth:`deliver` does it. Envelopes processed
        before are skipped.
        """
        events: list[Event] = []
        seen = self.store.processed_ids([e.id for e in envelopes])
        todo = [e for e in envelopes if e.id not in seen]
        while todo:
            # One commit for a batch of envelopes, each a savepoint inside it; acknowledged
            # only after the commit. A KME request must not wait inside the transaction:
            # the batch so far is committed first (_BatchBreak) and that envelope
            # processed on its own; a file chunk (a file write) gets its own batch.
            # Each session the batch advances is written once, at its end, in the same
            # transaction (docs/messaging.md §10.3): a crash before the commit loses the
            # whole batch (redelivered, opened again), after it nothing.
            done, alone = 0, False
            with self.store.transaction():
                self._batching, self._batch = True, {}
                try:
                    for envelope in todo:
                        kind = _type_of(envelope)
                        chunk = kind is MessageType.FILE_CHUNK
                        if chunk and done:
                            break
                        out = None
                        if kind is MessageType.RATCHET_SHORT or kind is MessageType.RATCHET:
                            out = self._process_ratchet(envelope)  # (None: it needs a KME)
                        events += await self.process(envelope) if out is None else out
                        done += 1
                        if chunk:
                            break
                except _BatchBreak:
                    alone = True
                except BaseException:
                    self._received = []  # rolled back with the batch: never written later
                    raise
                finally:
                    self._batching = False
                    advanced, self._batch = self._batch, None
                    marks, self._marks = self._marks, []
                now = self.clock()
                self._write_received()
                for session in advanced.values():
                    self.store.save_session(session.state, now)
                self.store.mark_processed_many(marks, now)
            todo = todo[done:]
            if alone:
                events += await self.process(todo[0])
                todo = todo[1:]
        if any(isinstance(e, MessagePending) for e in events) and any(
            isinstance(e, MessageReceived) for e in events
        ):  # e.g. a short message that came before its epoch's full one (§7.4)
            events += await self.retry_pending()
        return events

    async def process(self, envelope: Envelope) -> list[Event]:
        """Process one envelope and record it as processed (never raises for bad input)."""
        events: list[Event] = []
        try:
            kind = message_type(envelope.data)
            if kind in _DIRECT:
                events = await self._process_direct(envelope, kind)
            elif kind is MessageType.GROUP:
                events = self._process_group(envelope)
            elif kind is MessageType.FILE_CHUNK:
                events = self.files.chunk_received(envelope)
            else:
                raise MessageFormatError(f"envelope of type {kind.name} not handled here")
        except PendingError as pending:
            return self._kept(envelope, pending)
        except (MessagingError, QCallError) as exc:
            return self._rejected(envelope, exc)
        return events

    def _process_ratchet(self, envelope: Envelope) -> list[Event] | None:
        """:meth:`process` of a ratchet message (type 2 or 5) of a batch, without awaiting
        anything: the same steps, results and errors. ``None`` (nothing done): it needs a
        QKD key, so it goes through :meth:`process`."""
        try:
            now = self.clock()
            message, session = self._ratchet_session(envelope)
            if session.qkd_refs_needed(message):
                return None
            return self._open_direct(envelope, now, message, session)
        except PendingError as pending:
            return self._kept(envelope, pending)
        except (MessagingError, QCallError) as exc:
            return self._rejected(envelope, exc)

    def _kept(self, envelope: Envelope, pending: PendingError) -> list[Event]:
        """Keep an envelope for later (:meth:`retry_pending`), in its own savepoint."""
        with self.store.transaction():
            self.store.add_pending(
                envelope.id, envelope.sender, envelope.data, str(pending.args[0]), self.clock()
            )
            self.store.mark_processed(envelope.id, self.clock())
        return [MessagePending(envelope.sender, envelope.id, str(pending.args[0]))]

    def _rejected(self, envelope: Envelope, exc: MessagingError | QCallError) -> list[Event]:
        """Bad input: shown as rejected, recorded as processed (its own savepoint)."""
        logger.warning("! envelope %d from %s rejected: %s", envelope.id, envelope.sender, exc)
        with self.store.transaction():
            self.store.mark_processed(envelope.id, self.clock())
        return [MessageRejected(envelope.sender, envelope.id, exc)]

    def _ratchet_session(self, envelope: Envelope) -> tuple[RatchetMessage, Session]:
        """A ratchet message (type 2 or 5) parsed, and its session."""
        message = RatchetMessage.parse(envelope.data)
        session = self._stored_session(message.session_id)
        if session is None:
            raise UnknownSessionError(
                f"message from {envelope.sender} for an unknown session "
                f"{message.session_id.hex()[:8]}"
            )
        return message, session

    async def _process_direct(self, envelope: Envelope, kind: MessageType) -> list[Event]:
        now = self.clock()
        init: PrekeyMessage | None = None
        opk_used = 0
        th_init = b""
        if kind is MessageType.PREKEY:
            init = PrekeyMessage.parse(envelope.data)
            session, th_init, opk_used = await self._accept(init, now)
            message = RatchetMessage.parse(init.inner)
            if message.compact:
                raise MessageFormatError("prekey message: its inner message must be full")
        else:
            message, session = self._ratchet_session(envelope)
        refs = session.qkd_refs_needed(message)
        try:
            keys = await self._qkd_keys(refs) if refs else {}
        except (QKDError,) as exc:
            if isinstance(exc, KeyNotFoundError):
                raise
            raise PendingError(f"QKD key not available yet: {exc}") from exc
        return self._open_direct(
            envelope, now, message, session, keys, refs, init, th_init, opk_used
        )

    def _open_direct(
        self,
        envelope: Envelope,
        now: float,
        message: RatchetMessage,
        session: Session,
        keys: dict[str, bytes] | None = None,
        refs: Sequence[QKDRef] = (),
        init: PrekeyMessage | None = None,
        th_init: bytes = b"",
        opk_used: int = 0,
    ) -> list[Event]:
        """The rest of :meth:`_process_direct`, once any QKD key it needs is here."""
        try:
            plaintext = session.decrypt(message, now, keys)
        except EpochNotOpenError as exc:  # its epoch's full message is still to come
            raise PendingError(str(exc)) from exc
        batch = self._batch
        if batch is not None and init is None:
            # In a batch the session is written once, at the batch's end, whatever happens
            # to this envelope now: its message key is used (the ratchet moved past it).
            batch.pop(session.session_id, None)
            batch[session.session_id] = session
        body = unpad(plaintext)
        content = Content.decode(body)
        # A text of a batch needs no savepoint of its own: its only write, the history
        # row, joins the batch's others, written in one statement at its end (or before
        # any other history row, to keep their order); if that fails, the whole batch
        # rolls back and nothing of it is acknowledged.
        if batch is not None and init is None and not refs and content.kind is ContentKind.TEXT:
            events = self._apply_content(session, content, body, envelope.id, now, defer=True)
            self._marks.append(envelope.id)  # with the batch's session (process_batch)
            return events
        self._write_received()
        with self.store.transaction():
            if batch is None or init is not None:
                self.store.save_session(session.state, now)
            if init is not None and th_init:
                if self.store.init_session(th_init) is None:
                    self.store.record_init(th_init, session.session_id, now)
                if opk_used:
                    self.store.consume_one_time_prekey(opk_used, now)
            self.store.delete_qkd_keys([r.key_id for r in refs])
            events = self._apply_content(session, content, body, envelope.id, now)
            self.store.mark_processed(envelope.id, now)
        if batch is not None and init is not None:  # written above with its set-up rows
            batch.pop(session.session_id, None)
            batch[session.session_id] = session
        return events

    async def _accept(self, init: PrekeyMessage, now: float) -> tuple[Session, bytes, int]:
        """The session of a prekey message: the known one, or a new one (§3.3)."""
        spk = self.store.prekey_record(PrekeyKind.SIGNED, init.signed_prekey_id)
        opk = None
        if init.one_time_prekey_id:
            opk = self.store.prekey_record(PrekeyKind.ONE_TIME, init.one_time_prekey_id)
        if spk is None or (init.one_time_prekey_id and opk is None):
            raise PrekeyError(f"prekey message from {init.sender} names prekeys we do not have")
        th_init = init_transcript(init, spk, opk)
        known = self.store.init_session(th_init)
        if known is not None:  # a repeat prekey message of a session we have
            session = self._stored_session(known)
            if session is None:
                raise UnknownSessionError(f"session of {init.sender}'s prekey message is gone")
            return session, th_init, 0
        check_prekey_message(
            self.me,
            init,
            spk,
            opk,
            check_peer=self.contacts.check_peer,
            accept_pqc=self.config.accept_pqc,
            backend=self.backend,
        )
        _, spk_seed = self.store.prekey(PrekeyKind.SIGNED, init.signed_prekey_id)
        opk_seed = b""
        if init.one_time_prekey_id:  # refused here if already used (PrekeyError)
            _, opk_seed = self.store.prekey(PrekeyKind.ONE_TIME, init.one_time_prekey_id)
        key = None
        if init.qkd is not None:
            try:
                key = (await self._qkd_keys([init.qkd]))[init.qkd.key_id]
            except QKDError as exc:
                if isinstance(exc, KeyNotFoundError):
                    raise
                raise PendingError(f"QKD key not available yet: {exc}") from exc
        keys = Responder(self.me, spk, spk_seed, opk, opk_seed)
        session, th = respond(
            keys,
            init,
            now=now,
            check_peer=self.contacts.check_peer,
            qkd_key=key,
            accept_pqc=self.config.accept_pqc,
            backend=self.backend,
            limits=self.config.limits,
            policy=self.config.policy,
        )
        return session, th, init.one_time_prekey_id

    def _apply_content(
        self,
        session: Session,
        content: Content,
        body: bytes,
        envelope_id: int,
        now: float,
        defer: bool = False,
    ) -> list[Event]:
        """Store and turn a 1:1 content into events (inside the receive transaction).

        ``body`` is the content's encoding as received (canonical: ``content.serialize()``).
        With ``defer`` (a text of a batch) its history row waits for :meth:`_write_received`.
        """
        peer, mode = session.peer, session.mode
        if defer:
            self._received.append((peer, content.message_id, body))
            return [MessageReceived(peer, peer, content, mode, envelope_id)]
        if content.kind in (ContentKind.TEXT, ContentKind.FILE):
            self.store.add_history(
                peer, content.message_id, outgoing=False, now=now, body=body
            )
            if content.kind is ContentKind.FILE:
                self.files.offer_received(peer, peer, content, now)
            return [MessageReceived(peer, peer, content, mode, envelope_id)]
        if content.kind is ContentKind.RECEIPT:
            assert content.status is not None
            for message_id in content.receipts:
                self.store.set_status(peer, message_id, content.status)
            return [ReceiptReceived(peer, peer, content.status, content.receipts)]
        if content.kind is ContentKind.GROUP_CHANGE:
            return [self._apply_group_change(peer, session.state.peer_identity, content.body)]
        return self._accept_sender_key(peer, content)

    def _write_received(self) -> None:
        """Write the history rows of the batch's texts so far (one statement)."""
        if self._received:
            rows, self._received = self._received, []
            self.store.add_received(rows, self.clock())

    async def retry_pending(self) -> list[Event]:
        """Retry envelopes kept for later (after a sender key or QKD key arrived)."""
        events: list[Event] = []
        for pending_id, envelope_id, sender, data in self.store.pending():
            envelope = Envelope(envelope_id, sender, data)
            try:
                kind = message_type(data)
                if kind is MessageType.GROUP:
                    result = self._process_group(envelope)
                elif kind is MessageType.FILE_CHUNK:
                    result = self.files.chunk_received(envelope)
                else:
                    result = await self._process_direct(envelope, kind)
            except PendingError:
                continue
            except (MessagingError, QCallError) as exc:
                result = [MessageRejected(sender, envelope_id, exc)]
            self.store.remove_pending(pending_id)
            events += result
        return events

    # --- history --------------------------------------------------------------------------------

    def history(
        self, conversation: str, *, grep: str | None = None, limit: int = 1000
    ) -> list[tuple[HistoryEntry, Content]]:
        """The local history of a peer or ``@group`` (decrypted), optionally filtered."""
        out = []
        for entry in self.store.history(conversation, limit=limit):
            content = Content.decode(entry.body)
            if grep is None or grep.lower() in content.text.lower():
                out.append((entry, content))
        return out
