"""User-space network emulation for calls: delay, jitter, loss, reordering, rate.

The kernel on our machines has no ``netem`` qdisc (``tc qdisc … netem`` fails),
so propagation delay, jitter and loss are emulated in user space, on the send
path of each peer's ICE transport: every UDP datagram an aioice
``StunProtocol`` hands to its socket — STUN connectivity checks and consent
freshness (RFC 8445 §7.2, RFC 7675) as well as DTLS, SRTP/SRTCP and SCTP — goes
through a :class:`LinkEmulator` that decides whether it is lost and when it
leaves. Applied to *both* peers, each direction gets its own one-way emulation
(like netem on the egress of each host).

The model (close to netem's defaults, ``man 8 tc-netem``):

* **loss**: each datagram is dropped independently with probability ``loss``
  (Bernoulli; netem ``loss random``).
* **delay and jitter**: a datagram sent at *t* is due at
  *t + delay + U(-jitter, +jitter)* — a uniform jitter, netem's default
  distribution for ``delay D J`` — never earlier than *t*.
* **order**: by default datagrams keep their order: a datagram is never
  released before the previous one (its due time is raised to the previous
  release time). When jitter exceeds the packet interval (20 ms for audio), this
  turns jitter into *queueing*: the mean achieved delay rises above ``delay``
  and the spread is smaller than the uniform one. That is what a FIFO
  bottleneck does, and what RTP receivers see on most real paths. With
  ``reorder=True`` each datagram keeps its own due time and may overtake
  earlier ones (netem's behaviour with jitter and no rate limit).
* **rate** (optional): a serialization queue at ``rate_kbps``; a datagram
  starts transmitting when the previous one is done, then propagates.

Datagrams are released with ``loop.call_at`` — the send path never sleeps.
The achieved delay is therefore the requested one plus the event loop's timer
slack. asyncio's default loop on Linux waits in ``epoll_wait``, whose timeout is
whole milliseconds rounded *up*: a 5.53 ms timer fires after ≈ 6.1 ms. Processes
that emulate a path should run on :func:`precise_loop` (``select(2)``, whose
timeout has microseconds: ≈ 0.1 ms late), as the latency harness does
(:func:`run`, ``QCALL_TIMERS``). The emulator's accuracy (requested vs achieved
delay, jitter, loss) is measured in ``tests/test_netem.py`` and
``scripts/netem_accuracy.py`` and reported in docs/performance.md.

The signaling path (a websocket over TCP) can be delayed too, with a
:class:`TCPDelayProxy` in front of the signaling server: each chunk of bytes is
forwarded ``delay_ms`` after it was read, in order, in each direction. Only
delay is emulated there — TCP turns loss into retransmission delay, which the
proxy does not model. The KMEs stay on loopback: in the Beijing–Hefei scenario
each user's KME is at its own site.

This reaches into aiortc 1.16 / aioice 0.10+ internals
(``RTCPeerConnection.__gather``, ``RTCIceGatherer._connection``,
``Connection._protocols``, ``StunProtocol.transport``), like the tests'
``capture()``; ``tests/test_netem.py`` breaks loudly if they move.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from qcall._aio import AsyncService
from qcall.exceptions import CallError

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

__all__ = [
    "FIBRE_US_PER_KM",
    "PROFILES",
    "RELAY_PROCESSING_US",
    "TIMERS_ENV",
    "Emulation",
    "LinkEmulator",
    "LinkStats",
    "NetworkProfile",
    "TCPDelayProxy",
    "apply_profile",
    "get_profile",
    "precise_loop",
    "run",
]

T = TypeVar("T")

#: Environment variable naming the event loop of the processes that emulate a
#: path (:func:`run`): ``precise`` (the default: :func:`precise_loop`) or ``epoll``
#: (asyncio's default loop, millisecond timers).
TIMERS_ENV = "QCALL_TIMERS"


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire ≈ 0.1 ms late instead of up to 1 ms.

    asyncio's default selector on Linux (epoll) waits whole milliseconds, rounded
    up, so every emulated one-way trip (a ``call_at``) came ≈ 0.5 ms late on
    average: ≈ 1 ms per round trip of a path that does not exist in the real
    network. ``select(2)`` takes a ``timeval`` (µs); its cost grows with the
    number of file descriptors (at most 1024), which is fine for the harness's
    processes (a phone, the signaling server and its proxies), not for a server
    with many connections.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def run(main: Coroutine[Any, Any, T], timers: str | None = None) -> T:
    """``asyncio.run(main)`` on the loop ``timers`` names (default: ``$QCALL_TIMERS``).

    ``precise`` (the default) runs on :func:`precise_loop`; ``epoll``, asyncio's
    default loop.

    Raises:
        ValueError: ``timers`` is neither.
    """
    timers = timers or os.environ.get(TIMERS_ENV) or "precise"
    if timers == "epoll":
        return asyncio.run(main)
    if timers != "precise":
        main.close()
        raise ValueError(f"{TIMERS_ENV} must be precise or epoll, not {timers!r}")
    with asyncio.Runner(loop_factory=precise_loop) as runner:
        return runner.run(main)

#: One-way propagation in standard single-mode fibre: group index ≈ 1.468, so
#: light covers 1 km in 1.468 / c ≈ 4.9 µs ("about 5 µs per km").
FIBRE_US_PER_KM = 4.9

#: Assumed forwarding latency of each of the route's intermediate nodes for a
#: voice datagram (store-and-forward of a ~200-byte packet at 10 Gb/s is 0.16 µs;
#: router lookup and queueing on a lightly loaded carrier router are tens of µs).
#: This is an assumption, not a measurement of the Beijing–Hefei network.
RELAY_PROCESSING_US = 50.0

#: Beijing–Hefei: 965 km of fibre over 16 hops (qcall/data/topologies/beijing-hefei.toml).
BEIJING_HEFEI_KM = 965.0
BEIJING_HEFEI_HOPS = 16


@dataclass(frozen=True)
class NetworkProfile:
    """What one direction of the path does to datagrams.

    Attributes:
        name: short name (``loopback``, ``beijing-hefei``, ``lossy``).
        delay_ms: mean one-way delay added to every datagram.
        jitter_ms: half-width of the uniform jitter around ``delay_ms``.
        loss: probability in [0, 1) that a datagram is dropped.
        reorder: let jittered datagrams overtake each other (default: keep order).
        rate_kbps: serialization rate of the bottleneck, or ``None`` (unlimited).
        description: one line for reports.
    """

    name: str
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    reorder: bool = False
    rate_kbps: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        if self.jitter_ms < 0:
            raise ValueError("jitter_ms must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if self.rate_kbps is not None and self.rate_kbps <= 0:
            raise ValueError("rate_kbps must be > 0")

    @property
    def is_null(self) -> bool:
        """True when the profile changes nothing (then nothing is wrapped)."""
        return (
            self.delay_ms == 0 and self.jitter_ms == 0 and self.loss == 0 and self.rate_kbps is None
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _beijing_hefei() -> NetworkProfile:
    fibre_ms = BEIJING_HEFEI_KM * FIBRE_US_PER_KM / 1000.0
    relays_ms = BEIJING_HEFEI_HOPS * RELAY_PROCESSING_US / 1000.0
    return NetworkProfile(
        "beijing-hefei",
        delay_ms=round(fibre_ms + relays_ms, 2),
        description=(
            f"965 km fibre x {FIBRE_US_PER_KM} us/km = {fibre_ms:.2f} ms + 16 hops x "
            f"{RELAY_PROCESSING_US:g} us forwarding = {relays_ms:.2f} ms, one way"
        ),
    )


#: The harness's network profiles (one direction; applied to both peers).
PROFILES: dict[str, NetworkProfile] = {
    "loopback": NetworkProfile("loopback", description="no emulation: the host's own interface"),
    "beijing-hefei": _beijing_hefei(),
    "lossy": NetworkProfile(
        "lossy",
        delay_ms=30.0,
        jitter_ms=20.0,
        loss=0.05,
        description="30 ms +/- 20 ms (uniform, order kept), 5 % random loss, one way",
    ),
}


def get_profile(name: str) -> NetworkProfile:
    """The profile called ``name``.

    Raises:
        CallError: unknown name (the message lists the known ones).
    """
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise CallError(f"unknown network profile {name!r} (known: {known})") from None


@dataclass
class LinkStats:
    """What a :class:`LinkEmulator` did (sizes and times, never payloads)."""

    sent: int = 0
    dropped: int = 0
    delays_ms: list[float] = field(default_factory=list)
    #: Actual release delays measured by the asyncio shell (timer slack included).
    achieved_ms: list[float] = field(default_factory=list)


class LinkEmulator:
    """Sans-I/O core: decides the fate of each datagram of one direction.

    Args:
        profile: what to emulate.
        seed: seed of this direction's random generator (runs are reproducible).
    """

    def __init__(self, profile: NetworkProfile, seed: int = 0) -> None:
        self.profile = profile
        self.random = random.Random(seed)
        self.stats = LinkStats()
        self._last_release = float("-inf")
        self._link_free = float("-inf")

    def decide(self, now: float, size: int) -> float | None:
        """Decide what happens to a datagram of ``size`` bytes sent at ``now``.

        Args:
            now: send time in seconds (any monotonic clock).
            size: datagram size in bytes (used by the rate limit).

        Returns:
            The release time (seconds, same clock, ``>= now``), or ``None`` if lost.
        """
        p = self.profile
        self.stats.sent += 1
        if p.loss and self.random.random() < p.loss:
            self.stats.dropped += 1
            return None
        start = now
        if p.rate_kbps is not None:
            start = max(now, self._link_free)
            self._link_free = start + size * 8 / (p.rate_kbps * 1000.0)
            start = self._link_free
        delay = p.delay_ms / 1000.0
        if p.jitter_ms:
            delay += self.random.uniform(-p.jitter_ms, p.jitter_ms) / 1000.0
        release = start + max(0.0, delay)
        if not p.reorder:
            release = max(release, self._last_release)
        self._last_release = max(self._last_release, release)
        self.stats.delays_ms.append((release - now) * 1000.0)
        return release


class _EmulatedTransport:
    """Wraps an ``asyncio.DatagramTransport``: ``sendto`` goes through the emulator."""

    def __init__(self, inner: asyncio.DatagramTransport, link: LinkEmulator) -> None:
        self._inner = inner
        self._link = link
        self._loop = asyncio.get_running_loop()

    def sendto(self, data: bytes, addr: Any = None) -> None:
        now = self._loop.time()
        release = self._link.decide(now, len(data))
        if release is None:
            return
        if release <= now:
            self._release(data, addr, now)
        else:
            self._loop.call_at(release, self._release, data, addr, now)

    def _release(self, data: bytes, addr: Any, sent: float) -> None:
        if self._inner.is_closing():
            return
        self._link.stats.achieved_ms.append((self._loop.time() - sent) * 1000.0)
        self._inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:  # close, get_extra_info, is_closing, …
        return getattr(self._inner, name)


@dataclass
class Emulation:
    """Handle returned by :func:`apply_profile`: the profile and the link's statistics."""

    profile: NetworkProfile
    link: LinkEmulator

    @property
    def stats(self) -> LinkStats:
        return self.link.stats


