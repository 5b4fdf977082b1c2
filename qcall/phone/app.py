"""``qcall phone``: the full-screen terminal phone (Textual).

The main screen switches between three lists: contacts (live presence and
verification), recent calls (missed ones marked) and conversations (Quantum
Secret messages). A call pushes :class:`~qcall.phone.screens.CallScreen`; an
incoming call pushes :class:`~qcall.phone.screens.IncomingScreen`, which goes
away by itself when the caller gives up (and the call shows as missed). Keys
are listed in docs/phone.md and in the footer of each screen.
"""

from __future__ import annotations

import datetime
from typing import ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import ContentSwitcher, DataTable, Footer, Header, Input, Static

from qcall.exceptions import QCallError
from qcall.phone.controller import PhoneController
from qcall.phone.history import Outcome
from qcall.phone.model import format_duration
from qcall.phone.screens import CallScreen, IncomingScreen, refresh_screen, verification_text

__all__ = ["MainScreen", "PhoneApp"]

#: Seconds between two redraws (timers, meters); network figures every 4 ticks.
TICK = 0.25


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


class MainScreen(Screen[None]):
    """Contacts, recent calls and conversations."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "show('contacts')", "Contacts"),
        Binding("r", "show('recents')", "Recent calls"),
        Binding("t", "show('conversations')", "Conversations"),
        Binding("n", "dial_name", "Call a name"),
        Binding("q", "app.quit", "Quit"),
    ]

    AUTO_FOCUS = "#contacts"

    DEFAULT_CSS = """
    #status-line { height: 1; padding: 0 1; color: $text-muted; }
    #dial, #message { display: none; }
    #dial.visible, #message.visible { display: block; }
    #conversation { height: auto; max-height: 50%; padding: 0 1; }
    """

    def __init__(self, controller: PhoneController) -> None:
        super().__init__()
        self.controller = controller
        self.open_conversation: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="status-line")
        yield Input(placeholder="name to call, then Enter", id="dial")
        with ContentSwitcher(initial="contacts"):
            yield DataTable(id="contacts", cursor_type="row")
            yield DataTable(id="recents", cursor_type="row")
            with Vertical(id="conversations"):
                yield DataTable(id="conversation-list", cursor_type="row")
                yield Static(id="conversation")
                yield Input(placeholder="message, then Enter", id="message")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#contacts", DataTable).add_columns("", "name", "identity", "fingerprint")
        self.query_one("#recents", DataTable).add_columns("when", "who", "call", "length", "note")
        self.query_one("#conversation-list", DataTable).add_columns("with", "last", "unread")
        self.update_view()

    def action_show(self, name: str) -> None:
        self.query_one(ContentSwitcher).current = name
        if name == "recents":
            self.controller.history.mark_seen()
        self.update_view()
        self.query_one(f"#{'conversation-list' if name == 'conversations' else name}").focus()

    def action_dial_name(self) -> None:
        field = self.query_one("#dial", Input)
        field.add_class("visible")
        field.focus()

    def _dial(self, name: str) -> None:
        try:
            self.controller.dial(name)
        except QCallError as exc:
            self.notify(str(exc), severity="error")

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        event.input.value = ""
        if event.input.id == "dial":
            event.input.remove_class("visible")
            self.query_one("#contacts").focus()
            if value:
                self._dial(value)
        elif event.input.id == "message" and value and self.open_conversation:
            conversations = self.controller.conversations
            if conversations is not None:
                try:
                    await conversations.send(self.open_conversation, value)
                except QCallError as exc:
                    self.notify(str(exc), severity="error")
            self.update_view()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is None:
            return
        if event.data_table.id in ("contacts", "recents"):
            self._dial(key.split("\0")[0])
        elif event.data_table.id == "conversation-list":
            self.open_conversation = key
            self.query_one("#message", Input).add_class("visible")
            self.query_one("#message", Input).focus()
            self.update_view()

    def update_view(self) -> None:
        """Render the lists from the controller (presence, history, messages)."""
        ctl = self.controller
        signaling = ctl.phone.signaling
        state = "online" if signaling.connected else "reconnecting…"
        missed = ctl.history.unseen_missed()
        line = f"{ctl.phone.name} · {state} on {signaling.url}"
        if missed:
            line += f" · {missed} missed call{'s' if missed > 1 else ''}"
        if ctl.notice:
            line += f" · {ctl.notice}"
        self.query_one("#status-line", Static).update(line)
        self._fill_contacts()
        self._fill_recents()
        self._fill_conversations()

    def _fill_contacts(self) -> None:
        table = self.query_one("#contacts", DataTable)
        rows = self.controller.contact_rows()
        keep = table.cursor_row
        table.clear()
        for row in rows:
            presence = Text("● online", "green") if row.online else Text("○ offline", "dim")
            table.add_row(
                presence, row.name, verification_text(row.verification),
                row.detail or row.fingerprint[:29], key=row.name,
            )  # fmt: skip
        if rows:
            table.move_cursor(row=min(keep, len(rows) - 1))

    def _fill_recents(self) -> None:
        table = self.query_one("#recents", DataTable)
        table.clear()
        for record in self.controller.history.records()[:200]:
            arrow = "←" if record.direction == "incoming" else "→"
            style = "bold red" if record.outcome is Outcome.MISSED else ""
            table.add_row(
                _when(record.started_at),
                record.peer,
                Text(f"{arrow} {record.outcome.value}", style),
                format_duration(record.duration) if record.duration else "",
                record.error or record.policy,
                key=f"{record.peer}\0{record.call_id}",
            )

    def _fill_conversations(self) -> None:
        conversations = self.controller.conversations
        table = self.query_one("#conversation-list", DataTable)
        view = self.query_one("#conversation", Static)
        if conversations is None:
            view.update("Messaging is not set up on this phone.")
            return
        table.clear()
        for summary in conversations.summaries():
            table.add_row(
                summary.name, summary.last[:60], str(summary.unread or ""), key=summary.name
            )
        text = Text()
        for sender, error in conversations.errors[-3:]:
            text.append(f"refused a message from {sender}: {error}\n", style="bold red")
        if self.open_conversation:
            text.append(f"— {self.open_conversation} —\n", style="bold")
            for line in conversations.lines(self.open_conversation, limit=30):
                who = "me" if line.outgoing else self.open_conversation
                stamp = datetime.datetime.fromtimestamp(line.at_ms / 1000).strftime("%H:%M")
                text.append(f"{stamp} {who}: ", style="cyan" if line.outgoing else "magenta")
                text.append(f"{line.text}\n")
        view.update(text)


class PhoneApp(App[None]):
    """The phone (see the module docstring).

    Args:
        controller: the user's phone; the app starts it when it mounts (the
            caller closes it after :meth:`run_async` returns).
    """

    TITLE = "qcall phone"

    def __init__(self, controller: PhoneController) -> None:
        super().__init__()
        self.controller = controller
        self.error: QCallError | None = None
        self.main = MainScreen(controller)
        self._ticks = 0
        controller.on_change = self._changed

    async def on_mount(self) -> None:
        self.sub_title = self.controller.phone.name
        await self.push_screen(self.main)
        try:
            await self.controller.start()
        except QCallError as exc:
            self.error = exc
            self.exit()
            return
        self.set_interval(TICK, self._tick)
        self._changed()

    def _changed(self) -> None:
        self.call_later(self.sync_screens)

    async def _tick(self) -> None:
        self._ticks += 1
        if self._ticks % 4 == 0:
            await self.controller.refresh()
        if self.controller.ring_silent and self._ticks % 8 == 0:
            self.bell()
        await self.sync_screens()

    async def sync_screens(self) -> None:
        """Push or pop the call and incoming screens to match the controller, then redraw."""
        ctl = self.controller
        top = self.screen
        if isinstance(top, IncomingScreen) and ctl.ringing is not top.live:
            await self.pop_screen()
        elif isinstance(top, CallScreen) and ctl.call is None:
            await self.pop_screen()
        top = self.screen
        if ctl.call is not None and not isinstance(top, CallScreen | IncomingScreen):
            await self.push_screen(CallScreen(ctl))
        elif ctl.ringing is not None and not isinstance(top, IncomingScreen):
            await self.push_screen(IncomingScreen(ctl, ctl.ringing))
            if ctl.ring_silent:
                self.bell()
        for screen in self.screen_stack:
            refresh_screen(screen)
