"""Optical layer of decoy-state BB84: Alice's source, the fibre, Eve, Bob's detectors.

Event-level Monte Carlo. At 1 GHz and 100 km only about one pulse in a
thousand gives a click, so instead of drawing every pulse we draw, exactly,
how many pulses fall in each class

    (intensity k, Alice's basis a, Bob's basis b, Eve-flipped d, click outcome o)

from one multinomial per intensity, with the per-pulse probabilities of
:func:`qcall.qkd.sim.model.detection_probabilities` (``o`` is "correct
detector only", "wrong detector only", "double click" or "no click"). Then
only the clicked pulses are materialised: their labels are shuffled and
given random distinct pulse indices, and the bits are drawn (Alice's bit
uniform; Bob's bit equals the bit of the state that reached him for a
correct click, its complement for a wrong click, random for a double click).
The joint distribution of everything either party records is the same as
that of a pulse-by-pulse simulation; pulses without a click are not stored
(their settings are drawn lazily, from the right conditional law, if anyone
asks for them).

Intercept-resend (Eve on a fraction ``f`` of pulses): Eve measures in a
random basis and resends a pulse of the same intensity prepared in her
basis with her result. When her basis equals Alice's (probability 1/2) the
resent state equals Alice's; otherwise (``d = 1``, probability ``f/2``) the
state reaching Bob is in the other basis and carries a random bit. This is
the textbook idealised attack: it leaves the gains unchanged and raises the
sifted QBER to ``(1 - f/2) E + f/4``.

The party records are separate objects: :class:`AliceRecord` holds what
Alice's source logged, :class:`BobRecord` what Bob's detectors logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .model import LinkParams, detection_probabilities

__all__ = ["AliceRecord", "BobRecord", "OpticalLayer"]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# Outcome codes within a (k, a, b, d) class.
_CORRECT, _WRONG, _DOUBLE = 0, 1, 2


@dataclass
class AliceRecord:
    """What Alice's source logged for one block.

    Attributes:
        n_pulses: pulses sent.
        sent: pulses sent per intensity class (signal, decoy, vacuum).
        indices: pulse indices for which settings are stored (sorted).
        intensity, basis, bit: her settings at those indices.
    """

    n_pulses: int
    sent: I64
    indices: I64
    intensity: U8
    basis: U8
    bit: U8
    _rng: np.random.Generator
    _idle_intensity: npt.NDArray[np.float64]

    def __repr__(self) -> str:
        return f"AliceRecord(n_pulses={self.n_pulses}, stored={self.indices.size})"

    def settings_at(self, indices: I64) -> tuple[U8, U8, U8]:
        """Alice's (intensity, basis, bit) at the given pulse indices.

        Indices she has not stored (pulses without a click, which an honest
        Bob never announces) get settings drawn from their conditional law.
        """
        if indices.size == self.indices.size and np.array_equal(indices, self.indices):
            return self.intensity, self.basis, self.bit  # the usual case: Bob's clicks
        pos = np.searchsorted(self.indices, indices)
        pos_c = np.minimum(pos, max(self.indices.size - 1, 0))
        known = (pos < self.indices.size) & (self.indices[pos_c] == indices) if (
            self.indices.size) else np.zeros(indices.size, dtype=bool)
        inten = np.empty(indices.size, dtype=np.uint8)
        basis = np.empty(indices.size, dtype=np.uint8)
        bit = np.empty(indices.size, dtype=np.uint8)
        inten[known] = self.intensity[pos_c[known]]
        basis[known] = self.basis[pos_c[known]]
        bit[known] = self.bit[pos_c[known]]
        n_new = int((~known).sum())
        if n_new:
            inten[~known] = self._rng.choice(3, size=n_new, p=self._idle_intensity)
            basis[~known] = self._rng.integers(0, 2, n_new, dtype=np.uint8)
            bit[~known] = self._rng.integers(0, 2, n_new, dtype=np.uint8)
        return inten, basis, bit


@dataclass
class BobRecord:
    """What Bob's detectors logged for one block: clicked pulses, bases, bits."""

    n_pulses: int
    indices: I64
    basis: U8
    bit: U8

    def __repr__(self) -> str:
        return f"BobRecord(n_pulses={self.n_pulses}, detections={self.indices.size})"


