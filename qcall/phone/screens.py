"""The call screen and the incoming-call prompt of ``qcall phone`` (Textual).

They render :class:`~qcall.phone.controller.PhoneController` state through the
pure functions of :mod:`qcall.phone.model` and call its methods on key presses;
the app (:mod:`qcall.phone.app`) pushes and pops them as calls come and go.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Static

from qcall.exceptions import QCallError
from qcall.phone.model import (
    Verification,
    call_title,
    format_duration,
    level_dbfs,
    meter,
    network_lines,
    security_lines,
)

if TYPE_CHECKING:
    from qcall.phone.controller import LiveCall, PhoneController

__all__ = ["CallScreen", "IncomingScreen"]

_VERIFICATION_STYLE = {
    Verification.KEY_CHANGED: "bold white on red",
    Verification.ORGANISATION: "bold green",
    Verification.VERIFIED: "bold green",
    Verification.UNVERIFIED: "yellow",
    Verification.UNKNOWN: "yellow",
}


def verification_text(verification: Verification) -> Text:
    """A verification state, coloured."""
    return Text(verification.symbol, style=_VERIFICATION_STYLE[verification])


def _panel(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, box=None, title_justify="left", expand=True)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        style = "bold white on red" if label in ("error",) or "KEY CHANGED" in value else ""
        table.add_row(label, Text(value, style=style))
    return table


class CallScreen(Screen[None]):
    """One call: timer, level meters, the security panel and the network panel."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("h", "hangup", "Hang up"),
        Binding("m", "mute", "Mute"),
        Binding("p", "hold", "Hold/resume"),
        Binding("plus,equals_sign", "volume(1)", "Vol +", key_display="+"),
        Binding("minus", "volume(-1)", "Vol −", key_display="-"),
        Binding("v", "confirm_sas", "Confirm SAS"),
    ]

    DEFAULT_CSS = """
    CallScreen { layout: vertical; }
    #call-title { height: 1; text-style: bold; padding: 0 1; }
    #call-timer { height: 1; padding: 0 1; color: $accent; }
    #panels { height: auto; }
    #security, #network { width: 1fr; height: auto; padding: 1 1; border: round $primary; }
    #meters { height: auto; padding: 0 1; }
    #call-notice { height: auto; padding: 0 1; color: $warning; }
    """

    def __init__(self, controller: PhoneController) -> None:
        super().__init__()
        self.controller = controller

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield Static(id="call-title")
            yield Static(id="call-timer")
            with Horizontal(id="panels"):
                yield Static(id="security")
                yield Static(id="network")
            yield Static(id="meters")
            yield Static(id="call-notice")
        yield Footer()

    def on_mount(self) -> None:
        self.update_view()

    @property
    def live(self) -> LiveCall | None:
        return self.controller.call

    def update_view(self) -> None:
        """Render the controller's call (called by the app on every change and tick)."""
        live = self.live
        if live is None:
            return
        status = live.session.status
        self.query_one("#call-title", Static).update(
            call_title(status, muted=live.muted, held=live.held)
        )
        if live.connected_at is not None:
            timer = format_duration(live.elapsed(self.controller.clock()))
        else:
            timer = "ringing… (ringback)" if live.direction == "outgoing" else "connecting…"
        self.query_one("#call-timer", Static).update(timer)
        verification = self.controller.verification(live.peer)
        self.query_one("#security", Static).update(
            _panel(
                "Security",
                security_lines(
                    status,
                    verification=verification,
                    route=live.route,
                    sas_confirmed=live.sas_confirmed,
                ),
            )
        )
        self.query_one("#network", Static).update(_panel("Network", network_lines(status)))
        mic = live.source.level if live.source is not None else 0.0
        out = live.playback.level if live.playback is not None else 0.0
        mic_db, out_db = level_dbfs(mic), level_dbfs(out)
        meters = Text()
        meters.append("mic      ", style="bold cyan")
        meters.append(meter(mic_db), style="green")
        meters.append(f" {mic_db:6.1f} dBFS")
        meters.append("  MUTED" if live.muted else "", style="bold red")
        meters.append("\nspeaker  ", style="bold cyan")
        meters.append(meter(out_db), style="green")
        meters.append(f" {out_db:6.1f} dBFS  volume {round(live.volume * 100)} %")
        meters.append("  ON HOLD" if live.held else "", style="bold yellow")
        self.query_one("#meters", Static).update(meters)
        self.query_one("#call-notice", Static).update(self.controller.notice)

    async def action_hangup(self) -> None:
        await self.controller.hangup()

    def action_mute(self) -> None:
        self.controller.toggle_mute()

    def action_hold(self) -> None:
        self.controller.toggle_hold()

    def action_volume(self, direction: int) -> None:
        from qcall.phone.controller import VOLUME_STEP

        self.controller.change_volume(direction * VOLUME_STEP)

    def action_confirm_sas(self) -> None:
        try:
            self.controller.confirm_sas()
        except QCallError as exc:
            self.notify(str(exc), severity="warning")


class IncomingScreen(ModalScreen[None]):
    """The ringing prompt: who calls and how far they are verified."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "answer", "Answer"),
        Binding("d", "decline", "Decline"),
    ]

    DEFAULT_CSS = """
    IncomingScreen { align: center middle; }
    #incoming { width: 64; height: auto; border: heavy $accent; padding: 1 2;
                background: $surface; }
    """

    def __init__(self, controller: PhoneController, live: LiveCall) -> None:
        super().__init__()
        self.controller = controller
        self.live = live

    def compose(self) -> ComposeResult:
        yield Static(id="incoming")
        yield Footer()

    def on_mount(self) -> None:
        self.update_view()

    def update_view(self) -> None:
        verification = self.controller.verification(self.live.peer)
        text = Text()
        text.append("Incoming call\n\n", style="bold")
        text.append(f"{self.live.peer}\n", style="bold reverse")
        text.append("identity: ")
        text.append_text(verification_text(verification))
        fpr = self.controller.phone.signaling.online.get(self.live.peer)
        if fpr:
            text.append(f"\nfingerprint: {fpr}", style="dim")
        if verification is Verification.KEY_CHANGED:
            text.append("\nThe key differs from the one you know: the call will be refused.",
                        style="bold red")
        if self.controller.ring_silent:
            text.append("\n(no speaker: silent ring)", style="dim")
        text.append("\n\n[a] answer    [d] decline")
        self.query_one("#incoming", Static).update(text)

    def action_answer(self) -> None:
        try:
            self.controller.answer()
        except QCallError as exc:
            self.notify(str(exc), severity="error")

    async def action_decline(self) -> None:
        await self.controller.decline()


def refresh_screen(screen: Any) -> None:
    """Call ``update_view`` on a screen that has one."""
    update = getattr(screen, "update_view", None)
    if update is not None and screen.is_mounted:
        with contextlib.suppress(NoMatches):  # a screen being removed
            update()