def _wrap_connection(connection: Any, link: LinkEmulator) -> None:
    for protocol in getattr(connection, "_protocols", []):
        transport = getattr(protocol, "transport", None)
        if transport is not None and not isinstance(transport, _EmulatedTransport):
            protocol.transport = _EmulatedTransport(transport, link)


def _ice_connections(pc: RTCPeerConnection) -> list[Any]:
    transports = getattr(pc, "_RTCPeerConnection__iceTransports", None)
    if transports is None:
        raise CallError("network emulation: this aiortc has no per-connection ICE transports")
    return [t.iceGatherer._connection for t in transports]


def apply_profile(target: Any, profile: NetworkProfile, seed: int = 0) -> Emulation | None:
    """Emulate ``profile`` on everything ``target`` sends from now on.

    Call it on both peers (each with its own seed) for a two-way emulation.

    Args:
        target: an ``RTCPeerConnection`` — before ``setLocalDescription`` (the
            usual case: its sockets are wrapped as soon as ICE gathers them) or
            after (its existing sockets are wrapped now) — or a
            :class:`~qcall.call.session.CallSession` that has not created its
            peer connection yet (it applies the profile when it does).
        profile: what to emulate on this side's outgoing datagrams.
        seed: seed for this direction's loss and jitter draws.

    Returns:
        For a peer connection, an :class:`Emulation` whose :attr:`~Emulation.stats`
        fill as datagrams go. For a session, ``None``: its emulation appears as
        ``session.emulation`` once it creates its peer connection (the caller's
        direction uses seed ``2 * seed``, the callee's ``2 * seed + 1``).

    Raises:
        CallError: ``target`` is neither, or its peer connection already exists.
    """
    from aiortc import RTCPeerConnection

    if not isinstance(target, RTCPeerConnection):
        options = getattr(target, "options", None)
        if options is None or not hasattr(options, "network"):
            raise CallError("apply_profile needs an RTCPeerConnection or a CallSession")
        if getattr(target, "pc", None) is not None:
            raise CallError("apply_profile: the call's peer connection already exists")
        target.options = dataclasses.replace(options, network=profile, network_seed=seed)
        return None
    link = LinkEmulator(profile, seed)
    emulation = Emulation(profile, link)
    if profile.is_null:
        return emulation
    pc = target
    for connection in _ice_connections(pc):
        _wrap_connection(connection, link)
    original: Callable[[], Awaitable[None]] = pc._RTCPeerConnection__gather  # type: ignore[attr-defined]

    async def gather() -> None:
        await original()
        for connection in _ice_connections(pc):
            _wrap_connection(connection, link)

    pc._RTCPeerConnection__gather = gather  # type: ignore[attr-defined]
    return emulation


class TCPDelayProxy(AsyncService):
    """A TCP proxy that delays each direction by ``delay_ms`` (order kept, no loss).

    Args:
        target: ``(host, port)`` of the real server.
        delay_ms: one-way delay added to every chunk, in each direction.

    Use ``async with TCPDelayProxy(...) as proxy`` and connect to ``proxy.port``
    on 127.0.0.1.
    """

    def __init__(self, target: tuple[str, int], delay_ms: float) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self.target = target
        self.delay = delay_ms / 1000.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on an ephemeral port of ``host`` (then read :attr:`port`)."""
        self._server = await asyncio.start_server(self._handle, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every proxied connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pump(reader, upstream_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # close(): end quietly (asyncio reports cancelled
            pass  # start_server handlers as errors)
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await src.read(65536)
                queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()
