"""The bundled national network runs: 206 simulated links, 18 KMEs, 306 SAE pairs served.

All links at model fidelity here (the protocol-fidelity demo route is the
``beijing-hefei`` chain, exercised in tests/test_network.py); every pair gets a
key through the real ETSI GS QKD 014 KMEs, and the demo pair's key arrives.
"""

from __future__ import annotations

from pathlib import Path

from qcall.qkd.client import open_key_source
from qcall.qkd.network import SimulatedNetwork, default_link_factory
from qcall.qkd.topology import load_topology

from .utils import TIMEOUT_FACTOR

TIMEOUT = 60 * TIMEOUT_FACTOR


async def test_national_network_serves_every_pair(tmp_path: Path) -> None:
    topo = load_topology("national")
    factory = default_link_factory(fidelity="model")
    async with SimulatedNetwork.start(
        topo, tmp_path / "state", link_factory=factory, seed=4, pool_target=2
    ) as net:
        await net.wait_ready(TIMEOUT)
        status = net.status()
        active = [link for link in status["links"].values() if link["active"]]
        assert len(active) == len(topo.serving_links()) == 206
        assert {link["fidelity"] for link in active} == {"model"}
        assert len(status["pairs"]) == 18 * 17
        assert all(pair["delivered"] >= 1 for pair in status["pairs"])
        route = net.route("alice", "bob")
        assert route[0] == "Beijing" and route[-1] == "Yaohai_AP01"
        async with (
            open_key_source(net.sae_credentials("alice").as_config()) as beijing,
            open_key_source(net.sae_credentials("guangzhou").as_config()) as guangzhou,
        ):
            key = await beijing.get_key("guangzhou", application="message")
            assert (await guangzhou.get_key_by_id("alice", key.key_id)).key == key.key


def test_auto_fidelity_runs_the_demo_route_at_protocol() -> None:
    topo = load_topology("national")
    make = default_link_factory()
    path = topo.shortest_path("Beijing", "Yaohai_AP01")
    assert path is not None
    demo = {link.name for link in topo.path_links(path)}
    kinds = {name: getattr(make(link, 1), "fidelity") for name, link in topo.links.items()}
    assert {kinds[name] for name in demo} == {"protocol"}
    assert {kind for name, kind in kinds.items() if name not in demo} == {"model"}
