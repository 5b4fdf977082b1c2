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

Datagrams are released by loop timers — the send path never sleeps — through a
:class:`_PreciseQueue`: **never before** their release time, and late by as
little as the loop allows. A timer fires late by the kernel's timer slack (50 µs
by default; :func:`set_timer_slack` makes it 1 ns on the emulating thread) plus
the loop's wake-up latency; so the queue arms its one timer early by a measured
estimate of that lateness (:class:`_WakeLatency`, an EWMA of past wake-ups) and
busy-waits the remaining µs. asyncio's default loop on Linux waits in
``epoll_wait``, whose timeout is whole milliseconds rounded *up*: processes that
emulate a path should run on :func:`precise_loop` (``select(2)``, µs timeouts),
as the latency harness does (:func:`run`, ``QCALL_TIMERS``). The emulator's
accuracy (requested vs achieved delay, jitter, loss) is measured in
``tests/test_netem.py`` and ``scripts/netem_accuracy.py`` and reported in
docs/performance.md.

The signaling path (a websocket over TCP) can be delayed too, with a
:class:`TCPDelayProxy` in front of the signaling server: each chunk of bytes is
forwarded ``delay_ms`` after it was read (never earlier), in order, in each
direction, with EOFs and closes behind the bytes and back-pressure both ways.
Only delay is emulated there — TCP turns loss into retransmission delay, which
the proxy does not model. The KMEs stay on loopback: in the Beijing–Hefei scenario
each user's KME is at its own site.

This reaches into aiortc 1.16 / aioice 0.10+ internals
(``RTCPeerConnection.__gather``, ``RTCIceGatherer._connection``,
``Connection._protocols``, ``StunProtocol.transport``), like the tests'
``capture()``; ``tests/test_netem.py`` breaks loudly if they move.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import heapq
import itertools
import os
import random
import selectors
import sys
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from qcall._aio import AsyncService
from qcall.exceptions import CallError

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

