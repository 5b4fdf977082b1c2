"""A simulated QKD link: optical layer + post-processing protocol between two ends.

:class:`AliceEnd` and :class:`BobEnd` are Sans-I/O protocol ends. Each holds
only its own optical record and its own random generator; they talk only by
messages (:mod:`.messages`) carried by the :class:`AuthenticatedChannel`.
Bob asks, Alice answers (docs/qkd-simulation.md has the message chart):

1. Sifting: Bob announces detected pulse indices and bases; Alice answers
   which bases matched and the intensity class of each sifted pulse, plus a
   seed choosing the signal bits to disclose.
2. Parameter estimation: Bob discloses his decoy, vacuum and sampled signal
   bits. Alice measures the gains ``Q_k`` (detections / pulses sent per
   intensity) and error rates ``E_k``, bounds ``Y_1`` and ``e_1``
   (:func:`.model.decoy_estimate`) and decides: go on, no key (nothing
   certifiable), or alarm (``E_mu`` above ``qber_abort``).
3. Error correction: Cascade (:mod:`.cascade`), Bob corrects to Alice's key.
4. Verification: 64-bit universal hash with a seed Alice picks and sends.
5. Privacy amplification: Toeplitz hash to
   ``m = floor8(n_key * Q1/Q_mu * (1 - H2(e1)) - leak_EC - 64)``
   with a seed Alice picks and sends.

:class:`SimulatedLink` is the object the rest of qcall uses.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from qcall.exceptions import LinkAlarmError, PostProcessingError

from . import messages as m
from .bb84 import AliceRecord, BobRecord, OpticalLayer
from .cascade import CascadeAlice, CascadeBob, block_schedule
from .channel import ALICE, BOB, AuthenticatedChannel
from .model import LinkParams, binary_entropy, decoy_estimate
from .privacy import toeplitz_hash
from .verify import TAG_BITS, verification_tag

__all__ = ["AliceEnd", "BlockResult", "BobEnd", "LinkStats", "SimulatedLink", "final_length"]

logger = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
_M = TypeVar("_M", bound=m.Message)

#: Pre-shared one-time pad for channel authentication (bytes), kept topped up.
AUTH_PAD_BYTES = 4096


class State(enum.IntEnum):
    """Where :class:`AliceEnd` is in the protocol."""

    EXPECT_DETECTIONS = 0
    EXPECT_DISCLOSURE = 1
    RECONCILING = 2
    EXPECT_VERIFY_RESULT = 3
    DONE = 4


#: Messages Alice accepts in each state.
_ACCEPTS: dict[State, tuple[type[m.Message], ...]] = {
    State.EXPECT_DETECTIONS: (m.Detections,),
    State.EXPECT_DISCLOSURE: (m.Disclosure,),
    State.RECONCILING: (m.PassRequest, m.ParityQuery, m.ReconciliationDone),
    State.EXPECT_VERIFY_RESULT: (m.VerifyResult,),
    State.DONE: (),
}


class Abort(enum.IntEnum):
    """Alice's decision after parameter estimation (``Parameters.abort``)."""

    CONTINUE = 0
    ALARM = 1  # QBER above threshold
    NO_KEY = 2  # not enough data or no certifiable single-photon contribution


def final_length(key_bits: int, single_photon_fraction: float, e1_upper: float,
                 leaked_bits: int) -> int:
    """Secret key length after privacy amplification, a multiple of 8 (>= 0).

    ``n_key * Q1/Q_mu * (1 - H2(e1_upper)) - leak_EC - 64`` (GLLP with the
    measured decoy bounds and the real leakage; asymptotic, no finite-size terms).
    """
    secure = key_bits * single_photon_fraction * (1.0 - binary_entropy(e1_upper))
    bits = math.floor(secure) - leaked_bits - TAG_BITS
    return max(0, bits - bits % 8) if bits > 0 else 0


def _sample_mask(seed: bytes, n: int, fraction: float) -> npt.NDArray[np.bool_]:
    """Which of ``n`` sifted signal bits are disclosed (same on both sides)."""
    return np.random.default_rng(int.from_bytes(seed, "little")).random(n) < fraction


