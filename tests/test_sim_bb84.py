"""Tests for qcall.qkd.sim.bb84: the optical layer samples the physical model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcall.qkd.sim.bb84 import AliceRecord, BobRecord, OpticalLayer
from qcall.qkd.sim.model import LinkParams, expected_gain, expected_qber


def transmit(params: LinkParams, n: int, seed: int = 1) -> tuple[AliceRecord, BobRecord]:
    optics = OpticalLayer(params, np.random.default_rng(seed))
    return optics.transmit(n, np.random.default_rng(seed + 100))


def sifted_qber(alice: AliceRecord, bob: BobRecord, cls: int) -> tuple[float, int]:
    inten, basis, bit = alice.settings_at(bob.indices)
    sel = (basis == bob.basis) & (inten == cls)
    return float((bit[sel] != bob.bit[sel]).mean()), int(sel.sum())


def within(measured: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(measured - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("misalignment", [0.005, 0.03, 0.07])
def test_qber_matches_model(misalignment: float) -> None:
    p = LinkParams(25.0, misalignment=misalignment, dark_count_prob=1e-6)
    alice, bob = transmit(p, 4_000_000)
    for cls in (0, 1):
        q, n = sifted_qber(alice, bob, cls)
        assert within(q, expected_qber(p, p.intensities[cls]), n)


def test_gains_match_model_per_intensity() -> None:
    p = LinkParams(60.0, dark_count_prob=1e-5)
    alice, bob = transmit(p, 20_000_000)
    inten, _, _ = alice.settings_at(bob.indices)
    assert alice.sent.sum() == 20_000_000
    for cls, x in enumerate(p.intensities):
        n_det = int((inten == cls).sum())
        assert within(n_det / alice.sent[cls], expected_gain(p, x), int(alice.sent[cls]))
    assert within(alice.sent[0] / 20_000_000, p.p_signal, 20_000_000)


def test_sifting_keeps_half_the_detections() -> None:
    p = LinkParams(10.0)
    alice, bob = transmit(p, 2_000_000)
    _, basis, _ = alice.settings_at(bob.indices)
    n_det = bob.indices.size
    assert within(float((basis == bob.basis).mean()), 0.5, n_det)
    expected_det = sum(pr * expected_gain(p, x) for pr, x in zip(p.probabilities,
                                                                 p.intensities, strict=True))
    assert within(n_det / 2_000_000, expected_det, 2_000_000)


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_intercept_resend_raises_qber_as_predicted(fraction: float) -> None:
    p = LinkParams(20.0, eve_fraction=fraction)
    alice, bob = transmit(p, 3_000_000)
    q, n = sifted_qber(alice, bob, 0)
    assert within(q, expected_qber(p, p.mu), n)
    if fraction == 1.0:
        assert 0.24 < q < 0.27
    inten, _, _ = alice.settings_at(bob.indices)
    # The idealised attack leaves the signal gain unchanged.
    assert within(int((inten == 0).sum()) / alice.sent[0], expected_gain(p, p.mu),
                  int(alice.sent[0]))


def test_records_are_separate_and_indices_valid() -> None:
    alice, bob = transmit(LinkParams(5.0), 500_000)
    assert bob.indices is not alice.indices
    assert np.all(np.diff(bob.indices) > 0)
    assert bob.indices[0] >= 0 and bob.indices[-1] < 500_000
    assert set(np.unique(bob.bit)) <= {0, 1} and set(np.unique(bob.basis)) <= {0, 1}
    assert "bit" not in repr(alice) and "bit" not in repr(bob)


def test_settings_for_pulses_without_click_are_drawn_lazily() -> None:
    alice, bob = transmit(LinkParams(5.0), 100_000)
    free = np.setdiff1d(np.arange(2000), bob.indices)[:500]
    inten, basis, bit = alice.settings_at(free)
    assert inten.size == basis.size == bit.size == free.size
    assert inten.max() <= 2 and basis.max() <= 1 and bit.max() <= 1


def test_same_seed_same_block() -> None:
    a1, b1 = transmit(LinkParams(15.0), 200_000, seed=7)
    a2, b2 = transmit(LinkParams(15.0), 200_000, seed=7)
    assert np.array_equal(b1.indices, b2.indices) and np.array_equal(a1.bit, a2.bit)
