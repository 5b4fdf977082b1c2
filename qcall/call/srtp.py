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

* ``_setup_srtp``: exports a qcall secret (RFC 5705, :data:`EXPORTER_LABEL`,
  :data:`EXPORTER_LENGTH` bytes), hands it to the caller's ``key_provider`` and
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
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import aiortc
import pylibsrtp
from aiortc import RTCPeerConnection, clock as aiortc_clock
from aiortc.rtcdtlstransport import RTCDtlsTransport, State as DTLSState
from pylibsrtp import Policy, Session

from qcall.exceptions import CallError, InvalidKeyError, QCallError

__all__ = [
    "AIORTC_CHECKED_VERSIONS",
    "AIORTC_SUPPORTED",
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
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
    "swap_srtp_keys",
]

logger = logging.getLogger(__name__)

#: aiortc versions whose ``rtcdtlstransport.py`` was read and diffed for this hook
#: (``_setup_srtp`` appeared in 1.13; 1.10-1.12 set SRTP up inline in ``start``).
AIORTC_CHECKED_VERSIONS: Final = ("1.13.0", "1.14.0", "1.15.0", "1.16.0")

#: Supported aiortc range, ``(lowest, first unsupported)``: ``>=1.13,<1.17``.
AIORTC_SUPPORTED: Final = ((1, 13), (1, 17))

#: RFC 5705 §4 exporter label; "EXPERIMENTAL" labels need no IANA registration.
EXPORTER_LABEL: Final = b"EXPERIMENTAL-qcall-hybrid-srtp-v1"

#: Length in bytes of the exported secret (384 bits, the HKDF-SHA-384 hash size).
EXPORTER_LENGTH: Final = 48

#: The DTLS role a transport took ("client" or "server", RFC 5764 §4.1).
DTLSRole = Literal["client", "server"]

#: Inbound generations kept at once: previous (grace), current and next.
MAX_GENERATIONS: Final = 3

#: An outbound key switch waits while a sequence number is this close to 65535.
WRAP_GUARD: Final = 64

_RFC5764_LABEL: Final = b"EXTRACTOR-dtls_srtp"
_HOOK_ATTRIBUTE: Final = "_qcall_srtp_hook"


def _short_hash(data: bytes) -> str:
    """Return a short SHA-256 hash of ``data`` to log in place of key bytes."""
    return hashlib.sha256(data).hexdigest()[:8]


# --- profiles and keys --------------------------------------------------------------


class SRTPProfile(enum.Enum):
    """SRTP protection profiles qcall can key (RFC 7714 §14.2, RFC 5764 §4.1.2).

    The value is the profile's registered name, as in the DTLS use_srtp extension.
    """

    AEAD_AES_256_GCM = "SRTP_AEAD_AES_256_GCM"
    AEAD_AES_128_GCM = "SRTP_AEAD_AES_128_GCM"
    AES128_CM_HMAC_SHA1_80 = "SRTP_AES128_CM_SHA1_80"

    @property
    def key_length(self) -> int:
        """Master key length in bytes."""
        return 32 if self is SRTPProfile.AEAD_AES_256_GCM else 16

    @property
    def salt_length(self) -> int:
        """Master salt length in bytes (12 for AEAD, RFC 7714 §12; 14 for CM)."""
        return 14 if self is SRTPProfile.AES128_CM_HMAC_SHA1_80 else 12

    @property
    def libsrtp_profile(self) -> int:
        """The ``pylibsrtp.Policy`` profile constant."""
        return cast(int, getattr(Policy, "SRTP_PROFILE_" + self.name.replace("HMAC_", "")))

    @classmethod
    def from_name(cls, name: str) -> SRTPProfile:
        """Look a profile up by member name or registered name.

        Raises:
            ValueError: unknown profile (the message names the field ``profile``).
        """
        for profile in cls:
            if name in (profile.name, profile.value):
                return profile
        raise ValueError(f"profile: unknown SRTP profile {name[:40]!r}")


