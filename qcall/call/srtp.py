"""The hybrid SRTP hook: the one place where qcall's keys enter aiortc's media path.

aiortc (checked on the versions in :data:`AIORTC_CHECKED_VERSIONS`) creates its
SRTP sessions in exactly one method, ``RTCDtlsTransport._setup_srtp``, right
after the DTLS handshake and the fingerprint check: it exports RFC 5764 §4.2
``EXTRACTOR-dtls_srtp`` keying material and builds one inbound and one outbound
``pylibsrtp.Session``. The SRTP data path then only ever touches
``_tx_srtp.protect``/``protect_rtcp`` (in ``_send_rtp``) and
``_rx_srtp.unprotect``/``unprotect_rtcp`` (in ``_recv_next``).

:func:`install_srtp_hook` replaces, on one transport *instance* (never on the
class, so a ``plain`` baseline call in the same process is untouched):

* ``_setup_srtp``: exports the DTLS secret the key schedule takes as ``K_dtls``
  (RFC 5705 label :data:`EXPORTER_LABEL`, 2·(key+salt) bytes of the profile DTLS
  negotiated: docs/key-schedule.md), hands it to the caller's ``key_provider`` and
  puts qcall session objects in ``_rx_srtp``/``_tx_srtp``. The DTLS-SRTP keys
  are never derived, so media can never flow under DTLS-only keys.
* ``_send_rtp``: drops outbound RTP/RTCP until the hybrid keys are installed
  (raising would end aiortc's sender loop for good).

Inbound SRTP that arrives before the keys is queued (bounded) and replayed in
order once they are installed. If the provider raises or times out, the hook
fails closed: the transport goes to ``failed`` (provider raised synchronously)
or is stopped, which sends a DTLS close_notify and closes the peer connection.

Rekeying (see docs/srtp-hook.md for the message exchange the call layer drives):
a receiver keeps up to three generations of inbound sessions and tries the one
that last authenticated a packet first, then the others, newest first; AEAD tags
(or HMAC-SHA1-80) make a wrong-key trial fail cleanly, and libsrtp changes no
replay or rollover state for a packet that does not authenticate. A sender
switches its outbound session only once the peer has installed the new inbound
key, so no packet is ever sent under a key its receiver lacks.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, cast

import pylibsrtp
from aiortc import RTCPeerConnection, clock as aiortc_clock
from aiortc.rtcdtlstransport import RTCDtlsTransport, State as DTLSState
from pylibsrtp import Session

from qcall.call.aiortc_compat import require_aiortc
from qcall.call.srtpcore import (
    DEFAULT_PROFILE,
    MAX_GENERATIONS,
    WRAP_GUARD,
    InboundKeyring,
    OutboundSession,
    SRTPKeys,
    SRTPProfile,
    SRTPStats,
    short_hash,
    srtp_session,
)
from qcall.exceptions import CallError, QCallError

__all__ = [
    "AIORTC_CHECKED_VERSIONS",
    "AIORTC_SUPPORTED",
    "DEFAULT_PROFILE",
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "MAX_GENERATIONS",
    "WRAP_GUARD",
    "HookState",
    "HybridSRTP",
    "InboundKeyring",
    "KeyProvider",
    "OutboundSession",
    "SRTPKeys",
    "SRTPProfile",
    "SRTPStats",
    "check_aiortc_version",
    "dtls_srtp_keys",
    "export_exporter_secret",
    "get_srtp_hook",
    "install_srtp_hook",
    "negotiated_profile",
    "swap_srtp_keys",
]

logger = logging.getLogger(__name__)

#: aiortc versions whose ``rtcdtlstransport.py`` was read and diffed for this hook
#: (``_setup_srtp`` appeared in 1.13; 1.10-1.12 set SRTP up inline in ``start``).
AIORTC_CHECKED_VERSIONS: Final = ("1.13.0", "1.14.0", "1.15.0", "1.16.0")

#: Supported aiortc range, ``(lowest, first unsupported)``: ``>=1.13,<1.17``.
AIORTC_SUPPORTED: Final = ((1, 13), (1, 17))

#: RFC 5705 label of ``K_dtls`` (docs/key-schedule.md): RFC 5764 §4.2's own label, so
#: the exporter is the very 2·(key+salt) bytes aiortc would have cut its SRTP keys from.
EXPORTER_LABEL: Final = b"EXTRACTOR-dtls_srtp"

#: ``K_dtls`` length for the profile aiortc's DTLS negotiates first (AEAD_AES_256_GCM).
EXPORTER_LENGTH: Final = 2 * (32 + 12)

#: The DTLS role a transport took ("client" or "server", RFC 5764 §4.1).
DTLSRole = Literal["client", "server"]

_HOOK_ATTRIBUTE: Final = "_qcall_srtp_hook"


class _InboundAdapter:
    """What aiortc sees as ``_rx_srtp``: queues while keys are pending, then decrypts."""

    def __init__(self, hook: HybridSRTP) -> None:
        self._hook = hook

    def unprotect(self, data: bytes) -> bytes:
        return self._hook._unprotect(data, rtcp=False)

    def unprotect_rtcp(self, data: bytes) -> bytes:
        return self._hook._unprotect(data, rtcp=True)


# --- the aiortc shell --------------------------------------------------------------


class HookState(enum.IntEnum):
    """Life cycle of a :class:`HybridSRTP` hook."""

    WAITING_FOR_DTLS = 0
    WAITING_FOR_KEYS = 1
    ACTIVE = 2
    FAILED = 3
    CLOSED = 4


#: ``key_provider(exporter_secret, role)`` returns keys, or an awaitable of keys.
KeyProvider = Callable[[bytes, DTLSRole], SRTPKeys | Awaitable[SRTPKeys]]


class HybridSRTP:
    """Hybrid SRTP keys on one aiortc ``RTCDtlsTransport``; see :func:`install_srtp_hook`.

    Attributes:
        transport: the hooked ``RTCDtlsTransport``.
        state: a :class:`HookState`.
        stats: the :class:`SRTPStats` counters.
        error: the exception that failed the hook, if any.
        role: the DTLS role, once DTLS completed.
    """

    def __init__(
        self,
        transport: RTCDtlsTransport,
        key_provider: KeyProvider,
        *,
        timeout: float | None = 10.0,
        grace: float = 2.0,
        auto_activate: bool = True,
        max_pending: int = 256,
        clock: Callable[[], float] = time.monotonic,
        exporter_label: bytes = EXPORTER_LABEL,
        exporter_length: int | None = None,
    ) -> None:
        self.transport = transport
        self.state = HookState.WAITING_FOR_DTLS
        self.stats = SRTPStats()
        self.error: BaseException | None = None
        self.role: DTLSRole | None = None
        #: ``clock()`` reading when media was enabled under the hybrid keys, if it was.
        self.active_at: float | None = None
        self._key_provider = key_provider
        self._timeout = timeout
        self._auto_activate = auto_activate
        self._clock = clock
        self._exporter_secret: bytes | None = None
        self._exporter = (exporter_label, exporter_length)
        self._keyring = InboundKeyring(self.stats, grace=grace)
        self._outbound = OutboundSession(self.stats)
        self._activated = -1
        self._pending_outbound: dict[int, tuple[Session, str]] = {}
        self._pending_rx: collections.deque[tuple[bytes, bool, int]] = collections.deque()
        self._max_pending = max_pending
        self._task: asyncio.Future[None] | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise CallError("install the SRTP hook from the asyncio event loop") from None
        self._ready: asyncio.Future[None] = loop.create_future()
        self._original_send_rtp = transport._send_rtp
        # The one patch point, per instance (see install_srtp_hook).
        transport._setup_srtp = self._setup_srtp  # type: ignore[method-assign]
        transport._send_rtp = self._send_rtp  # type: ignore[method-assign]
        transport.on("statechange", self._on_transport_state)

    def __repr__(self) -> str:
        return (
            f"<HybridSRTP {self.state.name} role={self.role} tx_generation="
            f"{self.generation} rx_generations={self.inbound_generations}>"
        )

    # -- public API -------------------------------------------------------------------

    @property
    def exporter_secret(self) -> bytes:
        """The RFC 5705 secret given to the key provider (``K_dtls``, :data:`EXPORTER_LABEL`).

        Raises:
            CallError: DTLS has not completed yet.
        """
        if self._exporter_secret is None:
            raise CallError("the DTLS exporter secret exists only once DTLS completes")
        return self._exporter_secret

    @property
    def generation(self) -> int:
        """Generation of the outbound key in use (0 = initial keys, -1 = none yet)."""
        return self._outbound.generation

    @property
    def inbound_generations(self) -> tuple[int, ...]:
        """Generations of the inbound keys currently installed, oldest first."""
        return self._keyring.generations

    async def wait_ready(self) -> None:
        """Wait until the hybrid keys are installed and media flows.

        Raises:
            CallError: the provider failed, timed out, or the transport closed first.
        """
        await asyncio.shield(self._ready)

    def prepare_rekey(self, keys: SRTPKeys, *, generation: int | None = None) -> int:
        """Rekey step 1: install the next inbound key; keep the outbound one ready.

        After calling this method: tell the peer (REKEY / REKEY-ACK, docs/srtp-hook.md),
        then call :meth:`activate_outbound` once the peer has prepared too.

        Args:
            keys: the new generation's keys, this side's view.
            generation: its number; by default one more than the newest installed.

        Returns:
            The generation number.

        Raises:
            CallError: the hook is not active, or ``generation`` is not newer.
        """
        if self.state is not HookState.ACTIVE:
            raise CallError(f"cannot rekey: hybrid SRTP is {self.state.name}")
        if generation is None:
            generation = max(self._keyring.generations, default=0) + 1
        self._keyring.install(generation, keys.remote_master, keys.profile)
        outbound = srtp_session(keys.local_master, keys.profile, inbound=False)
        self._pending_outbound[generation] = (outbound, short_hash(keys.local_master))
        self.stats.rekeys_prepared += 1
        logger.debug("= generation %d prepared: %r (inbound installed)", generation, keys)
        return generation

    def activate_outbound(self, generation: int) -> None:
        """Rekey step 2: protect from now on with the outbound key of ``generation``.

        Call it only once the peer has prepared ``generation`` (its REKEY-ACK, or the
        REKEY message that asked for it). Calling it again is harmless.

        Raises:
            CallError: ``generation`` was not prepared.
        """
        if generation == self._activated:
            return
        try:
            session, fingerprint = self._pending_outbound.pop(generation)
        except KeyError:
            raise CallError(f"generation: {generation} was not prepared") from None
        for older in [g for g in self._pending_outbound if g < generation]:
            del self._pending_outbound[older]
        self._outbound.install(generation, session)
        self._activated = generation
        self.stats.rekeys_activated += 1
        logger.debug("= outbound switching to generation %d #%s", generation, fingerprint)

    async def swap_keys(
        self,
        keys: SRTPKeys,
        *,
        peer_ready: Awaitable[object] | None,
        generation: int | None = None,
    ) -> int:
        """Prepare ``keys``, wait for ``peer_ready``, then switch the outbound key.

        Args:
            keys: the new generation's keys, this side's view.
            peer_ready: resolves when the peer has prepared this generation (its
                REKEY-ACK); ``None`` when the caller knows it already has.
            generation: as for :meth:`prepare_rekey`.

        Returns:
            The generation number.
        """
        generation = self.prepare_rekey(keys, generation=generation)
        if peer_ready is not None:
            await peer_ready
        if self.state is HookState.ACTIVE:
            self.activate_outbound(generation)
        return generation

    # -- aiortc hooks ------------------------------------------------------------------

    def _setup_srtp(self) -> None:
        """Replacement of ``RTCDtlsTransport._setup_srtp``: export, then ask the provider."""
        transport = self.transport
        try:
            label, length = self._exporter
            secret = export_exporter_secret(transport, label=label, length=length)
        except CallError as exc:
            self._fail_now(exc)
            return
        self._exporter_secret = secret
        self.role = cast(DTLSRole, transport._role)
        transport._rx_srtp = _InboundAdapter(self)  # type: ignore[assignment]
        transport._tx_srtp = self._outbound  # type: ignore[assignment]
        self.state = HookState.WAITING_FOR_KEYS
        logger.debug("= DTLS done (%s), exporter #%s", self.role, short_hash(secret))
        try:
            result = self._key_provider(secret, self.role)
        except Exception as exc:
            self._fail_now(exc)
            return
        if inspect.isawaitable(result):
            self._task = asyncio.ensure_future(self._await_keys(result))
            return
        try:
            self._install_initial(result)
        except CallError as exc:
            self._fail_now(exc)
            return
        self._set_active()

    async def _await_keys(self, result: Awaitable[SRTPKeys]) -> None:
        try:
            keys = await asyncio.wait_for(result, self._timeout)
            self._install_initial(keys)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail_later(exc)
            return
        # Replay what arrived early, in order; packets arriving meanwhile join the queue.
        while self._pending_rx and self.state is HookState.WAITING_FOR_KEYS:
            data, rtcp, arrival_ms = self._pending_rx.popleft()
            await self._deliver(data, rtcp, arrival_ms)
        if self.state is HookState.WAITING_FOR_KEYS:
            self._set_active()

    def _install_initial(self, keys: object) -> None:
        if not isinstance(keys, SRTPKeys):
            raise CallError(f"key provider returned {type(keys).__name__}, not SRTPKeys")
        if self.state is not HookState.WAITING_FOR_KEYS:
            raise CallError(f"hybrid SRTP is {self.state.name}")
        self._keyring.install(0, keys.remote_master, keys.profile)
        self._outbound.install(0, srtp_session(keys.local_master, keys.profile, inbound=False))
        self._activated = 0
        logger.debug("= hybrid SRTP keys installed: %r", keys)

    def _set_active(self) -> None:
        self.state = HookState.ACTIVE
        self.active_at = self._clock()
        self._ready.set_result(None)
        logger.debug("= media enabled under hybrid SRTP keys")

    async def _deliver(self, data: bytes, rtcp: bool, arrival_ms: int) -> None:
        try:
            plain, _ = self._keyring._unprotect(data, self._clock(), rtcp=rtcp)
        except pylibsrtp.Error as exc:
            logger.debug("! queued SRTP packet dropped: %s", exc)
            return
        if rtcp:
            await self.transport._handle_rtcp_data(plain)
        else:
            await self.transport._handle_rtp_data(plain, arrival_time_ms=arrival_ms)

    def _unprotect(self, data: bytes, *, rtcp: bool) -> bytes:
        if self.state is not HookState.ACTIVE:
            if self.state is HookState.WAITING_FOR_KEYS and len(self._pending_rx) < (
                self._max_pending
            ):
                self._pending_rx.append((data, rtcp, aiortc_clock.current_ms()))
                self.stats.rx_queued_pending += 1
                raise pylibsrtp.Error("hybrid keys pending: packet queued")
            self.stats.rx_dropped_pending += 1
            raise pylibsrtp.Error("no hybrid keys: packet dropped")
        plain, generation = self._keyring._unprotect(data, self._clock(), rtcp=rtcp)
        if self._auto_activate and generation in self._pending_outbound:
            # The peer sends under `generation` only after preparing it, which
            # installed its inbound key of `generation`: switching is safe.
            self.activate_outbound(generation)
        return plain

    async def _send_rtp(self, data: bytes) -> None:
        """Replacement of ``RTCDtlsTransport._send_rtp``: no keys, no media."""
        if self.state is HookState.ACTIVE or self.transport.state != "connected":
            await self._original_send_rtp(data)
        else:
            self.stats.tx_dropped_pending += 1

    # -- failure and teardown ------------------------------------------------------------

    def _fail_now(self, exc: BaseException) -> None:
        """Fail inside ``start()``: aiortc sees FAILED and starts neither pump nor media."""
        self._record_failure(exc)
        self.transport._set_state(DTLSState.FAILED)

    async def _fail_later(self, exc: BaseException) -> None:
        """Fail after ``start()``: stop the transport (close_notify to the peer)."""
        self._record_failure(exc)
        await self.transport.stop()

    def _record_failure(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.TimeoutError):
            message = f"hybrid SRTP keys not ready within {self._timeout} s"
        elif isinstance(exc, QCallError):  # qcall messages never hold key bytes
            message = f"hybrid SRTP key provider failed: {exc}"
        else:
            message = f"hybrid SRTP key provider failed: {type(exc).__name__}"
        logger.warning("! %s; closing the DTLS transport, no media", message)
        self.error = exc
        self._teardown(HookState.FAILED, CallError(message))

    def _teardown(self, state: HookState, error: CallError) -> None:
        self.state = state
        self._exporter_secret = None
        self._keyring.clear()
        self._pending_outbound.clear()
        self._pending_rx.clear()
        self._outbound.clear()
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: no "never retrieved" warning
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def _on_transport_state(self) -> None:
        if self.transport.state in ("closed", "failed") and self.state < HookState.FAILED:
            self._teardown(HookState.CLOSED, CallError("the DTLS transport closed"))


# --- public functions -----------------------------------------------------------------


def check_aiortc_version(version: str | None = None) -> None:
    """Refuse aiortc versions this hook was not checked against.

    Args:
        version: defaults to the installed ``aiortc.__version__``.

    Raises:
        CallError: the version is outside :data:`AIORTC_SUPPORTED`.
    """
    require_aiortc(
        AIORTC_SUPPORTED,
        "SRTP hook",
        f"checked on {', '.join(AIORTC_CHECKED_VERSIONS)}: install a supported aiortc",
        version,
    )


def _dtls_transports(target: Any) -> list[Any]:
    if isinstance(target, RTCDtlsTransport):
        return [target]
    if isinstance(target, RTCPeerConnection):
        found: dict[int, Any] = {}
        for transceiver in target.getTransceivers():
            found[id(transceiver.receiver.transport)] = transceiver.receiver.transport
        sctp = target.sctp
        if sctp is not None:
            found[id(sctp.transport)] = sctp.transport
        return list(found.values())
    raise CallError(f"target: expected RTCPeerConnection or RTCDtlsTransport, not {target!r}")


def install_srtp_hook(
    target: RTCPeerConnection | RTCDtlsTransport,
    key_provider: KeyProvider,
    *,
    timeout: float | None = 10.0,
    grace: float = 2.0,
    auto_activate: bool = True,
    exporter_label: bytes = EXPORTER_LABEL,
    exporter_length: int | None = None,
) -> HybridSRTP:
    """Make aiortc key SRTP with the caller's keys instead of DTLS-SRTP (RFC 5764).

    Call it on a peer connection once its DTLS transport exists and before DTLS
    completes: the caller after ``setRemoteDescription(answer)`` (or earlier,
    after ``addTrack``), the callee after ``setRemoteDescription(offer)``. When
    DTLS completes, ``key_provider(exporter_secret, role)`` is called with the
    RFC 5705 secret ``K_dtls`` (:func:`export_exporter_secret`: equal on both
    sides) and the DTLS role; it returns :class:`SRTPKeys` or an awaitable of
    them. Until they are installed no media is sent and inbound SRTP is queued.

    Why this is safe: the hook replaces two methods on this one instance; aiortc
    calls ``_setup_srtp`` exactly once, from ``start()``, and all SRTP goes through
    ``_tx_srtp``/``_rx_srtp`` (checked on :data:`AIORTC_CHECKED_VERSIONS`; other
    versions are refused). Fail closed: a provider that raises synchronously puts
    the transport in ``failed``; one that raises or times out later stops it.

    Args:
        target: an ``RTCPeerConnection`` with exactly one DTLS transport (BUNDLE),
            or an ``RTCDtlsTransport``.
        key_provider: gives the initial keys (generation 0).
        timeout: seconds the provider may take; ``None`` waits forever.
        grace: seconds an old inbound key stays after its successor's first packet.
        auto_activate: switch the outbound key as soon as a packet from the peer
            authenticates under a prepared generation (proof it prepared it too).
        exporter_label: RFC 5705 label of the secret given to ``key_provider``
            (a private one must start with ``EXPERIMENTAL``, RFC 5705 §4).
        exporter_length: its length in bytes; ``None``: 2·(key+salt) of the SRTP
            profile DTLS negotiated (RFC 5764 §4.2).

    Returns:
        The :class:`HybridSRTP` handle (also :func:`get_srtp_hook` of the transport).

    Raises:
        CallError: unsupported aiortc, no or several DTLS transports, a transport
            whose SRTP is already set up, or one hooked already.
    """
    check_aiortc_version()
    transports = _dtls_transports(target)
    if len(transports) != 1:
        raise CallError(
            f"target: has {len(transports)} DTLS transports; install the hook once "
            "transceivers exist and BUNDLE left one (or hook each RTCDtlsTransport)"
        )
    transport = transports[0]
    for name in ("_setup_srtp", "_send_rtp", "_rx_srtp", "_tx_srtp", "_ssl", "_role"):
        if not hasattr(transport, name):
            raise CallError(f"aiortc's RTCDtlsTransport lacks {name}: unsupported version")
    if getattr(transport, _HOOK_ATTRIBUTE, None) is not None:
        raise CallError("target: this DTLS transport already has a hybrid SRTP hook")
    if transport._rx_srtp is not None or transport.state not in ("new", "connecting"):
        raise CallError(
            f"target: DTLS transport is {transport.state}: too late to replace its SRTP keys"
        )
    hook = HybridSRTP(
        transport,
        key_provider,
        timeout=timeout,
        grace=grace,
        auto_activate=auto_activate,
        exporter_label=exporter_label,
        exporter_length=exporter_length,
    )
    setattr(transport, _HOOK_ATTRIBUTE, hook)
    return hook


def get_srtp_hook(transport: RTCDtlsTransport) -> HybridSRTP:
    """Return the :class:`HybridSRTP` installed on ``transport``.

    Raises:
        CallError: none is installed.
    """
    hook = getattr(transport, _HOOK_ATTRIBUTE, None)
    if not isinstance(hook, HybridSRTP):
        raise CallError("this DTLS transport has no hybrid SRTP hook")
    return hook


async def swap_srtp_keys(
    transport: RTCDtlsTransport,
    new_keys: SRTPKeys,
    *,
    peer_ready: Awaitable[object] | None,
    generation: int | None = None,
) -> int:
    """Rekey ``transport`` without losing a packet: :meth:`HybridSRTP.swap_keys`."""
    return await get_srtp_hook(transport).swap_keys(
        new_keys, peer_ready=peer_ready, generation=generation
    )


def export_exporter_secret(
    transport: RTCDtlsTransport,
    *,
    label: bytes = EXPORTER_LABEL,
    length: int | None = None,
) -> bytes:
    """Export keying material from a completed DTLS handshake (RFC 5705 §4, no context).

    Both peers obtain the same bytes; they are bound to this DTLS session and so
    to the certificate fingerprints signed into the qcall transcript. With the
    defaults this is ``K_dtls`` of docs/key-schedule.md: the RFC 5764 §4.2 keying
    material, 2·(key+salt) bytes of the negotiated profile (88 for AES-256-GCM).

    Args:
        transport: an ``RTCDtlsTransport`` whose handshake has completed.
        label: the RFC 5705 label.
        length: bytes to export; ``None`` for the RFC 5764 length described above.

    Raises:
        CallError: DTLS has not completed, or negotiated no SRTP profile qcall knows.
    """
    ssl = getattr(transport, "_ssl", None)
    if ssl is None or not getattr(transport, "encrypted", False):
        raise CallError("DTLS has not completed: no keying material to export")
    if length is None:
        profile = negotiated_profile(transport)
        length = 2 * (profile.key_length + profile.salt_length)
    try:
        return bytes(ssl.export_keying_material(label, length))
    except Exception as exc:  # pyOpenSSL raises its own SSL.Error
        raise CallError(f"DTLS keying material export failed: {type(exc).__name__}") from exc


def negotiated_profile(transport: RTCDtlsTransport) -> SRTPProfile:
    """The SRTP profile the DTLS use_srtp extension negotiated (RFC 5764 §4.1.2).

    Raises:
        CallError: DTLS has not completed or negotiated no profile qcall knows.
    """
    ssl = getattr(transport, "_ssl", None)
    name = ssl.get_selected_srtp_profile() if ssl is not None else b""
    try:
        return SRTPProfile.from_name(bytes(name or b"").decode("ascii", "replace"))
    except ValueError as exc:
        raise CallError(f"DTLS negotiated no usable SRTP profile ({exc})") from None


def dtls_srtp_keys(transport: RTCDtlsTransport) -> SRTPKeys:
    """The stock DTLS-SRTP keys aiortc would have used (RFC 5764 §4.2).

    For the ``plain`` baseline and for tests that show hybrid packets do *not*
    decrypt under them. Layout: client key ‖ server key ‖ client salt ‖ server salt.

    Raises:
        CallError: DTLS has not completed or negotiated no profile qcall knows.
    """
    profile = negotiated_profile(transport)
    k, s = profile.key_length, profile.salt_length
    view = export_exporter_secret(transport, label=b"EXTRACTOR-dtls_srtp", length=2 * (k + s))
    client = (view[:k], view[2 * k : 2 * k + s])
    server = (view[k : 2 * k], view[2 * k + s :])
    local, remote = (client, server) if transport._role == "client" else (server, client)
    return SRTPKeys(profile, local[0], local[1], remote[0], remote[1])
