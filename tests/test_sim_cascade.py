"""Tests for qcall.qkd.sim.cascade: Cascade makes Bob's key equal to Alice's."""

from __future__ import annotations

import numpy as np
import pytest

from qcall.exceptions import PostProcessingError
from qcall.qkd.sim import messages as m
from qcall.qkd.sim.cascade import CascadeAlice, CascadeBob, block_schedule
from qcall.qkd.sim.model import binary_entropy
from qcall.qkd.sim.verify import verification_tag


def reconcile(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray, CascadeAlice,
                                                      CascadeBob, int]:
    rng = np.random.default_rng(seed)
    alice_key = rng.integers(0, 2, n, dtype=np.uint8)
    errors = (rng.random(n) < qber).astype(np.uint8)
    alice = CascadeAlice(alice_key, np.random.default_rng([seed, 1]))
    bob = CascadeBob(alice_key ^ errors, block_schedule(qber, n))
    gen = bob.run()
    try:
        msg = next(gen)
        while True:
            # Every message goes through the wire encoding, as on the channel.
            reply = alice.handle(m.decode(m.encode(msg)))
            msg = gen.send(m.decode(m.encode(reply)))
    except StopIteration:
        pass
    return alice_key, bob.key, alice, bob, int(errors.sum())


@pytest.mark.parametrize("qber", [0.005, 0.01, 0.02, 0.04, 0.08])
def test_keys_equal_after_cascade_across_seeds(qber: float) -> None:
    hash_rng = np.random.default_rng(99)
    for seed in range(40):
        n = 4096 + 997 * seed
        a, b, alice, bob, n_err = reconcile(n, qber, seed)
        hash_seed = hash_rng.integers(0, 2, n + 63, dtype=np.uint8)
        assert verification_tag(a, hash_seed) == verification_tag(b, hash_seed)
        assert np.array_equal(a, b)
        assert bob.corrected == n_err
        assert alice.leaked_bits == bob.leaked_bits


def test_leakage_is_close_to_shannon_limit_on_large_blocks() -> None:
    a, b, alice, _, n_err = reconcile(1 << 17, 0.02, 5)
    f = alice.leaked_bits / ((1 << 17) * binary_entropy(n_err / (1 << 17)))
    assert np.array_equal(a, b)
    assert 1.0 < f < 1.16


def test_error_free_key_costs_only_top_level_parities() -> None:
    a, b, alice, bob, _ = reconcile(8192, 0.0, 1)
    assert np.array_equal(a, b)
    assert bob.corrected == 0
    assert alice.leaked_bits == sum(-(-8192 // k) for k in block_schedule(0.0, 8192))


def test_block_schedule_shape() -> None:
    s = block_schedule(0.02, 60_000)
    assert s[0] == round(0.73 / 0.02) and s[1] == 4 * s[0]
    assert s[2:] == [15_000] * 8  # 4 blocks per late pass: (1/4)**8 = 2**-16
    s = block_schedule(0.02, 100_000)
    assert s[2:] == [6250] * 4  # 16 blocks per late pass: (1/16)**4 = 2**-16
    assert all(1 <= k <= 2 for k in block_schedule(0.5, 2))


def test_alice_rejects_malformed_queries() -> None:
    alice = CascadeAlice(np.zeros(100, dtype=np.uint8), np.random.default_rng(0))
    with pytest.raises(PostProcessingError, match="block_size"):
        alice.handle(m.PassRequest(block_size=0))
    with pytest.raises(PostProcessingError, match="pass_index"):
        alice.handle(m.ParityQuery(pass_index=0, starts=np.zeros(1, np.uint32),
                                   ends=np.ones(1, np.uint32)))
    alice.handle(m.PassRequest(block_size=10))
    for starts, ends in (([5], [5]), ([0], [101]), ([0, 1], [2])):
        with pytest.raises(PostProcessingError, match=r"ParityQuery\.ends"):
            alice.handle(m.ParityQuery(pass_index=0, starts=np.array(starts, np.uint32),
                                       ends=np.array(ends, np.uint32)))
    with pytest.raises(PostProcessingError, match="unexpected"):
        alice.handle(m.ReconciliationDone())


def test_bob_rejects_wrong_reply() -> None:
    bob = CascadeBob(np.zeros(64, dtype=np.uint8), [8])
    gen = bob.run()
    next(gen)
    with pytest.raises(PostProcessingError, match="PassSetup"):
        gen.send(m.ReconciliationDone())
    gen = CascadeBob(np.zeros(64, dtype=np.uint8), [8]).run()
    next(gen)
    with pytest.raises(PostProcessingError, match="parities"):
        gen.send(m.PassSetup(seed=b"", parities=np.zeros(3, np.uint8)))
    gen = CascadeBob(np.zeros(64, dtype=np.uint8), [8]).run()
    next(gen)
    with pytest.raises(PostProcessingError, match="seed"):
        gen.send(m.PassSetup(seed=bytes(1000), parities=np.zeros(8, np.uint8)))
