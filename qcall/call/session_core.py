"""The state of one call, and how it waits, spawns tasks, times its steps and ends.

:class:`SessionCore` is the lowest layer of :class:`~qcall.call.session.CallSession`
(the layers and how they fit: :mod:`qcall.call.session`). It holds the call's
whole state, made in one ``__init__`` (the arguments are documented on
:class:`~qcall.call.session.CallSession`), and what every layer above uses:

* waiting for the peer (:meth:`SessionCore._wait_message`, :meth:`SessionCore._until`)
  always races the call's end and a timeout, so a call that fails or is hung
  up never leaves a coroutine waiting;
* background work runs as tasks of the call (:meth:`SessionCore._spawn`): a
  task's error ends the call, and closing the call cancels them;
* milestones go to ``status.timings_ms`` (:meth:`SessionCore._mark`), the CPU
  time of handshake steps to its ``compute`` entry (:meth:`SessionCore._computing`);
* a call ends once (:meth:`SessionCore._finish`), cleanly or with the error
  that ends it; the hangup the peer gets then carries a code, not the details
  (:meth:`SessionCore._abort`, :meth:`SessionCore._fail_handshake`).

Also here: the small helpers the layers share (base64 for signaling payloads,
:class:`PeerSDP`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection

from qcall.call.aiortc_compat import close_peer_connection
from qcall.call.crypto_worker import SigningWorker
from qcall.call.netem import Emulation
from qcall.call.prepared import PreparedConnections
from qcall.call.srtp import HybridSRTP, SRTPKeys
from qcall.call.status import CallOptions, CallState, CallStatus
from qcall.exceptions import (
    CallError,
    HandshakeError,
    IdentityError,
    QCallError,
    QKDError,
    SignalingError,
)
from qcall.handshake import (
    HandshakeFailed,
    HandshakeProtocol,
    OfferReceived,
    QKDKeysNeeded,
    ReplayCache,
)
from qcall.handshake.protocol import CheckPeer, State, wire_code
from qcall.otp.media import OTPMedia
from qcall.pqc import SigningKey
from qcall.qkd.client import KeySource
from qcall.signaling.client import SignalingClient
from qcall.signaling.messages import Offer

__all__ = ["PeerSDP", "SessionCore", "b64", "hangup_reason", "unb64"]

logger = logging.getLogger("qcall.call.session")  # one logger for the whole session

#: Handshake states whose secrets a call ended before the answer drops (the caller's
#: ML-KEM key, the callee's ML-KEM shared secret of an offer verified while ringing).
_UNANSWERED = frozenset({State.CALLER_EXPECT_ANSWER, State.CALLEE_EXPECT_ANSWER_SDP})


def hangup_reason(exc: QCallError) -> str:
    """The reason a hang-up names to the peer for ``exc``: its wire ``code``, else the
    handshake code of an identity or QKD error, else ``error`` (never details)."""
    reason = getattr(exc, "code", None)
    if isinstance(reason, str):
        return reason
    return wire_code(exc) if isinstance(exc, IdentityError | QKDError) else "error"


class PeerSDP:
    """The peer's SDP, sent ahead of (and not yet authenticated by) its OFFER/ANSWER."""

    def __init__(self, sdp: str) -> None:
        self.sdp = sdp


def b64(data: bytes) -> str:
    """``data`` in base64: how handshake messages ride in signaling payloads."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Decode a base64 payload from the peer.

    Raises:
        CallError: ``text`` is not base64.
    """
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise CallError("peer sent a payload that is not base64") from exc


