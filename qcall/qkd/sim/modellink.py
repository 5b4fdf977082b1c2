"""A QKD link at *model* fidelity: key at the analytic decoy-state rate, with fluctuations.

:class:`SimulatedLink` (``protocol`` fidelity) runs the optical Monte Carlo and
the whole post-processing protocol for every block: about half a second of one
core per block. A national network has hundreds of links, which two cores
cannot post-process in real time. :class:`ModelLink` stands in for such a link
with the same interface (``run_block``, ``set_eavesdropper``, ``alarm``,
``stats``, ``expected_secret_key_rate``) and the same :class:`BlockResult`,
drawing per block only the *statistics* the protocol would measure:

1. pulses per intensity ``n_k ~ Multinomial(n, p_k)``;
2. detections ``D_k ~ Binomial(n_k, Q_k)`` and sifted bits ``S_k ~ Binomial(D_k, 1/2)``
   with the model's gains ``Q_k`` (:func:`.model.expected_gain`);
3. errors among the disclosed bits: all decoy and vacuum bits and a
   ``sample_fraction`` of the signal bits, ``Binomial(·, E_k)`` with the
   model's error rates including an eavesdropper (:func:`.model.expected_qber`);
4. parameter estimation exactly as the protocol's Alice does it (measured
   gains and errors → :func:`.model.decoy_estimate`), the same alarm rule
   (signal QBER above ``qber_abort`` raises :class:`LinkAlarmError`) and the
   same "no key" rule;
5. error correction *modelled*: the leak is ``f · n_key · H2(e)`` with
   ``f = ec_efficiency`` (1.1) and ``e`` the key's true error fraction
   (``Binomial(n_key, E_mu) / n_key``), where the protocol counts the real
   Cascade parities (f ≈ 1.06–1.08, docs/qkd-simulation.md);
6. privacy amplification to :func:`.link.final_length`, less the 256 bits per
   block that repay the authentication pad, as in the protocol.

The key itself is fresh random bytes, the same at both ends (there is nothing
to reconcile): ``os.urandom`` by default, the link's seeded generator when a
seed is given (reproducible tests). Each block costs tens of microseconds.

The two fidelities agree on rate within the model's error: the expected
difference is the error-correction efficiency (model f = 1.1 against Cascade's
measured f), plus per-block statistical noise; ``scripts/bench_qkd.py
--fidelity`` measures both (docs/qkd-simulation.md, *Fidelity*).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from qcall.exceptions import LinkAlarmError

from .link import BlockResult, LinkStats, final_length
from .model import (
    LinkParams,
    binary_entropy,
    decoy_estimate,
    expected_gain,
    expected_qber,
)

__all__ = ["AUTH_BITS_PER_BLOCK", "ModelLink"]

logger = logging.getLogger(__name__)

#: One-time-pad bits the protocol spends per block on its two end-of-block tags.
AUTH_BITS_PER_BLOCK = 256


class ModelLink:
    """A simulated link at model fidelity (see the module docstring).

    Args:
        name: link name (appears in errors and stats).
        params: the physical model and protocol settings.
        seed: makes the statistics *and the key bytes* reproducible (tests);
            ``None``: fresh entropy, key bytes from ``os.urandom``.
        latch_alarm: as for :class:`SimulatedLink`.
    """

    fidelity = "model"

    def __init__(
        self, name: str, params: LinkParams, seed: int | None = None, *, latch_alarm: bool = False
    ) -> None:
        self.name = name
        self.latch_alarm = latch_alarm
        self._params = params
        self._rng = np.random.default_rng(seed)
        self._seeded = seed is not None
        self.alarm = False
        self.alarm_qber: float | None = None
        self.stats = LinkStats()
        self._blocks = 0

    def __repr__(self) -> str:
        return (
            f"ModelLink({self.name!r}, {self._params.length_km:g} km, "
            f"eve={self._params.eve_fraction:g}, alarm={self.alarm})"
        )

    @property
    def params(self) -> LinkParams:
        """Current parameters (replaced by :meth:`set_eavesdropper`)."""
        return self._params

    def set_eavesdropper(self, fraction: float) -> None:
        """Let an intercept-resend eavesdropper attack ``fraction`` of the pulses (0 = none)."""
        self._params = self._params.replace(eve_fraction=fraction)

    def clear_alarm(self) -> None:
        """Leave the alarm state (operator acknowledgement, for ``latch_alarm``)."""
        self.alarm = False
        self.alarm_qber = None

    def expected_secret_key_rate(self) -> float:
        """Analytic secret key rate in bit/s (:meth:`LinkParams.expected_secret_key_rate`)."""
        return self._params.expected_secret_key_rate()

    def _key_bytes(self, size: int) -> bytes:
        return self._rng.bytes(size) if self._seeded else os.urandom(size)

    def run_block(self, n_pulses: int | None = None) -> BlockResult:
        """Draw one block's statistics and key; see :meth:`SimulatedLink.run_block`.

        Raises:
            LinkAlarmError: the estimated QBER exceeds ``qber_abort``, or the
                alarm is latched.
        """
        if self.alarm and self.latch_alarm:
            raise LinkAlarmError(
                f"link {self.name}: in alarm state (QBER {self.alarm_qber:.1%}); "
                "clear_alarm() first",
                link=self.name,
                qber=self.alarm_qber,
            )
        p = self._params
        n = p.default_block_pulses() if n_pulses is None else int(n_pulses)
        if n <= 0:
            raise ValueError(f"n_pulses must be > 0, got {n}")
        start = time.perf_counter()
        rng = self._rng
        sent = rng.multinomial(n, p.probabilities)
        gains_model = [expected_gain(p, x) for x in p.intensities]
        errors_model = [expected_qber(p, x) for x in p.intensities]
        detections = [int(rng.binomial(int(sent[k]), gains_model[k])) for k in range(3)]
        sifted = [int(rng.binomial(d, 0.5)) for d in detections]
        sample = int(rng.binomial(sifted[0], p.sample_fraction))
        key_bits = sifted[0] - sample
        # Disclosed bits: every decoy and vacuum bit, a sample of the signal bits.
        disclosed = [sample, sifted[1], sifted[2]]
        errors: list[float] = []
        for k in range(3):
            wrong = int(rng.binomial(disclosed[k], errors_model[k])) if disclosed[k] else 0
            errors.append(wrong / disclosed[k] if disclosed[k] else 0.5)
        gains = [detections[k] / int(sent[k]) if sent[k] else 0.0 for k in range(3)]
        est = decoy_estimate(p.intensities, gains, errors)
        qber = errors[0]
        spf = est.q1_lower / gains[0] if gains[0] > 0 else 0.0
        duration = n / p.pulse_rate_hz
        st = self.stats
        st.blocks += 1
        st.pulses += n
        st.simulated_seconds += duration
        st.last_qber = qber
        index = self._blocks
        self._blocks += 1
        if sample and qber > p.qber_abort:
            st.alarms += 1
            st.wall_seconds += time.perf_counter() - start
            self.alarm, self.alarm_qber = True, qber
            logger.warning(
                "! link %s: QBER %.2f%% > %.2f%%: eavesdropper suspected",
                self.name,
                100 * qber,
                100 * p.qber_abort,
            )
            raise LinkAlarmError(
                f"link {self.name}: QBER {qber:.1%} above the {p.qber_abort:.0%} "
                "threshold: eavesdropper suspected",
                link=self.name,
                qber=qber,
            )
        if self.alarm:
            logger.info("= link %s: QBER %.2f%%, alarm cleared", self.name, 100 * qber)
            self.clear_alarm()
        true_errors = int(rng.binomial(key_bits, errors_model[0])) if key_bits else 0
        true_qber = true_errors / key_bits if key_bits else 0.0
        leak = math.ceil(p.ec_efficiency * key_bits * binary_entropy(true_qber))
        secret = final_length(key_bits, spf, est.e1_upper, leak) if sample else 0
        delivered = max(0, secret - AUTH_BITS_PER_BLOCK) if secret else 0
        auth_bits = AUTH_BITS_PER_BLOCK if secret else 0
        key = self._key_bytes(delivered // 8)
        wall = time.perf_counter() - start
        st.wall_seconds += wall
        st.sifted_bits += sum(sifted)
        st.key_bits += key_bits
        st.errors_corrected += true_errors
        st.leaked_ec_bits += leak if secret else 0
        st.final_bits += 8 * len(key)
        return BlockResult(
            link=self.name,
            index=index,
            alice_key=key,
            bob_key=key,
            n_pulses=n,
            duration_s=duration,
            detections=sum(detections),
            sifted_bits=sum(sifted),
            key_bits=key_bits,
            qber=qber,
            qber_corrected=true_qber,
            gains=(gains[0], gains[1], gains[2]),
            errors=(errors[0], errors[1], errors[2]),
            y1_lower=est.y1_lower,
            e1_upper=est.e1_upper,
            single_photon_fraction=spf,
            leaked_ec_bits=leak if secret else 0,
            verify_bits=64 if secret else 0,
            auth_bits=auth_bits,
            final_bits=8 * len(key),
            secret_bits=secret,
            verified=bool(secret),
            messages=0,
            channel_bytes=0,
            wall_s=wall,
            postprocessing_s=0.0,
            alice_s=0.0,
            bob_s=0.0,
        )
