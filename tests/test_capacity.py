"""Tests for qcall.qkd.capacity: link rates, max-flow route rate, call modes, admission."""

from __future__ import annotations

import json
import math

import pytest

from qcall.exceptions import CapacityError, TopologyError
from qcall.qkd.capacity import (
    CallAdmission,
    CallMode,
    CapacityPlanner,
    link_key_rate,
    link_rates,
    max_flow,
)
from qcall.qkd.sim import LinkParams
from qcall.qkd.topology import Topology, load_topology, parse_topology


def square(ab: float = 60.0, cd: float = 60.0) -> Topology:
    """A—B—D and A—C—D: two disjoint two-hop routes, plus a dead end E off B."""
    return parse_topology(
        {
            "name": "square",
            "nodes": [{"name": n} for n in "ABCDE"],
            "links": [
                {"a": "A", "b": "B", "length_km": ab},
                {"a": "B", "b": "D", "length_km": 60.0},
                {"a": "A", "b": "C", "length_km": 60.0},
                {"a": "C", "b": "D", "length_km": cd},
                {"a": "B", "b": "E", "length_km": 10.0},
            ],
        }
    )


def test_link_rate_is_the_analytic_model() -> None:
    topo = square()
    rates = link_rates(topo)
    assert rates["A-B"] == pytest.approx(LinkParams(60.0).expected_secret_key_rate())
    assert rates["B-E"] > rates["A-B"]  # shorter is faster
    slow = link_key_rate(topo.link("A-B"), pulse_rate_hz=1e8)
    assert slow == pytest.approx(rates["A-B"] / 10)


def test_max_flow_adds_disjoint_routes_and_takes_bottlenecks() -> None:
    topo = square()
    caps = {"A-B": 5.0, "B-D": 3.0, "A-C": 2.0, "C-D": 7.0, "B-E": 100.0}
    assert max_flow(topo, "A", "D", caps) == pytest.approx(3.0 + 2.0)
    assert max_flow(topo, "D", "A", caps) == pytest.approx(5.0)  # undirected
    assert max_flow(topo, "A", "E", caps) == pytest.approx(5.0 + 2.0)  # A-B, A-C-D-B
    caps["B-D"] = 0.0  # a cut link carries nothing
    assert max_flow(topo, "A", "D", caps) == pytest.approx(2.0)
    assert max_flow(topo, "A", "A", caps) == math.inf
    with pytest.raises(TopologyError, match="unknown node 'Z'"):
        max_flow(topo, "A", "Z", caps)


def test_max_flow_needs_the_residual_graph() -> None:
    """A diamond where the greedy first path must be undone to reach the optimum."""
    topo = parse_topology(
        {
            "name": "diamond",
            "nodes": [{"name": n} for n in "STUV"],
            "links": [
                {"a": "S", "b": "T", "length_km": 1},
                {"a": "S", "b": "U", "length_km": 1},
                {"a": "T", "b": "U", "length_km": 1},
                {"a": "T", "b": "V", "length_km": 1},
                {"a": "U", "b": "V", "length_km": 1},
            ],
        }
    )
    caps = {"S-T": 1.0, "S-U": 1.0, "T-U": 1.0, "T-V": 1.0, "U-V": 1.0}
    assert max_flow(topo, "S", "V", caps) == pytest.approx(2.0)


def test_call_modes() -> None:
    aes = CallMode.aes(60.0)
    assert (aes.name, aes.kind, aes.setup_bits) == ("aes-60s", "aes", 256)
    assert aes.bits_per_second == pytest.approx(256 / 60)
    otp = CallMode.otp(opus_bitrate=8000, frame_ms=20)
    # 20-byte Opus frame + 256-bit one-time MAC key, 50 packets/s, two directions.
    assert otp.bits_per_second == pytest.approx(2 * (160 + 256) * 50)
    assert otp.name == "otp-8k"
    assert CallMode.otp(6000, 20).bits_per_second == pytest.approx(2 * (120 + 256) * 50)
    assert aes.calls(1000.0, 1.0) == math.floor(1000 * 60 / 256)
    assert otp.calls(41_600.0, 1.0) == 1
    assert otp.calls(41_599.0, 1.0) == 0
    with pytest.raises(ValueError, match="rekey_seconds"):
        CallMode.aes(0)
    with pytest.raises(ValueError, match="kind"):
        CallMode("x", "rot13", 0, 1.0)