__all__ = [
    "FIBRE_US_PER_KM",
    "PROFILES",
    "PROXY_IN_FLIGHT_MAX",
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
    "set_timer_slack",
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
    default loop. Either way the thread's timer slack is set to 1 ns first
    (:func:`set_timer_slack`).

    Raises:
        ValueError: ``timers`` is neither.
    """
    timers = timers or os.environ.get(TIMERS_ENV) or "precise"
    set_timer_slack()  # the loop runs on this thread
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


#: PR_GET_TIMERSLACK / PR_SET_TIMERSLACK of ``prctl(2)`` (linux/prctl.h).
_PR_SET_TIMERSLACK = 29
_PR_GET_TIMERSLACK = 30


@functools.cache
def _prctl() -> Any:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return prctl


def set_timer_slack(ns: int = 1) -> int | None:
    """Set the calling thread's timer slack to ``ns`` nanoseconds (Linux; a no-op elsewhere).

    The kernel may fire a thread's timers up to its *timer slack* late (50 µs by
    default) to batch wake-ups; ``select(2)`` uses the larger of that and 0.1 %
    of the timeout. The emulating processes want their timers on time, so
    :func:`run`, :class:`_EmulatedTransport` and :class:`TCPDelayProxy` set 1 ns
    on the thread that runs their loop — not on import: a process that only
    imports this module keeps its slack.

    Returns:
        The previous slack in ns, or ``None`` where it cannot be set (not Linux,
        no libc ``prctl``, or the call failed).
    """
    if ns < 1:  # 0 would mean "back to the default"
        raise ValueError("ns must be >= 1")
    prctl = _prctl() if sys.platform.startswith("linux") else None
    if prctl is None:
        return None
    previous = int(prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0))
    if previous < 0 or prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0) != 0:
        return None
    return previous


#: Never arm a timer more than this ahead of its due time (the longest busy-wait);
#: a wake-up later than this is a stall (load, a long callback), not latency.
_MAX_LEAD = 0.001
_EWMA_GAIN = 1 / 8


class _WakeLatency:
    """How late the loop's timers fire: EWMA of the lateness and of its deviation.

    Like RFC 6298's SRTT / RTTVAR: ``lead`` (mean + 1 deviation, at most
    :data:`_MAX_LEAD`) is how early a release is armed so that the wake-up
    usually comes just before the due time; the rest is a short busy-wait.
    Lateness is skewed (most wake-ups quick, a few stalls), so the mean alone
    already lands most wake-ups early; one deviation more bought a tighter p75
    and two deviations doubled the busy-wait for no better median
    (docs/performance.md, "The emulated path's precision"). One per event
    loop, shared by its queues.
    """

    def __init__(self) -> None:
        # A first guess (select(2) on this project's 2-core VM: ≈ 0.1 ms); the
        # EWMA takes over from the first wake-up.
        self.mean = 100e-6
        self.dev = 50e-6
        self.samples = 0
        #: Time spent busy-waiting (s) over ``releases`` timer firings (the CPU cost).
        self.spun = 0.0
        self.releases = 0

    def observe(self, late: float) -> None:
        late = min(max(late, 0.0), _MAX_LEAD)  # stalls must not set the lead
        self.dev += (abs(late - self.mean) - self.dev) * _EWMA_GAIN
        self.mean += (late - self.mean) * _EWMA_GAIN
        self.samples += 1

    @property
    def lead(self) -> float:
        return min(_MAX_LEAD, self.mean + self.dev)


_WAKE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WakeLatency] = (
    weakref.WeakKeyDictionary()
)


class _PreciseQueue(Generic[T]):
    """Items released at their due times on ``loop``: never early, late as little as possible.

    One timer is armed, for the earliest item, ``lead`` seconds early (the
    loop's measured wake-up latency, :class:`_WakeLatency`); when it fires
    before the due time the loop busy-waits the rest (at most
    :data:`_MAX_LEAD`). Every item due by then is handed to ``release`` in one
    batch, in order of due time, then of pushing (equal due times keep FIFO
    order, which ``loop.call_at``'s heap does not promise).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, release: Callable[[list[T]], None]) -> None:
        self._loop = loop
        self._release = release
        self._wake = _WAKE.setdefault(loop, _WakeLatency())
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._armed_ahead = False

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        seq = next(self._seq)
        heapq.heappush(self._heap, (due, seq, item))
        if self._timer is None or self._heap[0][1] == seq:
            self._arm()

    def cancel(self) -> None:
        """Forget every pending item and the timer."""
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        at = self._heap[0][0] - self._wake.lead
        if self._timer is not None:
            if self._armed_at == at:
                return
            self._timer.cancel()
        self._armed_at = at
        self._armed_ahead = at > self._loop.time()
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        now = loop.time()
        if self._armed_ahead:
            self._wake.observe(now - self._armed_at)
        if not self._heap:
            return
        due = self._heap[0][0]
        if due - now > _MAX_LEAD:  # cannot happen with asyncio's timers; stay correct
            self._arm()
            return
        woke = now
        while now < due:  # the rest: a wake-up would come too late
            now = loop.time()
        self._wake.spun += now - woke
        self._wake.releases += 1
        batch = []
        while self._heap and self._heap[0][0] <= now:
            batch.append(heapq.heappop(self._heap)[2])
        if self._heap:
            self._arm()
        self._release(batch)


class _EmulatedTransport:
    """Wraps an ``asyncio.DatagramTransport``: ``sendto`` goes through the emulator.

    Released datagrams leave through a :class:`_PreciseQueue`: never before
    the emulator's release time, and in order of release time (equal times in
    order of sending).
    """

    def __init__(self, inner: asyncio.DatagramTransport, link: LinkEmulator) -> None:
        self._inner = inner
        self._link = link
        self._loop = asyncio.get_running_loop()
        self._queue: _PreciseQueue[tuple[bytes, Any, float]] = _PreciseQueue(
            self._loop, self._release
        )
        set_timer_slack()

    def sendto(self, data: bytes, addr: Any = None) -> None:
        now = self._loop.time()
        release = self._link.decide(now, len(data))
        if release is None:
            return
        if release <= now and not self._queue:
            self._release([(data, addr, now)])
        else:
            self._queue.push(release, (data, addr, now))

    def _release(self, batch: list[tuple[bytes, Any, float]]) -> None:
        if self._inner.is_closing():
            self._queue.cancel()
            return
        now = self._loop.time()
        for data, addr, sent in batch:
            self._link.stats.achieved_ms.append((now - sent) * 1000.0)
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


#: Back-pressure of :class:`TCPDelayProxy`: a side is no longer read while this
#: many of the bytes read from it are still in flight (delayed), and again once
#: they are under a quarter of it; also while the other side's socket buffer is
#: full (``pause_writing``).
PROXY_IN_FLIGHT_MAX = 1 << 20

_EOF = "eof"  # markers on a delay line, behind the bytes read before them
_CLOSE = "close"


class _Leg(asyncio.Protocol):
    """One connection of a proxied pair: what it reads reaches the other ``delay`` later."""

    def __init__(self, proxy: TCPDelayProxy, peer: _Leg | None = None) -> None:
        self.proxy = proxy
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.line: _PreciseQueue[bytes | str] = _PreciseQueue(self.loop, self._deliver)
        self.in_flight = 0
        self.eof_in = self.eof_out = self.lost = False
        self._paused: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy._legs.add(self)
        if self.peer is None:  # the client's side: read once the server's is there
            self.pause("connect")
            self.proxy._connect(self)
        else:  # the server's side
            self.peer.peer = self
            self.peer.resume("connect")

    def data_received(self, data: bytes) -> None:
        self.in_flight += len(data)
        self.line.push(self.loop.time() + self.proxy.delay, data)
        if self.in_flight > PROXY_IN_FLIGHT_MAX:
            self.pause("in flight")

    def eof_received(self) -> bool:
        self.eof_in = True
        self.line.push(self.loop.time() + self.proxy.delay, _EOF)
        if self.eof_out and self.transport is not None:
            self.transport.close()  # both ways done
        return True  # half-closed: the other way goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.proxy._legs.discard(self)
        # The other side is closed once what was read before reaches it (a
        # no-op when both ways were already closed by EOFs).
        self.line.push(self.loop.time() + self.proxy.delay, _CLOSE)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause("writing")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume("writing")

    def pause(self, why: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(why)

    def resume(self, why: str) -> None:
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _deliver(self, batch: list[bytes | str]) -> None:
        self.in_flight -= sum(len(item) for item in batch if isinstance(item, bytes))
        if self.in_flight <= PROXY_IN_FLIGHT_MAX // 4:
            self.resume("in flight")
        peer = self.peer
        out = peer.transport if peer is not None else None
        if peer is None or out is None or out.is_closing():
            return  # the other side is gone: what was in flight to it is lost
        chunks: list[bytes] = []
        for item in batch:
            if isinstance(item, bytes):
                chunks.append(item)
                continue
            if chunks:
                out.write(b"".join(chunks))
                chunks = []
            if item == _EOF and out.can_write_eof() and not peer.eof_in:
                out.write_eof()
                peer.eof_out = True
            else:  # close, or the last way of a pair: close once written
                out.close()
                return
        if chunks:
            out.write(b"".join(chunks))


class TCPDelayProxy(AsyncService):
    """A TCP proxy that delays each direction by ``delay_ms`` (order kept, no loss).

    Built on protocol callbacks: each side's bytes go on a delay line (a
    :class:`_PreciseQueue`: released by one timer, never before ``delay_ms``
    after they were read, late by as little as the loop allows). An EOF (a
    half-close) reaches the other side after the bytes read before it, and so
    does a close or reset; back-pressure stops reading a side while the other
    side's socket buffer is full or :data:`PROXY_IN_FLIGHT_MAX` of its bytes
    are in flight.

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
        self._legs: set[_Leg] = set()

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on an ephemeral port of ``host`` (then read :attr:`port`)."""
        set_timer_slack()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Leg(self), host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every proxied connection (what is in flight is dropped)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for leg in list(self._legs):
            leg.line.cancel()
            if leg.transport is not None:
                leg.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)  # let the transports report connection_lost

    def _connect(self, client: _Leg) -> None:
        task = asyncio.ensure_future(self._open(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, client: _Leg) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _Leg(self, client), *self.target)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        if client.lost:
            upstream.close()
