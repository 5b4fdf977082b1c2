"""``qcall phone`` through Textual's headless pilot, with real calls.

Each test starts a real signaling server on a loopback port and two phones in
this process, each with its own qcall home (contacts, calls.json) and a pair of
real key files as the QKD key source (hybrid policy). Audio is synthetic (tone
tracks); the "speaker" of each phone records to WAV files, so the ringtone,
the ringback and the call audio are checked by their frequency, not assumed.
One phone runs in a :class:`PhoneApp` driven by key presses; the other is a bare
:class:`PhoneController`, the same object the app renders.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from textual import events
from textual.widgets import DataTable

from qcall.call.audio_analysis import peak_frequency
from qcall.call.media import ToneTrack, WavRecorder, read_wav
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.call.status import CallState
from qcall.contacts import ContactStore
from qcall.exceptions import MediaError
from qcall.identity import Identity
from qcall.phone.app import PhoneApp
from qcall.phone.controller import PhoneController
from qcall.phone.history import CallHistory, Outcome
from qcall.phone.model import Verification
from qcall.phone.screens import CallScreen, IncomingScreen
from qcall.qkd.client import open_key_source
from qcall.qkd.keyfile import create_key_files
from signaling.server import SignalingServer
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow

TONES = {"alice": 600.0, "bob": 900.0}


@dataclass
class Lab:
    tmp: Path
    url: str
    controllers: list[PhoneController] = field(default_factory=list)
    recordings: dict[str, list[Path]] = field(default_factory=dict)

    def controller(self, name: str, *, speaker: bool = True) -> PhoneController:
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        contacts = ContactStore.in_home(home)
        phone = Phone(
            self.url,
            Identity.generate(name).signing_key,
            name,
            check_peer=contacts.check_peer,
            key_source=open_key_source(f"keyfile:{self.tmp / f'{name}.keys.json'}"),
            options=CallOptions(rekey_interval=None),
            make_source=lambda: ToneTrack(TONES[name]),
        )
        counter = itertools.count()
        files = self.recordings.setdefault(name, [])

        def open_speaker() -> WavRecorder:
            if not speaker:
                raise MediaError("no sound device on this test machine")
            path = self.tmp / f"{name}-speaker-{next(counter)}.wav"
            files.append(path)
            return WavRecorder(path)

        ctl = PhoneController(phone, contacts, CallHistory.in_home(home), open_speaker=open_speaker)
        self.controllers.append(ctl)
        return ctl


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    create_key_files(
        "alice", tmp_path / "alice.keys.json", "bob", tmp_path / "bob.keys.json", 32
    )
    server = SignalingServer()
    await server.start("127.0.0.1", 0)
    lab = Lab(tmp_path, f"ws://127.0.0.1:{server.port}")
    try:
        yield lab
    finally:
        for ctl in lab.controllers:
            await ctl.close()
        await server.close()


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout * T
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def mounted(app: Any, selector: str, what: str) -> Any:
    """The widget ``selector`` on the current screen, once the screen has mounted it.

    A screen pushed by a key or an event mounts its widgets on a later tick, so a
    ``query_one`` right after the push can miss them on a loaded machine.
    """
    await until(lambda: bool(app.screen.query(selector)), what)
    return app.screen.query_one(selector)


_CHARS = {"minus": "-", "plus": "+", "enter": "\r"}


async def press(pilot: Any, *keys: str) -> None:
    """Type keys into the app like ``Pilot.press``, without its wait for an idle CPU.

    ``Pilot.press`` waits up to 2 s a key for the process to go idle, which it never does
    while two phones in this process exchange audio; the tests wait for what the key does.
    """
    for key in keys:
        event = events.Key(key, _CHARS.get(key, key if len(key) == 1 else None))
        event.set_sender(pilot.app)
        pilot.app._driver.send_message(event)
        await asyncio.sleep(0.02)


async def steady_level(level: Callable[[], float], seconds: float = 0.4) -> float:
    """A tone's level on a meter: the 90th percentile of readings over ``seconds``.

    A steady tone gives the same RMS every frame; frames concealed after a late
    packet (two phones share this process's CPU) read lower, so they are left out.
    """
    readings = []
    for _ in range(round(seconds / 0.02)):
        readings.append(level())
        await asyncio.sleep(0.02)
    return float(np.percentile(readings, 90))


def sound_of(path: Path, seconds: float = 0.3) -> tuple[np.ndarray[Any, Any], int]:
    """The first ``seconds`` of sound in a recording (from the first loud sample)."""
    samples, rate = read_wav(path)
    loud = np.flatnonzero(np.abs(samples) > 1000)
    assert loud.size > rate // 5, f"{path.name} holds no sound"
    start = int(loud[0])
    return samples[start : start + int(seconds * rate)].astype(float), rate


def tone_of(path: Path) -> float:
    return peak_frequency(*sound_of(path))


def share_near(path: Path, freqs: tuple[float, ...]) -> float:
    """The share of a recording's energy within 20 Hz of ``freqs``."""
    sound, rate = sound_of(path)
    power = np.abs(np.fft.rfft(sound * np.hanning(sound.size))) ** 2
    hz = np.fft.rfftfreq(sound.size, 1 / rate)
    near = np.zeros(hz.size, bool)
    for f in freqs:
        near |= np.abs(hz - f) < 20
    return float(power[near].sum() / power.sum())


async def ring(app: PhoneApp, caller: PhoneController) -> None:
    """``caller`` calls the app's phone; returns when the app shows the incoming prompt."""
    await until(lambda: app.controller.phone.signaling.connected, "the app's phone registered")
    await caller.start()
    caller.dial(app.controller.phone.name)
    await until(  # the screen, and its prompt mounted (textual composes it after the push)
        lambda: isinstance(app.screen, IncomingScreen) and len(app.screen.query("#incoming")) > 0,
        "the incoming prompt",
    )


async def test_answer_confirm_sas_mute_hold_volume_hang_up(lab: Lab) -> None:
    bob = lab.controller("bob")
    alice = lab.controller("alice")
    app = PhoneApp(bob)
    async with app.run_test() as pilot:
        await ring(app, alice)
        assert bob.verification("alice") is Verification.UNKNOWN  # never called: nothing pinned
        prompt = app.screen.query_one("#incoming")
        await until(lambda: "alice" in str(prompt.render()), "the caller's name on the prompt")
        assert "identity: new" in str(prompt.render())
        await until(lambda: len(lab.recordings["bob"]) == 1, "the ringtone on bob's speaker")
        await until(lambda: len(lab.recordings["alice"]) == 1, "ringback on alice's speaker")

        await asyncio.sleep(0.5)  # let it ring: the ringtone's first burst lasts 0.4 s
        await press(pilot, "a")
        await until(lambda: isinstance(app.screen, CallScreen), "the call screen")
        assert bob.call is not None and alice.call is not None
        await until(
            lambda: bob.call is not None
            and bob.call.connected_at is not None
            and alice.call is not None
            and alice.call.connected_at is not None,
            "the call connected",
        )
        status = bob.call.session.status
        assert status.state is CallState.ACTIVE and status.policy == "hybrid"
        assert status.qkd_key_ids and status.sas == alice.call.session.status.sas
        # The ringtone and ringback stopped, and were what they should be.
        assert share_near(lab.recordings["bob"][0], (880, 1175)) > 0.9  # the two-tone ring
        assert abs(tone_of(lab.recordings["alice"][0]) - 425) < 10
        await until(lambda: bob.call is not None and bob.call.route is not None, "QKD route")
        # ETSI 014 Status of the key source: a key file names itself as both "KMEs".
        assert bob.call.route == "bob @ keyfile:bob.keys.json → keyfile:bob.keys.json @ alice"

        # Audio flows both ways, and the meters see it.
        await until(lambda: alice.call is not None and alice.call.playback is not None
                    and alice.call.playback.level > 0.05,
                    "bob's tone at alice")
        await until(lambda: bob.call is not None and bob.call.source is not None
                    and bob.call.source.level > 0.05, "bob's microphone meter")
        screen = app.screen
        assert isinstance(screen, CallScreen)
        screen.update_view()
        assert "in call" in str(screen.query_one("#call-title").render())

        # Confirm the SAS: alice becomes verified in bob's contacts.
        assert bob.verification("alice") is Verification.UNVERIFIED
        await press(pilot, "v")
        await until(lambda: bob.verification("alice") is Verification.VERIFIED, "SAS confirmed")
        assert bob.contacts.get("alice") is not None and bob.contacts.get("alice").verified  # type: ignore[union-attr]

        # Mute: alice hears silence from bob; unmute: the tone again.
        await press(pilot, "m")
        await until(lambda: bob.call is not None and bob.call.muted, "muted")
        await until(lambda: alice.call is not None and alice.call.playback is not None
                    and alice.call.playback.level < 0.005, "silence at alice while muted")
        await press(pilot, "m")
        await until(lambda: alice.call is not None and alice.call.playback is not None
                    and alice.call.playback.level > 0.05, "bob's tone again")

        # Hold: nothing either way at bob's end; resume.
        await press(pilot, "p")
        await until(lambda: bob.call is not None and bob.call.held, "on hold")
        assert bob.call.source is not None and bob.call.source.held
        await until(lambda: bob.call is not None and bob.call.playback is not None
                    and bob.call.playback.level == 0.0, "bob's speaker silent on hold")
        await until(lambda: alice.call is not None and alice.call.playback is not None
                    and alice.call.playback.level < 0.005, "alice hears silence on hold")
        await press(pilot, "p")
        await until(lambda: bob.call is not None and not bob.call.held, "resumed")

        # Volume: down twice lowers the played level by the gain.
        await until(lambda: bob.call is not None and bob.call.playback is not None
                    and bob.call.playback.level > 0.05, "alice's tone at bob")
        playback = bob.call.playback
        assert playback is not None
        before = await steady_level(lambda: playback.level)
        await press(pilot, "minus", "minus", "minus", "minus", "minus")
        await until(lambda: bob.call is not None and bob.call.volume == 0.5, "volume 50 %")
        await asyncio.sleep(0.1)
        assert await steady_level(lambda: playback.level) == pytest.approx(before * 0.5, rel=0.1)

        # Hang up: both ends end, both histories have the answered call.
        await press(pilot, "h")
        await until(lambda: bob.call is None and alice.call is None, "both ends hung up")
        await until(lambda: not isinstance(app.screen, CallScreen), "the call screen closed")
        mine = bob.history.records()[0]
        assert mine.outcome is Outcome.ANSWERED and mine.direction == "incoming"
        assert mine.peer == "alice" and mine.policy == "hybrid" and mine.duration > 0
        assert alice.history.records()[0].outcome is Outcome.ANSWERED
    # The recording of the call itself (bob's second speaker) holds alice's tone.
    assert abs(tone_of(lab.recordings["bob"][1]) - TONES["alice"]) < 10


async def test_caller_gives_up_prompt_becomes_missed_call(lab: Lab) -> None:
    bob = lab.controller("bob", speaker=False)  # no sound device: a silent ring, no crash
    alice = lab.controller("alice")
    app = PhoneApp(bob)
    async with app.run_test() as pilot:
        await ring(app, alice)
        assert bob.ring_silent
        await alice.hangup()  # the caller gives up
        await until(lambda: not isinstance(app.screen, IncomingScreen), "the prompt went away")
        assert bob.ringing is None and bob.call is None
        missed = bob.history.missed()
        assert [(r.peer, r.direction, r.seen) for r in missed] == [("alice", "incoming", False)]
        assert alice.history.records()[0].outcome is Outcome.NO_ANSWER
        line = app.screen.query_one("#status-line")
        await until(lambda: "1 missed call" in str(line.render()), "the missed-call count")
        await press(pilot, "r")
        await until(lambda: bob.history.unseen_missed() == 0, "the missed calls looked at")
        table = app.screen.query_one("#recents", DataTable)
        assert table.row_count == 1 and "missed" in str(table.get_row_at(0)[2])
    # The file survives the phone: a new history reads the missed call back.
    again = CallHistory.in_home(lab.tmp / "bob")
    assert again.records()[0].outcome is Outcome.MISSED


async def test_dial_from_the_app_and_decline_and_presence(lab: Lab) -> None:
    alice = lab.controller("alice")
    bob = lab.controller("bob")
    alice.contacts.pin("bob", bob.phone.signing_key.public_bytes())  # an earlier call
    app = PhoneApp(alice)
    async with app.run_test() as pilot:
        await until(lambda: alice.phone.signaling.connected, "alice registered")
        table = app.screen.query_one("#contacts", DataTable)
        await until(lambda: table.row_count == 1, "bob in the contacts, offline")
        assert "offline" in str(table.get_row("bob")[0])
        assert "unverified" in str(table.get_row("bob")[2])
        await bob.start()  # bob comes online
        await until(lambda: "online" in str(table.get_row("bob")[0])
                    and "offline" not in str(table.get_row("bob")[0]), "bob online")

        await press(pilot, "n", *"bob", "enter")
        await until(lambda: isinstance(app.screen, CallScreen), "the call screen")
        timer = await mounted(app, "#call-timer", "the call screen's timer")
        await until(lambda: "ringing" in str(timer.render()), "ringing on the call screen")
        await until(lambda: bob.ringing is not None, "bob's phone rings")
        await bob.decline()
        await until(lambda: alice.call is None, "alice's call ended")
        await until(lambda: not isinstance(app.screen, CallScreen), "back to the lists")
        assert alice.history.records()[0].outcome is Outcome.NO_ANSWER
        assert "declined" in alice.notice
        assert bob.history.records()[0].outcome is Outcome.DECLINED

        await bob.phone.close()  # bob goes offline
        await until(lambda: "offline" in str(table.get_row("bob")[0]), "bob offline")


async def test_conversations_screen_reads_and_sends(lab: Lab) -> None:
    from qcall.phone.conversations import Conversations
    from tests.messaging_transport import Server
    from tests.test_phone_model import _client

    server = Server(lab.tmp / "mailbox.db")
    try:
        mine, theirs = _client(lab.tmp, server, "m-alice"), _client(lab.tmp, server, "m-bob")
        bob_side = Conversations(theirs, lambda: ["m-alice"], poll_interval=None)
        alice = lab.controller("alice")
        alice.conversations = Conversations(mine, lambda: ["m-bob"], poll_interval=0.05)
        app = PhoneApp(alice)
        async with app.run_test() as pilot:
            await bob_side.start()
            await until(lambda: alice.phone.signaling.connected, "alice registered")
            await bob_side.send("m-alice", "lunch at noon?")
            await press(pilot, "t")
            table = await mounted(app, "#conversation-list", "the conversation list")
            await until(
                lambda: table.row_count == 1
                and [str(c) for c in table.get_row("m-bob")] == ["m-bob", "lunch at noon?", "1"],
                "the conversation listed, 1 unread",
            )
            await until(lambda: app.focused is table, "the list focused")
            await press(pilot, "enter")
            view = await mounted(app, "#conversation", "the conversation view")
            await until(lambda: "m-bob: lunch at noon?" in str(view.render()), "the history")
            await press(pilot, *"yes", "enter")
            await until(lambda: "me: yes" in str(view.render()), "my message shown")
            assert await bob_side.poll() == 1
            assert [line.text for line in bob_side.lines("m-alice")] == ["lunch at noon?", "yes"]
    finally:
        await server.close()


async def test_cli_phone_wires_messaging_to_the_signaling_server(tmp_path: Path) -> None:
    """`qcall phone` builds its conversations on the phone's own signaling connection:
    a message bob sends while alice's phone is open is pushed to her at once."""
    import argparse
    import contextlib

    from qcall.cli.phone import _messaging
    from qcall.messaging.client import MessagingClient
    from qcall.messaging.store import ClientStore
    from qcall.messaging.transport import SignalingTransport
    from qcall.signaling.client import SignalingClient
    from signaling.store import SQLiteMessageStore

    server = SignalingServer(mailbox=SQLiteMessageStore(tmp_path / "mailbox.db"))
    await server.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.port}"
    idents = {}
    for name in ("alice", "bob"):
        (tmp_path / name).mkdir()
        idents[name] = Identity.generate(name)
        idents[name].save(tmp_path / name)
    contacts = ContactStore.in_home(tmp_path / "alice")
    phone = Phone(url, idents["alice"].signing_key, "alice",
                  check_peer=contacts.check_peer, key_source=None)  # fmt: skip
    controller = PhoneController(phone, contacts, CallHistory.in_home(tmp_path / "alice"))
    args = argparse.Namespace(home=str(tmp_path / "alice"), config=None)
    store = _messaging(args, phone, contacts, controller)
    bob_signaling = SignalingClient(url, idents["bob"].signing_key, "bob")
    bob_seed = idents["bob"].signing_key.seed_bytes()
    bob_store = ClientStore(tmp_path / "bob" / "messages.db", bob_seed)
    bob = MessagingClient(idents["bob"], bob_store, SignalingTransport(bob_signaling),
                          ContactStore.in_home(tmp_path / "bob"))  # fmt: skip
    try:
        conversations = controller.conversations
        assert conversations is not None
        conversations.poll_interval = 30.0  # only a push can deliver within the test
        await controller.start()
        await bob_signaling.connect()
        await bob.send_text("alice", "the phone hears me")
        await until(lambda: conversations.unread.get("bob") == 1, "bob's message pushed")
        assert [line.text for line in conversations.lines("bob")] == ["the phone hears me"]
        assert conversations.lines("bob")[0].outgoing is False
    finally:
        await controller.close()
        with contextlib.suppress(Exception):
            await bob_signaling.close()
        store.close()
        bob_store.close()
        await server.close()
