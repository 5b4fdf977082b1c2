"""Fast call set-up: the one place where qcall changes aioice's ICE and aiortc's DTLS timing.

Stock aiortc/aioice (pinned in :data:`AIORTC_PINNED` and :data:`AIOICE_PINNED`) waste
most of a call's set-up on timers, not on the network (docs/performance.md, "Set-up
speed"):

* **ICE completion waits for a pacing tick.** ``aioice.Connection.connect`` starts
  one check per 20 ms tick (RFC 8445 §6.1.4.2's Ta) and only looks at the check
  list's result after ``asyncio.sleep(0.02)``: a check that succeeds in 0.5 ms
  on loopback is reported ≈ 20 ms later, and DTLS starts only then.
  :func:`_fast_connect` runs the same pacing in a side task and returns the moment
  the check list completes.
* **A lost connectivity check waits 500 ms** (``aioice.stun.RETRY_RTO``).
  Connectivity checks here retransmit after the path's RTO (:class:`RttEstimator`,
  RFC 6298 from the checks' own round trips; :data:`CHECK_INITIAL_RTO` before any
  sample),
  doubling each time, with aioice's retry count. Consent checks
  (``retransmissions=0``) keep aioice's timer.
* **A lost DTLS flight waits 1 s** (OpenSSL's initial DTLS timer; pyOpenSSL exposes
  neither ``DTLS_set_timer_cb`` nor a way to shorten it). A Python timer
  (:class:`FlightTimer`, Sans-I/O) resends the last flight's datagrams byte for byte
  after 2 × the path's smoothed RTT, as WebRTC's DTLS (≥ :data:`DTLS_MIN_RTO`,
  ≈ 50 ms before the path's RTT is known; :meth:`RttEstimator.flight_rto`),
  doubling each time, until the peer's next flight arrives. A byte-identical copy
  of a record the peer already has fails its DTLS replay check (RFC 6347 §4.1.2.6)
  and is dropped, so a spurious resend costs one datagram. A copy cannot make the
  peer retransmit its own flight (OpenSSL drops it before the handshake layer), so
  the side that sends the *final* flight resends it when the peer's handshake
  records keep arriving after the handshake completed (the peer did not get it).
  The side still waiting for that final flight resends its own flight at once when
  application data arrives instead (the peer's first SCTP packet: the peer is done,
  so its final flight was lost); such data is not the peer's next flight and leaves
  the timer running (docs/performance.md, "Failed calls on lossy").
  OpenSSL's own 1 s timer still runs underneath, as a last resort.
* **A lost SCTP packet waits ≥ 1 s** (RFC 4960's RTO.Min, 3 s RTO.Initial). The
  control channel (rekeys) gets :data:`SCTP_MIN_RTO` and an initial RTO from the
  path's RTT once DTLS is up (:meth:`FastTransport.path_known`).

* **The DTLS context was built on the set-up path.** ``RTCDtlsTransport.start``
  builds its ``SSL.Context`` (``RTCCertificate._create_ssl_context``: the
  certificate, the key, the ciphers, the SRTP profiles; ≈ 0.2 ms) when DTLS starts,
  after the invite or the answer. :func:`prebuild_dtls_contexts` (separate from
  :func:`install_fast_transport`; :mod:`qcall.call.prepared` calls it) builds it
  ahead, once per peer connection, with the same call; the first ``start`` takes it.

* **DTLS waited for ICE to complete on both sides** (one path round trip on each
  side's own check). With the caller's SDP in the invite, the callee (controlled,
  DTLS client: aiortc answers ``a=setup:active``) starts DTLS on the pair of its first
  check, so its ClientHello follows that check; the caller (controlling, DTLS server)
  starts DTLS on the pair of the callee's first *authenticated* check (RFC 8445
  §7.3: MESSAGE-INTEGRITY with the caller's ICE password, which only the holder of
  the invite's SDP knows) and answers the ClientHello already queued, while its
  own checks (aggressive nomination) finish in the background. ICE still completes
  as before and replaces the tentative pair with the nominated one (a flight lost on
  a wrong tentative pair is resent by the flight timer); an ICE failure afterwards
  closes the connection. The DTLS handshake itself authenticates the peer
  (the fingerprints of the SDP, which the signed handshake checks).

:func:`install_fast_transport` applies the other five to one ``RTCPeerConnection``
*instance* (never to the classes, so a stock ``plain`` call in the same process is
untouched). It refuses versions other than the pinned ones: the private members it
touches (``Connection._check_periodic``, ``_check_list_state``, ``_check_list_done``,
``_query_consent_task``, ``_nominated``, ``_check_list``, ``check_incoming``,
``StunProtocol.transactions``, the name-mangled
``Transaction.__timeout_delay``, ``RTCDtlsTransport._write_ssl`` and
``RTCIceTransport._recv``) were read on those versions, and
``tests/test_fast_transport.py`` fails when any of them changes (:data:`PINNED_SOURCES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aioice
from aioice import stun
from aioice.ice import ICE_COMPLETED, ICE_FAILED, CandidatePair, Connection, StunProtocol
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate, RTCDtlsTransport
from OpenSSL import SSL

from qcall.call.aiortc_compat import require_aiortc, require_version

__all__ = [
    "AIOICE_PINNED",
    "AIORTC_PINNED",
    "CHECK_INITIAL_RTO",
    "DTLS_MIN_RTO",
    "INITIAL_RTO",
    "PINNED_SOURCES",
    "SCTP_INITIAL_RTO",
    "SCTP_MIN_RTO",
    "FlightTimer",
    "RttEstimator",
    "changed_internals",
    "check_pinned_versions",
    "install_fast_transport",
    "prebuild_dtls_contexts",
]

logger = logging.getLogger(__name__)

#: aiortc releases this module was read against: ``>=1.16,<1.17``.
AIORTC_PINNED: Final = ((1, 16), (1, 17))
#: aioice releases this module was read against: ``>=0.13,<0.14``.
AIOICE_PINNED: Final = ((0, 13), (0, 14))

#: RTO (s) before the path's RTT is known (browsers start DTLS near 50 ms).
INITIAL_RTO: Final = 0.05
#: Bounds (s) of any RTO computed from samples.
MIN_RTO: Final = 0.03
MAX_RTO: Final = 1.0
#: First retransmission (s) of a connectivity check before the path's RTT is known:
#: above most paths' RTT, so that the first checks give samples (Karn's rule).
CHECK_INITIAL_RTO: Final = 0.1
#: Lowest DTLS retransmission timeout (s): a flight is also a little CPU work.
DTLS_MIN_RTO: Final = 0.05
#: SCTP RTO bounds (s) instead of RFC 4960's 1 s minimum and 3 s initial value: the
#: control channel's rekey messages ride SCTP, and a lost one should cost about an RTO
#: of the path. The initial value applies until the association measured its own RTT;
#: once DTLS is up it is ``3 × srtt`` of the path, at least the minimum.
SCTP_MIN_RTO: Final = 0.2
SCTP_INITIAL_RTO: Final = 0.5
SCTP_MAX_RTO: Final = 60.0  # as aiortc (RFC 4960 §15)
#: ICE pacing (Ta, RFC 8445 §6.1.4.2), as aioice: one new check every 20 ms.
TA: Final = 0.02

_INSTALLED: Final = "_qcall_fast_transport"

#: SHA-256 (first 16 hex digits) of the source of every aioice/aiortc function this
#: module replaces, copies or relies on, as read on aiortc 1.16.0 and aioice 0.13.0;
#: :func:`changed_internals` names those that differ (tests/test_fast_transport.py).
PINNED_SOURCES: Final = {
    "aioice.ice.Connection.connect": "da51be46190141ee",
    "aioice.ice.Connection._check_periodic": "ce421a512904f981",
    "aioice.ice.Connection.gather_candidates": "d33db28d4d1e49ff",
    # DTLS on a tentative pair: checks authenticated before check_incoming, data sent
    # and received on _nominated, completion as soon as _nominated is full, consent.
    "aioice.ice.Connection.request_received": "dcdc9a3862c1a0b4",
    "aioice.ice.Connection.check_incoming": "cb3e32bd47e5fa82",
    "aioice.ice.Connection._check_list_maybe_complete": "b190e289adad3622",
    "aioice.ice.Connection.sendto": "bf162ec03bdce2cc",
    "aioice.ice.Connection.recvfrom": "676acc01e4a9a9da",
    "aioice.ice.Connection.query_consent": "fe49173a650a378a",
    "aioice.ice.StunProtocol.request": "97991c38f65ea939",
    "aioice.stun.Transaction.__init__": "be1622dc921927d6",
    "aioice.stun.Transaction._Transaction__retry": "493a0eca2ecdf19b",
    "aiortc.rtcdtlstransport.RTCDtlsTransport._write_ssl": "6573c0237063bdf0",
    "aiortc.rtcdtlstransport.RTCDtlsTransport._recv_next": "998076720c05aa13",
    "aiortc.rtcdtlstransport.RTCDtlsTransport._do_handshake": "0af5299c33352e6e",
    "aiortc.rtcicetransport.RTCIceTransport.__init__": "b11403aba1c3a32b",
    "aiortc.rtcpeerconnection.RTCPeerConnection._RTCPeerConnection__createDtlsTransport": (
        "ad91de689a334df2"
    ),
    "aiortc.rtcpeerconnection.RTCPeerConnection._RTCPeerConnection__createSctpTransport": (
        "f1155cfa69ec6e34"
    ),
    "aiortc.rtcsctptransport.RTCSctpTransport.__init__": "294b0e5108438509",
    "aiortc.rtcsctptransport.RTCSctpTransport._update_rto": "a1e7afb18886a101",
    # The DTLS context made ahead (prebuild_dtls_contexts): what start() builds, with
    # what, from which per-transport certificate attribute.
    "aiortc.rtcdtlstransport.RTCCertificate.__init__": "6b93f0a813ce17e5",
    "aiortc.rtcdtlstransport.RTCCertificate._create_ssl_context": "aac625bdc264f0a6",
    "aiortc.rtcdtlstransport.RTCDtlsTransport.__init__": "3bffce6c2b56b5dc",
    "aiortc.rtcdtlstransport.RTCDtlsTransport.start": "3b3522667fe0a3da",
    "aiortc.rtcdtlstransport.RTCDtlsTransport.getLocalParameters": "63b60c064e9ad56d",
    "aiortc.rtcpeerconnection.RTCPeerConnection.__init__": "f5388aea637f0f21",
}


def changed_internals() -> list[str]:
    """The names in :data:`PINNED_SOURCES` whose installed source differs (or is gone)."""
    changed = []
    for name, digest in PINNED_SOURCES.items():
        module_name, _, rest = name.partition(".")
        parts = rest.split(".")
        obj: Any = importlib.import_module(f"{module_name}.{parts[0]}")
        try:
            for part in parts[1:]:
                obj = getattr(obj, part)
            source = inspect.getsource(obj)
        except (AttributeError, OSError, TypeError):
            changed.append(name)
            continue
        if hashlib.sha256(source.encode()).hexdigest()[:16] != digest:
            changed.append(name)
    return changed


def check_pinned_versions(
    aiortc_version: str | None = None, aioice_version: str | None = None
) -> None:
    """Raise :class:`CallError` unless aiortc and aioice are the pinned releases."""
    hint = "use CallOptions(fast_transport=False)"
    require_aiortc(AIORTC_PINNED, "fast transport", hint, aiortc_version)
    version = aioice.__version__ if aioice_version is None else aioice_version
    require_version("aioice", version, AIOICE_PINNED, "fast transport", hint)


# --- Sans-I/O cores ---------------------------------------------------------------------


@dataclass
class RttEstimator:
    """RFC 6298 §2 smoothed RTT and retransmission timeout of one path.

    Attributes:
        initial: the RTO before the first sample (RFC 6298 says 1 s; WebRTC
            stacks start DTLS near 50 ms, :data:`INITIAL_RTO`).
        srtt: smoothed RTT (s), ``None`` before a sample.
        rttvar: RTT variation (s).
    """

    initial: float = INITIAL_RTO
    srtt: float | None = None
    rttvar: float = 0.0
    samples: int = 0

    def sample(self, rtt: float) -> None:
        """Take one measured round trip (s), RFC 6298 §2.2–2.3 (alpha 1/8, beta 1/4)."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.samples += 1

    def flight_rto(self) -> float:
        """A DTLS flight's first timeout (s): 2 × srtt within bounds, as WebRTC's DTLS.

        RFC 6298's ``srtt + 4·rttvar`` is ≈ 3 × RTT after the few samples ICE gives
        before DTLS starts; a flight is a few datagrams, and a spurious resend is
        dropped by the peer's replay check. Before any sample: :meth:`rto`.
        """
        if self.srtt is None:
            return self.rto(DTLS_MIN_RTO)
        return min(MAX_RTO, max(DTLS_MIN_RTO, 2 * self.srtt))

    def rto(self, floor: float = MIN_RTO) -> float:
        """The retransmission timeout (s): ``srtt + 4·rttvar`` within bounds, or ``initial``."""
        if self.srtt is None:
            return max(self.initial, floor)
        return min(MAX_RTO, max(floor, self.srtt + 4 * self.rttvar))


