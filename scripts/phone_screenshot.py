#!/usr/bin/env python3
"""Export an SVG screenshot of ``qcall phone``'s call screen (docs/images/phone-call.svg).

It runs a real call on this machine: a signaling server on a loopback port,
two phones (alice in the app, headless; bob answering), a pair of key files as
the QKD key source (hybrid policy) and test tones as microphones. Once the
call is up and RTCP figures have arrived, the SAS is confirmed and Textual
exports the screen::

    python scripts/phone_screenshot.py [--out docs/images/phone-call.svg] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from qcall.call.media import ToneTrack
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.contacts import ContactStore
from qcall.identity import Identity
from qcall.phone.app import PhoneApp
from qcall.phone.audio import DiscardSink
from qcall.phone.controller import PhoneController
from qcall.phone.history import CallHistory
from qcall.qkd.client import open_key_source
from qcall.qkd.keyfile import create_key_files
from signaling.server import SignalingServer

ROOT = Path(__file__).resolve().parent.parent


def controller(tmp: Path, url: str, name: str, tone: float) -> PhoneController:
    home = tmp / name
    home.mkdir()
    contacts = ContactStore.in_home(home)
    phone = Phone(
        url,
        Identity.generate(name).signing_key,
        name,
        check_peer=contacts.check_peer,
        key_source=open_key_source(f"keyfile:{tmp / f'{name}.keys.json'}"),
        options=CallOptions(rekey_interval=2.0),
        make_source=lambda: ToneTrack(tone),
    )
    return PhoneController(phone, contacts, CallHistory.in_home(home), open_speaker=DiscardSink)


async def wait(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("the call did not come up in time")
        await asyncio.sleep(0.05)


async def main(out: Path, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        create_key_files("alice", tmp / "alice.keys.json", "bob", tmp / "bob.keys.json", 64)
        server = SignalingServer()
        await server.start("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}"
        alice = controller(tmp, url, "alice", 440.0)
        bob = controller(tmp, url, "bob", 660.0)
        app = PhoneApp(alice)
        try:
            async with app.run_test(size=(112, 32)):
                await bob.start()
                await wait(lambda: alice.phone.signaling.connected)
                alice.dial("bob")
                await wait(lambda: bob.ringing is not None)
                bob.answer()
                await wait(lambda: alice.call is not None and alice.call.connected_at is not None)
                await asyncio.sleep(seconds)  # RTCP reports, a few rekeys, the meters
                alice.confirm_sas()
                alice.change_volume(-0.2)
                await alice.refresh()
                await app.sync_screens()
                await asyncio.sleep(0.3)
                out.parent.mkdir(parents=True, exist_ok=True)
                app.save_screenshot(filename=out.name, path=str(out.parent))
                print(f"wrote {out}")
                await alice.hangup()
        finally:
            await alice.close()
            await bob.close()
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "phone-call.svg")
    parser.add_argument("--seconds", type=float, default=6.0, help="call length before the shot")
    args = parser.parse_args()
    asyncio.run(main(args.out, args.seconds))
