"""The split link between two network sites: provisioning, connection, BB84 blocks.

:func:`split_sides` cuts a topology at the split link; :func:`create_psk`
writes the link's pre-shared authentication secret (both hosts get a copy).

:class:`SiteConnection` is the thin asyncio shell around one TCP (TLS)
stream carrying :mod:`qcall.qkd.sitewire` frames: an outbox that holds each
frame ``delay`` seconds (a user-space one-way delay, order kept), an inbox
for the split link's protocol messages and a queue for incoming relay hops.

:func:`alice_block` and :func:`bob_block` run one block of the split link's
decoy-state BB84 between two processes with the Sans-I/O ends of
:mod:`qcall.qkd.sim.link`: the transmitter simulates the optics and sends
Bob's detector record (:class:`~qcall.qkd.sitewire.Optics`), then answers
(:class:`~qcall.qkd.sim.link.AliceEnd`) every post-processing message that
the receiver's :class:`~qcall.qkd.sim.link.BobEnd` drives; each message is a
frame of the link's :class:`~qcall.qkd.sim.channel.ChannelEnd` (HMAC,
sequence number) and the block ends with each side's Wegman–Carter tag. The
protocol steps run in ``pool`` (a thread), never in the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from qcall.config import atomic_write
from qcall.exceptions import ConfigError, PostProcessingError, SiteLinkError
from qcall.qkd.sim.bb84 import BobRecord, OpticalLayer
from qcall.qkd.sim.channel import ChannelEnd
from qcall.qkd.sim.link import Abort, AliceEnd, BobEnd, BobOutcome, State
from qcall.qkd.sim.model import LinkParams
from qcall.qkd.sitewire import (
    BlockTag,
    FrameReader,
    Optics,
    PostProcessing,
    RelayKey,
    SiteMessage,
    encode_frame,
)
from qcall.qkd.topology import Topology

__all__ = [
    "PEER_TIMEOUT",
    "PSK_BYTES",
    "BlockEnd",
    "CrossPair",
    "SiteConnection",
    "SplitLinkState",
    "alice_block",
    "bob_block",
    "create_psk",
    "split_sides",
]

#: Seconds to wait for the other site's next protocol frame or answer.
PEER_TIMEOUT = 30.0
_M = TypeVar("_M", bound=SiteMessage)

#: Pre-shared authentication secret of the split link: MAC key + one-time pad.
PSK_BYTES = 32 + 4096


def create_psk(path: str | os.PathLike[str]) -> Path:
    """Write a fresh pre-shared secret for a split link (mode 0600); copy it to both hosts."""
    target = Path(path)
    atomic_write(target, os.urandom(PSK_BYTES), mode=0o600)
    return target


def split_sides(topology: Topology, split: str) -> tuple[set[str], set[str]]:
    """Return the node sets on the ``a`` and ``b`` side of link ``split``.

    Raises:
        ConfigError: unknown link, or removing it leaves the two ends connected.
    """
    link = topology.link(split)
    seen = {link.a}
    stack = [link.a]
    while stack:
        node = stack.pop()
        for other_link in topology.links_of(node):
            other = other_link.other(node)
            if other_link.name != link.name and other not in seen:
                seen.add(other)
                stack.append(other)
    if link.b in seen:
        raise ConfigError(f"link {link.name!r} does not split topology {topology.name!r} in two")
    return seen, set(topology.nodes) - seen


@dataclass(frozen=True)
class BlockEnd:
    """How one split-link block ended at this end; ``key`` is this end's copy (not in repr)."""

    block: int
    decision: Abort
    qber: float
    verified: bool
    key: bytes = field(repr=False)


@dataclass(eq=False)
class SiteConnection:
    """One connection to the other site: queues in, a delayed outbox out."""

    writer: asyncio.StreamWriter
    delay: float = 0.0
    inbox: asyncio.Queue[SiteMessage] = field(default_factory=asyncio.Queue)
    relays: asyncio.Queue[RelayKey] = field(default_factory=asyncio.Queue)
    outbox: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)

    def send(self, msg: SiteMessage) -> None:
        """Queue ``msg``; :meth:`write_loop` writes it ``delay`` seconds from now."""
        due = asyncio.get_running_loop().time() + self.delay
        self.outbox.put_nowait((due, encode_frame(msg)))

    async def write_loop(self) -> None:
        """Write queued frames when due, in order (runs for the connection's life)."""
        loop = asyncio.get_running_loop()
        while True:
            due, frame = await self.outbox.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the emulated one-way delay
            self.writer.write(frame)
            await self.writer.drain()

    async def read_loop(
        self,
        reader: asyncio.StreamReader,
        frames: FrameReader,
        dispatch: Callable[[SiteMessage], None],
    ) -> None:
        """Feed received bytes to ``frames`` and each message to ``dispatch``.

        Raises:
            SiteLinkError: the other site closed the connection or sent a bad frame.
        """
        while True:
            data = await reader.read(1 << 16)
            if not data:
                raise SiteLinkError("the other site closed the connection")
            for msg in frames.feed(data):
                dispatch(msg)

    async def expect(self, kind: type[_M], block: int | None) -> _M:
        """Take the next protocol message, which must be a ``kind`` of ``block``.

        Raises:
            SiteLinkError: another message or block.
            TimeoutError: nothing within :data:`PEER_TIMEOUT` (when ``block`` is given).
        """
        async with asyncio.timeout(PEER_TIMEOUT if block is not None else None):
            msg = await self.inbox.get()
        if not isinstance(msg, kind):
            raise SiteLinkError(f"expected {kind.__name__}, got {type(msg).__name__}")
        if block is not None and getattr(msg, "block", None) != block:
            raise SiteLinkError(f"{kind.__name__}.block is not {block}")
        return msg


