"""Tests for qcall.qkd.sim.link: the whole protocol between two separate ends."""

from __future__ import annotations

import numpy as np
import pytest

from qcall.exceptions import ChannelAuthenticationError, LinkAlarmError, PostProcessingError
from qcall.qkd.sim import LinkParams, SimulatedLink, messages as m
from qcall.qkd.sim.bb84 import OpticalLayer
from qcall.qkd.sim.link import AliceEnd, final_length
from qcall.qkd.sim.model import binary_entropy, expected_gain, expected_qber

SMALL = 1 << 15  # sifted signal bits per block in these tests


def params(length_km: float = 10.0, **kw: object) -> LinkParams:
    kw.setdefault("block_sifted_bits", SMALL)
    return LinkParams(length_km, **kw)  # type: ignore[arg-type]


def test_block_delivers_equal_keys_with_expected_sizes() -> None:
    p = params(20.0)
    link = SimulatedLink("a-b", p, seed=1)
    r = link.run_block()
    assert r.verified and r.final_bits > 0
    assert r.alice_key == r.bob_key and len(r.alice_key) * 8 == r.final_bits
    n = r.n_pulses
    assert r.duration_s == pytest.approx(n / p.pulse_rate_hz)
    det = sum(pr * expected_gain(p, x) for pr, x in zip(p.probabilities, p.intensities,
                                                        strict=True))
    assert r.detections == pytest.approx(n * det, rel=0.03)
    assert r.sifted_bits == pytest.approx(n * det / 2, rel=0.03)
    assert r.key_bits == pytest.approx(SMALL * (1 - p.sample_fraction), rel=0.03)
    assert r.qber_corrected == pytest.approx(expected_qber(p, p.mu), rel=0.15)
    # Final length follows the measured bounds and the counted leakage exactly.
    expected = final_length(r.key_bits, r.single_photon_fraction, r.e1_upper,
                            r.leaked_ec_bits)
    assert r.secret_bits == expected and r.final_bits == expected - r.auth_bits
    assert r.auth_bits == 256 and r.verify_bits == 64
    # Real Cascade leakage is near the Shannon limit.
    assert 1.0 < r.leaked_ec_bits / (r.key_bits * binary_entropy(r.qber_corrected)) < 1.3


def test_simulated_rate_tracks_analytic_model() -> None:
    p = params(25.0, block_sifted_bits=1 << 17)
    link = SimulatedLink("a-b", p, seed=2)
    for _ in range(2):
        link.run_block()
    assert link.stats.key_rate_bps == pytest.approx(link.expected_secret_key_rate(), rel=0.2)
    assert link.stats.blocks == 2 and link.stats.final_bits > 0
    assert link.stats.qber == pytest.approx(expected_qber(p, p.mu), rel=0.1)
    assert link.stats.speedup > 0


def test_keys_differ_between_blocks_and_seeds() -> None:
    a = SimulatedLink("a", params(), seed=3)
    b = SimulatedLink("b", params(), seed=4)
    r1, r2, r3 = a.run_block(), a.run_block(), b.run_block()
    assert r1.alice_key != r2.alice_key and r1.alice_key[:32] != r3.alice_key[:32]
    again = SimulatedLink("a", params(), seed=3).run_block()
    assert again.alice_key == r1.alice_key  # reproducible from the seed


def test_repr_never_shows_key_bytes() -> None:
    r = SimulatedLink("a-b", params(), seed=5).run_block()
    assert r.alice_key.hex()[:16] not in repr(r)
    assert "alice_key" not in repr(r)


def test_eavesdropper_triggers_alarm_and_link_stops() -> None:
    link = SimulatedLink("n1-n2", params(30.0), seed=6)
    link.run_block()
    link.set_eavesdropper(1.0)
    for _ in range(2):  # no key while Eve is there
        with pytest.raises(LinkAlarmError) as info:
            link.run_block()
        assert info.value.link == "n1-n2"
        assert info.value.qber == pytest.approx(
            expected_qber(link.params, link.params.mu), abs=0.02)
        assert link.alarm and link.alarm_qber == info.value.qber
    assert link.stats.alarms == 2
    link.set_eavesdropper(0.0)
    r = link.run_block()  # the alarm follows the last block
    assert not link.alarm and link.alarm_qber is None
    assert r.final_bits > 0 and r.alice_key == r.bob_key


def test_latched_alarm_needs_clearing() -> None:
    link = SimulatedLink("n1-n2", params(30.0, eve_fraction=1.0), seed=6, latch_alarm=True)
    with pytest.raises(LinkAlarmError):
        link.run_block()
    link.set_eavesdropper(0.0)
    with pytest.raises(LinkAlarmError, match="alarm state"):
        link.run_block()
    assert link.stats.blocks == 1  # refused without sending pulses
    link.clear_alarm()
    assert link.run_block().final_bits > 0


def test_partial_eavesdropping_raises_qber_and_shrinks_key() -> None:
    p = params(10.0, eve_fraction=0.2, block_sifted_bits=1 << 17)
    r = SimulatedLink("a-b", p, seed=7).run_block()
    assert r.qber_corrected == pytest.approx(expected_qber(p, p.mu), rel=0.1)
    assert r.qber < p.qber_abort  # 5.9 %: no alarm ...
    # ... but the decoy bounds see it (e1 rises) and privacy amplification
    # removes Eve's information: the key rate drops by an order of magnitude.
    assert r.e1_upper > 0.05
    clean = p.replace(eve_fraction=0.0).expected_secret_key_rate()
    assert r.secret_bits / r.duration_s < 0.25 * clean
    assert r.alice_key == r.bob_key