#: The profile hybrid calls use unless the policy says otherwise.
DEFAULT_PROFILE: Final = SRTPProfile.AEAD_AES_256_GCM


@dataclass(frozen=True, repr=False)
class SRTPKeys:
    """SRTP master keys and salts for both directions of one call, one side's view.

    ``local_*`` protect what this side sends; ``remote_*`` what it receives. The
    peer holds the same keys with local and remote exchanged (:meth:`peer_view`).

    Raises:
        InvalidKeyError: a key or salt has the wrong type or length for ``profile``
            (the message names the field, never the bytes).
    """

    profile: SRTPProfile
    local_key: bytes
    local_salt: bytes
    remote_key: bytes
    remote_salt: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.profile, SRTPProfile):
            raise InvalidKeyError("profile: must be an SRTPProfile")
        for name in ("local_key", "local_salt", "remote_key", "remote_salt"):
            value = getattr(self, name)
            expected = self.profile.key_length if name.endswith("key") else self.profile.salt_length
            if not isinstance(value, bytes):
                raise InvalidKeyError(f"{name}: must be bytes, not {type(value).__name__}")
            if len(value) != expected:
                raise InvalidKeyError(
                    f"{name}: {self.profile.name} needs {expected} bytes, got {len(value)}"
                )

    @property
    def local_master(self) -> bytes:
        """Outbound master key ‖ master salt, as libsrtp takes it."""
        return self.local_key + self.local_salt

    @property
    def remote_master(self) -> bytes:
        """Inbound master key ‖ master salt, as libsrtp takes it."""
        return self.remote_key + self.remote_salt

    def peer_view(self) -> SRTPKeys:
        """Return the same keys as the peer sees them (local and remote swapped)."""
        return SRTPKeys(
            self.profile, self.remote_key, self.remote_salt, self.local_key, self.local_salt
        )

    def fingerprint(self) -> str:
        """A short hash of all four values, safe to log and to compare in tests."""
        return _short_hash(self.local_master + b"|" + self.remote_master)

    def __repr__(self) -> str:
        return (
            f"SRTPKeys({self.profile.name}, local=#{_short_hash(self.local_master)}, "
            f"remote=#{_short_hash(self.remote_master)})"
        )


def _session(master: bytes, profile: SRTPProfile, *, inbound: bool) -> Session:
    """Build a pylibsrtp session with aiortc's own policy settings."""
    policy = Policy(
        key=master,
        ssrc_type=Policy.SSRC_ANY_INBOUND if inbound else Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=profile.libsrtp_profile,
    )
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return Session(policy)


# --- counters -----------------------------------------------------------------------


@dataclass
class SRTPStats:
    """Counters of one hooked transport, for tests, the harness and ``getStats``.

    ``decrypt_failures`` is the number the acceptance tests hold at zero across
    rekeys: packets that no installed key authenticated (plus malformed ones).
    Replays are counted apart: a duplicate is not a key problem.
    """

    tx_packets: int = 0
    tx_dropped_pending: int = 0
    rx_packets: int = 0
    rx_queued_pending: int = 0
    rx_dropped_pending: int = 0
    rx_auth_failures: int = 0
    rx_replay_drops: int = 0
    rx_malformed: int = 0
    rx_trial_decrypts: int = 0
    rx_older_generation: int = 0
    tx_switch_deferred: int = 0
    rx_by_generation: collections.Counter[int] = field(default_factory=collections.Counter)
    rekeys_prepared: int = 0
    rekeys_activated: int = 0

    @property
    def decrypt_failures(self) -> int:
        """Packets dropped because no installed key decrypts them (or malformed)."""
        return self.rx_auth_failures + self.rx_malformed


# --- Sans-I/O core: inbound keyring ---------------------------------------------------


