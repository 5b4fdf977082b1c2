"""File transfers through MessagingClient: limits, progress, resume on both sides, tampering."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from qcall.exceptions import FileTransferError, MessageTooLargeError
from qcall.messaging.api import Envelope, Event, FileReceived, MessageReceived
from qcall.messaging.client import MessagingClient
from qcall.messaging.content import ContentKind
from tests.messaging_transport import MaliciousServer
from tests.test_messaging_client import World, connection, make_identity, rejected

CHUNK = 4096


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    server = MaliciousServer(tmp_path / "server.db")
    yield World(tmp_path, server)
    await server.close()


async def users(world: World, *names: str, **config: Any) -> list[MessagingClient]:
    out = []
    for name in names:
        client = world.client(name, chunk_size=CHUNK, **config)
        await client.ensure_prekeys()
        out.append(client)
    return out


def files(events: Sequence[Event]) -> list[FileReceived]:
    return [e for e in events if isinstance(e, FileReceived)]


async def test_file_arrives_whole_with_progress(world: World, tmp_path: Path) -> None:
    alice, bob = await users(world, "alice", "bob")
    data = os.urandom(10 * CHUNK + 123)
    (tmp_path / "report.pdf").write_bytes(data)
    seen = []
    offer = await alice.send_file(
        "bob", tmp_path / "report.pdf", progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (11, 11) and len(seen) == 11
    events = await bob.receive()
    offers = [e for e in events if isinstance(e, MessageReceived)]
    assert offers[0].content.kind is ContentKind.FILE
    [received] = files(events)
    assert (
        received.path.read_bytes() == data
        and received.offer.sha256 == hashlib.sha256(data).digest()
    )
    assert received.path.name == "report.pdf" and received.offer.file_id == offer.file_id
    assert stat.S_IMODE(received.path.parent.stat().st_mode) == 0o700
    assert alice.store.transfers(outgoing=True) == [] and bob.store.transfers(outgoing=False) == []


async def test_file_over_the_limit_is_refused_before_upload(world: World, tmp_path: Path) -> None:
    alice, _ = await users(world, "alice", "bob", max_file_size=CHUNK)
    (tmp_path / "big.bin").write_bytes(bytes(CHUNK + 1))
    with pytest.raises(MessageTooLargeError, match=r"big\.bin is 4097 bytes"):
        await alice.send_file("bob", tmp_path / "big.bin")
    assert connection(alice).sent == [] and alice.store.transfers(outgoing=True) == []
    with pytest.raises(FileTransferError, match="cannot read"):
        await alice.send_file("bob", tmp_path / "missing.bin")


async def test_upload_and_download_resume_after_a_break(world: World, tmp_path: Path) -> None:
    alice, bob = await users(world, "alice", "bob")
    data = os.urandom(8 * CHUNK)
    (tmp_path / "data.bin").write_bytes(data)
    transport, sent = alice.transport, 0
    original = transport.send

    async def breaking(recipient: str, envelope: bytes, ref: bytes) -> int:
        nonlocal sent
        if envelope[1] == 4:
            sent += 1
            if sent == 4:
                raise ConnectionError("connection lost")
        return await original(recipient, envelope, ref)

    setattr(transport, "send", breaking)  # (mypy refuses assigning to a method)
    with pytest.raises(ConnectionError):
        await alice.send_file("bob", tmp_path / "data.bin")
    # bob takes what is there (the offer and 3 chunks), then "crashes" after writing a
    # chunk he never committed: the partial file has bytes past his progress.
    assert files(await bob.receive()) == []
    [file_id] = bob.store.transfers(outgoing=False)
    part = bob.store.path.parent / "files" / "data.bin.part"
    with part.open("ab") as f:
        f.write(b"junk written before the crash")
    assert await alice.files.resume_uploads() == 1  # from chunk 3 on
    bob2 = MessagingClient(
        make_identity("bob"), bob.store, bob.transport, bob.contacts, config=bob.config
    )  # a restarted client
    [received] = files(await bob2.receive())
    assert received.path.read_bytes() == data
    assert bob.store.transfer(file_id) is None


async def test_tampered_and_foreign_chunks_are_refused(world: World, tmp_path: Path) -> None:
    alice, bob, _ = await users(world, "alice", "bob", "carol")
    data = os.urandom(3 * CHUNK)
    (tmp_path / "x.bin").write_bytes(data)
    await alice.send_file("bob", tmp_path / "x.bin")
    stored = await world.server.store.fetch("bob")
    chunk = stored[-3]  # the first chunk
    assert chunk.data[1] == 4
    await world.server.store.ack("bob", [e.id for e in stored[-3:]])
    bad = bytearray(chunk.data)
    bad[-1] ^= 1
    world.server.mode = "inject"
    world.server.injected = [
        Envelope(1 << 45, "alice", bytes(bad)),
        Envelope((1 << 45) + 1, "carol", chunk.data),  # right bytes, wrong sender
    ]
    events = await bob.receive()
    assert rejected(events) == [FileTransferError, FileTransferError]
    world.server.mode = "honest"
    for envelope in stored[-3:]:
        await world.server.store.put("bob", "alice", envelope.data, 0)
    [received] = files(await bob.receive())
    assert received.path.read_bytes() == data


async def test_file_to_a_group(world: World, tmp_path: Path) -> None:
    alice, bob, carol = await users(world, "alice", "bob", "carol")
    await alice.create_group("team", ["bob", "carol"])
    data = os.urandom(2 * CHUNK + 5)
    (tmp_path / "plan.txt").write_bytes(data)
    await alice.send_file("@team", tmp_path / "plan.txt")
    for member in (bob, carol):
        [received] = files(await member.receive())
        assert received.conversation == "@team" and received.sender == "alice"
        assert received.path.read_bytes() == data
