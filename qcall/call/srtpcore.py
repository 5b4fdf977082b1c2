"""Sans-I/O core of the hybrid SRTP hook: profiles, keys, counters, keyrings.

Nothing here touches aiortc, a socket or the clock: :class:`InboundKeyring`
takes ``now`` as an argument. The only dependency is libsrtp (via pylibsrtp),
which does the RFC 3711 packet transforms. :mod:`qcall.call.srtp` is the thin
aiortc shell around it and re-exports every public name.

Rekeying relies on two properties of libsrtp, both covered by the tests: a
packet that does not authenticate under a session changes none of its replay
or rollover state (so trial decryption is free of side effects), and a new
session starts its rollover counter at 0 on both sides (hence the wrap guard of
:class:`OutboundSession`).
"""

from __future__ import annotations

import collections
import enum
import hashlib
import logging
import struct
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

import pylibsrtp
from pylibsrtp import Policy, Session

from qcall.exceptions import CallError, InvalidKeyError

__all__ = [
    "DEFAULT_PROFILE",
    "MAX_GENERATIONS",
    "WRAP_GUARD",
    "InboundKeyring",
    "KeyAndSalt",
    "OutboundSession",
    "SRTPKeys",
    "SRTPProfile",
    "SRTPStats",
    "short_hash",
    "srtp_session",
]

logger = logging.getLogger(__name__)

_SEQ_SSRC = struct.Struct("!H4xI")  # RTP header (RFC 3550 §5.1) from byte 2

#: Inbound generations kept at once: previous (grace), current and next.
MAX_GENERATIONS: Final = 3

#: An outbound key switch waits while a sequence number is this close to 65535.
WRAP_GUARD: Final = 64


def short_hash(data: bytes) -> str:
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


class KeyAndSalt(Protocol):
    """Anything with a master ``key`` and ``salt`` (one direction's material)."""

    @property
    def key(self) -> bytes: ...

    @property
    def salt(self) -> bytes: ...


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

    @classmethod
    def from_material(
        cls, profile: SRTPProfile | str | enum.Enum, local: KeyAndSalt, remote: KeyAndSalt
    ) -> SRTPKeys:
        """Build keys from two ``(key, salt)`` objects, such as the key schedule's
        ``KeysDerived.local_keys`` / ``remote_keys`` (docs/key-schedule.md).

        Args:
            profile: an :class:`SRTPProfile`, or a profile enum or name to look up.
            local: protects what this side sends.
            remote: unprotects what the peer sends.

        Raises:
            InvalidKeyError: unknown profile, or a key or salt of the wrong length.
        """
        if not isinstance(profile, SRTPProfile):
            name = profile.value if isinstance(profile, enum.Enum) else profile
            try:
                profile = SRTPProfile.from_name(str(name))
            except ValueError as exc:
                raise InvalidKeyError(str(exc)) from None
        return cls(profile, local.key, local.salt, remote.key, remote.salt)

    def peer_view(self) -> SRTPKeys:
        """Return the same keys as the peer sees them (local and remote swapped)."""
        return SRTPKeys(
            self.profile, self.remote_key, self.remote_salt, self.local_key, self.local_salt
        )

    def fingerprint(self) -> str:
        """A short hash of all four values, safe to log and to compare in tests."""
        return short_hash(self.local_master + b"|" + self.remote_master)

    def __repr__(self) -> str:
        return (
            f"SRTPKeys({self.profile.name}, local=#{short_hash(self.local_master)}, "
            f"remote=#{short_hash(self.remote_master)})"
        )


def srtp_session(master: bytes, profile: SRTPProfile, *, inbound: bool) -> Session:
    """Build a libsrtp session with aiortc's own policy settings (RFC 3711 §8.2).

    Args:
        master: master key ‖ master salt.
        profile: the protection profile.
        inbound: ``True`` for a receiving session (any inbound SSRC).
    """
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
    """Counters of one hooked transport, for the tests and the latency harness.

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
        self._retire_at: float | None = None

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
        self._sessions[generation] = srtp_session(master, profile, inbound=True)
        while len(self._sessions) > MAX_GENERATIONS:
            del self._sessions[min(self._sessions)]
        if self._preferred is None or self._preferred not in self._sessions:
            self._preferred = generation

    def clear(self) -> None:
        """Drop every session (libsrtp frees its cipher contexts when they are collected)."""
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
        if self._retire_at is not None and now >= self._retire_at:
            self._retire()
        # Fast path: the generation that authenticated the previous packet.
        preferred = self._preferred
        replay = False
        session = self._sessions.get(preferred) if preferred is not None else None
        if session is not None:
            assert preferred is not None
            try:
                plain = session.unprotect_rtcp(data) if rtcp else session.unprotect(data)
            except pylibsrtp.Error as exc:
                replay = str(exc).startswith("replay")
            except (ValueError, TypeError):
                self._stats.rx_malformed += 1
                raise pylibsrtp.Error("malformed SRTP packet") from None
            else:
                self._accept(preferred, now, 0)
                return plain, preferred
        # Trial decryption with the other generations, newest first. A packet that
        # fails to authenticate leaves a libsrtp session's state untouched.
        others = sorted((g for g in self._sessions if g != preferred), reverse=True)
        for attempt, generation in enumerate(others, 1):
            session = self._sessions[generation]
            try:
                plain = session.unprotect_rtcp(data) if rtcp else session.unprotect(data)
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
        raise pylibsrtp.Error(f"no installed key authenticates it (generations {self.generations})")

    def _accept(self, generation: int, now: float, attempt: int) -> None:
        stats = self._stats
        stats.rx_packets += 1
        stats.rx_by_generation[generation] += 1
        if attempt:
            stats.rx_trial_decrypts += attempt
            self._preferred = generation
        newest = self._newest_seen
        if newest is None or generation > newest:
            self._newest_seen = generation
            if len(self._sessions) > 1:
                self._retire_at = now + self._grace
        elif generation < newest:
            stats.rx_older_generation += 1

    def _retire(self) -> None:
        self._retire_at = None
        newest = self._newest_seen
        for generation in [g for g in self._sessions if newest is not None and g < newest]:
            del self._sessions[generation]
            logger.debug("= inbound generation %d retired", generation)
        if self._preferred not in self._sessions:
            self._preferred = max(self._sessions, default=None)


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
        """Drop the sessions (libsrtp frees its cipher contexts when they are collected)."""
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
            seq, ssrc = _SEQ_SSRC.unpack_from(data, 2)
            self._last_seq[ssrc] = seq
        if self._next is not None:
            self._maybe_switch()
        assert self.session is not None  # the shell only delegates once keys are installed
        self._stats.tx_packets += 1
        return self.session.protect(data)

    def protect_rtcp(self, data: bytes) -> bytes:
        """Protect one RTCP packet (RFC 3711 §3.4)."""
        if self._next is not None:
            self._maybe_switch()
        assert self.session is not None
        self._stats.tx_packets += 1
        return self.session.protect_rtcp(data)