class OpticalLayer:
    """Source + fibre + (optional) Eve + detectors, with its own RNG.

    Args:
        params: the physical model.
        rng: the generator of the physics (photon statistics, choices of
            bases and bits are the devices' own random numbers).
    """

    def __init__(self, params: LinkParams, rng: np.random.Generator) -> None:
        self.params = params
        self._rng = rng

    def _class_probabilities(self) -> npt.NDArray[np.float64]:
        """Array [k, a, b, d, o] of per-pulse probabilities given intensity k (o: 3 clicks)."""
        p = self.params
        f = p.eve_fraction
        out = np.zeros((3, 2, 2, 2, 3))
        for k, x in enumerate(p.intensities):
            for a in (0, 1):
                for b in (0, 1):
                    for d, pd in ((0, 1.0 - f / 2.0), (1, f / 2.0)):
                        match = b == (a ^ d)
                        out[k, a, b, d] = 0.25 * pd * np.array(
                            detection_probabilities(p, x, match))
        return out

    def transmit(self, n_pulses: int, alice_rng: np.random.Generator) -> tuple[AliceRecord,
                                                                                BobRecord]:
        """Send ``n_pulses`` pulses; return Alice's and Bob's records.

        Args:
            n_pulses: block length in pulses (simulated time ``n / pulse_rate``).
            alice_rng: Alice's generator, used only for settings of pulses she
                is later asked about but did not store.
        """
        rng = self._rng
        p = self.params
        sent = rng.multinomial(n_pulses, p.probabilities).astype(np.int64)
        probs = self._class_probabilities()
        counts = []
        for cls in range(3):
            flat = probs[cls].ravel()
            full = np.append(flat, max(0.0, 1.0 - flat.sum()))
            counts.append(rng.multinomial(int(sent[cls]), full / full.sum())[:-1])
        count = np.concatenate(counts)  # over flattened (k, a, b, d, o)
        labels = rng.permutation(np.repeat(np.arange(count.size), count))
        k, a, b, d, o = np.unravel_index(labels, probs.shape)
        n_det = labels.size
        indices = _distinct_sorted(rng, n_pulses, n_det)

        alice_bit = rng.integers(0, 2, n_det, dtype=np.uint8)
        # Bit of the state that reaches Bob: Alice's, or Eve's random one (d = 1).
        state_bit = np.where(d == 1, rng.integers(0, 2, n_det, dtype=np.uint8), alice_bit)
        flip = np.where(o == _DOUBLE, rng.integers(0, 2, n_det, dtype=np.uint8),
                        (o == _WRONG).astype(np.uint8))
        bob_bit = (state_bit ^ flip).astype(np.uint8)

        # Intensity law of pulses that gave no click (for lazy lookups).
        idle = np.array([sent[i] - counts[i].sum() for i in range(3)], dtype=np.float64)
        idle = idle / idle.sum() if idle.sum() > 0 else np.array(p.probabilities)
        alice = AliceRecord(
            n_pulses=n_pulses, sent=sent, indices=indices, intensity=k.astype(np.uint8),
            basis=a.astype(np.uint8), bit=alice_bit, _rng=alice_rng, _idle_intensity=idle)
        bob = BobRecord(n_pulses=n_pulses, indices=indices.copy(), basis=b.astype(np.uint8),
                        bit=bob_bit)
        return alice, bob


def _distinct_sorted(rng: np.random.Generator, n: int, k: int) -> I64:
    """``k`` distinct sorted pulse indices in ``[0, n)``, in O(k).

    Sorted uniforms from exponential spacings on ``[0, n - k + 1)``, floored,
    plus ``0, 1, ..., k-1``: strictly increasing and within range. (Indices are
    only labels for sifting; their exact law does not affect any statistic.)
    """
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    gaps = rng.standard_exponential(k + 1)
    u = np.cumsum(gaps)[:-1] / gaps.sum()
    base = np.minimum(np.floor(u * (n - k + 1)).astype(np.int64), n - k)
    out: I64 = base + np.arange(k, dtype=np.int64)
    return out
