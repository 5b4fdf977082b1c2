"""Physical model of a decoy-state BB84 fibre link and its analytic key rate.

Pure functions, no randomness. The optical simulation (:mod:`.bb84`) samples
from exactly these probabilities, so the analytic and simulated numbers agree
in expectation.

Physics (weak coherent pulses, threshold detectors):

* Channel + detector transmittance ``eta = 10**(-alpha*L/10) * eta_det``.
* A coherent pulse of mean photon number ``mu`` sent in basis ``a`` and
  measured in basis ``b``: the two detectors receive independent Poisson
  photon numbers, with means ``eta*mu*(1-e_d)`` (correct detector) and
  ``eta*mu*e_d`` (wrong detector) when ``a == b`` (``e_d`` is the optical
  misalignment) and ``eta*mu/2`` each when ``a != b``. Each detector also
  fires by itself with the dark-count probability ``p_d`` per gate. A double
  click is turned into a random bit (squashing).
* Hence the gain ``Q = 1 - (1-p_d)**2 * exp(-eta*mu)`` and the exact error
  probability used here; for ``p_d, e_d`` small it reduces to the textbook
  ``E*Q = e0*Y0 + e_d*(1 - exp(-eta*mu))`` of Ma et al. 2005, Eq. (4)-(5).

Key rate (GLLP with decoy-state estimates):

* Gottesman, Lo, Lütkenhaus, Preskill, "Security of QKD with imperfect
  devices", QIC 4, 325 (2004) (GLLP)::

      R >= q * ( -Q_mu * f * H2(E_mu) + Q_1 * (1 - H2(e_1)) )

* Lo, Ma, Chen, "Decoy state quantum key distribution", PRL 94, 230504
  (2005), and Ma, Qi, Zhao, Lo, "Practical decoy state for quantum key
  distribution", PRA 72, 012326 (2005), Sec. V (two decoys ``nu > omega``,
  Eq. (34)-(37); ``omega = 0`` is the vacuum + weak decoy protocol)::

      Y_0^L = max(0, (nu*Q_om*e^om - om*Q_nu*e^nu) / (nu - om))
      Y_1^L = mu / (mu*nu - mu*om - nu^2 + om^2)
              * (Q_nu*e^nu - Q_om*e^om - (nu^2-om^2)/mu^2 * (Q_mu*e^mu - Y_0^L))
      e_1^U = (E_nu*Q_nu*e^nu - E_om*Q_om*e^om) / ((nu - om) * Y_1^L)
      Q_1^L = Y_1^L * mu * exp(-mu)

``q = 1/2`` (symmetric BB84 sifting). Only signal pulses (probability
``p_signal``) carry key; decoy and vacuum pulses are disclosed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = [
    "DecoyEstimate",
    "LinkParams",
    "binary_entropy",
    "decoy_estimate",
    "detection_probabilities",
    "expected_gain",
    "expected_qber",
    "secret_fraction",
]


def binary_entropy(p: float) -> float:
    """Return ``H2(p)`` in bits (0 at p = 0 or 1; p is clipped to [0, 1])."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