class AliceEnd:
    """Alice's end of the post-processing protocol (she answers).

    Args:
        params: link parameters (thresholds, sample fraction).
        record: her source log for this block.
        rng: her own generator (seeds she picks and sends).
    """

    def __init__(self, params: LinkParams, record: AliceRecord, rng: np.random.Generator) -> None:
        self.params = params
        self.record = record
        self.rng = rng
        self.key: U8 | None = None  # her reconciled-key reference (signal, not sampled)
        self.final_key: bytes | None = None
        self.cascade: CascadeAlice | None = None
        self.decision = Abort.CONTINUE
        self.gains = (0.0, 0.0, 0.0)
        self.errors = (0.0, 0.0, 0.0)
        self.qber = 0.0
        self.y1_lower = 0.0
        self.e1_upper = 0.5
        self.single_photon_fraction = 0.0
        self.verified = False
        self._det_intensity = np.zeros(0, dtype=np.uint8)
        self._intensity = np.zeros(0, dtype=np.uint8)
        self._bits = np.zeros(0, dtype=np.uint8)
        self._sample = np.zeros(0, dtype=bool)
        self.state = State.EXPECT_DETECTIONS

    def __repr__(self) -> str:
        return f"AliceEnd(state={self.state.name}, decision={self.decision.name})"

    def handle(self, msg: m.Message) -> m.Message:
        """Process one message from Bob and return the reply.

        Raises:
            PostProcessingError: unexpected or malformed message (names the field).
        """
        if not isinstance(msg, _ACCEPTS[self.state]):
            raise PostProcessingError(
                f"Alice did not expect {type(msg).__name__} in state {self.state.name}")
        if isinstance(msg, m.Detections):
            return self._sift(msg)
        if isinstance(msg, m.Disclosure):
            return self._estimate(msg)
        if isinstance(msg, m.PassRequest | m.ParityQuery):
            assert self.cascade is not None
            return self.cascade.handle(msg)
        if isinstance(msg, m.ReconciliationDone):
            return self._challenge()
        assert isinstance(msg, m.VerifyResult)
        return self._amplify(msg)

    def _sift(self, msg: m.Detections) -> m.Sifting:
        rec = self.record
        if msg.n_pulses != rec.n_pulses:
            raise PostProcessingError(f"Detections.n_pulses {msg.n_pulses} != {rec.n_pulses}")
        idx = msg.indices()
        if msg.bases.size != idx.size:
            raise PostProcessingError("Detections.bases: length differs from the gaps")
        inten, basis, bit = rec.settings_at(idx)
        match = basis == msg.bases
        self._det_intensity = inten
        self._intensity = inten[match]
        self._bits = bit[match]
        seed = self.rng.bytes(16)
        signal = self._intensity == 0
        self._sample = _sample_mask(seed, int(signal.sum()), self.params.sample_fraction)
        self.state = State.EXPECT_DISCLOSURE
        return m.Sifting(match=match.astype(np.uint8), intensity=self._intensity,
                         sample_seed=seed)

    def _estimate(self, msg: m.Disclosure) -> m.Parameters:
        p = self.params
        signal = self._intensity == 0
        disclose = ~signal
        disclose[np.flatnonzero(signal)[self._sample]] = True
        if msg.bits.size != int(disclose.sum()):
            raise PostProcessingError("Disclosure.bits: wrong number of bits")
        wrong = np.zeros(self._bits.size, dtype=bool)
        wrong[disclose] = msg.bits != self._bits[disclose]
        counts = np.bincount(self._det_intensity, minlength=3)
        sent = self.record.sent
        gains = tuple(float(counts[k] / sent[k]) if sent[k] else 0.0 for k in range(3))
        errors: list[float] = []
        for k in range(3):
            sel = disclose & (self._intensity == k)
            errors.append(float(wrong[sel].mean()) if sel.any() else 0.5)
        self.gains = (gains[0], gains[1], gains[2])
        self.errors = (errors[0], errors[1], errors[2])
        self.qber = errors[0]
        est = decoy_estimate(p.intensities, self.gains, self.errors)
        self.y1_lower, self.e1_upper = est.y1_lower, est.e1_upper
        self.single_photon_fraction = est.q1_lower / gains[0] if gains[0] > 0 else 0.0
        keep = signal.copy()
        keep[np.flatnonzero(signal)[self._sample]] = False
        self.key = self._bits[keep]
        n_key = int(self.key.size)
        # Even a perfect code (leak n*H2(E)) could not leave key: stop early.
        ideal = final_length(n_key, self.single_photon_fraction, self.e1_upper,
                             math.ceil(n_key * binary_entropy(self.qber)))
        if not bool(self._sample.any()) or self.qber > p.qber_abort:
            self.decision = Abort.ALARM if self._sample.any() else Abort.NO_KEY
        elif ideal == 0:
            self.decision = Abort.NO_KEY
        if self.decision is Abort.CONTINUE:
            self.cascade = CascadeAlice(self.key, self.rng)
            self.state = State.RECONCILING
        else:
            self.state = State.DONE
        return m.Parameters(abort=int(self.decision), qber=self.qber, y1_lower=self.y1_lower,
                            e1_upper=self.e1_upper,
                            single_photon_fraction=self.single_photon_fraction)

    def _challenge(self) -> m.VerifyChallenge:
        assert self.key is not None
        seed = self.rng.integers(0, 2, self.key.size + TAG_BITS - 1, dtype=np.uint8)
        self.state = State.EXPECT_VERIFY_RESULT
        return m.VerifyChallenge(seed=seed, tag=verification_tag(self.key, seed))

    def _amplify(self, msg: m.VerifyResult) -> m.Amplification:
        assert self.key is not None and self.cascade is not None
        self.state = State.DONE
        self.verified = msg.ok == 1
        length = 0
        if self.verified:
            length = final_length(self.key.size, self.single_photon_fraction, self.e1_upper,
                                  self.cascade.leaked_bits)
        seed = self.rng.integers(0, 2, self.key.size + length - 1 if length else 0,
                                 dtype=np.uint8)
        self.final_key = np.packbits(toeplitz_hash(self.key, seed, length)).tobytes()
        return m.Amplification(length=length, seed=seed)