@dataclass
class FlightTimer:
    """When to resend the last DTLS flight (RFC 6347 §4.2.4, timer values by RTT).

    Feed it what the DTLS layer sends and receives, with ``now``; it answers with
    the flight to resend (:meth:`poll`) and when to ask again (:meth:`deadline`).
    """

    rtt: RttEstimator
    max_resends: int = 6
    flight: list[bytes] = field(default_factory=list)
    resends: int = 0
    done: bool = False
    _due: float | None = None
    _rto: float = 0.0
    _sent_at: float | None = None
    _new_flight: bool = True
    _last_reactive: float = -1.0
    _seen: set[bytes] = field(default_factory=set)

    def sent(self, datagram: bytes, now: float) -> None:
        """The DTLS layer wrote ``datagram`` (part of a new flight unless resending)."""
        if self._new_flight:
            self.flight = []
            self._new_flight = False
            self.resends = 0
            self._sent_at = now
            self._rto = self.rtt.flight_rto()
        self.flight.append(datagram)
        self._due = None if self.done else now + self._rto

    def received(self, datagram: bytes, now: float) -> list[bytes]:
        """A DTLS datagram arrived; return datagrams to resend at once.

        A datagram identical to one received before is the peer resending its
        flight: it did not get ours, so ours goes again at once (RFC 6347 §4.2.4),
        at most once per half RTO, and our timer keeps running. Application data
        while our handshake is not done (the DTLS server's first SCTP packet) means
        the peer finished and its final flight was lost: ours goes again the same
        way, so that the peer resends its final flight. A new handshake or
        change-cipher-spec datagram during the handshake is the peer's next flight:
        it ends our timer (an RTT sample if we never resent, Karn's rule); other
        records (alerts) leave the timer alone. After the handshake, a handshake
        or change-cipher-spec record means the peer lacks our final flight.
        """
        duplicate = datagram in self._seen
        if not duplicate and len(self._seen) < 64:
            self._seen.add(datagram)
        handshake = datagram[:1] in (b"\x14", b"\x16")
        # Application data before our handshake is done: the peer is done (its SCTP
        # INIT, say), so its final flight was lost. Not its next flight (that would
        # stop our timer until OpenSSL's 1 s one): ours goes again, as for a duplicate.
        lacking = not self.done and datagram[:1] == b"\x17"
        if duplicate or lacking or (self.done and handshake):
            if self.flight and now - self._last_reactive >= self.rtt.rto(DTLS_MIN_RTO) / 2:
                self._last_reactive = now
                return list(self.flight)
            return []
        if self.done or not handshake:  # e.g. an alert: not the peer's next flight
            return []
        if self._sent_at is not None and self.resends == 0 and not self._new_flight:
            self.rtt.sample(now - self._sent_at)  # Karn: only unambiguous round trips
        self._sent_at = None
        self._new_flight = True
        self._due = None
        return []

    def handshake_done(self) -> None:
        """The handshake completed: no more timer, only reactive resends."""
        self.done = True
        self._due = None

    def deadline(self) -> float | None:
        """When :meth:`poll` has work, or ``None``."""
        return self._due

    def poll(self, now: float) -> list[bytes]:
        """The datagrams to resend now (the whole last flight), backing off ×2."""
        if self._due is None or now < self._due or self.done:
            return []
        if self.resends >= self.max_resends:
            self._due = None
            return []
        self.resends += 1
        self._rto = min(MAX_RTO, self._rto * 2)
        self._due = now + self._rto
        return list(self.flight)


