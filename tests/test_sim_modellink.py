"""Tests for qcall.qkd.sim.modellink: model-fidelity links against the analytic rate and BB84."""

from __future__ import annotations

import statistics

import pytest

from qcall.exceptions import ConfigError, LinkAlarmError
from qcall.qkd.network import default_link_factory
from qcall.qkd.sim import LinkParams, ModelLink, SimulatedLink
from qcall.qkd.topology import parse_topology


def rate(link: ModelLink | SimulatedLink, blocks: int) -> float:
    rows = [link.run_block() for _ in range(blocks)]
    return sum(r.secret_bits for r in rows) / sum(r.duration_s for r in rows)


@pytest.mark.parametrize("km", [10.0, 60.0, 100.0])
def test_model_rate_matches_the_analytic_rate(km: float) -> None:
    link = ModelLink("m", LinkParams(km), seed=1)
    measured = rate(link, 50)
    assert measured == pytest.approx(link.expected_secret_key_rate(), rel=0.02)
    assert link.stats.qber == pytest.approx(link.params.replace().misalignment, abs=0.005)


def test_model_agrees_with_the_protocol_within_its_error() -> None:
    params = LinkParams(60.0, block_sifted_bits=1 << 16)
    protocol = rate(SimulatedLink("p", params, seed=2), 3)
    model_rows = [ModelLink("m", params, seed=3).run_block() for _ in range(60)]
    per_block = [r.secret_bits / r.duration_s for r in model_rows]
    model = statistics.mean(per_block)
    # The model's error: the spread of its blocks plus the EC-efficiency gap
    # (model f = 1.1, Cascade measures about 1.07): a few per cent.
    assert protocol == pytest.approx(model, rel=0.08)
    assert statistics.stdev(per_block) / model < 0.05


def test_model_block_delivers_equal_fresh_keys() -> None:
    link = ModelLink("m", LinkParams(50.0))
    one, two = link.run_block(), link.run_block()
    assert one.alice_key == one.bob_key and len(one.alice_key) > 1000
    assert one.alice_key != two.alice_key
    assert one.final_bits == 8 * len(one.alice_key) == one.secret_bits - 256
    assert "alice_key" not in repr(one)
    assert link.stats.blocks == 2 and link.stats.final_bits == one.final_bits + two.final_bits
    seeded = [ModelLink("m", LinkParams(50.0), seed=7).run_block().alice_key for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_model_eavesdropper_raises_the_alarm_like_the_protocol() -> None:
    link = ModelLink("m", LinkParams(30.0), seed=4)
    link.run_block()
    link.set_eavesdropper(1.0)
    with pytest.raises(LinkAlarmError, match="eavesdropper suspected") as info:
        link.run_block()
    assert info.value.link == "m" and info.value.qber is not None and info.value.qber > 0.2
    assert link.alarm and link.stats.alarms == 1
    link.set_eavesdropper(0.2)  # below the threshold: less key, no alarm
    weak = link.run_block()
    assert not link.alarm and 0.04 < weak.qber < 0.11
    assert weak.final_bits < 0.3 * link.params.replace(eve_fraction=0.0).expected_secret_key_rate()
    latched = ModelLink("m", LinkParams(30.0, eve_fraction=1.0), seed=5, latch_alarm=True)
    with pytest.raises(LinkAlarmError):
        latched.run_block()
    latched.set_eavesdropper(0.0)
    with pytest.raises(LinkAlarmError, match="clear_alarm"):
        latched.run_block()
    latched.clear_alarm()
    assert latched.run_block().final_bits > 0


def test_too_long_a_model_link_gives_no_key() -> None:
    block = ModelLink("m", LinkParams(250.0), seed=6).run_block()
    assert block.final_bits == 0 and block.alice_key == b""


def test_link_factory_follows_the_topology_fidelity() -> None:
    topo = parse_topology(
        {
            "name": "mixed",
            "nodes": [{"name": n} for n in "ABC"],
            "links": [
                {"a": "A", "b": "B", "length_km": 40, "fidelity": "protocol"},
                {"a": "B", "b": "C", "length_km": 40, "fidelity": "model"},
                {"a": "A", "b": "C", "length_km": 40},
            ],
        }
    )
    auto = default_link_factory()
    kinds = [type(auto(link, 1)).__name__ for link in topo.links.values()]
    assert kinds == ["SimulatedLink", "ModelLink", "SimulatedLink"]
    forced = default_link_factory(fidelity="model")
    assert {type(forced(link, 1)).__name__ for link in topo.links.values()} == {"ModelLink"}
    with pytest.raises(ConfigError, match="fidelity must be one of protocol, model"):
        default_link_factory(fidelity="cheap")