class SessionCore:
    """The state of one call and the helpers every layer of a session uses.

    Create a :class:`~qcall.call.session.CallSession` (its arguments are
    documented there), not this class.
    """

    def __init__(
        self,
        *,
        signaling: SignalingClient,
        signing_key: SigningKey,
        name: str,
        call_id: str,
        peer: str,
        role: str,
        check_peer: CheckPeer,
        key_source: KeySource | None,
        options: CallOptions,
        source: MediaStreamTrack | None,
        on_track: Callable[[MediaStreamTrack], None] | None = None,
        replay_cache: ReplayCache | None = None,
        peer_trust: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signaling = signaling
        self.signing_key = signing_key
        self.name = name
        self.call_id = call_id
        self.peer = peer
        self.role = role
        self.check_peer = check_peer
        self.peer_trust = peer_trust
        self.key_source = key_source
        self.options = options
        self.source = source
        #: Where the received audio plays (set by whoever attaches one): its
        #: ``underruns`` go into :attr:`status`.
        self.sink: Any = None
        self.on_track = on_track
        self.clock = clock
        self.replay_cache = replay_cache
        self.status = CallStatus(call_id=call_id, role=role, peer=peer)
        self.pc: RTCPeerConnection | None = None
        self.hook: HybridSRTP | None = None
        self.hs: HandshakeProtocol | None = None
        self._channel: RTCDataChannel | None = None
        self._outbox: list[bytes] = []
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._keys0: asyncio.Future[SRTPKeys] = asyncio.get_running_loop().create_future()
        self._confirmed0: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer_changed = asyncio.Event()
        self._t0 = time.monotonic()
        self._exporter: bytes = b""
        self.qkd_kme_id = ""
        self._connected = asyncio.Event()
        self._connected_at: float | None = None
        self._offer_inputs: tuple[list[Any], str] = ([], options.policy)
        self._peer_sdp = ""  # the peer's SDP applied to our peer connection
        self._sdp_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._exporter_wanted = False  # the handshake is ready for K_dtls
        self._picked_up = asyncio.Event()  # caller: the callee accepted
        self._invite_sent = asyncio.Event()  # caller: our SDP left in the invite
        #: Caller: in-call handshake messages received before the answer was processed.
        self._held: list[bytes] | None = [] if role == "caller" else None
        self._ice_started = asyncio.Event()  # the peer's SDP is applied
        self._answer_sdp: asyncio.Future[PeerSDP] = asyncio.get_running_loop().create_future()
        self._invite_offer: tuple[str, float] | None = None  # callee: invite payload, when
        #: Callee: the signed offer verified while the phone rang (its events, when it came).
        self._ringing_offer: tuple[OfferReceived, list[QKDKeysNeeded], float] | None = None
        self._answering = False  # callee: answer() was called
        #: Callee (auto-answer): the signed offer that came before answer(), and when.
        self._pending_offer: tuple[Offer, float] | None = None
        #: Callee: answer() follows at once (the signed offer is verified after the accept).
        self.auto_answer = False
        #: Callee: why the signed offer that came while ringing was refused, if it was.
        self.refused: QCallError | None = None
        self._remote_track: MediaStreamTrack | None = None  # until the peer is verified
        self.emulation: Emulation | None = None
        #: The phone's ML-DSA signer process (:mod:`qcall.call.crypto_worker`), if any.
        self.signer: SigningWorker | None = None
        self.otp: OTPMedia | None = None  # one-time-pad media (docs/otp.md)
        #: The phone's prepared peer connections (:mod:`qcall.call.prepared`), or None.
        self.prepared: PreparedConnections | None = None

    @property
    def peer_sae(self) -> str:
        return self.peer  # SAE IDs default to user names (docs/calls.md)

    @property
    def own_sae(self) -> str:
        return self.options.sae_id or self.name

    # --- waiting for the peer -------------------------------------------------------------

    async def _until(self, waited: asyncio.Future[Any], timeout: float, what: str) -> None:
        """Wait for ``waited``; raise the call's error if it ends first, or on timeout."""
        try:
            done, _ = await asyncio.wait(
                {waited, self._ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waited.cancel()
        if self._ended.done():
            exc = self._ended.exception()
            raise exc or CallError("the call ended during setup")
        if not done:
            error = (
                HandshakeError(f"key confirmation did not arrive within {timeout:g} s")
                if what == "key confirmation"
                else CallError(f"{what} timed out after {timeout:g} s")
            )
            self._finish(error)
            raise error

    def _peer_identified(self, fingerprint: str) -> None:
        """The peer's transcript signature verified and ``check_peer`` accepted its key."""
        self.status.peer_fingerprint = fingerprint
        if self.peer_trust is not None:
            self.status.peer_trust = self.peer_trust(self.peer) or ""

    async def _wait_message(
        self, kind: type | tuple[type, ...], timeout: float, what: str
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallError(f"no {what} from {self.peer} within {timeout:g} s")
            getter = asyncio.ensure_future(self._inbox.get())
            try:
                done, _ = await asyncio.wait(
                    {getter, self._ended}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:
                getter.cancel()  # or it would take the next message
                raise
            if getter not in done:
                getter.cancel()
                if self._ended.done():
                    raise self._ended.exception() or CallError("the call ended")
                continue
            message = getter.result()
            if isinstance(message, kind):
                return message
            logger.debug("! ignoring %s while waiting for %s", type(message).__name__, what)

    # --- tasks and timings ----------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.debug("! call task failed: %r", exc)
            self._finish(exc if isinstance(exc, QCallError) else CallError(str(exc)))

    def _mark(self, what: str, at: float | None = None) -> None:
        """Record milestone ``what``: now, or at the ``time.monotonic()`` reading ``at``."""
        when = time.monotonic() if at is None else at
        self.status.timings_ms[what] = round((when - self._t0) * 1000, 2)

    def _elapsed_ms(self) -> float:
        return round((time.monotonic() - self._t0) * 1000, 2)

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        """Add the CPU time of a handshake step (ML-KEM, ML-DSA, HKDF) to ``compute``.

        The event loop's thread CPU time, not wall time: a step preempted by
        another process (two cores, four busy processes in the harness) would
        otherwise count the other process's work as this one's compute.
        """
        started = time.thread_time()
        try:
            yield
        finally:
            spent = (time.thread_time() - started) * 1000
            timings = self.status.timings_ms
            timings["compute"] = round(timings.get("compute", 0.0) + spent, 3)

    def note_keys(self, key_ids: list[str]) -> None:
        if key_ids:
            self.status.qkd_key_ids = key_ids
            self.status.all_key_ids.extend(key_ids)

    # --- endings --------------------------------------------------------------------------

    def end_with_error(self, error: QCallError, reason: str) -> None:
        """End the call with ``error``, telling the peer ``reason``."""
        self._finish(error)
        self._spawn(self._send_hangup(reason))

    def _failure(self, default: str) -> QCallError:
        if self.hs is not None and self.hs.error is not None:
            return self.hs.error
        return CallError(default)

    def _fail_handshake(self, event: HandshakeFailed) -> None:
        error = event.error
        if event.remote:
            error = type(error)(f"{self.peer} refused the call: {error}")
        self._finish(error)
        self._spawn(self._send_hangup(wire_code(error)))

    async def _send_hangup(self, reason: str) -> None:
        with contextlib.suppress(SignalingError):
            await self.signaling.hangup(self.call_id, reason)

    def _finish(self, error: BaseException | None) -> None:
        if self._ended.done():
            return
        if self.hs is not None and self.hs.state in _UNANSWERED:
            self.hs.discard()  # declined or ended before the answer: no secret kept
        if error is None:
            self.status.state = CallState.ENDED
            self._ended.set_result(None)
        else:
            self.status.state = CallState.FAILED
            self.status.error = str(error)
            # One line: the owner (the CLI, the phone) shows the whole error once.
            headline = str(error).splitlines()[0] if str(error) else type(error).__name__
            # A changed identity key is the owner's to show (once, whole): not a warning here.
            log = logger.info if isinstance(error, IdentityError) else logger.warning
            log("! call %s failed: %s", self.call_id, headline)
            self._ended.set_exception(error)
            self._ended.exception()  # mark retrieved: the owner may never await it
        for future in (self._keys0, self._confirmed0):
            if not future.done():
                future.set_exception(error or CallError("the call ended"))
                future.exception()

    async def _abort(self, exc: BaseException) -> None:
        if isinstance(exc, QCallError):
            self._finish(exc)
            await self._send_hangup(hangup_reason(exc))
        else:
            self._finish(CallError(f"call aborted ({type(exc).__name__})"))
        await self._close()

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.pc is not None:
            pc, self.pc = self.pc, None
            if self.hook is not None:
                self.status.decrypt_failures = self.hook.stats.decrypt_failures
            if self.otp is not None:
                self.status.otp_budget = self.otp.describe()
                self.otp.close()
            await close_peer_connection(pc)
        if self.source is not None:
            # A microphone would otherwise keep capturing (and its device stay
            # open) after the call; every call gets a fresh source (Phone.make_source).
            dropped = getattr(self.source, "dropped_blocks", None)
            if isinstance(dropped, int):
                self.status.mic_dropped_blocks = dropped
            self.source.stop()