@dataclass(frozen=True)
class LinkParams:
    """Physical and protocol parameters of one simulated QKD fibre link.

    Defaults describe a modern GHz-clocked decoy-state BB84 system with
    InGaAs/SNSPD-class detectors; all are overridable.

    Attributes:
        length_km: fibre length.
        loss_db_per_km: fibre attenuation (0.2 dB/km, standard SMF-28 at 1550 nm).
        pulse_rate_hz: source repetition rate.
        mu, nu, omega: signal, weak decoy and (weak) vacuum intensities, mu > nu > omega >= 0.
        p_signal, p_decoy, p_vacuum: probabilities of each intensity (sum to 1).
        detector_efficiency: Bob's detection efficiency (including his optics).
        dark_count_prob: dark-count probability per detector per gate.
        misalignment: optical error probability e_d.
        ec_efficiency: reconciliation efficiency f used by the analytic model (the
            simulation counts the real Cascade leakage instead).
        qber_abort: abort threshold on the estimated signal QBER.
        eve_fraction: fraction of pulses an intercept-resend eavesdropper attacks.
        sample_fraction: share of sifted signal bits disclosed to estimate the QBER.
        block_sifted_bits: target sifted signal bits per block (sets the default block size).
        block_pulses: explicit pulses per block (overrides ``block_sifted_bits``).
    """

    length_km: float
    loss_db_per_km: float = 0.2
    pulse_rate_hz: float = 1.0e9
    mu: float = 0.5
    nu: float = 0.1
    omega: float = 0.0
    p_signal: float = 0.8
    p_decoy: float = 0.1
    p_vacuum: float = 0.1
    detector_efficiency: float = 0.2
    dark_count_prob: float = 1.0e-7
    misalignment: float = 0.01
    ec_efficiency: float = 1.1
    qber_abort: float = 0.11
    eve_fraction: float = 0.0
    sample_fraction: float = 0.05
    block_sifted_bits: int = 1 << 18
    block_pulses: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"LinkParams.{field} must be {rule}, got {getattr(self, field)!r}")

        check(self.length_km >= 0 and math.isfinite(self.length_km), "length_km", ">= 0")
        check(self.loss_db_per_km >= 0, "loss_db_per_km", ">= 0")
        check(self.pulse_rate_hz > 0, "pulse_rate_hz", "> 0")
        check(self.mu > self.nu, "mu", "> nu")
        check(self.nu > self.omega, "nu", "> omega")
        check(self.omega >= 0, "omega", ">= 0")
        for name in ("p_signal", "p_decoy", "p_vacuum"):
            check(0.0 < getattr(self, name) < 1.0, name, "in (0, 1)")
        total = self.p_signal + self.p_decoy + self.p_vacuum
        check(abs(total - 1.0) < 1e-9, "p_vacuum", "such that p_signal + p_decoy + p_vacuum == 1")
        check(0.0 < self.detector_efficiency <= 1.0, "detector_efficiency", "in (0, 1]")
        check(0.0 <= self.dark_count_prob < 0.5, "dark_count_prob", "in [0, 0.5)")
        check(0.0 <= self.misalignment < 0.5, "misalignment", "in [0, 0.5)")
        check(self.ec_efficiency >= 1.0, "ec_efficiency", ">= 1")
        check(0.0 < self.qber_abort < 0.5, "qber_abort", "in (0, 0.5)")
        check(0.0 <= self.eve_fraction <= 1.0, "eve_fraction", "in [0, 1]")
        check(0.0 < self.sample_fraction < 0.5, "sample_fraction", "in (0, 0.5)")
        check(self.block_sifted_bits >= 1024, "block_sifted_bits", ">= 1024")
        check(self.block_pulses is None or self.block_pulses > 0, "block_pulses", "> 0")

    # --- derived quantities -----------------------------------------------------

    @property
    def intensities(self) -> tuple[float, float, float]:
        """(mu, nu, omega): signal, decoy, vacuum intensities, in class order 0, 1, 2."""
        return (self.mu, self.nu, self.omega)

    @property
    def probabilities(self) -> tuple[float, float, float]:
        """Probabilities of intensity classes 0 (signal), 1 (decoy), 2 (vacuum)."""
        return (self.p_signal, self.p_decoy, self.p_vacuum)

    @property
    def transmittance(self) -> float:
        """Overall transmittance eta (fibre loss times detector efficiency)."""
        loss_db = self.loss_db_per_km * self.length_km
        return float(10.0 ** (-loss_db / 10.0) * self.detector_efficiency)

    def replace(self, **changes: object) -> LinkParams:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def default_block_pulses(self) -> int:
        """Pulses per block: ``block_pulses`` or enough for ``block_sifted_bits``."""
        if self.block_pulses is not None:
            return self.block_pulses
        sifted_per_pulse = 0.5 * self.p_signal * expected_gain(self, self.mu)
        return max(1, math.ceil(self.block_sifted_bits / sifted_per_pulse))

    def expected_secret_key_rate(self) -> float:
        """Analytic secret key rate in bits per second (see the module docstring).

        ``pulse_rate * p_signal * (1 - sample_fraction) * R`` with ``R`` the GLLP
        rate per signal pulse from the expected decoy statistics (no eavesdropper
        unless ``eve_fraction`` > 0; the intercept-resend attack raises the decoy
        error rates and so lowers the bound, usually to zero).
        """
        gains = [expected_gain(self, x) for x in self.intensities]
        errs = [expected_qber(self, x) for x in self.intensities]
        est = decoy_estimate(self.intensities, gains, errs)
        per_signal = secret_fraction(est, gains[0], errs[0], self.ec_efficiency)
        return self.pulse_rate_hz * self.p_signal * (1.0 - self.sample_fraction) * per_signal