def test_too_long_link_gives_no_key_without_error() -> None:
    # 250 km: QBER ~9 % (dark counts), below the alarm, but nothing certifiable.
    r = SimulatedLink("long", params(250.0, block_pulses=10**11), seed=8).run_block()
    assert 0.07 < r.qber < 0.11
    assert r.final_bits == 0 and r.alice_key == r.bob_key == b""
    assert r.leaked_ec_bits == 0  # stopped after parameter estimation


def test_dark_count_dominated_link_alarms() -> None:
    # Physically indistinguishable from an attack: QBER above threshold.
    with pytest.raises(LinkAlarmError):
        SimulatedLink("too-long", params(320.0, block_pulses=10**11), seed=8).run_block()


def test_tampering_on_the_classical_channel_is_detected() -> None:
    link = SimulatedLink("a-b", params(), seed=9)
    count = {"n": 0}

    def mitm(sender: int, frame: bytes) -> bytes:
        count["n"] += 1
        if count["n"] == 5:  # Bob's first Cascade message
            b = bytearray(frame)
            b[12] ^= 0xFF
            return bytes(b)
        return frame

    link.channel.tamper = mitm
    with pytest.raises(ChannelAuthenticationError):
        link.run_block()
    assert link.stats.failed_blocks == 1
    link.channel.tamper = None
    r = link.run_block()  # ends are still in step
    assert r.final_bits > 0 and r.alice_key == r.bob_key


def test_alice_rejects_hostile_detections() -> None:
    p = params()
    optics = OpticalLayer(p, np.random.default_rng(1))
    rec, _ = optics.transmit(100_000, np.random.default_rng(2))

    def alice() -> AliceEnd:
        return AliceEnd(p, rec, np.random.default_rng(3))

    bases = np.zeros(2, dtype=np.uint8)

    def det(gaps: list[int], long: tuple[int, ...] = (), n: int = 100_000,
            b: np.ndarray = bases) -> m.Detections:
        return m.Detections(n_pulses=n, gaps=np.array(gaps, np.uint16),
                            long_gaps=np.array(long, np.uint64), bases=b)

    cases = [
        (det([2, 1], n=5), "n_pulses"),
        (det([2, 1], b=bases[:1]), "bases"),
        (det([3, 0]), "strictly increasing"),
        (det([2, 0xFFFF], (10**6,)), "beyond n_pulses"),
        (det([2, 0xFFFF]), "long_gaps"),
        (det([2, 0xFFFF], (2**63 + 1,)), "long_gaps"),
        (m.Disclosure(bits=bases), "did not expect"),
    ]
    for msg, field in cases:
        with pytest.raises(PostProcessingError, match=field):
            alice().handle(msg)


def test_bob_rejects_hostile_parameters() -> None:
    from qcall.qkd.sim.link import BobEnd

    p = params()
    optics = OpticalLayer(p, np.random.default_rng(1))
    _, rec = optics.transmit(200_000, np.random.default_rng(2))
    gen = BobEnd(p, rec, np.random.default_rng(3)).run()
    det = next(gen)
    assert isinstance(det, m.Detections)
    n = det.bases.size
    match = np.ones(n, dtype=np.uint8)
    disclosure = gen.send(m.Sifting(match=match, intensity=np.ones(n, np.uint8),
                                    sample_seed=bytes(16)))
    assert isinstance(disclosure, m.Disclosure) and disclosure.bits.size == n
    with pytest.raises(PostProcessingError, match="single_photon_fraction"):
        gen.send(m.Parameters(abort=0, qber=0.01, y1_lower=0.1, e1_upper=0.02,
                              single_photon_fraction=float("nan")))


def test_debug_log_shows_messages_but_no_key(caplog: pytest.LogCaptureFixture) -> None:
    link = SimulatedLink("a-b", params(), seed=10)
    link.channel.debug = True
    with caplog.at_level("DEBUG", logger="qcall.qkd.sim"):
        r = link.run_block()
    text = caplog.text
    assert "Detections(" in text and "Amplification(" in text
    assert r.alice_key.hex()[:12] not in text
    assert len(link.channel.transcript) == r.messages - 2  # + the two block tags


def test_failed_verification_discards_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import qcall.qkd.sim.link as link_module

    # A crippled Cascade (one pass of 64-bit blocks) leaves errors behind at 5 %:
    # the universal hash must catch them and the block must yield nothing.
    monkeypatch.setattr(link_module, "block_schedule", lambda qber, n: [64])
    link = SimulatedLink("a-b", params(misalignment=0.05), seed=11)
    r = link.run_block()
    assert not r.verified
    assert r.final_bits == 0 and r.alice_key == r.bob_key == b""
    assert link.stats.failed_verifications == 1 and link.stats.final_bits == 0
    monkeypatch.undo()
    r = link.run_block()  # the channel and pads are still in step
    assert r.verified and r.final_bits > 0
