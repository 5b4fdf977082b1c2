"""Rerouting and key accounting in the simulated network (model-fidelity links, real KMEs).

A square A—B—D / A—C—D gives the pair (a, d) two routes. Keys relayed over a
link that is then cut or raises an eavesdropper alarm are withdrawn from both
KMEs, so the next key a call draws (its next rekey) comes over the other
route. Every KME counts key spent per application tag and SAE pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qcall.exceptions import KMEBadRequestError, RelayError
from qcall.qkd.client import open_key_source
from qcall.qkd.etsi014 import KeyRequest
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.network import SimulatedNetwork, default_link_factory
from qcall.qkd.relay import LinkState, TrustedNodeRelay
from qcall.qkd.topology import Topology, parse_topology
from qcall.typing import SAEId

from .utils import TIMEOUT_FACTOR

TIMEOUT = 30 * TIMEOUT_FACTOR


def square() -> Topology:
    return parse_topology(
        {
            "name": "square",
            "nodes": [
                {"name": "A", "kme": True, "saes": ["a"]},
                {"name": "B"},
                {"name": "C"},
                {"name": "D", "kme": True, "saes": ["d"]},
            ],
            "links": [
                {"a": "A", "b": "B", "length_km": 40},
                {"a": "B", "b": "D", "length_km": 40},
                {"a": "A", "b": "C", "length_km": 60},
                {"a": "C", "b": "D", "length_km": 60},
            ],
        }
    )


def model_network(state: Path, **options: Any) -> Any:
    return SimulatedNetwork.start(
        square(),
        state,
        link_factory=default_link_factory(fidelity="model", block_sifted_bits=1 << 12),
        speedup=50.0,
        pool_target=4,
        link_capacity_bits=1 << 14,
        seed=2,
        relay_interval=0.01,
        alarm_retry=0.05,
        **options,
    )


def test_relay_avoids_cut_and_unhealthy_links() -> None:
    relay = TrustedNodeRelay(square())
    for buf in relay.buffers.values():
        block = bytes(range(256)) * 4
        buf.deposit(block, block)
    assert relay.route("A", "D", 256) == ["A", "B", "D"]
    relay.buffer("B-D").qber = 0.10  # close to the alarm threshold: costs ~2 hops more
    assert relay.route("A", "D", 256) == ["A", "C", "D"]
    relay.buffer("B-D").qber = None
    relay.set_cut("A-C")
    assert relay.buffer("A-C").state is LinkState.LINK_DOWN and relay.down_links == ["A-C"]
    relay.set_cut("A-B")
    with pytest.raises(RelayError, match="hop 'A-B' is cut; no other route") as info:
        relay.route("A", "D", 256)
    assert info.value.hop == "A-B"
    relay.clear_alarm("A-B")  # a clean block does not repair a cut fibre
    assert relay.buffer("A-B").cut
    relay.set_cut("A-B", False)
    assert relay.live_route("A", "D") == ["A", "B", "D"]


def test_kme_withdraw_only_untouched_keys_and_count_usage() -> None:
    kme = KME("KME-A")
    keys = random_keys(4, 256)
    kme.supply("a", "b", keys)
    first = kme.enc_keys(
        SAEId("a"), "b", KeyRequest(size=128, extension_optional=({"qcall_application": "otp"},))
    )
    # Half of block 0 went out: it stays (its peer must find it); 1 and 3 go.
    gone = kme.withdraw("a", "b", [keys[0][0], keys[1][0], keys[3][0], "nope"])
    assert gone == [keys[1][0], keys[3][0]]
    assert kme.stored_key_count("a", "b") == 1  # 128 bits of block 0 + block 2
    kme.enc_keys(
        SAEId("a"), "b", KeyRequest(extension_mandatory=({"qcall_application": "rekey"},))
    )
    kme.dec_keys(SAEId("b"), "a", [first.keys[0].key_id], application="otp")
    assert kme.usage() == [
        {"application": "otp", "master": "a", "slave": "b", "keys": 2, "bits": 256},
        {"application": "rekey", "master": "a", "slave": "b", "keys": 1, "bits": 256},
    ]
    with pytest.raises(KMEBadRequestError, match="qcall_application must match"):
        kme.enc_keys(
            SAEId("a"), "b", KeyRequest(extension_optional=({"qcall_application": "Bad App"},))
        )
    with pytest.raises(KMEBadRequestError, match="extension_mandatory"):
        kme.enc_keys(SAEId("a"), "b", KeyRequest(extension_mandatory=({"colour": 1},)))
    assert kme.withdraw("x", "y", ["k"]) == []


async def fetch(net: SimulatedNetwork, application: str) -> tuple[str, frozenset[str] | None]:
    """Draw one key as a/d would for ``application``; return its ID and the links it crossed."""
    async with (
        open_key_source(net.sae_credentials("a").as_config()) as at_a,
        open_key_source(net.sae_credentials("d").as_config()) as at_d,
    ):
        key = await at_a.get_key("d", application=application)
        same = await at_d.get_key_by_id("a", key.key_id, application=application)
        assert same.key == key.key
    return key.key_id, net.key_routes.links_of("a", "d", key.key_id)


async def test_next_rekey_is_rerouted_after_a_cut_and_an_alarm(tmp_path: Path) -> None:
    async with model_network(tmp_path / "state") as net:
        await net.wait_ready(TIMEOUT)
        await net.wait_for(lambda: net.pair_status("a", "d")["stored_keys"] >= 4, TIMEOUT)
        _, first = await fetch(net, "call-setup")
        assert first is not None  # for mypy: a relayed key's route is remembered
        assert first in ({"A-B", "B-D"}, {"A-C", "C-D"})  # either route, by key levels
        cut = sorted(first)[1]  # B-D or C-D
        other = {"A-B", "B-D", "A-C", "C-D"} - first

        net.cut_link(cut)
        assert net.status()["links"][cut]["state"] == "LINK_DOWN"
        assert net.pair_status("a", "d")["withdrawn"] >= 1
        if cut == "B-D":  # on the default route: the KME Status says so
            assert net.pair_status("a", "d")["alarm"] == "fibre cut on link B-D; rerouted (2 hops)"
        await net.wait_for(lambda: net.pair_status("a", "d")["stored_keys"] >= 1, TIMEOUT)
        _, links = await fetch(net, "rekey")
        assert links is not None  # for mypy
        assert links == other  # the next rekey came over the other route

        net.cut_link(cut, cut=False)
        attacked = sorted(other)[1]
        net.set_eavesdropper(attacked, 1.0)
        await net.wait_for(
            lambda: net.status()["links"][attacked]["state"] == "LINK_ALARM", TIMEOUT
        )
        await net.wait_for(lambda: net.pair_status("a", "d")["stored_keys"] >= 1, TIMEOUT)
        _, links = await fetch(net, "rekey")
        assert links == first  # and back, away from the eavesdropper

        usage = {(r["kme"], r["application"]): r for r in net.key_usage()}
        assert usage[("KME-A", "call-setup")]["keys"] == 1
        assert usage[("KME-A", "rekey")]["keys"] == 2
        assert usage[("KME-D", "rekey")]["bits"] == 512
        assert usage[("KME-A", "rekey")]["route"] in (["A", "B", "D"], ["A", "C", "D"])
        assert net.status()["key_usage"] == net.key_usage()


def test_relay_tops_up_hundreds_of_pairs_fairly(tmp_path: Path) -> None:
    """20 SAEs (380 ordered pairs) on a star: each top-up round serves the emptiest pools,
    so after 6 rounds of 64 keys every pair has a key (the national network has 306 pairs)."""
    saes = [f"s{i}" for i in range(20)]
    star = parse_topology(
        {
            "name": "star",
            "nodes": [{"name": "Hub"}]
            + [{"name": f"N{i}", "kme": True, "saes": [sae]} for i, sae in enumerate(saes)],
            "links": [{"a": "Hub", "b": f"N{i}", "length_km": 10} for i in range(20)],
        }
    )
    net = SimulatedNetwork(star, tmp_path, pool_target=4, link_capacity_bits=1 << 20)
    for pair in net._pairs:
        net._add_pools(pair)
    for buf in net.relay.buffers.values():
        block = bytes(1 << 17)
        buf.deposit(block, block)
    for _ in range(6):
        assert net.top_up(max_keys=64) == 64
    counts = [net.pair_status(p.master, p.slave)["stored_keys"] for p in net._pairs]
    assert len(counts) == 380 and min(counts) >= 1 and max(counts) <= 2