def detection_probabilities(
    params: LinkParams, intensity: float, basis_match: bool
) -> tuple[float, float, float]:
    """Per-pulse click probabilities for one intensity and basis relation.

    Args:
        params: the link.
        intensity: mean photon number of the pulse leaving Alice.
        basis_match: whether Bob measures in the basis the pulse is encoded in.

    Returns:
        ``(p_correct_only, p_wrong_only, p_double)``: only the detector of the
        encoded bit clicks, only the other one, both.
    """
    m = params.transmittance * intensity
    keep = 1.0 - params.dark_count_prob
    if basis_match:
        m_right, m_wrong = m * (1.0 - params.misalignment), m * params.misalignment
    else:
        m_right = m_wrong = m / 2.0
    p_c = 1.0 - keep * math.exp(-m_right)
    p_w = 1.0 - keep * math.exp(-m_wrong)
    return (p_c * (1.0 - p_w), p_w * (1.0 - p_c), p_c * p_w)


def expected_gain(params: LinkParams, intensity: float) -> float:
    """Gain ``Q = 1 - (1 - p_d)**2 exp(-eta*intensity)`` (unaffected by intercept-resend)."""
    keep = 1.0 - params.dark_count_prob
    return 1.0 - keep * keep * math.exp(-params.transmittance * intensity)


def expected_qber(params: LinkParams, intensity: float, eve_fraction: float | None = None) -> float:
    """Expected sifted QBER for one intensity.

    Without Eve: ``(p_wrong_only + p_double/2) / Q`` for matching bases. With
    intercept-resend on a fraction ``f`` of pulses, Eve guesses the basis wrong
    half the time and then Bob's sifted bit is random:
    ``E(f) = (1 - f/2) * E + f/4`` (25 % + E/2 at f = 1).
    """
    f = params.eve_fraction if eve_fraction is None else eve_fraction
    c, w, d = detection_probabilities(params, intensity, True)
    e = (w + d / 2.0) / (c + w + d)
    return (1.0 - f / 2.0) * e + f / 4.0


@dataclass(frozen=True)
class DecoyEstimate:
    """Decoy-state bounds (Ma et al. 2005, Eq. (34)-(37)).

    Attributes:
        y0_lower: lower bound on the vacuum yield Y_0.
        y1_lower: lower bound on the single-photon yield Y_1.
        e1_upper: upper bound on the single-photon error rate e_1 (clipped to 0.5).
        q1_lower: lower bound on the single-photon gain ``Y_1 mu e^-mu``.
    """

    y0_lower: float
    y1_lower: float
    e1_upper: float
    q1_lower: float


def decoy_estimate(
    intensities: tuple[float, float, float] | list[float],
    gains: tuple[float, float, float] | list[float],
    errors: tuple[float, float, float] | list[float],
) -> DecoyEstimate:
    """Bound Y_0, Y_1, e_1 from measured (or expected) gains and error rates.

    Args:
        intensities: ``(mu, nu, omega)``.
        gains: ``(Q_mu, Q_nu, Q_omega)``, detections per pulse sent.
        errors: ``(E_mu, E_nu, E_omega)``, sifted error rates (only E_nu and E_omega are used).

    Returns:
        The bounds; ``y1_lower`` is 0 (and ``e1_upper`` 0.5) when the data
        cannot certify any single-photon contribution.
    """
    mu, nu, om = intensities
    q_mu, q_nu, q_om = gains
    _e_mu, e_nu, e_om = errors
    y0 = max(0.0, (nu * q_om * math.exp(om) - om * q_nu * math.exp(nu)) / (nu - om))
    denom = mu * nu - mu * om - nu * nu + om * om
    y1 = (mu / denom) * (
        q_nu * math.exp(nu) - q_om * math.exp(om) - (nu * nu - om * om) / (mu * mu)
        * (q_mu * math.exp(mu) - y0)
    )
    if not y1 > 0.0:
        return DecoyEstimate(y0, 0.0, 0.5, 0.0)
    e1 = (e_nu * q_nu * math.exp(nu) - e_om * q_om * math.exp(om)) / ((nu - om) * y1)
    e1 = min(0.5, max(0.0, e1))
    return DecoyEstimate(y0, y1, e1, y1 * mu * math.exp(-mu))


def secret_fraction(est: DecoyEstimate, q_mu: float, e_mu: float, f: float) -> float:
    """GLLP rate per signal pulse: ``q * (Q_1 (1 - H2(e_1)) - Q_mu f H2(E_mu))``, >= 0."""
    r = 0.5 * (est.q1_lower * (1.0 - binary_entropy(est.e1_upper))
               - q_mu * f * binary_entropy(e_mu))
    return max(0.0, r)
