"""Tests for qcall.qkd.sim.model: physics, decoy-state bounds, analytic key rate."""

from __future__ import annotations

import itertools
import math

import pytest

from qcall.qkd.sim.model import (
    LinkParams,
    binary_entropy,
    decoy_estimate,
    detection_probabilities,
    expected_gain,
    expected_qber,
    secret_fraction,
)


def test_binary_entropy() -> None:
    assert binary_entropy(0.0) == 0.0
    assert binary_entropy(1.0) == 0.0
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("length_km", -1.0), ("mu", 0.05), ("nu", 0.0), ("p_vacuum", 0.2),
     ("misalignment", 0.5), ("qber_abort", 0.0), ("eve_fraction", 1.5),
     ("block_sifted_bits", 10), ("detector_efficiency", 0.0)],
)
def test_params_validation_names_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        LinkParams(**{"length_km": 10.0, field: value})  # type: ignore[arg-type]


def test_transmittance_follows_fibre_loss() -> None:
    p = LinkParams(50.0, loss_db_per_km=0.2, detector_efficiency=0.5)
    assert p.transmittance == pytest.approx(0.1 * 0.5)
    assert LinkParams(0.0, detector_efficiency=0.3).transmittance == pytest.approx(0.3)


def test_detection_probabilities_sum_to_gain() -> None:
    p = LinkParams(25.0, dark_count_prob=1e-5, misalignment=0.03)
    for match in (True, False):
        c, w, d = detection_probabilities(p, p.mu, match)
        assert c + w + d == pytest.approx(expected_gain(p, p.mu), rel=1e-12)
    c, w, d = detection_probabilities(p, p.mu, False)
    assert c == pytest.approx(w)  # wrong basis: both detectors equally likely


def test_qber_reduces_to_misalignment_and_dark_counts() -> None:
    p = LinkParams(50.0, misalignment=0.03, dark_count_prob=1e-6)
    eta, y0 = p.transmittance, 1 - (1 - 1e-6) ** 2
    # Textbook E*Q = e0*Y0 + e_d*(1 - exp(-eta*mu)) (Ma et al. 2005, Eq. (5)).
    textbook = (0.5 * y0 + 0.03 * (1 - math.exp(-eta * p.mu))) / expected_gain(p, p.mu)
    assert expected_qber(p, p.mu) == pytest.approx(textbook, rel=0.02)


def test_intercept_resend_qber() -> None:
    p = LinkParams(10.0, misalignment=0.02)
    e = expected_qber(p, p.mu, 0.0)
    assert expected_qber(p, p.mu, 1.0) == pytest.approx(0.25 + e / 2)
    assert expected_qber(p, p.mu, 0.4) == pytest.approx(0.8 * e + 0.1)


def test_decoy_bounds_bracket_the_truth() -> None:
    p = LinkParams(40.0, dark_count_prob=1e-6, misalignment=0.02)
    gains = [expected_gain(p, x) for x in p.intensities]
    errs = [expected_qber(p, x) for x in p.intensities]
    est = decoy_estimate(p.intensities, gains, errs)
    eta, keep = p.transmittance, (1 - 1e-6) ** 2
    y1_true = 1 - keep * (1 - eta)
    assert 0.9 * y1_true < est.y1_lower <= y1_true
    assert est.y0_lower == pytest.approx(1 - keep, rel=1e-9)
    assert 0.02 <= est.e1_upper < 0.03
    assert est.q1_lower == pytest.approx(est.y1_lower * p.mu * math.exp(-p.mu))


def test_decoy_bounds_without_signal() -> None:
    est = decoy_estimate((0.5, 0.1, 0.0), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5))
    assert est.y1_lower == 0.0 and est.e1_upper == 0.5
    assert secret_fraction(est, 0.0, 0.5, 1.1) == 0.0


def test_key_rate_falls_with_distance_and_dies_under_attack() -> None:
    rates = [LinkParams(d).expected_secret_key_rate() for d in (0, 25, 50, 100, 150)]
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))
    # ~0.2 dB/km: 50 km more fibre costs about a factor 10 in the linear regime.
    assert 5 < rates[2] / rates[3] < 15
    assert LinkParams(400.0).expected_secret_key_rate() == 0.0
    assert LinkParams(20.0, eve_fraction=1.0).expected_secret_key_rate() == 0.0


def test_default_block_pulses_targets_sifted_bits() -> None:
    p = LinkParams(30.0, block_sifted_bits=1 << 16)
    n = p.default_block_pulses()
    assert n * 0.5 * p.p_signal * expected_gain(p, p.mu) == pytest.approx(1 << 16, rel=1e-3)
    assert LinkParams(30.0, block_pulses=1234).default_block_pulses() == 1234
