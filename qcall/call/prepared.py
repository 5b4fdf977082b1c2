"""Peer connections made before they are needed: one for the next call we place, one to answer.

Making a call's :class:`~aiortc.RTCPeerConnection` costs ≈ 2.5 ms of CPU on the
caller before its invite can leave (the DTLS certificate, the control channel,
the audio transceiver, the offer and ICE gathering: UDP sockets bound on every
interface) and ≈ 2 ms on the callee before its ``accept`` can (the same, and its
answer). On a long path both are on the set-up's critical path
(docs/performance.md, "Set-up speed: round 5"). A :class:`Phone
<qcall.call.phone.Phone>` therefore keeps one of each made ahead, between calls
(one per :class:`PrepareSpec`: the harness's ``plain`` baselines get theirs too,
without the control channel):

* **to place a call** (``caller``): everything up to the local offer — the
  certificate, the ICE credentials and candidates, the negotiated control
  channel, the audio transceiver (sending, or receive-only without a source)
  and ``setLocalDescription(offer)``. The call adopts it and its offer rides
  the invite at once;
* **to answer a call** (``callee``): the certificate, the audio transceiver and
  the ICE candidates of its transport, gathered; the caller's SDP is applied,
  the control channel made and the answer made when a call is answered.

Each also holds its DTLS ``SSL.Context``, built ahead
(:func:`~qcall.call.fast_transport.prebuild_dtls_contexts`, ≈ 0.2 ms each side),
which its DTLS transport's start takes once instead of building it after the
invite or the answer (a callee's transport made by the caller's offer too).

Both are ``max-bundle`` when they carry the control channel, which is made after
the audio transceiver (:func:`bundle_policy`): the channel rides the audio's ICE
and DTLS transport and gathers nothing of its own.

What a prepared connection holds, and the rules (docs/threat-model.md,
"Prepared peer connections"): a fresh DTLS key pair and self-signed
certificate, fresh ICE credentials and bound sockets — no key of any call and
nothing of the peer. Each is used for **one call only** (:meth:`PreparedConnections.take`
hands it out once; the call closes it when it ends), and one not taken within
:data:`PREPARED_MAX_AGE` seconds is closed and replaced (at most
:data:`PREPARED_MAX_REFRESHES` times in a row; then none is held until a call).
A new one is made only once the call that took the previous one has ended
(:meth:`PreparedConnections.keep`); a call that starts while one is being made
for it waits for it (:meth:`PreparedConnections.take_soon`, at most
:data:`PREPARE_WAIT`) instead of making a second one beside it. The call attaches
everything of its own when it adopts it: its handlers, its audio source
(``replaceTrack``), the Opus encoder, the jitter buffer mode, the network
emulation and the SRTP hook.

A prepared connection is only adopted by a call whose options it was made for
(:class:`PrepareSpec`: role, ICE servers and policy, the fast transport, whether
audio is sent, the control channel); otherwise the call makes its own, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpTransceiver,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from qcall.call.aiortc_compat import close_peer_connection, gather_now
from qcall.call.fast_transport import install_fast_transport, prebuild_dtls_contexts
from qcall.call.status import CallOptions

__all__ = [
    "CONTROL_CHANNEL_ID",
    "CONTROL_CHANNEL_LABEL",
    "PREPARED_MAX_AGE",
    "PREPARED_MAX_REFRESHES",
    "PREPARE_WAIT",
    "PrepareSpec",
    "PreparedConnection",
    "PreparedConnections",
    "bundle_policy",
    "new_peer_connection",
    "prepare",
]

logger = logging.getLogger(__name__)

#: Label and id of the negotiated data channel that carries in-call handshake
#: messages (:mod:`qcall.call.session_pump`, which re-exports them).
CONTROL_CHANNEL_LABEL = "qcall-control"
CONTROL_CHANNEL_ID = 0

#: Seconds a prepared connection may wait for a call before it is closed and replaced.
PREPARED_MAX_AGE = 60.0
#: Times in a row an unused prepared connection is replaced (then: none until a call).
PREPARED_MAX_REFRESHES = 10
#: Seconds a call waits for the connection being made for it (≈ 2.5 ms of CPU).
PREPARE_WAIT = 0.05


def bundle_policy(control: bool) -> RTCBundlePolicy:
    """``max-bundle`` for a call with the control channel (made after the audio
    transceiver, it then shares the audio's transport); else aiortc's default.

    aiortc 1.16 gives a data channel made *before* any transceiver a transport of
    its own under max-bundle, which never connects: the order matters.
    """
    return RTCBundlePolicy.MAX_BUNDLE if control else RTCBundlePolicy.BALANCED


@dataclass(frozen=True, slots=True)
class PrepareSpec:
    """What a prepared connection was made for; a call adopts only one that matches.

    Attributes:
        role: ``caller`` (made up to its offer) or ``callee`` (gathered, no SDP yet).
        ice_servers: ``repr`` of the STUN/TURN servers (``CallOptions.ice_servers``).
        ice_policy: ``all`` or ``relay``.
        fast_transport: :func:`~qcall.call.fast_transport.install_fast_transport` on it.
        send_audio: a sending audio transceiver (the call has a source); else the
            caller's is receive-only and the callee's is made by the offer.
        control: the negotiated control channel (every call but ``plain``).
    """

    role: str
    ice_servers: str
    ice_policy: str
    fast_transport: bool
    send_audio: bool
    control: bool = True

    @classmethod
    def for_call(
        cls, role: str, options: CallOptions, send_audio: bool, *, control: bool = True
    ) -> PrepareSpec:
        """The spec a call of ``role`` with ``options`` needs."""
        return cls(
            role=role,
            ice_servers=repr(options.ice_servers),
            ice_policy=options.ice_policy,
            fast_transport=options.fast_transport,
            send_audio=send_audio,
            control=control,
        )

    def configuration(self, options: CallOptions) -> RTCConfiguration:
        """The peer connection's configuration (``options`` must be the spec's)."""
        ice = [RTCIceServer(**server) for server in options.ice_servers]
        relay = self.ice_policy == "relay"
        policy = RTCIceTransportPolicy.RELAY if relay else RTCIceTransportPolicy.ALL
        return RTCConfiguration(
            iceServers=ice, iceTransportPolicy=policy, bundlePolicy=bundle_policy(self.control)
        )


@dataclass(slots=True)
class PreparedConnection:
    """A peer connection made ahead for one call (used once, then closed by that call)."""

    spec: PrepareSpec
    pc: RTCPeerConnection
    channel: RTCDataChannel | None
    audio: RTCRtpTransceiver | None
    made_at: float

    def fresh(self, now: float | None = None, max_age: float = PREPARED_MAX_AGE) -> bool:
        """Made at most ``max_age`` seconds ago (``time.monotonic()``)."""
        return (time.monotonic() if now is None else now) - self.made_at <= max_age

    async def close(self) -> None:
        """Close it unused (its sockets, its certificate's key go with it)."""
        with contextlib.suppress(Exception):
            await close_peer_connection(self.pc)


def new_peer_connection(spec: PrepareSpec, options: CallOptions) -> RTCPeerConnection:
    """A bare peer connection for ``spec``: its configuration and, if the spec asks for
    it, the fast transport (installed before any transport exists).

    Both a prepared connection and one a call makes itself start here.
    """
    pc = RTCPeerConnection(spec.configuration(options))
    if spec.fast_transport:
        install_fast_transport(pc)
    return pc


async def prepare(spec: PrepareSpec, options: CallOptions) -> PreparedConnection:
    """Make a peer connection for ``spec`` (see the module's docstring for what it holds).

    ``options``: the call options the spec was taken from (their ICE servers).
    """
    pc = new_peer_connection(spec, options)
    try:
        audio: RTCRtpTransceiver | None = None
        if spec.send_audio:
            audio = pc.addTransceiver("audio", direction="sendrecv")  # its track: on adoption
        elif spec.role == "caller":
            audio = pc.addTransceiver("audio", direction="recvonly")
        channel = None
        if spec.control and spec.role == "caller":  # after the audio: bundled on it
            channel = pc.createDataChannel(
                CONTROL_CHANNEL_LABEL, negotiated=True, id=CONTROL_CHANNEL_ID, ordered=True
            )
        if spec.role == "caller":
            await pc.setLocalDescription(await pc.createOffer())
        else:
            await gather_now(pc)  # the answer's setLocalDescription finds them gathered
        prebuild_dtls_contexts(pc)  # DTLS start takes it (fast_transport.py)
    except BaseException:
        await close_peer_connection(pc)
        raise
    return PreparedConnection(spec, pc, channel, audio, time.monotonic())


class PreparedConnections:
    """A phone's prepared connections: at most one per :class:`PrepareSpec`, each handed out once.

    Args:
        max_age: seconds an unused one lives before it is closed and replaced.
        max_refreshes: how many times in a row an unused one is replaced; then
            none is held for that spec until :meth:`keep` is called again.
    """

    def __init__(
        self, max_age: float = PREPARED_MAX_AGE, max_refreshes: int = PREPARED_MAX_REFRESHES
    ) -> None:
        self.max_age = max_age
        self.max_refreshes = max_refreshes
        self._ready: dict[PrepareSpec, PreparedConnection] = {}
        self._keepers: dict[PrepareSpec, asyncio.Task[None]] = {}
        self._taken: dict[PrepareSpec, asyncio.Event] = {}
        self._made: dict[PrepareSpec, asyncio.Event] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def keep(self, spec: PrepareSpec, options: CallOptions) -> None:
        """Hold one connection for ``spec`` ready from now on (made in the background).

        ``options``: the call options ``spec`` was taken from (their ICE servers).
        Does nothing while one for ``spec`` is held or being made, or once
        :meth:`close` ran.
        """
        if self._closed:
            return
        keeper = self._keepers.get(spec)
        if keeper is not None and not keeper.done():
            return
        self._taken[spec] = asyncio.Event()
        self._made[spec] = asyncio.Event()
        self._keepers[spec] = asyncio.ensure_future(self._keeper(spec, options))

    async def take_soon(
        self, spec: PrepareSpec, wait: float = PREPARE_WAIT
    ) -> PreparedConnection | None:
        """:meth:`take`, after waiting (at most ``wait`` s) for one being made for ``spec``.

        A call placed or answered while its connection is being made (just after
        the phone started, or right after the previous call) waits for it rather
        than making a second one beside it: the two would share the CPU.
        """
        keeper = self._keepers.get(spec)
        made = self._made.get(spec)
        if spec not in self._ready and keeper is not None and not keeper.done() and made:
            waiter = asyncio.ensure_future(made.wait())
            await asyncio.wait({waiter, keeper}, timeout=wait)
            waiter.cancel()
        return self.take(spec)

    def take(self, spec: PrepareSpec) -> PreparedConnection | None:
        """The connection held for ``spec``, once; ``None`` if there is none.

        One older than ``max_age`` is closed, not returned. Nothing is made to
        replace it until :meth:`keep` is called again (once the call has ended).
        """
        taken = self._taken.get(spec)
        if taken is not None:
            taken.set()
        held = self._ready.pop(spec, None)
        if held is None:
            return None
        if not held.fresh(max_age=self.max_age):
            self._discard(held)
            return None
        return held

    def _discard(self, prepared: PreparedConnection) -> None:
        task = asyncio.ensure_future(prepared.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Stop making connections and close the ones held."""
        self._closed = True
        for task in self._keepers.values():
            task.cancel()
        for task in self._keepers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        held, self._ready = list(self._ready.values()), {}
        for prepared in held:
            await prepared.close()
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    async def _keeper(self, spec: PrepareSpec, options: CallOptions) -> None:
        taken = self._taken[spec]
        prepared: PreparedConnection | None = None
        try:
            for _ in range(self.max_refreshes + 1):
                try:
                    prepared = await prepare(spec, options)
                except Exception as exc:  # the call will make its own
                    logger.debug("! no %s connection prepared: %r", spec.role, exc)
                    return
                self._ready[spec] = prepared
                self._made[spec].set()
                taken.clear()  # (a call that came meanwhile made its own)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(taken.wait(), self.max_age)
                    return  # taken: the next one once that call has ended (keep())
                if self._ready.get(spec) is prepared:  # unused for max_age: replaced
                    del self._ready[spec]
                    await prepared.close()
        except asyncio.CancelledError:
            if prepared is not None and self._ready.get(spec) is prepared:
                del self._ready[spec]
                await prepared.close()
            raise