async def alice_block(
    conn: SiteConnection,
    ch: ChannelEnd,
    optics: OpticalLayer,
    params: LinkParams,
    rng: np.random.Generator,
    block: int,
    pool: Executor,
    finish: Callable[[BlockEnd], None],
) -> BlockEnd:
    """Run one block as the transmitter; call ``finish`` once Bob's tag verifies.

    Raises:
        PostProcessingError: a frame or Bob's block tag does not verify, or a
            message is malformed (the connection must be dropped).
        SiteLinkError, TimeoutError: the connection failed.
    """
    loop = asyncio.get_running_loop()
    n = params.default_block_pulses()
    alice_rec, bob_rec = await loop.run_in_executor(pool, optics.transmit, n, rng)
    conn.send(Optics(block, n, bob_rec.indices, bob_rec.basis, bob_rec.bit))
    alice = AliceEnd(params, alice_rec, rng)
    ch.reset_transcript()
    while alice.state is not State.DONE:
        pp = await conn.expect(PostProcessing, block)
        incoming = ch.open(pp.frame)
        reply = await loop.run_in_executor(pool, alice.handle, incoming)
        conn.send(PostProcessing(block, ch.seal(reply)))
    alice_tag, bob_tag = ch.block_tags()
    conn.send(BlockTag(block, alice_tag))
    theirs = await conn.expect(BlockTag, block)
    if not hmac.compare_digest(theirs.tag, bob_tag):
        raise PostProcessingError(f"split link block {block}: Bob's tag does not verify")
    end = BlockEnd(block, alice.decision, alice.qber, alice.verified, alice.final_key or b"")
    finish(end)
    return end


async def bob_block(
    conn: SiteConnection,
    ch: ChannelEnd,
    optics: Optics,
    params: LinkParams,
    rng: np.random.Generator,
    pool: Executor,
    finish: Callable[[BlockEnd], None],
) -> BlockEnd:
    """Run one block as the receiver, from the transmitter's ``optics``.

    ``finish`` runs after Alice's tag verifies and *before* Bob's tag is sent,
    so the transmitter's next relay hop finds this block's key here.

    Raises:
        PostProcessingError: a frame or Alice's tag does not verify, or a reply
            is malformed (the connection must be dropped).
        SiteLinkError, TimeoutError: the connection failed.
    """
    loop = asyncio.get_running_loop()
    block = optics.block
    record = BobRecord(optics.n_pulses, optics.indices, optics.basis, optics.bit)
    gen = BobEnd(params, record, rng).run()

    def step(reply: Any) -> tuple[bool, Any]:
        try:
            return False, (next(gen) if reply is None else gen.send(reply))
        except StopIteration as stop:
            return True, stop.value

    ch.reset_transcript()
    finished, value = await loop.run_in_executor(pool, step, None)
    while not finished:
        conn.send(PostProcessing(block, ch.seal(value)))
        pp = await conn.expect(PostProcessing, block)
        incoming = ch.open(pp.frame)
        finished, value = await loop.run_in_executor(pool, step, incoming)
    out: BobOutcome = value
    alice_tag, bob_tag = ch.block_tags()
    theirs = await conn.expect(BlockTag, block)
    if not hmac.compare_digest(theirs.tag, alice_tag):
        raise PostProcessingError(f"split link block {block}: Alice's tag does not verify")
    end = BlockEnd(block, out.decision, out.qber, out.verified, out.final_key)
    finish(end)
    conn.send(BlockTag(block, bob_tag))
    return end


@dataclass(eq=False)
class CrossPair:
    """An SAE pair whose master and slave are on different sites (no key bytes)."""

    master: str
    slave: str
    master_node: str
    slave_node: str
    outgoing: bool  # the master SAE is on this site
    delivered: int = 0
    received: int = 0
    error: str | None = None
    last_route: tuple[str, ...] | None = None


@dataclass
class SplitLinkState:
    """What this end knows about the split link (for status; no key bytes)."""

    blocks: int = 0
    alarms: int = 0
    failures: int = 0
    qber: float | None = None
    alarm: bool = False
    connected: bool = False
    connections: int = 0
    error: str | None = None  # the last failure, until a block authenticates again