class InboundKeyring:
    """Inbound SRTP sessions of several key generations, with trial decryption.

    No I/O and no clock: callers pass ``now`` (seconds, any monotonic origin).
    A generation older than the newest one that has authenticated a packet is
    kept for ``grace`` seconds after that first packet (late, reordered packets),
    then dropped. At most :data:`MAX_GENERATIONS` are kept.

    Args:
        stats: counters to update.
        grace: seconds an older generation survives its successor's first packet.
    """

    def __init__(self, stats: SRTPStats, *, grace: float = 2.0) -> None:
        self._stats = stats
        self._grace = grace
        self._sessions: dict[int, Session] = {}
        self._preferred: int | None = None
        self._newest_seen: int | None = None
        self._newest_seen_at = 0.0

    @property
    def generations(self) -> tuple[int, ...]:
        """Installed generations, oldest first."""
        return tuple(sorted(self._sessions))

    def install(self, generation: int, master: bytes, profile: SRTPProfile) -> None:
        """Install the inbound session of ``generation`` (RFC 3711 §3.2.1 master key ‖ salt).

        Raises:
            CallError: ``generation`` is not newer than every installed one.
        """
        if self._sessions and generation <= max(self._sessions):
            raise CallError(f"generation: {generation} is not newer than {max(self._sessions)}")
        self._sessions[generation] = _session(master, profile, inbound=True)
        while len(self._sessions) > MAX_GENERATIONS:
            del self._sessions[min(self._sessions)]
        if self._preferred is None or self._preferred not in self._sessions:
            self._preferred = generation

    def clear(self) -> None:
        """Drop every session (libsrtp zeroes its key material on deallocation)."""
        self._sessions.clear()
        self._preferred = None

    def unprotect(self, data: bytes, now: float) -> tuple[bytes, int]:
        """Authenticate and decrypt one SRTP packet (RFC 3711 §3.3).

        Returns:
            The RTP packet and the generation whose key authenticated it.

        Raises:
            pylibsrtp.Error: no installed key authenticates it, it is a replay, or it
                is malformed; the matching counter was incremented.
        """
        return self._unprotect(data, now, rtcp=False)

    def unprotect_rtcp(self, data: bytes, now: float) -> tuple[bytes, int]:
        """Authenticate and decrypt one SRTCP packet (RFC 3711 §3.4); see :meth:`unprotect`."""
        return self._unprotect(data, now, rtcp=True)

    def _unprotect(self, data: bytes, now: float, *, rtcp: bool) -> tuple[bytes, int]:
        self._retire(now)
        order = sorted(self._sessions, reverse=True)
        if self._preferred in self._sessions:
            order.remove(self._preferred)
            order.insert(0, self._preferred)
        replay = False
        for attempt, generation in enumerate(order):
            session = self._sessions[generation]
            try:
                if rtcp:
                    plain = session.unprotect_rtcp(data)
                else:
                    plain = session.unprotect(data)
            except pylibsrtp.Error as exc:
                replay = replay or str(exc).startswith("replay")
                continue
            except (ValueError, TypeError):
                self._stats.rx_malformed += 1
                raise pylibsrtp.Error("malformed SRTP packet") from None
            self._accept(generation, now, attempt)
            return plain, generation
        if replay:
            self._stats.rx_replay_drops += 1
            raise pylibsrtp.Error("replayed SRTP packet")
        self._stats.rx_auth_failures += 1
        raise pylibsrtp.Error(f"no installed key authenticates it (generations {order})")

    def _accept(self, generation: int, now: float, attempt: int) -> None:
        stats = self._stats
        stats.rx_packets += 1
        stats.rx_trial_decrypts += attempt
        stats.rx_by_generation[generation] += 1
        self._preferred = generation
        if self._newest_seen is None or generation > self._newest_seen:
            self._newest_seen = generation
            self._newest_seen_at = now
        elif generation < self._newest_seen:
            stats.rx_older_generation += 1

    def _retire(self, now: float) -> None:
        newest = self._newest_seen
        if newest is None or now - self._newest_seen_at < self._grace:
            return
        for generation in [g for g in self._sessions if g < newest]:
            del self._sessions[generation]
            logger.debug("= inbound generation %d retired", generation)