# --- aioice: checks at once, completion at once, RTO by RTT -------------------------------


async def _pace(connection: Connection) -> None:
    """aioice's pacing loop (Ta), in its own task."""
    while connection._check_periodic():
        await asyncio.sleep(TA)


async def _fast_connect(connection: Connection, early: bool) -> None:
    """``Connection.connect`` (aioice 0.13) returning as soon as the check list completes.

    ``early``: return sooner, on a *tentative* pair (:func:`_tentative_pair`), so that
    DTLS starts while the checks finish in the background (:func:`_finish_checks`).
    """
    if not connection._local_candidates_end:
        raise ConnectionError("Local candidates gathering was not performed")
    if connection.remote_username is None or connection.remote_password is None:
        raise ConnectionError("Remote username or password is missing")
    first_check: asyncio.Future[tuple[tuple[str, int], StunProtocol]] = (
        asyncio.get_running_loop().create_future()
    )
    if early:
        _watch_incoming_checks(connection, first_check)
    for remote_candidate in connection._remote_candidates:
        connection._pair_remote_candidate(remote_candidate)
    connection.sort_check_list()
    connection._unfreeze_initial()
    for early_check in connection._early_checks:
        connection.check_incoming(*early_check)
    connection._early_checks.clear()
    connection._early_checks_done = True

    pacer = asyncio.ensure_future(_pace(connection))
    result = asyncio.ensure_future(connection._check_list_state.get())
    if early:
        pair = await _tentative_pair(connection, first_check, {pacer, result})
        if pair is not None and not result.done():
            logger.debug("< ICE tentative pair %s: DTLS starts while the checks finish", pair)
            connection._nominated.setdefault(pair.component, pair)
            task = asyncio.ensure_future(_finish_checks(connection, pacer, result))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
            connection._query_consent_task = asyncio.create_task(connection.query_consent())
            return
    await _finish_checks(connection, pacer, result)
    connection._query_consent_task = asyncio.create_task(connection.query_consent())


