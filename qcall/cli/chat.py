"""``qcall chat bob`` / ``qcall chat @team``: an interactive conversation on the terminal.

The history comes first, then new messages as they arrive (pushed by the
server), and what you type is sent line by line. Marks after your lines:
``✓`` the server stored it, ``✓✓`` bob's device has it, ``read`` bob saw it (1:1
conversations; receipts are end-to-end encrypted messages too). ``/quit`` or
Ctrl-D ends the chat. Anything rejected (tampered, replayed, a forged member)
is shown as an error line, never as a message.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from qcall.exceptions import QCallError

if TYPE_CHECKING:
    from qcall.cli.messaging import Messenger
    from qcall.messaging.api import Event

__all__ = ["run_chat"]


def _reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None], src: TextIO) -> None:
    """A daemon thread: stdin lines into ``queue`` (``None`` at end of input)."""
    for line in src:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def run_chat(
    m: Messenger, to: str, *, lines: int = 20, src: TextIO | None = None, out: TextIO | None = None
) -> int:
    """Run the chat until end of input or ``/quit``; returns the exit code."""
    from qcall.cli.messaging import _history_line, _history_row, event_text, sender_trust
    from qcall.messaging.api import MessageReceived, ReceiptReceived
    from qcall.messaging.content import ReceiptStatus

    out = out or sys.stdout
    client, transport = m.client, m.transport
    direct = not to.startswith("@")

    def show(text: str) -> None:
        print(text, file=out, flush=True)

    show(f"chat with {to} · {m.mode_of(to)} ({m.notice}) — /quit or Ctrl-D to leave")
    for entry, content in client.history(to)[-lines:]:
        show(_history_line(_history_row(entry, content, to)))
    sent: dict[bytes, str] = {}

    async def handle(events: list[Event]) -> None:
        read: list[bytes] = []
        for event in events:
            if isinstance(event, ReceiptReceived):
                mark = "✓✓ read" if event.status is ReceiptStatus.READ else "✓✓"
                for message_id in event.message_ids:
                    if message_id in sent:
                        show(f"  {mark}  {sent[message_id][:40]}")
                continue
            text = event_text(event, lambda name: sender_trust(client, name))
            if text is None:
                continue
            if isinstance(event, MessageReceived) and event.conversation == to:
                show(text)
                if direct:
                    read.append(event.content.message_id)
            elif isinstance(event, MessageReceived):
                show(f"(in {event.conversation}) {text}")
            else:
                show(text)
        if read:
            await client.send_receipt(to, read, ReceiptStatus.READ)

    await handle(await client.receive())
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=_reader, args=(loop, queue, src or sys.stdin), daemon=True).start()
    next_line: asyncio.Task[str | None] = asyncio.create_task(queue.get())
    woken: asyncio.Task[bool] = asyncio.create_task(transport.wake.wait())
    try:
        while True:
            await asyncio.wait({next_line, woken}, return_when=asyncio.FIRST_COMPLETED)
            if woken.done():
                pushed = transport.take_pushed()
                try:
                    events = await client.deliver(pushed)
                    if transport.fetch_needed and m.signaling.connected:
                        await client.flush_outbox()  # what a broken connection kept
                        events += await client.receive()
                except QCallError as exc:
                    show(f"! {exc}")
                    events = []
                await handle(events)
                woken = asyncio.create_task(transport.wake.wait())
            if next_line.done():
                line = next_line.result()
                if line is None or line.strip() == "/quit":
                    return 0
                next_line = asyncio.create_task(queue.get())
                if not line.strip():
                    continue
                try:
                    message_id = await client.send_text(to, line)
                except QCallError as exc:
                    show(f"! not sent: {exc}")
                    continue
                sent[message_id] = line
                show(f"→ {line}  ✓")
    finally:
        next_line.cancel()
        woken.cancel()
