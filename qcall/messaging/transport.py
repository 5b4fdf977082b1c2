"""The messaging :class:`~qcall.messaging.api.Transport` over a signaling connection.

:class:`SignalingTransport` speaks the mailbox frames of
:mod:`qcall.signaling.mailbox` on a :class:`~qcall.signaling.client.SignalingClient`
(docs/messaging.md §12): each call sends one request and waits for its answer;
requests may be in flight together (answers are matched by ``id``). Envelopes
the server pushes are queued in :attr:`SignalingTransport.pushed`, and
:attr:`SignalingTransport.wake` is set when something arrived or waits::

    client = SignalingClient(url, key, "alice")
    transport = SignalingTransport(client)
    await client.connect()
    messaging = MessagingClient(identity, store, transport, contacts)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from qcall.exceptions import (
    MailboxFullError,
    MessageTooLargeError,
    MessagingError,
    PrekeyError,
    SignalingError,
    SignalingProtocolError,
)
from qcall.messaging.api import Envelope
from qcall.messaging.prekeys import PrekeyBundle, SignedPrekey
from qcall.signaling.client import SignalingClient
from qcall.signaling.mailbox import (
    MAX_ACK_IDS,
    MailAck,
    MailAcked,
    MailBatch,
    MailError,
    MailFetch,
    MailFrame,
    MailPush,
    MailPut,
    MailStored,
    MailWaiting,
    OneTimePrekey,
    PrekeysBundle,
    PrekeysClaim,
    PrekeysCount,
    PrekeysHeld,
    PrekeysPublish,
    is_mailbox_frame,
    parse_mailbox_frame,
)

__all__ = ["SignalingTransport"]

logger = logging.getLogger(__name__)


def _error(frame: MailError) -> Exception:
    text = f"signaling server: {frame.message} ({frame.code})"
    if frame.code == "too_big":
        return MessageTooLargeError(text)
    if frame.code in ("mailbox_full", "too_many_prekeys"):
        return MailboxFullError(text)
    if frame.code == "wrong_identity":
        return PrekeyError(text)
    if frame.code in ("bad_message", "auth_required"):
        return SignalingProtocolError(text)
    return MessagingError(text)


class SignalingTransport:
    """:class:`~qcall.messaging.api.Transport` over ``client`` (see the module docstring).

    Args:
        client: the signaling connection (registered before the first call).
        timeout: seconds to wait for an answer (:class:`SignalingError` after).
    """

    def __init__(self, client: SignalingClient, *, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout
        #: Envelopes the server pushed, not yet taken (:meth:`take_pushed`).
        self.pushed: list[Envelope] = []
        #: Set when an envelope was pushed, or envelopes wait on the server
        #: (``mail_waiting``, a reconnection): then :attr:`fetch_needed` is set too.
        self.wake = asyncio.Event()
        self.fetch_needed = True
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[MailFrame]] = {}
        client.add_listener(self)

    def __repr__(self) -> str:
        return f"<SignalingTransport {self.client.name} {self.client.url}>"

    # --- FrameListener ------------------------------------------------------------------

    def frame(self, text: str) -> bool:
        if not is_mailbox_frame(text):
            return False
        try:
            frame = parse_mailbox_frame(text, server=False)
        except SignalingProtocolError as exc:
            logger.warning("! ignored a malformed mailbox frame from the server: %s", exc)
            return True
        if isinstance(frame, MailPush):
            e = frame.envelope
            self.pushed.append(Envelope(e.id, e.sender, e.data))
            self.wake.set()
        elif isinstance(frame, MailWaiting):
            self.fetch_needed = True
            self.wake.set()
        else:
            request = getattr(frame, "id", None)
            future = self._pending.pop(request, None) if request is not None else None
            if future is None:
                logger.warning("! mailbox answer %r matches no request", frame)
            elif not future.done():
                future.set_result(frame)
        return True

    def disconnected(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SignalingError("the signaling connection was lost"))
        self._pending.clear()
        self.fetch_needed = True
        self.wake.set()

    def take_pushed(self) -> list[Envelope]:
        """The pushed envelopes received so far (then forgotten here)."""
        out, self.pushed = self.pushed, []
        self.wake.clear()
        return out

    # --- requests ---------------------------------------------------------------------------

    async def _request(self, make: type[MailFrame], *args: object) -> MailFrame:
        self._next_id += 1
        request = self._next_id
        frame = make(request, *args)  # type: ignore[call-arg]
        future: asyncio.Future[MailFrame] = asyncio.get_running_loop().create_future()
        self._pending[request] = future
        try:
            await self.client.send(frame)
            async with asyncio.timeout(self.timeout):
                answer = await future
        except TimeoutError:
            raise SignalingError(f"no answer to {make.TYPE} within {self.timeout:g} s") from None
        finally:
            self._pending.pop(request, None)
        if isinstance(answer, MailError):
            raise _error(answer)
        return answer

    async def publish_prekeys(self, bundle: bytes) -> int:
        parsed = PrekeyBundle.parse(bundle)
        one_time = tuple(
            OneTimePrekey(p.record.prekey_id, p.serialize()) for p in parsed.one_time_prekeys
        )
        answer = await self._request(
            PrekeysPublish, parsed.identity_key, parsed.signed_prekey.serialize(), one_time
        )
        assert isinstance(answer, PrekeysHeld)
        return answer.count

    async def prekey_count(self) -> int:
        answer = await self._request(PrekeysCount)
        assert isinstance(answer, PrekeysHeld)
        return answer.count

    async def claim_prekeys(self, peer: str) -> bytes | None:
        answer = await self._request(PrekeysClaim, peer)
        if not isinstance(answer, PrekeysBundle) or answer.owner != peer:
            raise PrekeyError(f"the server answered a claim for {peer} with another bundle")
        if answer.identity_key is None or answer.signed_prekey is None:
            return None
        opk = (SignedPrekey.parse(answer.one_time_prekey),) if answer.one_time_prekey else ()
        signed = SignedPrekey.parse(answer.signed_prekey)
        return PrekeyBundle(peer, answer.identity_key, signed, opk).serialize()

    async def send(self, recipient: str, data: bytes, client_ref: bytes) -> int:
        answer = await self._request(MailPut, recipient, data, client_ref)
        assert isinstance(answer, MailStored)
        return answer.envelope_id

    async def fetch(self, after: int = 0, limit: int = 100) -> list[Envelope]:
        if after == 0:
            self.fetch_needed = False
        answer = await self._request(MailFetch, after, limit)
        assert isinstance(answer, MailBatch)
        return [Envelope(e.id, e.sender, e.data) for e in answer.envelopes]

    async def ack(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), MAX_ACK_IDS):
            answer = await self._request(MailAck, tuple(ids[start : start + MAX_ACK_IDS]))
            assert isinstance(answer, MailAcked)