#: Background tasks of :func:`_fast_connect` (a reference keeps them from being collected).
_BACKGROUND: Final[set[asyncio.Future[None]]] = set()


def _watch_incoming_checks(
    connection: Connection, first: asyncio.Future[tuple[tuple[str, int], StunProtocol]]
) -> None:
    """Resolve ``first`` with the address and socket of the first authenticated check."""
    incoming = connection.check_incoming

    def check_incoming(
        message: stun.Message, addr: tuple[str, int], protocol: StunProtocol
    ) -> None:
        incoming(message, addr, protocol)
        if not first.done():
            first.set_result((addr, protocol))

    connection.check_incoming = check_incoming  # type: ignore[method-assign]


async def _tentative_pair(
    connection: Connection,
    first_check: asyncio.Future[tuple[tuple[str, int], StunProtocol]],
    running: set[asyncio.Future[Any]],
) -> CandidatePair | None:
    """The pair DTLS may use before ICE completes, or None (wait for ICE as usual).

    Controlled side (the callee, DTLS client): the pair of its first check, the
    highest-priority Waiting one, so that its ClientHello follows that check.
    Controlling side (the caller, DTLS server): the pair of the peer's first
    authenticated check (MESSAGE-INTEGRITY with our password: the peer holds our
    SDP and is at that address), so that it answers the ClientHello already
    queued instead of waiting for its own check's response.
    """
    if not connection.ice_controlling:
        for pair in connection._check_list:
            if pair.state in (CandidatePair.State.WAITING, CandidatePair.State.IN_PROGRESS):
                await asyncio.sleep(0)  # the pacer's first check leaves before the ClientHello
                return pair
        return None
    await asyncio.wait({first_check, *running}, return_when=asyncio.FIRST_COMPLETED)
    if not first_check.done():
        return None
    addr, protocol = first_check.result()
    for pair in connection._check_list:
        if pair.protocol is protocol and pair.remote_addr == addr:
            return pair
    return None