@dataclass
class BobOutcome:
    """What Bob's end learned (returned by :meth:`BobEnd.run`)."""

    decision: Abort
    qber: float
    final_key: bytes = b""
    key_bits: int = 0
    corrected: int = 0
    leaked_bits: int = 0
    verified: bool = False
    sifted_bits: int = 0


class BobEnd:
    """Bob's end of the post-processing protocol (he drives it).

    Args:
        params: link parameters.
        record: his detector log for this block.
        rng: his own generator (not needed by the protocol; kept for symmetry).
    """

    def __init__(self, params: LinkParams, record: BobRecord, rng: np.random.Generator) -> None:
        self.params = params
        self.record = record
        self.rng = rng

    def __repr__(self) -> str:
        return f"BobEnd({self.record!r})"

    def run(self) -> Generator[m.Message, m.Message, BobOutcome]:
        """The protocol as a generator: yields messages for Alice, receives her replies.

        Returns:
            :class:`BobOutcome` (when the generator stops).

        Raises:
            PostProcessingError: a reply is unexpected or malformed.
        """
        rec = self.record
        reply = yield m.Detections.from_indices(rec.n_pulses, rec.indices, rec.basis)
        sift = _expect(reply, m.Sifting)
        if sift.match.size != rec.indices.size:
            raise PostProcessingError("Sifting.match: length differs from detections")
        bits = rec.bit[sift.match.astype(bool)]
        inten = sift.intensity
        if inten.size != bits.size or (inten.size and int(inten.max()) > 2):
            raise PostProcessingError("Sifting.intensity: wrong length or class > 2")
        signal = inten == 0
        sample = _sample_mask(sift.sample_seed, int(signal.sum()), self.params.sample_fraction)
        disclose = ~signal
        disclose[np.flatnonzero(signal)[sample]] = True
        params = _expect((yield m.Disclosure(bits=bits[disclose])), m.Parameters)
        try:
            decision = Abort(params.abort)
        except ValueError:
            raise PostProcessingError(f"Parameters.abort: unknown value {params.abort}") from None
        for name in ("qber", "y1_lower", "e1_upper", "single_photon_fraction"):
            value = getattr(params, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise PostProcessingError(f"Parameters.{name}: {value!r} not in [0, 1]")
        out = BobOutcome(decision, params.qber, sifted_bits=int(bits.size))
        if decision is not Abort.CONTINUE:
            return out
        key = bits[signal & ~disclose].copy()
        out.key_bits = int(key.size)
        cascade = CascadeBob(key, block_schedule(params.qber, key.size))
        yield from cascade.run()
        out.corrected, out.leaked_bits = cascade.corrected, cascade.leaked_bits
        challenge = _expect((yield m.ReconciliationDone()), m.VerifyChallenge)
        if challenge.seed.size != key.size + TAG_BITS - 1:
            raise PostProcessingError("VerifyChallenge.seed: wrong length")
        out.verified = verification_tag(key, challenge.seed) == challenge.tag
        amp = _expect((yield m.VerifyResult(ok=int(out.verified))), m.Amplification)
        expected = 0
        if out.verified:
            expected = final_length(key.size, params.single_photon_fraction, params.e1_upper,
                                    cascade.leaked_bits)
        if amp.length != expected:
            raise PostProcessingError(f"Amplification.length {amp.length} != {expected}")
        if amp.seed.size != (key.size + expected - 1 if expected else 0):
            raise PostProcessingError("Amplification.seed: wrong length")
        out.final_key = np.packbits(toeplitz_hash(key, amp.seed, expected)).tobytes()
        return out


def _expect(msg: m.Message, cls: type[_M]) -> _M:
    if not isinstance(msg, cls):
        raise PostProcessingError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg


@dataclass(frozen=True)
class BlockResult:
    """One block of a simulated link. Keys are hidden from ``repr``.

    ``alice_key`` and ``bob_key`` were derived separately by each end; they
    are equal whenever ``verified`` (up to the 2**-64 hash collision bound).

    Attributes:
        link: link name.
        index: block number on this link (0-based).
        alice_key, bob_key: final secret key (``final_bits / 8`` bytes each),
            after the share that refilled the authentication pad.
        n_pulses, duration_s: pulses sent and simulated time (n / pulse rate).
        detections, sifted_bits, key_bits: clicks, sifted bits (all
            intensities), sifted signal bits entering error correction.
        qber: signal QBER estimated from the disclosed sample.
        qber_corrected: errors Cascade corrected / key bits (the exact QBER of the key).
        gains, errors: measured ``Q_k`` and ``E_k`` per intensity (mu, nu, omega).
        y1_lower, e1_upper, single_photon_fraction: decoy-state bounds.
        leaked_ec_bits, verify_bits, auth_bits: disclosed parity bits, hash
            tag bits, one-time-pad bits spent authenticating this block.
        final_bits: bits delivered (``len(alice_key) * 8``).
        secret_bits: privacy amplification output, i.e. ``final_bits`` plus the
            bits that repaid the authentication pad.
        verified: the universal-hash check passed.
        messages, channel_bytes: frames and bytes on the classical channel.
        wall_s: wall-clock seconds spent on the block (simulation + post-processing).
        postprocessing_s: the part of ``wall_s`` spent in the protocol (both ends).
        alice_s, bob_s: the part of it spent in each end's own computation (the
            rest is the channel: framing, MACs, transcript hashes).
    """

    link: str
    index: int
    alice_key: bytes = field(repr=False)
    bob_key: bytes = field(repr=False)
    n_pulses: int
    duration_s: float
    detections: int
    sifted_bits: int
    key_bits: int
    qber: float
    qber_corrected: float
    gains: tuple[float, float, float]
    errors: tuple[float, float, float]
    y1_lower: float
    e1_upper: float
    single_photon_fraction: float
    leaked_ec_bits: int
    verify_bits: int
    auth_bits: int
    final_bits: int
    secret_bits: int
    verified: bool
    messages: int
    channel_bytes: int
    wall_s: float
    postprocessing_s: float
    alice_s: float
    bob_s: float


    @property
    def pulses(self) -> int:
        """Alias of ``n_pulses``."""
        return self.n_pulses


@dataclass
class LinkStats:
    """Running totals of a link (see :attr:`SimulatedLink.stats`)."""

    blocks: int = 0
    pulses: int = 0
    simulated_seconds: float = 0.0
    wall_seconds: float = 0.0
    sifted_bits: int = 0
    key_bits: int = 0
    errors_corrected: int = 0
    leaked_ec_bits: int = 0
    final_bits: int = 0
    failed_verifications: int = 0
    failed_blocks: int = 0
    alarms: int = 0
    last_qber: float = 0.0

    @property
    def key_rate_bps(self) -> float:
        """Delivered secret key per simulated second."""
        return self.final_bits / self.simulated_seconds if self.simulated_seconds else 0.0

    @property
    def qber(self) -> float:
        """QBER over all reconciled bits so far (errors corrected / key bits)."""
        return self.errors_corrected / self.key_bits if self.key_bits else 0.0

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall-clock second (> 1: faster than life)."""
        return self.simulated_seconds / self.wall_seconds if self.wall_seconds else 0.0


class SimulatedLink:
    """A simulated decoy-state BB84 link between two trusted nodes.

    Each call of :meth:`run_block` sends one block of pulses through the
    optical model and runs the whole post-processing protocol between
    :class:`AliceEnd` and :class:`BobEnd` over the authenticated channel.

    Args:
        name: link name (appears in errors and stats).
        params: the physical model and protocol settings.
        seed: makes the link reproducible (``None``: fresh entropy). Three
            independent streams are derived: optics, Alice, Bob; the
            pre-shared authentication secret comes from a fourth.
        latch_alarm: if true, an alarm stays until :meth:`clear_alarm` (every
            block raises meanwhile). By default the alarm reflects the last
            block: it is raised by a block above the threshold and cleared by
            the next block that passes parameter estimation.

    Attributes:
        alarm: the link is in the alarm state (eavesdropper suspected).
        alarm_qber: QBER of the block that raised the alarm.
        stats: running totals (:class:`LinkStats`).
        channel: the authenticated classical channel (transcript of the last block).
    """

    #: The fidelity this class simulates (see :class:`.modellink.ModelLink`).
    fidelity = "protocol"

    def __init__(self, name: str, params: LinkParams, seed: int | None = None, *,
                 latch_alarm: bool = False) -> None:
        self.name = name
        self.latch_alarm = latch_alarm
        self._params = params
        ss = np.random.SeedSequence(seed)
        s_opt, s_alice, s_bob, s_auth = ss.spawn(4)
        self._optics = OpticalLayer(params, np.random.default_rng(s_opt))
        self._alice_rng = np.random.default_rng(s_alice)
        self._bob_rng = np.random.default_rng(s_bob)
        secret = np.random.default_rng(s_auth).bytes(32 + AUTH_PAD_BYTES)
        self.channel = AuthenticatedChannel(secret[:32], secret[32:])
        self.alarm = False
        self.alarm_qber: float | None = None
        self.stats = LinkStats()
        self._blocks = 0

    def __repr__(self) -> str:
        return (f"SimulatedLink({self.name!r}, {self._params.length_km:g} km, "
                f"eve={self._params.eve_fraction:g}, alarm={self.alarm})")

    @property
    def params(self) -> LinkParams:
        """Current parameters (replaced by :meth:`set_eavesdropper`)."""
        return self._params

    def set_eavesdropper(self, fraction: float) -> None:
        """Let an intercept-resend eavesdropper attack ``fraction`` of the pulses (0 = none)."""
        self._params = self._params.replace(eve_fraction=fraction)
        self._optics.params = self._params

    def clear_alarm(self) -> None:
        """Leave the alarm state (operator acknowledgement, for ``latch_alarm``)."""
        self.alarm = False
        self.alarm_qber = None

    def expected_secret_key_rate(self) -> float:
        """Analytic secret key rate in bit/s (:meth:`LinkParams.expected_secret_key_rate`)."""
        return self._params.expected_secret_key_rate()

    def run_block(self, n_pulses: int | None = None) -> BlockResult:
        """Send one block and run post-processing; return the keys and figures.

        Args:
            n_pulses: pulses in this block (default :meth:`LinkParams.default_block_pulses`).

        Returns:
            The block; ``final_bits`` may be 0 (nothing certifiable, or the
            verification failed: then the block is discarded and counted in
            ``stats.failed_verifications``).

        Raises:
            LinkAlarmError: the estimated QBER exceeds ``qber_abort`` (the link
                enters the alarm state), or the alarm is latched.
            PostProcessingError: a protocol message failed authentication or
                was malformed (the block is lost).
        """
        if self.alarm and self.latch_alarm:
            raise LinkAlarmError(f"link {self.name}: in alarm state (QBER "
                                 f"{self.alarm_qber:.1%}); clear_alarm() first",
                                 link=self.name, qber=self.alarm_qber)
        params = self._params
        n = params.default_block_pulses() if n_pulses is None else int(n_pulses)
        if n <= 0:
            raise ValueError(f"n_pulses must be > 0, got {n}")
        start = time.perf_counter()
        alice_rec, bob_rec = self._optics.transmit(n, self._alice_rng)
        optics_done = time.perf_counter()
        alice = AliceEnd(params, alice_rec, self._alice_rng)
        bob = BobEnd(params, bob_rec, self._bob_rng)
        ch = self.channel
        ch.transcript.clear()
        msgs0, bytes0, auth0 = sum(ch.messages), sum(ch.bytes_sent), ch.auth_bits_consumed
        gen = bob.run()
        clock = time.perf_counter
        t_alice = t_bob = 0.0
        try:
            t0 = clock()
            msg = next(gen)
            t_bob += clock() - t0
            while True:
                incoming = ch.transfer(BOB, msg)
                t0 = clock()
                reply = alice.handle(incoming)
                t_alice += clock() - t0
                incoming = ch.transfer(ALICE, reply)
                t0 = clock()
                msg = gen.send(incoming)
                t_bob += clock() - t0
        except StopIteration as stop:
            t_bob += clock() - t0
            out: BobOutcome = stop.value
        except PostProcessingError:
            ch.discard_block()
            self.stats.failed_blocks += 1
            raise
        ch.authenticate_block()
        auth_bits = ch.auth_bits_consumed - auth0
        if out.decision is not Abort.ALARM and self.alarm:
            logger.info("= link %s: QBER %.2f%%, alarm cleared", self.name, 100 * out.qber)
            self.clear_alarm()
        duration = n / params.pulse_rate_hz
        st = self.stats
        st.blocks += 1
        st.pulses += n
        st.simulated_seconds += duration
        st.last_qber = out.qber
        index = self._blocks
        self._blocks += 1
        if out.decision is Abort.ALARM:
            st.wall_seconds += time.perf_counter() - start
            st.alarms += 1
            self.alarm, self.alarm_qber = True, out.qber
            logger.warning("! link %s: QBER %.2f%% > %.2f%%: eavesdropper suspected",
                           self.name, 100 * out.qber, 100 * params.qber_abort)
            raise LinkAlarmError(f"link {self.name}: QBER {out.qber:.1%} above the "
                                 f"{params.qber_abort:.0%} threshold: eavesdropper suspected",
                                 link=self.name, qber=out.qber)
        alice_key = alice.final_key or b""
        bob_key = out.final_key
        secret_bits = 8 * len(alice_key)
        # Refill the authentication pad with the key it spent (both ends, own copies).
        refill = min(len(alice_key), (auth_bits + 7) // 8) if out.verified else 0
        if refill:
            ch.ends[ALICE].replenish(alice_key[:refill])
            ch.ends[BOB].replenish(bob_key[:refill])
            alice_key, bob_key = alice_key[refill:], bob_key[refill:]
        wall = time.perf_counter() - start
        st.wall_seconds += wall
        st.sifted_bits += out.sifted_bits
        st.key_bits += out.key_bits
        st.errors_corrected += out.corrected
        st.leaked_ec_bits += out.leaked_bits
        st.final_bits += 8 * len(alice_key)
        if out.decision is Abort.CONTINUE and not out.verified:
            st.failed_verifications += 1
            logger.warning("! link %s: block %d failed verification, discarded", self.name, index)
        return BlockResult(
            link=self.name, index=index, alice_key=alice_key, bob_key=bob_key, n_pulses=n,
            duration_s=duration, detections=int(bob_rec.indices.size),
            sifted_bits=out.sifted_bits, key_bits=out.key_bits, qber=out.qber,
            qber_corrected=out.corrected / out.key_bits if out.key_bits else 0.0,
            gains=alice.gains, errors=alice.errors, y1_lower=alice.y1_lower,
            e1_upper=alice.e1_upper, single_photon_fraction=alice.single_photon_fraction,
            leaked_ec_bits=out.leaked_bits,
            verify_bits=TAG_BITS if out.decision is Abort.CONTINUE else 0,
            auth_bits=auth_bits, final_bits=8 * len(alice_key), secret_bits=secret_bits,
            verified=out.verified,
            messages=sum(ch.messages) - msgs0, channel_bytes=sum(ch.bytes_sent) - bytes0,
            wall_s=wall, postprocessing_s=wall - (optics_done - start), alice_s=t_alice,
            bob_s=t_bob)
