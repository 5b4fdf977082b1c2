"""Asyncio client of the signaling server, with automatic reconnection.

:class:`SignalingClient` registers an ML-DSA-65 identity under a name by
signing the server's challenge (docs/signaling.md, "Registration"), keeps the
presence list, sends call messages and delivers everything the server sends
as events. When the connection drops (the server restarts, the network
blinks) it reconnects with exponential backoff and registers again by itself;
the application sees :class:`Disconnected` then a fresh
:class:`~qcall.signaling.messages.Registered`.

Typical use::

    async with SignalingClient("ws://127.0.0.1:8765", key, "alice") as client:
        call_id = await client.invite("bob")
        async for event in client:
            if isinstance(event, Accept) and event.call_id == call_id:
                await client.send_offer(call_id, offer_payload)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl as ssl_module
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from qcall import __version__, pqc
from qcall._aio import AsyncClosing
from qcall.exceptions import SignalingAuthError, SignalingError, SignalingProtocolError
from qcall.signaling.messages import (
    MAX_SERVER_MESSAGE_SIZE,
    Accept,
    Answer,
    Busy,
    CallMessage,
    Cancel,
    Challenge,
    ErrorMessage,
    Hangup,
    ICECandidate,
    Invite,
    Message,
    Offer,
    Presence,
    Register,
    Registered,
    Reject,
    Ringing,
    ServerMessage,
    TurnCredentials,
    error_for,
    fingerprint,
    parse_server_message,
)

__all__ = ["Disconnected", "Event", "FrameListener", "SignalingClient", "new_call_id"]

logger = logging.getLogger(__name__)

#: Error codes after which reconnecting cannot help.
FATAL_CODES = frozenset(
    {"auth_failed", "name_taken", "replaced", "too_many_names", "too_many_watched"}
)


@dataclass(frozen=True)
class Disconnected:
    """Client event: the connection to the server was lost.

    Attributes:
        reason: what happened (close code and reason, or the fatal error).
        final: ``True`` if the client will not reconnect (closed, fatal error,
            or reconnection disabled); the event iterator ends after it.
    """

    reason: str
    final: bool = False


class FrameListener(Protocol):
    """Takes frames of another protocol on the same connection (e.g. the mailbox,
    :mod:`qcall.messaging.transport`) before the client parses them."""

    def frame(self, text: str) -> bool:
        """Handle ``text`` if it is ours; ``True``: consumed (not an event)."""

    def disconnected(self) -> None:
        """The connection was lost (requests in flight will get no answer)."""


#: What iterating a :class:`SignalingClient` yields.
Event = ServerMessage | Disconnected


def new_call_id() -> str:
    """Return a fresh random call id (16 random bytes, base64url: 22 characters)."""
    return secrets.token_urlsafe(16)


class SignalingClient(AsyncClosing):
    """Connect to a signaling server as ``name`` and exchange call messages.

    Args:
        url: ``ws://host:port`` or ``wss://host:port``, or several such URLs (the
            instances of one service, sharing a ``server_id``): the client uses
            the first that answers and, when its connection drops, reconnects
            to the next one at once (docs/signaling.md, "Several instances").
        identity_signing_key: the user's long-term ML-DSA-65 key (FIPS 204).
        name: the name to register (docs/signaling.md, "Names").
        ssl: TLS context for ``wss://`` (default: the system's trust store).
        reconnect: reconnect and re-register automatically after a drop.
        backoff_min: first reconnection delay in seconds; doubled after each failure...
        backoff_max: ...up to this (with ±50 % jitter).
        timeout: seconds allowed for opening the connection and registering.
        watch: names whose presence to follow (for example the contacts, at most
            1000); default: everyone's, which costs O(users) per registration.
        features: optional features to ask for, when the server offers them
            (``register.features``; e.g. ``early_offer``: a caller's signed offer
            while the call rings, docs/signaling.md "The offer while ringing").
    """

    def __init__(
        self,
        url: str | Sequence[str],
        identity_signing_key: pqc.SigningKey,
        name: str,
        ssl: ssl_module.SSLContext | None = None,
        *,
        reconnect: bool = True,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        timeout: float = 10.0,
        watch: Iterable[str] | None = None,
        previous_key: pqc.SigningKey | None = None,
        features: Iterable[str] = (),
    ) -> None:
        if identity_signing_key.algorithm is not pqc.SignatureScheme.ML_DSA_65:
            raise SignalingAuthError("the signaling server accepts ML-DSA-65 identities only")
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise SignalingError("no signaling URL given")
        self._url_index = 0
        self.name = name
        self.fingerprint = fingerprint(identity_signing_key.public_bytes())
        self._key = identity_signing_key
        self._ssl = ssl
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.watch = None if watch is None else tuple(watch)
        #: The user's previous identity key: signs moving the name to the new key.
        self._previous = previous_key
        #: Registered peers other than us (those watched, if ``watch`` was given):
        #: name -> identity fingerprint (server-asserted).
        self.online: dict[str, str] = {}
        #: TURN credentials of the last registration (``None``: the server gives none);
        #: ``client.turn.ice_server()`` goes into ``CallOptions.ice_servers``.
        self.turn: TurnCredentials | None = None
        #: The ``server_id`` of the last challenge.
        self.server_id: str | None = None
        #: Features to ask for; and those the last ``challenge`` offered.
        self.features = tuple(features)
        self.server_features: frozenset[str] = frozenset()
        #: Number of successful registrations (1 after :meth:`connect`, +1 per reconnection).
        self.registrations = 0
        self._ws: ClientConnection | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._run_task: asyncio.Task[None] | None = None
        self._closing = False
        self._fatal: str | None = None
        self._finished = False
        self._registered = asyncio.Event()
        self._listeners: list[FrameListener] = []

    def __repr__(self) -> str:
        return f"<SignalingClient {self.name} {self.fingerprint[:16]}… {self.url}>"

    # --- lifecycle ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """``True`` while connected and registered."""
        return self._ws is not None and self._registered.is_set()

    async def connect(self) -> Registered:
        """Connect and register once; then keep the connection (and reconnect) in the background.

        Returns:
            the server's ``registered`` message (also queued as the first event).

        Raises:
            SignalingAuthError: the server refused the registration (``code`` says why).
            SignalingError: the server could not be reached or spoke nonsense.
        """
        if self._run_task is not None:
            raise SignalingError("already connected")
        if self._finished:
            raise SignalingError("this client was closed: make a new one")
        self._closing = False
        for attempt in range(len(self.urls)):
            try:
                ws, registered = await self._open()
                break
            except SignalingError as exc:
                if exc.code in FATAL_CODES or attempt == len(self.urls) - 1:
                    raise
                self._next_url()
        self._run_task = asyncio.create_task(self._run(ws))
        return registered

    async def close(self) -> None:
        """Close the connection and stop reconnecting; the event iterator then ends."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close()
        task, self._run_task = self._run_task, None
        if task is not None:
            if ws is None:  # sleeping between reconnection attempts
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finish("closed")

    async def __aenter__(self) -> SignalingClient:  # connect is its start
        await self.connect()
        return self

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Wait until the client is registered (again, after a reconnection).

        Raises:
            TimeoutError: not registered within ``timeout`` seconds.
        """
        await asyncio.wait_for(self._registered.wait(), timeout)

    def add_listener(self, listener: FrameListener) -> None:
        """Give ``listener`` the first look at every frame (see :class:`FrameListener`)."""
        self._listeners.append(listener)

    # --- events -------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # later iterators end too
                return
            yield event

    async def next_event(self, timeout: float | None = None) -> Event:
        """Return the next event.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            SignalingError: the client is closed and every event was consumed.
        """
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)
            raise SignalingError("the signaling client is closed")
        return event

    # --- calls ------------------------------------------------------------------------------

    async def invite(
        self, peer: str, call_id: str | None = None, payload: str | None = None
    ) -> str:
        """Invite ``peer`` to a call; return the call id (fresh unless given).

        ``payload``: the caller's offer, relayed verbatim in the invite
        (docs/signaling.md, "The offer in the invite").
        """
        call_id = call_id or new_call_id()
        await self.send(Invite(call_id, peer=peer, payload=payload))
        return call_id

    async def ringing(self, call_id: str) -> None:
        """Tell the caller that the user is being alerted."""
        await self.send(Ringing(call_id))

    async def accept(
        self, call_id: str, payload: str | None = None, reason: str | None = None
    ) -> None:
        """Accept an incoming call; ``payload``: the answer to the invite's offer;
        ``reason``: ``early offer expired`` asks for a freshly stamped offer."""
        await self.send(Accept(call_id, payload=payload, reason=reason))

    async def reject(self, call_id: str, reason: str | None = None) -> None:
        """Decline an incoming call."""
        await self.send(Reject(call_id, reason=reason))

    async def busy(self, call_id: str, reason: str | None = None) -> None:
        """Decline an incoming call because the user is busy."""
        await self.send(Busy(call_id, reason=reason))

    async def cancel(self, call_id: str, reason: str | None = None) -> None:
        """Withdraw an invitation that was not accepted yet."""
        await self.send(Cancel(call_id, reason=reason))

    async def hangup(self, call_id: str, reason: str | None = None) -> None:
        """End a call, in any state."""
        await self.send(Hangup(call_id, reason=reason))

    async def send_offer(self, call_id: str, payload: str, reason: str | None = None) -> None:
        """Send an offer (opaque payload, relayed verbatim) to the other party."""
        await self.send(Offer(call_id, payload=payload, reason=reason))

    async def send_answer(self, call_id: str, payload: str) -> None:
        """Send an answer (opaque payload, relayed verbatim) to the other party."""
        await self.send(Answer(call_id, payload=payload))

    async def send_ice(self, call_id: str, payload: str) -> None:
        """Send an ICE candidate (opaque payload, relayed verbatim) to the other party."""
        await self.send(ICECandidate(call_id, payload=payload))

    async def send(self, message: Message) -> None:
        """Send any client message.

        Raises:
            SignalingError: not connected (for example while reconnecting).
        """
        ws = self._ws
        if ws is None or not self._registered.is_set():
            raise SignalingError("not connected to the signaling server")
        try:
            await ws.send(message.serialize())
        except ConnectionClosed as exc:
            raise SignalingError("the signaling connection was lost") from exc

    # --- internals ----------------------------------------------------------------------------

    async def _open(self) -> tuple[ClientConnection, Registered]:
        """Connect, answer the challenge, return the socket and ``registered``."""
        try:
            ws = await connect(
                self.url,
                # wss:// without a context: the system's trust store (websockets refuses None).
                ssl=(
                    self._ssl
                    if self._ssl is not None or not self.url.lower().startswith("wss://")
                    else True
                ),
                open_timeout=self.timeout,
                max_size=MAX_SERVER_MESSAGE_SIZE,
                compression=None,  # like the server: base64 keys/signatures do not compress
                user_agent_header=f"qcall/{__version__}",
            )
        except ssl_module.SSLCertVerificationError as exc:
            raise SignalingError(
                f"cannot connect to {self.url}: the server's TLS certificate was refused "
                f"({exc.verify_message}); give the CA that signed it (--signaling-ca FILE, "
                "signaling_ca in the config)"
            ) from exc
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise SignalingError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            async with asyncio.timeout(self.timeout):
                challenge = parse_server_message(await ws.recv())
                if not isinstance(challenge, Challenge):
                    raise SignalingProtocolError(f"expected a challenge, got {challenge.TYPE!r}")
                self.server_id = challenge.server_id
                self.server_features = frozenset(challenge.features)
                register = Register.create(
                    self._key,
                    self.name,
                    challenge,
                    self.watch,
                    previous=self._previous,
                    features=self.features,
                )
                await ws.send(register.serialize())
                answer = parse_server_message(await ws.recv())
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, ConnectionClosed | TimeoutError):
                raise SignalingError(f"registration with {self.url} failed: {exc}") from exc
            raise
        if isinstance(answer, ErrorMessage):
            await ws.close()
            if answer.code == "name_taken":  # say what to do, not only what happened
                taken = error_for(
                    answer.code,
                    f"the name {self.name!r} is registered with another key (a previous "
                    "identity of yours, or someone else's). `qcall identity new --force` "
                    "keeps the previous key, which moves the name; else the server frees "
                    "a name offline for its pin_ttl (30 days by default) or when it "
                    "restarts: ask its operator, or use another name (docs/signaling.md)",
                )
                raise taken
            raise answer.exception()
        if not isinstance(answer, Registered) or answer.fingerprint != self.fingerprint:
            await ws.close()
            raise SignalingProtocolError("the server did not confirm our registration")
        self._ws = ws
        self._registered.set()
        self.registrations += 1
        self.online = {peer.name: peer.fingerprint for peer in answer.online}
        self.turn = answer.turn
        self._events.put_nowait(answer)
        logger.info("= registered as %s on %s", self.name, self.url)
        return ws, answer

    async def _run(self, ws: ClientConnection | None) -> None:
        while ws is not None:
            try:
                async for text in ws:
                    self._handle(text)
            except ConnectionClosed:
                pass
            self._ws = None
            self._registered.clear()
            for listener in self._listeners:
                listener.disconnected()
            reason = f"connection closed (code {ws.close_code}) {ws.close_reason or ''}".strip()
            if self._closing or self._fatal or not self.reconnect:
                break
            logger.info("! %s; reconnecting", reason)
            self._events.put_nowait(Disconnected(reason))
            ws = await self._reconnect()
        self._finish("closed" if self._closing else self._fatal or "connection lost")

    def _finish(self, reason: str) -> None:
        """Emit the final :class:`Disconnected` (once) and end the event stream."""
        if not self._finished:
            self._finished = True
            self._events.put_nowait(Disconnected(reason, final=True))
            self._events.put_nowait(None)

    @property
    def url(self) -> str:
        """The URL in use (or tried next)."""
        return self.urls[self._url_index]

    def _next_url(self) -> None:
        self._url_index = (self._url_index + 1) % len(self.urls)

    async def _reconnect(self) -> ClientConnection | None:
        delay = self.backoff_min
        while not self._closing:
            self._next_url()  # the instance we lost is tried last
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            try:
                ws, _ = await self._open()
                return ws
            except SignalingError as exc:
                if exc.code in FATAL_CODES:
                    self._fatal = str(exc)
                    return None
                logger.debug("! reconnection failed: %s", exc)
            delay = min(delay * 2, self.backoff_max)
        return None

    def _handle(self, text: str | bytes) -> None:
        if isinstance(text, str):
            for listener in self._listeners:
                if listener.frame(text):
                    return
        try:
            msg = parse_server_message(text)
        except SignalingProtocolError as exc:
            logger.warning("! ignored a malformed message from the server: %s", exc)
            return
        if isinstance(msg, Presence):
            if msg.online:
                self.online[msg.name] = msg.fingerprint
            else:
                self.online.pop(msg.name, None)
        elif isinstance(msg, ErrorMessage) and msg.code in FATAL_CODES:
            self._fatal = str(msg.exception())
        elif isinstance(msg, CallMessage) and logger.isEnabledFor(logging.DEBUG):
            logger.debug("< %r", msg)
        self._events.put_nowait(msg)
