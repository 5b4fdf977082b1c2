"""Messaging through a real signaling server on loopback (docs/messaging.md §12).

Mailbox and prekey frames, pushes to online recipients, limits, fairness under a
flood, and a ``kill -9`` of the server process between the sender's
acknowledgement and the recipient's fetch.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

from qcall import pqc
from qcall.contacts import ContactStore
from qcall.exceptions import MailboxFullError, MessageTooLargeError
from qcall.identity import Identity
from qcall.messaging.api import ClientConfig, MessageReceived
from qcall.messaging.client import MessagingClient
from qcall.messaging.store import ClientStore
from qcall.messaging.transport import SignalingTransport
from qcall.signaling import mailbox as mb, messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.server import SignalingServer
from signaling.store import SQLiteMessageStore, StoreLimits
from tests.utils import TIMEOUT_FACTOR

T = 10.0 * TIMEOUT_FACTOR
ROOT = Path(__file__).resolve().parent.parent
BACKEND = pqc.get_backend("cryptography")


def make_identity(name: str) -> Identity:
    seed = hashlib.sha256(b"qcall test identity " + name.encode()).digest()
    return Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed)


class User:
    """A messaging user: its own home, a signaling connection, a MessagingClient."""

    def __init__(self, home: Path, name: str, url: str) -> None:
        self.identity = make_identity(name)
        home.mkdir(parents=True, exist_ok=True)
        self.signaling = SignalingClient(url, self.identity.signing_key, name, backoff_max=0.5)
        self.transport = SignalingTransport(self.signaling, timeout=T)
        store = ClientStore(home / "messages.db", self.identity.signing_key.seed_bytes())
        self.client = MessagingClient(
            self.identity,
            store,
            self.transport,
            ContactStore(home / "contacts.json"),
            config=ClientConfig(one_time_prekeys=5, low_water=2),
            backend=BACKEND,
        )

    async def start(self) -> User:
        await self.signaling.connect()
        await self.client.ensure_prekeys()
        return self

    async def close(self) -> None:
        await self.signaling.close()


async def start_server(tmp: Path, limits: StoreLimits | None = None) -> SignalingServer:
    store = SQLiteMessageStore(tmp / "server.db", limits)
    server = SignalingServer(ServerConfig(server_id="test-server"), mailbox=store)
    await server.start("127.0.0.1", 0)
    return server


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SignalingServer]:
    srv = await start_server(tmp_path)
    yield srv
    await srv.close()


def url(server: SignalingServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


async def raw(server: SignalingServer, name: str) -> ClientConnection:
    ws = await connect(url(server), max_size=None)
    challenge = m.Challenge.parse(await ws.recv())
    key = make_identity(name).signing_key
    await ws.send(m.Register.create(key, name, challenge).serialize())
    assert isinstance(m.parse_server_message(await ws.recv()), m.Registered)
    return ws


async def answer(ws: ClientConnection, request: int) -> mb.MailFrame:
    """The answer to ``request``, skipping presence and pushes."""
    while True:
        text = await asyncio.wait_for(ws.recv(), T)
        assert isinstance(text, str)
        if not mb.is_mailbox_frame(text):
            continue
        frame = mb.parse_mailbox_frame(text, server=False)
        if getattr(frame, "id", None) == request:
            return frame


async def test_offline_message_then_push_to_an_online_recipient(
    server: SignalingServer, tmp_path: Path
) -> None:
    alice = await User(tmp_path / "alice", "alice", url(server)).start()
    bob = await User(tmp_path / "bob", "bob", url(server)).start()
    await bob.close()  # offline: stored
    await alice.client.send_text("bob", "while you were away")
    bob = await User(tmp_path / "bob", "bob", url(server)).start()
    events = await bob.client.receive()
    got = [e for e in events if isinstance(e, MessageReceived)]
    assert [e.content.text for e in got] == ["while you were away"]
    assert got[0].mode.value == "pqc"
    assert await server.mailbox.store.mailbox("bob") == (0, 0)  # type: ignore[union-attr]

    await alice.client.send_text("bob", "live")  # online: pushed
    await asyncio.wait_for(bob.transport.wake.wait(), T)
    pushed = bob.transport.take_pushed()
    assert len(pushed) == 1
    events = await bob.client.deliver(pushed)
    assert [e.content.text for e in events if isinstance(e, MessageReceived)] == ["live"]
    assert await server.mailbox.store.mailbox("bob") == (0, 0)  # type: ignore[union-attr]
    assert await bob.client.receive() == []  # exactly once
    await alice.close()
    await bob.close()


async def test_prekeys_are_bound_to_the_registered_identity_and_claimed_once(
    server: SignalingServer, tmp_path: Path
) -> None:
    alice = await User(tmp_path / "alice", "alice", url(server)).start()
    held = await alice.transport.prekey_count()
    assert held == 5
    mallory = await raw(server, "mallory")  # publishes alice's key under its own name
    other = make_identity("alice").public_key
    frame = mb.PrekeysPublish(1, other, b"x" * 100)
    await mallory.send(frame.serialize())
    refused = await answer(mallory, 1)
    assert isinstance(refused, mb.MailError) and refused.code == "wrong_identity"
    ids = set()
    for request in range(2, 9):
        await mallory.send(mb.PrekeysClaim(request, "alice").serialize())
        bundle = await answer(mallory, request)
        assert isinstance(bundle, mb.PrekeysBundle) and bundle.identity_key == other
        ids.add(bundle.one_time_prekey)
    assert None in ids and len(ids) == 6  # five one-time prekeys, each once, then none
    await mallory.send(mb.PrekeysClaim(9, "nobody").serialize())
    unknown = await answer(mallory, 9)
    assert isinstance(unknown, mb.PrekeysBundle) and unknown.identity_key is None
    await mallory.close()
    await alice.close()


async def test_malformed_and_unauthenticated_frames_get_clear_errors(
    server: SignalingServer,
) -> None:
    ws = await connect(url(server))
    await ws.recv()  # challenge
    await ws.send(mb.MailFetch(3).serialize())
    refused = await answer(ws, 3)
    assert isinstance(refused, mb.MailError) and refused.code == "auth_required"
    await ws.close()
    ws = await raw(server, "carol")
    await ws.send('{"type":"mail_put","id":4,"to":"bob","data":"not base64!"}')
    bad = await answer(ws, 4)
    assert isinstance(bad, mb.MailError) and bad.code == "bad_message" and "data" in bad.message
    await ws.send(mb.MailPut(5, "bob", b"ok").serialize())  # the connection still works
    assert isinstance(await answer(ws, 5), mb.MailStored)
    await ws.close()


async def test_mailbox_limits_give_a_clear_error(tmp_path: Path) -> None:
    server = await start_server(tmp_path, StoreLimits(max_messages=3, max_envelope_size=1000))
    try:
        alice = await User(tmp_path / "alice", "alice", url(server)).start()
        transport = alice.transport
        with pytest.raises(MessageTooLargeError, match=r"1001 bytes.*limit of 1000"):
            await transport.send("bob", b"x" * 1001, b"r0")
        for i in range(3):
            await transport.send("bob", b"m", b"r%d" % i)
        with pytest.raises(MailboxFullError, match="mailbox of bob is full"):
            await transport.send("bob", b"m", b"r9")
        assert await transport.send("bob", b"m", b"r1") > 0  # a resend is not a new message
        await alice.close()
    finally:
        await server.close()


async def test_a_flood_from_one_client_does_not_block_others(server: SignalingServer) -> None:
    flooder = await raw(server, "mallory")
    other = await raw(server, "carol")
    n = 3000
    frames = [mb.MailPut(i, "victim", b"x" * 200).serialize() for i in range(1, n + 1)]

    async def flood() -> int:
        for text in frames:
            await flooder.send(text)
        done = 0
        while done < n:
            reply = await asyncio.wait_for(flooder.recv(), T)  # str | bytes, unlike text
            done += isinstance(reply, str) and '"mail_stored"' in reply
        return done

    task = asyncio.create_task(flood())
    await asyncio.sleep(0.05)  # the flood is under way
    loop = asyncio.get_running_loop()
    start = loop.time()
    await other.send(mb.MailPut(1, "dave", b"hello").serialize())
    assert isinstance(await answer(other, 1), mb.MailStored)
    waited = loop.time() - start
    assert not task.done(), "the flood ended before the other client was served"
    assert waited < 1.0 * TIMEOUT_FACTOR
    assert await asyncio.wait_for(task, 60 * TIMEOUT_FACTOR) == n
    await flooder.close()
    await other.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_server(db: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling", "--port", str(port), "--mailbox", str(db),
         "--server-id", "test-server"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc


async def test_acknowledged_message_survives_kill_9_and_arrives_exactly_once(
    tmp_path: Path,
) -> None:
    port = _free_port()
    db = tmp_path / "server.db"
    proc = _spawn_server(db, port)
    address = f"ws://127.0.0.1:{port}"
    try:
        bob = await User(tmp_path / "bob", "bob", address).start()
        await bob.close()
        alice = await User(tmp_path / "alice", "alice", address).start()
        sent = [await alice.client.send_text("bob", f"message {i}") for i in range(5)]
        assert len(sent) == 5  # each returned after the server's commit
        await alice.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = _spawn_server(db, port)
        bob = await User(tmp_path / "bob", "bob", address).start()
        events = await bob.client.receive()
        texts = [e.content.text for e in events if isinstance(e, MessageReceived)]
        assert texts == [f"message {i}" for i in range(5)]
        assert await bob.client.receive() == []
        await bob.close()
        proc.send_signal(signal.SIGKILL)  # once more: the acks were committed too
        proc.wait()
        proc = _spawn_server(db, port)
        bob = await User(tmp_path / "bob", "bob", address).start()
        assert await bob.client.receive() == []
        await bob.close()
    finally:
        proc.kill()
        proc.wait()