def test_planner_capacity_of_a_route() -> None:
    topo = square()
    planner = CapacityPlanner(topo, utilisation=0.9)
    rate = planner.route_rate("A", "D")
    assert rate == pytest.approx(2 * LinkParams(60.0).expected_secret_key_rate())
    otp = CallMode.otp()
    cap = planner.capacity("A", "D", otp)
    assert cap.calls == math.floor(0.9 * rate / otp.bits_per_second)
    assert (cap.hops, cap.route_km) == (2, 120.0)
    assert cap.bottleneck in {"A-B", "B-D", "A-C", "C-D"}
    # A longer link lowers the flow through its route only.
    longer = CapacityPlanner(square(cd=80.0))
    assert longer.route_rate("A", "D") < rate
    assert longer.capacity("A", "D", otp).calls < cap.calls
    rows = planner.table([("A", "D"), ("A", "E")], [CallMode.aes(10.0), otp])
    assert [[c.mode.name for c in row] for row in rows] == [["aes-10s", "otp-8k"]] * 2


def test_admission_refuses_above_capacity_with_a_clear_message() -> None:
    topo = square()
    planner = CapacityPlanner(topo, rates={n: 50_000.0 for n in topo.links}, utilisation=1.0)
    otp = CallMode.otp()  # 41.6 kbit/s; the route A–D carries 100 kbit/s: 2 calls
    assert planner.capacity("A", "D", otp).calls == 2
    admission = CallAdmission(planner)
    answers = [admission.offer(f"c{i}", "A", "D", otp) for i in range(3)]
    assert [a.admitted for a in answers] == [True, True, False]
    refused = answers[2]
    assert refused.mode is None
    assert "route A–D is at capacity for otp-8k calls" in refused.message
    assert "2 active; it sustains 2" in refused.message and "refused" in refused.message
    assert admission.active("D", "A") == 2
    assert admission.reserved_bps("A", "D") == pytest.approx(2 * otp.bits_per_second)
    # Policy with a fallback: downgraded, and said so.
    aes = CallMode.aes(1.0)
    down = admission.offer("c3", "A", "D", otp, fallback=aes)
    assert down.admitted and down.downgraded and down.mode is aes
    assert down.message.endswith("downgraded to aes-1s")
    with pytest.raises(CapacityError, match="already admitted"):
        admission.offer("c3", "A", "D", aes)
    # A call that ends frees its share.
    admission.release("c0")
    assert admission.offer("c4", "A", "D", otp).admitted
    admission.release("nobody")


def test_national_scale_planner_is_fast_enough() -> None:
    topo = load_topology("hefei-metro")
    planner = CapacityPlanner(topo)
    cap = planner.capacity("Gaoxin_AP01", "Yaohai_AP01", CallMode.aes(60.0))
    assert cap.calls > 1000
    assert cap.route_rate_bps > 100_000


def test_cli_capacity_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    from qcall.cli import main

    assert main(["network", "capacity", "--topology", "national", "--rekey", "60"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("pair"))
    assert header.split()[-2:] == ["aes-60s", "otp-12k"]
    metro_pairs = [line for line in lines if " – " in line and ":" not in line.split()[0]]
    assert len(metro_pairs) == 16 * 15 // 2
    beijing_hefei = next(line for line in lines if line.startswith("Beijing – Hefei "))
    assert beijing_hefei.split()[3:5] == ["18", "994"]  # hops, km of the demo route
    inside = [line for line in lines if line.startswith("Hefei:")]
    assert len(inside) == 3  # the three KME sites of the Hefei metro
    assert main(["network", "capacity", "--topology", "beijing-hefei", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (pair,) = doc["pairs"]
    assert (pair["source"], pair["target"], pair["hops"]) == ("Beijing", "Hefei", 16)
    rate = pair["key_rate_bps"]
    # The OTP column plans with what qcall's OTP calls spend (payload, MAC key, block ends).
    from qcall.otp.capacity import call_key_rate_bps

    assert pair["calls"]["otp-12k"] == math.floor(0.9 * rate / call_key_rate_bps())
    assert pair["calls"]["aes-60s"] == math.floor(0.9 * rate * 60 / 256)
    # The simulated rates follow the analytic ones (the model's own error, a few per cent).
    analytic = min(link_rates(load_topology("beijing-hefei")).values())
    assert 0.85 * analytic < rate < analytic


def test_cli_capacity_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from qcall.cli import main

    assert main(["network", "capacity", "--topology", "national", "--rekey", "0"]) != 0
    assert "rekey_seconds must be positive" in capsys.readouterr().err
    assert main(["network", "capacity", "--utilisation", "1.5"]) != 0
    assert "--utilisation must be in (0, 1]" in capsys.readouterr().err
