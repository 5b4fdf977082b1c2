"""Load test: calls offered above a route's capacity are refused or downgraded, never run on
reused key; without admission control they starve (the KME answers 503, no key twice).

A chain A—R—B of two 150 km model-fidelity links at a quarter of device speed
carries about 4 kbit/s of key end to end: three AES calls rekeyed every 0.25 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qcall.qkd.capacity import CallMode
from qcall.qkd.loadtest import network_planner, run_load
from qcall.qkd.network import SimulatedNetwork, default_link_factory
from qcall.qkd.topology import parse_topology

from .utils import TIMEOUT_FACTOR

TIMEOUT = 30 * TIMEOUT_FACTOR
AES = CallMode.aes(0.25)  # 1,024 bit/s of key per call


def chain_network(state: Path) -> Any:
    topo = parse_topology(
        {
            "name": "slow-chain",
            "nodes": [
                {"name": "A", "kme": True, "saes": ["a"]},
                {"name": "R"},
                {"name": "B", "kme": True, "saes": ["b"]},
            ],
            "links": [
                {"a": "A", "b": "R", "length_km": 150},
                {"a": "R", "b": "B", "length_km": 150},
            ],
        }
    )
    return SimulatedNetwork.start(
        topo,
        state,
        link_factory=default_link_factory(fidelity="model", block_sifted_bits=1 << 14),
        speedup=0.25,
        pool_target=16,
        link_capacity_bits=1 << 14,
        seed=3,
        relay_interval=0.01,
    )


async def full_pools(net: Any) -> None:
    """Start the load with the KME pools full, as a network in service has them."""
    await net.wait_ready(TIMEOUT)
    await net.wait_for(lambda: net.pair_status("a", "b")["stored_keys"] >= 16, TIMEOUT)


async def test_admission_holds_capacity_and_refuses_or_downgrades_the_rest(
    tmp_path: Path,
) -> None:
    async with chain_network(tmp_path / "state") as net:
        await full_pools(net)
        planner = network_planner(net)
        capacity = planner.capacity("A", "B", AES).calls
        assert capacity == 3
        report = await run_load(net, "a", "b", AES, capacity + 2, 3.0)
        assert (report.capacity, report.admitted, report.refused) == (3, 3, 2)
        assert report.messages[0].startswith("route A–B is at capacity for aes-0.25s calls")
        assert report.messages[0].endswith("call refused")
        assert report.starved == 0 and report.completed == 3  # capacity is sustainable
        assert report.reused == 0 and report.mismatched == 0
        assert report.keys == 3 * (1 + 12)  # set-up + one rekey every 0.25 s for 3 s

        # Policy with a fallback: the calls above capacity run in the cheaper mode.
        slow = CallMode.aes(2.0)
        down = await run_load(net, "a", "b", AES, 4, 1.0, fallback=slow)
        assert (down.admitted, down.downgraded, down.refused) == (4, 1, 0)
        assert down.messages == [
            m for m in down.messages if m.endswith("downgraded to aes-2s")
        ]
        assert down.starved == 0 and down.reused == 0
        usage = {(r["kme"], r["application"]): r["keys"] for r in net.key_usage()}
        assert usage[("KME-A", "call-setup")] == usage[("KME-B", "call-setup")] == 3 + 4


async def test_without_admission_calls_above_capacity_starve_but_never_reuse_key(
    tmp_path: Path,
) -> None:
    async with chain_network(tmp_path / "state") as net:
        await full_pools(net)
        report = await run_load(net, "a", "b", AES, 10, 4.0, admission=False)
        assert report.admitted == 10 and report.refused == 0
        assert report.starved >= 1  # 10 kbit/s asked of a 4 kbit/s route
        assert report.reused == 0 and report.mismatched == 0
