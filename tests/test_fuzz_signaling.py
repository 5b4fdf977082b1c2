"""Fuzzing a running signaling server with 100,000 hostile frames while a real call proceeds.

Several raw WebSocket connections send frames made by a seeded mutator
(tests/fuzz.py) from a corpus of valid client frames: random bytes, truncated
and mutated JSON, type confusion, huge numbers, deep nesting, Unicode edge
cases, binary frames, invalid UTF-8 text frames and oversized frames, before
and after registration. Every frame must get exactly one well-formed ``error``
answer with a documented code (docs/signaling.md, "Errors"), or a clean close
(1007 invalid UTF-8, 1008 policy, 1009 too big). Meanwhile two
:class:`SignalingClient` users place real calls (invite → accept → offer →
answer → hangup) that must keep working. ``QCALL_FUZZ_FRAMES`` and
``QCALL_FUZZ_SEED`` change the size and seed (scripts/fuzz_signaling.py runs
longer campaigns).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qcall import pqc
from qcall.exceptions import SignalingProtocolError
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.server import SignalingServer
from tests.fuzz import Mutator
from tests.utils import TIMEOUT_FACTOR

CallMessageT = TypeVar("CallMessageT", bound=m.CallMessage)

T = 10.0 * TIMEOUT_FACTOR
FRAMES = int(os.environ.get("QCALL_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("QCALL_FUZZ_SEED", "20261127"))
WORKERS = 8
WINDOW = 64  # frames in flight per connection (the server's outbox holds 1024)

#: Codes a fuzzing connection may legitimately get: it never has a live call and
#: its invites name nobody online, so nothing is relayed and nothing is busy.
EXPECTED_CODES = frozenset(
    {"bad_message", "too_big", "auth_required", "auth_failed", "bad_state", "unknown_call",
     "unavailable"}
)  # fmt: skip
CLEAN_CLOSES = frozenset({1007, 1008, 1009})
#: Codes after which the server closes the connection (docs/signaling.md, "Errors").
CLOSING_CODES = frozenset({"auth_failed"})


def client_corpus(key: pqc.SigningKey) -> list[bytes]:
    """Valid client frames of every type (the register one for a stale nonce)."""
    challenge = m.Challenge(b"\x01" * m.NONCE_SIZE, "fuzz-server", 0)
    call_id = "fuzzcall-0001"
    frames: list[m.Message] = [
        m.Register.create(key, "fuzzer", challenge),
        m.Invite(call_id, peer="nobody"),
        m.Ringing(call_id),
        m.Accept(call_id),
        m.Reject(call_id, reason="no thanks"),
        m.Busy(call_id),
        m.Cancel(call_id, reason="changed my mind"),
        m.Hangup(call_id),
        m.Offer(call_id, payload='{"sdp": "v=0\\r\\n", "hs": "AAAA"}'),
        m.Answer(call_id, payload="x" * 200),
        m.ICECandidate(call_id, payload="candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host"),
    ]
    return [f.serialize().encode() for f in frames]


@dataclass
class Stats:
    frames: int = 0
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    closes: collections.Counter[int] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    registrations: int = 0


@dataclass(frozen=True)
class Frame:
    kind: str  # "text", "binary" or "badutf8" (bytes sent as an invalid text frame)
    data: str | bytes
    answers: int = 1  # error messages the server sends back
    closes: bool = False  # the server then closes the connection


def frame_for(mutator: Mutator, registered: bool) -> Frame:
    """One hostile frame and what the server must do with it."""
    rnd = mutator.random
    r = rnd.random()
    if r < 0.0004:  # above the hard limit: websockets closes 1009 without reading it
        return Frame("text", "[" + " " * (2 * m.MAX_MESSAGE_SIZE + 16) + "]", 0, True)
    if r < 0.0012:  # between the limits: read and answered too_big
        return Frame("text", '{"type":"ice","pad":"' + "y" * (m.MAX_MESSAGE_SIZE + 100) + '"}')
    data = mutator.mutate()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if rnd.random() < 0.005:
            return Frame("badutf8", data, 0, True)  # the server closes 1007
        return Frame("binary", data)
    if rnd.random() < 0.05:
        return Frame("binary", data)
    if not registered:
        try:
            msg = m.parse_client_message(text)
        except SignalingProtocolError:
            pass
        else:  # a well-formed register for a stale nonce: auth_failed, then closed
            return Frame("text", text, 1, isinstance(msg, m.Register))
    return Frame("text", text)


def batch_of(mutator: Mutator, registered: bool, limit: int) -> list[Frame]:
    """Up to ``limit`` frames; a frame after which the server closes ends the batch."""
    batch: list[Frame] = []
    while len(batch) < limit and not (batch and batch[-1].closes):
        batch.append(frame_for(mutator, registered))
    return batch


async def send_batch(ws: ClientConnection, batch: list[Frame], stats: Stats) -> None:
    for frame in batch:
        stats.kinds[frame.kind] += 1
        if frame.kind == "badutf8":
            assert isinstance(frame.data, bytes)
            await ws.send(frame.data, text=True)
        else:
            await ws.send(frame.data)
    stats.frames += len(batch)


async def read_answers(ws: ClientConnection, batch: list[Frame], stats: Stats) -> bool:
    """Check the answers to ``batch``; return False if (as expected) the server closed."""
    expected = sum(frame.answers for frame in batch)
    got = 0
    while got < expected:
        text = await asyncio.wait_for(ws.recv(), T)  # ConnectionClosed here fails the test
        msg = m.parse_server_message(text)  # the server's answers always parse
        if isinstance(msg, m.Presence):
            continue  # news about the other users, not an answer
        assert isinstance(msg, m.ErrorMessage), msg
        assert msg.code in EXPECTED_CODES, msg
        stats.answers[msg.code] += 1
        got += 1
    if not batch[-1].closes:
        return True
    with pytest.raises(ConnectionClosed):
        while True:
            msg = m.parse_server_message(await asyncio.wait_for(ws.recv(), T))
            assert isinstance(msg, m.Presence), msg
    assert ws.close_code in CLEAN_CLOSES, (ws.close_code, ws.close_reason)
    stats.closes[ws.close_code] += 1
    return False


async def exchange(ws: ClientConnection, batch: list[Frame], stats: Stats) -> bool:
    """Send a batch and check its answers; return False once the server closed."""
    last = batch[-1]
    if last.closes and not last.answers and len(batch) > 1:
        # A frame that fails the WebSocket (1007, 1009) drops the answers still
        # queued: send it alone, after the others were answered.
        return await exchange(ws, batch[:-1], stats) and await exchange(ws, [last], stats)
    await send_batch(ws, batch, stats)
    return await read_answers(ws, batch, stats)


async def fuzz_worker(
    url: str, index: int, frames: int, stats: Stats, key: pqc.SigningKey, corpus: list[bytes]
) -> None:
    mutator = Mutator(SEED * 100 + index, corpus)
    name = f"fuzz{index}"
    sent = 0
    while sent < frames:
        async with connect(url, max_size=2**20, compression=None, ping_interval=None) as ws:
            challenge = m.Challenge.parse(await asyncio.wait_for(ws.recv(), T))
            if mutator.random.random() < 0.5:  # before registration
                batch = batch_of(mutator, False, min(WINDOW, frames - sent))
                sent += len(batch)
                if not await exchange(ws, batch, stats):
                    continue
            await ws.send(m.Register.create(key, name, challenge).serialize())
            reply = m.parse_server_message(await asyncio.wait_for(ws.recv(), T))
            assert isinstance(reply, m.Registered), reply
            stats.registrations += 1
            # Registered: a few windows of frames, unless the server closes us first.
            for _ in range(mutator.random.randint(1, 8)):
                if sent >= frames:
                    break
                batch = batch_of(mutator, True, min(WINDOW, frames - sent))
                sent += len(batch)
                if not await exchange(ws, batch, stats):
                    break


async def real_calls(
    url: str, keys: dict[str, pqc.SigningKey], stop: asyncio.Event
) -> list[tuple[float, float]]:
    """Complete call set-ups between alice and bob until ``stop``; return (start, end) times."""
    durations: list[tuple[float, float]] = []
    alice = SignalingClient(url, keys["alice"], "alice", reconnect=False)
    bob = SignalingClient(url, keys["bob"], "bob", reconnect=False)
    async with alice, bob:

        async def expect(
            client: SignalingClient, cls: type[CallMessageT], call_id: str
        ) -> CallMessageT:
            while True:
                event = await client.next_event(T)
                if isinstance(event, cls) and event.call_id == call_id:
                    return event
                assert isinstance(event, m.Registered | m.Presence), event

        while not stop.is_set():
            start = time.perf_counter()
            call_id = await alice.invite("bob")
            invite = await expect(bob, m.Invite, call_id)
            assert invite.peer == "alice" and invite.fingerprint == alice.fingerprint
            await bob.accept(call_id)
            await expect(alice, m.Accept, call_id)
            await alice.send_offer(call_id, "offer " * 500)
            offer = await expect(bob, m.Offer, call_id)
            assert offer.payload == "offer " * 500
            await bob.send_answer(call_id, "answer")
            answer = await expect(alice, m.Answer, call_id)
            assert answer.payload == "answer" and answer.fingerprint == bob.fingerprint
            await alice.hangup(call_id)
            await expect(bob, m.Hangup, call_id)
            durations.append((start, time.perf_counter()))
            await asyncio.sleep(0.05)
    return durations


@pytest.fixture
async def server() -> AsyncIterator[SignalingServer]:
    # websockets logs every frame at DEBUG (400,000 records here, frames without
    # keys): INFO keeps the run fast; qcall's own loggers stay at DEBUG.
    loggers = [logging.getLogger(name) for name in ("websockets.server", "websockets.client")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    # One key serves the 8 fuzzing names and carol: above the default names per key.
    config = ServerConfig(
        server_id="fuzz-server", rate=1e9, burst=1e9, auth_timeout=60, max_names_per_key=16
    )
    srv = SignalingServer(config)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.slow
async def test_100k_hostile_frames_answered_while_a_call_proceeds(server: SignalingServer) -> None:
    backend = pqc.get_backend()
    keys = {
        n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
        for n in ("alice", "bob", "fuzzer")
    }
    corpus = client_corpus(keys["fuzzer"])
    url = f"ws://127.0.0.1:{server.port}"
    stats = Stats()
    stop = asyncio.Event()
    calls = asyncio.create_task(real_calls(url, keys, stop))
    await asyncio.sleep(0.2)  # both users registered before the barrage
    start = time.perf_counter()
    per_worker = [FRAMES // WORKERS + (i < FRAMES % WORKERS) for i in range(WORKERS)]
    await asyncio.gather(
        *(fuzz_worker(url, i, n, stats, keys["fuzzer"], corpus) for i, n in enumerate(per_worker))
    )
    end = time.perf_counter()
    elapsed = end - start
    stop.set()
    durations = await calls
    during = [b - a for a, b in durations if a >= start and b <= end]
    print(
        f"\n{stats.frames} frames in {elapsed:.1f} s ({stats.frames / elapsed:.0f}/s); "
        f"kinds {dict(stats.kinds)}; answers {dict(stats.answers)}; closes {dict(stats.closes)}; "
        f"registrations {stats.registrations}; {len(during)} real calls during the barrage, "
        f"max set-up {max(during, default=0) * 1e3:.0f} ms"
    )
    # Every frame got its answer, or was one that makes the server close (checked
    # frame by frame in read_answers): nothing was lost or answered twice.
    assert stats.frames == FRAMES
    closers = stats.kinds["badutf8"] + stats.closes[1009]
    assert sum(stats.answers.values()) + closers == FRAMES
    assert stats.closes[1007] == stats.kinds["badutf8"]
    assert stats.closes[1008] == stats.answers["auth_failed"]
    assert "server_error" not in stats.answers
    assert len(during) >= 3, "the real call did not proceed during the barrage"
    # The server forgot every fuzzing connection and serves a new user.
    async with asyncio.timeout(T):
        while server.protocol.connections:
            await asyncio.sleep(0.05)
    assert server.protocol.calls == 0
    async with SignalingClient(url, keys["fuzzer"], "carol", reconnect=False) as carol:
        assert carol.connected