async def _finish_checks(
    connection: Connection, pacer: asyncio.Future[None], result: asyncio.Future[Any]
) -> None:
    """Wait for the check list's result; cancel the checks left (aioice's ``connect`` tail).

    Raises:
        ConnectionError: ICE failed (when it runs in the background, after a tentative
            pair: the connection is closed instead, so DTLS and the call fail).
    """
    try:
        await asyncio.wait({pacer, result}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done() and not connection._check_list:
            res = ICE_FAILED
        else:
            res = await result
    finally:
        pacer.cancel()
        result.cancel()
    for check in connection._check_list:
        if check.task:
            check.task.cancel()
    if res != ICE_COMPLETED:
        if connection._query_consent_task is not None:  # we returned on a tentative pair
            logger.debug("< ICE failed after a tentative pair: closing")
            await connection.close()
            return
        raise ConnectionError("ICE negotiation failed")


def _timed_request(protocol: StunProtocol, rtt: RttEstimator) -> Callable[..., Any]:
    """``StunProtocol.request`` with the first retransmission after the path's RTO."""

    async def request(
        request: stun.Message,
        addr: tuple[str, int],
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[stun.Message, tuple[str, int]]:
        assert request.transaction_id not in protocol.transactions
        if integrity_key is not None:
            request.add_message_integrity(integrity_key)
        transaction = stun.Transaction(
            request, addr, protocol, retransmissions=retransmissions, integrity_key=integrity_key
        )
        if retransmissions is None:  # connectivity checks; consent keeps aioice's timer
            rto = rtt.rto() if rtt.samples else CHECK_INITIAL_RTO
            transaction._Transaction__timeout_delay = rto  # type: ignore[attr-defined]
        protocol.transactions[request.transaction_id] = transaction
        started = time.monotonic()
        try:
            response = await transaction.run()
        finally:
            del protocol.transactions[request.transaction_id]
        if transaction._Transaction__tries == 1:  # type: ignore[attr-defined]  # Karn
            rtt.sample(time.monotonic() - started)
        return response

    return request


# --- aiortc: the DTLS flight timer ---------------------------------------------------------


class _DtlsRetransmitter:
    """The asyncio shell of :class:`FlightTimer` on one ``RTCDtlsTransport``."""

    def __init__(self, dtls: Any, rtt: RttEstimator) -> None:
        self.dtls = dtls
        self.ice = dtls.transport
        self.core = FlightTimer(rtt)
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.on_connected: Callable[[], None] = lambda: None
        self._send_raw = self.ice._send
        write_ssl, recv = dtls._write_ssl, self.ice._recv

        async def _write_ssl() -> None:
            # aiortc sends what OpenSSL wrote with transport._send; catch it here.
            self._capturing = True
            try:
                await write_ssl()
            finally:
                self._capturing = False

        async def _send(data: bytes) -> None:
            if self._capturing and not self.core.done and 19 < data[0] < 64:
                self.core.sent(data, time.monotonic())
                self._arm()
            await self._send_raw(data)

        async def _recv() -> bytes:
            data: bytes = await recv()
            if 19 < data[0] < 64:
                if not self.core.done and dtls.encrypted:
                    self.core.handshake_done()
                for datagram in self.core.received(data, time.monotonic()):
                    logger.debug("> DTLS final flight again (%d bytes)", len(datagram))
                    await self._send_raw(datagram)
                self._arm()
            return data

        self._capturing = False
        dtls._write_ssl = _write_ssl
        self.ice._send = _send
        self.ice._recv = _recv

        def on_state() -> None:
            if dtls.state in ("connected", "closed", "failed"):
                self.core.handshake_done()
                self._arm()
            if dtls.state == "connected":
                self.on_connected()

        dtls.add_listener("statechange", on_state)

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        due = self.core.deadline()
        if due is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(loop.time() + max(0.0, due - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        flight = self.core.poll(time.monotonic())
        if flight:
            logger.debug(
                "> DTLS flight again (%d datagrams, try %d)", len(flight), self.core.resends
            )
            task = asyncio.ensure_future(self._resend(flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm()

    async def _resend(self, flight: list[bytes]) -> None:
        with contextlib.suppress(ConnectionError):
            for datagram in flight:
                await self._send_raw(datagram)


# --- installation --------------------------------------------------------------------------


@dataclass
class FastTransport:
    """What :func:`install_fast_transport` installed on one peer connection."""

    rtt: RttEstimator
    early_dtls: bool = True
    connections: list[Connection] = field(default_factory=list)
    dtls: list[_DtlsRetransmitter] = field(default_factory=list)
    sctp: list[Any] = field(default_factory=list)

    def path_known(self) -> None:
        """DTLS is up: an SCTP association that has no RTT of its own starts from the path's."""
        if self.rtt.srtt is None:
            return
        for sctp in self.sctp:
            if sctp._srtt is None:
                sctp._rto = max(SCTP_MIN_RTO, min(SCTP_INITIAL_RTO, 3 * self.rtt.srtt))


def install_fast_transport(pc: RTCPeerConnection, *, early_dtls: bool = True) -> FastTransport:
    """Make one peer connection's ICE and DTLS set-up fast; call before ``setRemoteDescription``.

    Every ICE connection and DTLS transport the peer connection has now or makes
    later (aiortc makes them in ``setLocalDescription``/``setRemoteDescription``) is
    patched: the hook wraps the peer connection's private ``__createDtlsTransport``.
    ``early_dtls``: DTLS starts on a tentative pair while the checks finish
    (:func:`_tentative_pair`); False waits for ICE to complete, as aiortc does.

    Raises:
        CallError: aiortc or aioice is not a pinned release.
    """
    check_pinned_versions()
    existing: FastTransport | None = getattr(pc, _INSTALLED, None)
    if existing is not None:
        return existing
    fast = FastTransport(RttEstimator(), early_dtls)
    setattr(pc, _INSTALLED, fast)
    create = pc._RTCPeerConnection__createDtlsTransport  # type: ignore[attr-defined]

    def create_dtls_transport() -> Any:
        dtls = create()
        _patch(fast, dtls)
        return dtls

    pc._RTCPeerConnection__createDtlsTransport = create_dtls_transport  # type: ignore[attr-defined]
    create_sctp = pc._RTCPeerConnection__createSctpTransport  # type: ignore[attr-defined]

    def create_sctp_transport() -> None:
        create_sctp()
        sctp = pc._RTCPeerConnection__sctp  # type: ignore[attr-defined]
        sctp._rto = SCTP_INITIAL_RTO
        sctp._update_rto = lambda r: _update_sctp_rto(sctp, r)
        fast.sctp.append(sctp)

    pc._RTCPeerConnection__createSctpTransport = create_sctp_transport  # type: ignore[attr-defined]
    return fast


def _update_sctp_rto(sctp: Any, r: float) -> None:
    """``RTCSctpTransport._update_rto`` (RFC 4960 §6.3.1) with :data:`SCTP_MIN_RTO`."""
    if sctp._srtt is None:
        sctp._rttvar = r / 2
        sctp._srtt = r
    else:
        sctp._rttvar = 0.75 * sctp._rttvar + 0.25 * abs(sctp._srtt - r)
        sctp._srtt = 0.875 * sctp._srtt + 0.125 * r
    sctp._rto = max(SCTP_MIN_RTO, min(sctp._srtt + 4 * sctp._rttvar, SCTP_MAX_RTO))


def _patch(fast: FastTransport, dtls: Any) -> None:
    connection: Connection = dtls.transport._connection
    if any(c is connection for c in fast.connections):
        return
    fast.connections.append(connection)
    connection.connect = lambda: _fast_connect(  # type: ignore[method-assign]
        connection, fast.early_dtls
    )
    gather = connection.gather_candidates

    async def gather_candidates() -> None:
        await gather()
        for protocol in connection._protocols:
            protocol.request = _timed_request(protocol, fast.rtt)  # type: ignore[method-assign]

    connection.gather_candidates = gather_candidates  # type: ignore[method-assign]
    retransmitter = _DtlsRetransmitter(dtls, fast.rtt)
    retransmitter.on_connected = fast.path_known
    fast.dtls.append(retransmitter)


# --- the DTLS context made ahead --------------------------------------------------------------


class _PrebuiltCertificate(RTCCertificate):
    """A peer connection's certificate, with one ``SSL.Context`` already built.

    The same key and X.509 certificate as the peer connection's (so the same
    fingerprints); :meth:`_create_ssl_context` hands the context built ahead out
    once, for the SRTP profiles it was built with, and builds any later one (or one
    for other profiles) as aiortc does.
    """

    def __init__(self, certificate: RTCCertificate, srtp_profiles: list[Any]) -> None:
        super().__init__(key=certificate._key, cert=certificate._cert)
        self.prebuilt_profiles = list(srtp_profiles)
        self.prebuilt: SSL.Context | None = certificate._create_ssl_context(
            srtp_profiles=self.prebuilt_profiles
        )
        self.handed_out = 0

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> SSL.Context:
        ctx, self.prebuilt = self.prebuilt, None
        if ctx is None or list(srtp_profiles) != self.prebuilt_profiles:
            return super()._create_ssl_context(srtp_profiles)
        self.handed_out += 1
        return ctx


@functools.cache
def _dtls_internals_pinned() -> bool:
    """The pinned releases, with the DTLS internals used here unchanged (read once)."""
    try:
        check_pinned_versions()
    except Exception:  # unsupported release: aiortc builds its context as before
        return False
    used = (".rtcdtlstransport.RTC", "RTCPeerConnection.__init__", "__createDtlsTransport")
    return not any(part in name for name in changed_internals() for part in used)


def prebuild_dtls_contexts(pc: RTCPeerConnection) -> int:
    """Build ``pc``'s DTLS ``SSL.Context`` ahead of ``RTCDtlsTransport.start``; return 1 if built.

    The context is what ``start`` would build (``_create_ssl_context`` of the peer
    connection's certificate with aiortc's SRTP profiles: the same certificate and
    key, verification settings, ciphers and profiles); the peer's fingerprint is
    checked after the handshake as before. The certificate is replaced by a
    :class:`_PrebuiltCertificate` (same key and certificate) in the peer
    connection's list and in each DTLS transport it has now, so the first DTLS
    transport to start — one that exists now, or one ``setRemoteDescription``
    makes later (a callee prepared without audio) — takes the context, once; any
    other builds its own, as aiortc does.

    Returns 0 (nothing changed) when done already, when a DTLS transport has
    started, on an aiortc/aioice release other than the pinned ones or when
    :func:`changed_internals` names any of the DTLS internals used. Call it on a
    peer connection made ahead (:mod:`qcall.call.prepared`).
    """
    if not _dtls_internals_pinned():
        return 0
    certificates = pc._RTCPeerConnection__certificates  # type: ignore[attr-defined]
    original = certificates[0]
    if isinstance(original, _PrebuiltCertificate):
        return 0
    found: dict[int, Any] = {}
    for transceiver in pc.getTransceivers():
        found[id(transceiver.receiver.transport)] = transceiver.receiver.transport
    if pc.sctp is not None:
        found[id(pc.sctp.transport)] = pc.sctp.transport
    transports = list(found.values())
    if any(not isinstance(t, RTCDtlsTransport) or t.state != "new" for t in transports):
        return 0
    profiles = transports[0]._srtp_profiles if transports else SRTP_PROFILES
    prebuilt = _PrebuiltCertificate(original, profiles)
    certificates[0] = prebuilt  # what __createDtlsTransport hands new transports
    for dtls in transports:
        if dtls._RTCDtlsTransport__local_certificate is original:
            dtls._RTCDtlsTransport__local_certificate = prebuilt
    return 1
