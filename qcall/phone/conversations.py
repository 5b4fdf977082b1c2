"""The conversations screen's model: Quantum Secret messages through :class:`MessagingClient`.

It polls the client's mailbox (:meth:`MessagingClient.receive`) and reads the
local, encrypted history (:class:`~qcall.messaging.store.ClientStore`), so the
screen shows what is stored on this device even while the server is away.
Conversations are listed for the names the phone knows (contacts, organisation
members, everyone online) and the groups; those with no message are left out.
Messages that fail a check arrive as :class:`~qcall.messaging.api.MessageRejected`
and are shown as errors, never as messages (docs/messaging.md §13).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qcall.exceptions import QCallError
from qcall.messaging.api import FileReceived, MessageReceived, MessageRejected
from qcall.messaging.client import MessagingClient
from qcall.messaging.content import ContentKind

__all__ = ["ConversationLine", "ConversationSummary", "Conversations"]

logger = logging.getLogger(__name__)

#: Seconds between two polls of the mailbox.
POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class ConversationSummary:
    """One line of the conversations list."""

    name: str
    last: str
    at_ms: int
    unread: int


@dataclass(frozen=True)
class ConversationLine:
    """One message of a conversation, as shown."""

    outgoing: bool
    at_ms: int
    text: str


def _text(kind: ContentKind, text: str) -> str:
    if kind is ContentKind.TEXT:
        return text
    if kind is ContentKind.FILE:
        return "[file]"
    return f"[{kind.name.lower()}]"


class Conversations:
    """Messages of one user (see the module docstring).

    Args:
        client: the user's messaging client (its transport reaches the server).
        names: returns the names to look for conversations with.
        on_change: called when new messages or errors arrived.
        poll_interval: seconds between mailbox polls (``None``: never poll; call
            :meth:`poll` yourself).
    """

    def __init__(
        self,
        client: MessagingClient,
        names: Callable[[], Iterable[str]] = tuple,
        *,
        on_change: Callable[[], None] = lambda: None,
        poll_interval: float | None = POLL_INTERVAL,
    ) -> None:
        self.client = client
        self.names = names
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.unread: dict[str, int] = {}
        #: Envelopes refused (shown as errors): (sender, reason).
        self.errors: list[tuple[str, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Publish prekeys if needed, then poll the mailbox in the background."""
        try:
            await self.client.ensure_prekeys()
        except QCallError as exc:
            self.errors.append(("server", f"prekeys not published: {exc}"))
        if self.poll_interval is not None:
            self._task = asyncio.ensure_future(self._poll_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll_loop(self) -> None:
        assert self.poll_interval is not None
        while True:
            try:
                await self.poll()
            except QCallError as exc:
                logger.debug("! mailbox poll failed: %s", exc)
            wake = getattr(self.client.transport, "wake", None)
            if isinstance(wake, asyncio.Event):  # a push from the server: at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.poll_interval)
            else:
                await asyncio.sleep(self.poll_interval)

    async def poll(self) -> int:
        """Fetch and process what waits in the mailbox; returns the messages received."""
        received = 0
        events = []
        take_pushed = getattr(self.client.transport, "take_pushed", None)
        if take_pushed is not None:  # envelopes the server pushed while we are online
            pushed = take_pushed()
            if pushed:
                events += await self.client.deliver(pushed)
        events += await self.client.receive()
        for event in events:
            if isinstance(event, MessageReceived) and event.content.kind in (
                ContentKind.TEXT,
                ContentKind.FILE,
            ):
                self.unread[event.conversation] = self.unread.get(event.conversation, 0) + 1
                received += 1
            elif isinstance(event, FileReceived):
                received += 1
            elif isinstance(event, MessageRejected):
                self.errors.append((event.sender, str(event.error)))
        if received or self.errors:
            self.on_change()
        return received

    def summaries(self) -> list[ConversationSummary]:
        """Conversations with at least one message, most recent first."""
        names = set(self.names()) | {f"@{g.name}" for g in self.client.groups()}
        out = []
        for name in names:
            history = self.client.history(name, limit=1)
            if not history:
                continue
            entry, content = history[-1]
            out.append(
                ConversationSummary(
                    name, _text(content.kind, content.text), entry.at_ms, self.unread.get(name, 0)
                )
            )
        out.sort(key=lambda s: -s.at_ms)
        return out

    def lines(self, name: str, limit: int = 200) -> list[ConversationLine]:
        """The last messages with ``name`` (oldest first); marks them read."""
        self.unread.pop(name, None)
        return [
            ConversationLine(entry.outgoing, entry.at_ms, _text(content.kind, content.text))
            for entry, content in self.client.history(name, limit=limit)
            if content.kind in (ContentKind.TEXT, ContentKind.FILE)
        ]

    async def send(self, name: str, text: str) -> None:
        """Send a text to a peer or ``@group``.

        Raises:
            QCallError: it could not be encrypted or sent (the message says why).
        """
        await self.client.send_text(name, text)
        self.on_change()