class OutboundSession:
    """The outbound SRTP session of the current generation (what aiortc sees as ``_tx_srtp``).

    A new session starts its rollover counter (RFC 3711 §3.3.1) at 0 at its first
    packet, and so does the receiver's. If the first packets under a new key were
    sent just before a sequence number wrap and then lost, the receiver would guess
    the wrong ROC for every later packet. So a requested switch waits while any
    stream's sequence number is within :data:`WRAP_GUARD` of the wrap (at most
    ``WRAP_GUARD`` packets). aiortc starts sequence numbers below 32768 for the
    same reason, so at 50 packets/s the first wrap comes after 11 minutes.

    Args:
        stats: counters to update.
    """

    def __init__(self, stats: SRTPStats) -> None:
        self._stats = stats
        self.generation = -1
        self.session: Session | None = None
        self._next: tuple[int, Session] | None = None
        self._last_seq: dict[int, int] = {}

    @property
    def switch_pending(self) -> bool:
        """Whether a requested switch waits for the sequence numbers to wrap."""
        return self._next is not None

    def install(self, generation: int, session: Session) -> None:
        """Use ``session`` from the next packet on (or after the wrap guard)."""
        if self.session is None:
            self.session, self.generation = session, generation
            return
        self._next = (generation, session)
        self._maybe_switch()

    def clear(self) -> None:
        """Drop the sessions (libsrtp zeroes its key material on deallocation)."""
        self.session = None
        self._next = None

    def _maybe_switch(self) -> None:
        if self._next is None:
            return
        if any(seq >= 0x10000 - WRAP_GUARD for seq in self._last_seq.values()):
            self._stats.tx_switch_deferred += 1
            return
        self.generation, self.session = self._next
        self._next = None

    def protect(self, data: bytes) -> bytes:
        """Protect one RTP packet (RFC 3711 §3.3)."""
        if len(data) >= 12:
            self._last_seq[int.from_bytes(data[8:12], "big")] = int.from_bytes(data[2:4], "big")
        if self._next is not None:
            self._maybe_switch()
        assert self.session is not None  # the hook's _send_rtp only delegates when ACTIVE
        self._stats.tx_packets += 1
        return self.session.protect(data)

    def protect_rtcp(self, data: bytes) -> bytes:
        """Protect one RTCP packet (RFC 3711 §3.4)."""
        if self._next is not None:
            self._maybe_switch()
        assert self.session is not None
        self._stats.tx_packets += 1
        return self.session.protect_rtcp(data)


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
    ) -> None:
        self.transport = transport
        self.state = HookState.WAITING_FOR_DTLS
        self.stats = SRTPStats()
        self.error: BaseException | None = None
        self.role: DTLSRole | None = None
        self._key_provider = key_provider
        self._timeout = timeout
        self._auto_activate = auto_activate
        self._clock = clock
        self._exporter_secret: bytes | None = None
        self._keyring = InboundKeyring(self.stats, grace=grace)
        self._outbound = OutboundSession(self.stats)
        self._activated = -1
        self._pending_outbound: dict[int, tuple[Session, str]] = {}
        self._pending_rx: collections.deque[tuple[bytes, bool, int]] = collections.deque()
        self._max_pending = max_pending
        self._task: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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
        """The RFC 5705 secret given to the key provider (:data:`EXPORTER_LABEL`).

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
        outbound = _session(keys.local_master, keys.profile, inbound=False)
        self._pending_outbound[generation] = (outbound, _short_hash(keys.local_master))
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
            secret = export_exporter_secret(transport)
        except CallError as exc:
            self._fail_now(exc)
            return
        self._exporter_secret = secret
        self.role = cast(DTLSRole, transport._role)
        transport._rx_srtp = _InboundAdapter(self)  # type: ignore[assignment]
        transport._tx_srtp = self._outbound  # type: ignore[assignment]
        self.state = HookState.WAITING_FOR_KEYS
        logger.debug("= DTLS done (%s), exporter #%s", self.role, _short_hash(secret))
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
        self._outbound.install(0, _session(keys.local_master, keys.profile, inbound=False))
        self._activated = 0
        logger.debug("= hybrid SRTP keys installed: %r", keys)

    def _set_active(self) -> None:
        self.state = HookState.ACTIVE
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
    version = aiortc.__version__ if version is None else version
    try:
        parsed = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        parsed = ()
    low, high = AIORTC_SUPPORTED
    if len(parsed) != 2 or not low <= parsed < high:
        raise CallError(
            f"aiortc {version} is not supported by qcall's SRTP hook (needs >="
            f"{low[0]}.{low[1]},<{high[0]}.{high[1]}; checked on "
            f"{', '.join(AIORTC_CHECKED_VERSIONS)}); install a supported aiortc"
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
) -> HybridSRTP:
    """Make aiortc key SRTP with the caller's keys instead of DTLS-SRTP (RFC 5764).

    Call it on a peer connection once its DTLS transport exists and before DTLS
    completes: the caller after ``setRemoteDescription(answer)`` (or earlier,
    after ``addTrack``), the callee after ``setRemoteDescription(offer)``. When
    DTLS completes, ``key_provider(exporter_secret, role)`` is called with the
    RFC 5705 secret (:data:`EXPORTER_LABEL`, :data:`EXPORTER_LENGTH` bytes, equal on
    both sides) and the DTLS role; it returns :class:`SRTPKeys` or an awaitable of
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
        transport, key_provider, timeout=timeout, grace=grace, auto_activate=auto_activate
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
    length: int = EXPORTER_LENGTH,
) -> bytes:
    """Export keying material from a completed DTLS handshake (RFC 5705 §4, no context).

    Both peers obtain the same bytes; they are bound to this DTLS session and so
    to the fingerprints signed into the qcall transcript.

    Raises:
        CallError: the DTLS handshake has not completed.
    """
    ssl = getattr(transport, "_ssl", None)
    if ssl is None or not getattr(transport, "encrypted", False):
        raise CallError("DTLS has not completed: no keying material to export")
    try:
        return bytes(ssl.export_keying_material(label, length))
    except Exception as exc:  # pyOpenSSL raises its own SSL.Error
        raise CallError(f"DTLS keying material export failed: {type(exc).__name__}") from exc


def dtls_srtp_keys(transport: RTCDtlsTransport) -> SRTPKeys:
    """The stock DTLS-SRTP keys aiortc would have used (RFC 5764 §4.2).

    For the ``plain`` baseline and for tests that show hybrid packets do *not*
    decrypt under them. Layout: client key ‖ server key ‖ client salt ‖ server salt.

    Raises:
        CallError: DTLS has not completed or negotiated no profile qcall knows.
    """
    ssl = getattr(transport, "_ssl", None)
    name = ssl.get_selected_srtp_profile() if ssl is not None else b""
    try:
        profile = SRTPProfile.from_name(name.decode("ascii", "replace"))
    except ValueError as exc:
        raise CallError(f"DTLS negotiated no usable SRTP profile ({exc})") from None
    k, s = profile.key_length, profile.salt_length
    view = export_exporter_secret(transport, label=_RFC5764_LABEL, length=2 * (k + s))
    client = (view[:k], view[2 * k : 2 * k + s])
    server = (view[k : 2 * k], view[2 * k + s :])
    local, remote = (client, server) if transport._role == "client" else (server, client)
    return SRTPKeys(profile, local[0], local[1], remote[0], remote[1])
