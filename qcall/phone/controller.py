"""The phone's asyncio shell: one :class:`~qcall.call.phone.Phone` and what a person does with it.

:class:`PhoneController` owns the calls, the ringing, the audio controls and
the recent-calls list; the Textual app (:mod:`qcall.phone.app`) only renders
its state (with :mod:`qcall.phone.model`) and calls its methods, so the tests
can drive every behaviour without a terminal as well as through the app.

Life of an incoming call: the invitation arrives → the session waits unanswered
(:meth:`Phone.ringing`), :attr:`PhoneController.ringing` is set and the
ringtone plays (on the speaker if one can be opened, else the app rings the
terminal bell) → the user answers (:meth:`answer`) or declines (:meth:`decline`)
→ or the caller gives up, the session ends unanswered and it is recorded as a
missed call. An outgoing call plays ringback until the callee picks up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiortc.mediastreams import MediaStreamTrack

from qcall.call.media import TrackSink
from qcall.call.phone import Phone
from qcall.call.session import CallSession
from qcall.call.status import CallState
from qcall.contacts import ContactStore
from qcall.exceptions import (
    CallError,
    CallRejectedError,
    CertificateError,
    IdentityChangedError,
    MediaError,
    QCallError,
)
from qcall.identity import fingerprint
from qcall.phone.audio import (
    MAX_VOLUME,
    RINGBACK,
    RINGTONE,
    Cadence,
    ControlledPlayback,
    ControlledSource,
    DiscardSink,
    RingTrack,
)
from qcall.phone.history import CallHistory, CallRecord, Outcome
from qcall.phone.model import ContactRow, RosterEntry, Verification, contact_rows, verification_of

if TYPE_CHECKING:
    from qcall.phone.conversations import Conversations

__all__ = ["LiveCall", "PhoneController"]

logger = logging.getLogger(__name__)

#: Volume step of the +/- keys.
VOLUME_STEP = 0.1


@dataclass(eq=False)
class LiveCall:
    """A call the phone shows: ringing, connecting or in progress."""

    session: CallSession
    direction: str  # "incoming" | "outgoing"
    started_at: float  # wall clock, for the history
    answered: bool = False  # incoming: the user picked up
    connected_at: float | None = None  # monotonic, once media flows
    user_hung_up: bool = False
    sas_confirmed: bool = False
    route: str | None = None
    playback: ControlledPlayback | None = None
    sink: TrackSink | None = None
    task: asyncio.Future[None] | None = None
    ending: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def peer(self) -> str:
        return self.session.peer

    @property
    def source(self) -> ControlledSource | None:
        source = self.session.source
        return source if isinstance(source, ControlledSource) else None

    @property
    def muted(self) -> bool:
        return self.source is not None and self.source.muted

    @property
    def held(self) -> bool:
        return self.playback is not None and self.playback.held

    @property
    def volume(self) -> float:
        return self.playback.volume if self.playback is not None else 1.0

    def elapsed(self, now: float) -> float:
        """Seconds since the call connected (0 before)."""
        return 0.0 if self.connected_at is None else now - self.connected_at


class PhoneController:
    """The phone a person uses (see the module docstring).

    Args:
        phone: the registered user's :class:`Phone`, not started yet.
        contacts: the user's contacts (the same store ``phone.check_peer`` uses).
        history: recent and missed calls.
        open_speaker: opens the speaker for a call or a ring; raises
            :class:`MediaError` when there is none (calls are then drained silently
            and rings are visible only).
        conversations: the messaging screen's model, or ``None``.
        on_change: called (synchronously) whenever something the screens show changed.
        clock: monotonic seconds (call timers).
    """

    def __init__(
        self,
        phone: Phone,
        contacts: ContactStore,
        history: CallHistory,
        *,
        open_speaker: Callable[[], TrackSink] | None = None,
        conversations: Conversations | None = None,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phone = phone
        self.contacts = contacts
        self.history = history
        self.open_speaker = open_speaker
        self.conversations = conversations
        self.on_change = on_change
        self.clock = clock
        #: The call on screen (outgoing or answered), or ``None``.
        self.call: LiveCall | None = None
        #: The incoming call ringing now, or ``None``.
        self.ringing: LiveCall | None = None
        #: Names whose last call was refused because their identity key changed.
        self.key_changed: set[str] = set()
        #: A ring is playing with no speaker: the app rings the terminal bell instead.
        self.ring_silent = False
        #: The last thing worth telling the user (a failed call, a declined one).
        self.notice = ""
        self._ring: tuple[RingTrack, TrackSink] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._wrap_source(phone)
        phone.on_track = self._on_track

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Register with the signaling server and start answering the phone.

        Raises:
            SignalingError: the server is unreachable or refused the registration.
        """
        await self.phone.start()
        self._spawn(self._incoming_loop())
        if self.conversations is not None:
            await self.conversations.start()

    async def close(self) -> None:
        """Hang up, stop ringing, disconnect."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_ring()
        for live in (self.call, self.ringing):
            if live is not None and live.sink is not None:
                await live.sink.stop()
        if self.conversations is not None:
            await self.conversations.close()
        await self.phone.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- who is there -------------------------------------------------------------------------

    def roster(self) -> list[RosterEntry]:
        """Pinned contacts and the members the user's organisations certify."""
        entries = {
            c.name: RosterEntry(c.name, pinned=c.fingerprint, sas_verified=c.verified)
            for c in self.contacts.list()
        }
        org = self.contacts.org
        if org is not None and org.exists():
            from qcall import pqc
            from qcall.org.profile import UTC, common_name

            now = datetime.datetime.now(UTC)
            for cert in org.known_certificates():
                key = pqc.x509_mldsa_public_key(cert.public_key())
                if key is None or common_name(cert.subject) == self.phone.name:
                    continue
                try:
                    member = org.validate(cert, now)
                except CertificateError as exc:
                    logger.debug("! certificate of %s not usable: %s", member_name(cert), exc)
                    continue
                old = entries.get(member.name, RosterEntry(member.name))
                entries[member.name] = RosterEntry(
                    member.name,
                    pinned=old.pinned,
                    sas_verified=old.sas_verified,
                    certified=fingerprint(key[1]),
                    organisation=member.organisation,
                )
        return list(entries.values())

    def contact_rows(self) -> list[ContactRow]:
        """The contacts screen (live presence from the signaling server)."""
        online = dict(self.phone.signaling.online)
        online.pop(self.phone.name, None)
        return contact_rows(self.roster(), online, self.key_changed)

    def verification(self, name: str) -> Verification:
        """The verification state of one name now."""
        entry = next((e for e in self.roster() if e.name == name), None)
        trust = self.contacts.peer_trust(name)
        if entry is None and trust is not None and trust.startswith("organisation"):
            return Verification.ORGANISATION
        return verification_of(
            entry, self.phone.signaling.online.get(name), changed=name in self.key_changed
        )

    # --- placing and answering ----------------------------------------------------------------

    def dial(self, peer: str) -> LiveCall:
        """Call ``peer``; returns at once with the call ringing (ringback plays).

        Raises:
            CallError: a call is already in progress.
        """
        if self.call is not None or self.ringing is not None:
            raise CallError("hang up the current call first")
        self.notice = ""
        session = self.phone.new_call(peer)
        live = LiveCall(session, "outgoing", time.time())
        self.call = live
        live.task = self._spawn(self._run_outgoing(live))
        self.on_change()
        return live

    async def _run_outgoing(self, live: LiveCall) -> None:
        await self._start_ring(RINGBACK)
        ringback = self._spawn(self._ringback_until_answered(live))
        try:
            await live.session.dial()
        except QCallError as exc:
            ringback.cancel()
            await self._ended(live, exc)
            return
        ringback.cancel()
        await self._stop_ring()
        await self._connected(live)
        await self._ended(live, await _wait_end(live.session))

    async def _ringback_until_answered(self, live: LiveCall) -> None:
        while live.session.status.state <= CallState.RINGING and not live.session.ended.done():
            await asyncio.sleep(0.02)
        await self._stop_ring()

    async def _incoming_loop(self) -> None:
        while True:
            session = await self.phone.ringing()
            live = LiveCall(session, "incoming", time.time())
            if session.ended.done():  # the caller gave up before we looked
                self._record(live, Outcome.MISSED)
                continue
            self.ringing = live
            self.notice = ""
            await self._start_ring(RINGTONE)
            self.on_change()
            live.ending = self._spawn(self._watch_ringing(live))

    async def _watch_ringing(self, live: LiveCall) -> None:
        """Until answered: if the call ends, it was missed (the caller gave up)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(live.session.ended)
        if not live.answered and self.ringing is live:
            self.ringing = None
            await self._stop_ring()
            if live.user_hung_up:
                self._record(live, Outcome.DECLINED)
            else:
                self._record(live, Outcome.MISSED)
                self.notice = f"missed call from {live.peer}"
            self.on_change()

    def answer(self) -> LiveCall:
        """Pick up the ringing call.

        Raises:
            CallError: nothing is ringing, or a call is in progress.
        """
        live = self.ringing
        if live is None:
            raise CallError("no incoming call")
        if self.call is not None:
            raise CallError("hang up the current call first")
        live.answered = True
        self.ringing = None
        self.call = live
        live.task = self._spawn(self._run_incoming(live))
        self.on_change()
        return live

    async def _run_incoming(self, live: LiveCall) -> None:
        await self._stop_ring()
        try:
            await live.session.answer()
        except QCallError as exc:
            await self._ended(live, exc)
            return
        await self._connected(live)
        await self._ended(live, await _wait_end(live.session))

    async def decline(self) -> None:
        """Decline the ringing call."""
        live = self.ringing
        if live is None:
            return
        live.user_hung_up = True
        await self.phone.decline(live.session)
        if live.ending is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await live.ending

    async def hangup(self) -> None:
        """Hang up the call on screen (or cancel it while it rings)."""
        live = self.call
        if live is None:
            return
        live.user_hung_up = True
        await live.session.hangup()
        if live.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await live.task

    async def _connected(self, live: LiveCall) -> None:
        live.connected_at = self.clock()
        self.on_change()
        live.route = await self._route(live.session)
        self.on_change()

    async def _route(self, session: CallSession) -> str | None:
        """Our SAE and KME → the peer's KME and SAE (ETSI 014 Status), for QKD calls."""
        source = session.key_source
        if source is None or not session.status.qkd_key_ids:
            return None
        try:
            status = await source.status(session.peer_sae)
        except QCallError as exc:
            logger.debug("! no QKD route for the display: %s", exc)
            return f"{session.own_sae} → {session.peer_sae}"
        return (
            f"{session.own_sae} @ {status.source_kme_id} → "
            f"{status.target_kme_id} @ {session.peer_sae}"
        )

    async def _ended(self, live: LiveCall, error: BaseException | None) -> None:
        await self._stop_ring()
        if live.sink is not None:
            await live.sink.stop()
        if isinstance(error, IdentityChangedError):
            self.key_changed.add(live.peer)
        if live.connected_at is not None:
            outcome = Outcome.ANSWERED
        elif live.direction == "outgoing" and (
            live.user_hung_up or isinstance(error, CallRejectedError)
        ):
            outcome = Outcome.NO_ANSWER
        else:
            outcome = Outcome.FAILED
        if error is not None and not live.user_hung_up:
            self.notice = str(error).splitlines()[0]
        elif live.connected_at is not None:
            self.notice = f"call with {live.peer} ended"
        self._record(live, outcome, error)
        if self.call is live:
            self.call = None
        self.on_change()

    def _record(self, live: LiveCall, outcome: Outcome, error: BaseException | None = None) -> None:
        if live.session.source is not None:  # release the microphone (or file) of this call
            live.session.source.stop()
        duration = live.elapsed(self.clock()) if live.connected_at is not None else 0.0
        text = "" if error is None or live.user_hung_up else str(error).splitlines()[0][:300]
        record = CallRecord(
            call_id=live.session.call_id,
            peer=live.peer,
            direction=live.direction,
            outcome=outcome,
            started_at=live.started_at,
            duration=round(duration, 1),
            policy=live.session.status.policy,
            error=text,
            seen=outcome is not Outcome.MISSED,
        )
        try:
            self.history.add(record)
        except QCallError as exc:  # a full disk must not take the phone down
            logger.warning("! call not saved to the history: %s", exc)

    # --- in a call --------------------------------------------------------------------------------

    def toggle_mute(self) -> bool:
        """Mute or unmute the microphone; returns the new state."""
        source = self.call.source if self.call is not None else None
        if source is None:
            return False
        source.muted = not source.muted
        self.on_change()
        return source.muted

    def toggle_hold(self) -> bool:
        """Put the call on hold (no audio either way at this end) or resume it."""
        live = self.call
        if live is None:
            return False
        held = not live.held
        if live.source is not None:
            live.source.held = held
        if live.playback is not None:
            live.playback.held = held
        self.on_change()
        return held

    def change_volume(self, delta: float) -> float:
        """Raise or lower the volume by ``delta`` (clamped to [0, MAX_VOLUME]); returns it."""
        live = self.call
        if live is None or live.playback is None:
            return 1.0
        volume = round(min(MAX_VOLUME, max(0.0, live.playback.volume + delta)), 2)
        live.playback.volume = volume
        self.on_change()
        return volume

    def confirm_sas(self) -> None:
        """The user compared the SAS by voice and it matched: mark the peer verified.

        Raises:
            CallError: no connected call, or it has no SAS yet.
        """
        live = self.call
        if live is None or live.session.status.state is not CallState.ACTIVE:
            raise CallError("no call in progress")
        if not live.session.status.sas:
            raise CallError("this call has no SAS yet")
        trust = self.contacts.peer_trust(live.peer) or ""
        if not trust.startswith("organisation"):
            self.contacts.mark_verified(live.peer)
        live.sas_confirmed = True
        self.on_change()

    async def refresh(self) -> None:
        """Update the live call's network figures (RTCP, jitter buffer)."""
        if self.call is not None and self.call.connected_at is not None:
            await self.call.session.refresh_stats()

    # --- audio ---------------------------------------------------------------------------------

    def _wrap_source(self, phone: Phone) -> None:
        make = phone.make_source

        def make_source() -> MediaStreamTrack | None:
            inner = make()
            return ControlledSource(inner) if inner is not None else None

        phone.make_source = make_source

    def _on_track(self, session: CallSession, track: MediaStreamTrack) -> None:
        live = self.call if self.call is not None and self.call.session is session else None
        if live is None:
            return
        live.playback = ControlledPlayback(track)
        live.sink = self._speaker() or DiscardSink()
        live.sink.addTrack(live.playback)
        self._spawn(live.sink.start())

    def _speaker(self) -> TrackSink | None:
        if self.open_speaker is None:
            return None
        try:
            return self.open_speaker()
        except MediaError as exc:
            logger.info("no speaker (%s)", exc)
            return None

    async def _start_ring(self, pattern: Cadence) -> None:
        await self._stop_ring()
        sink = self._speaker()
        self.ring_silent = sink is None
        if sink is None:
            return
        track = RingTrack(pattern)
        sink.addTrack(track)
        self._ring = (track, sink)
        await sink.start()

    async def _stop_ring(self) -> None:
        ring, self._ring = self._ring, None
        self.ring_silent = False
        if ring is not None:
            track, sink = ring
            track.stop()
            await sink.stop()


def member_name(cert: Any) -> str:
    """The common name of a certificate, for logs."""
    from qcall.org.profile import common_name

    return str(common_name(cert.subject))


async def _wait_end(session: CallSession) -> BaseException | None:
    try:
        await asyncio.shield(session.ended)
    except QCallError as exc:
        return exc
    return None
