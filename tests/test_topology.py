"""Tests for qcall.qkd.topology: the file format, the bundled topologies, validation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from qcall.exceptions import ConfigError, QKDError, TopologyError
from qcall.qkd.topology import bundled_topologies, load_topology, parse_topology

ROOT = Path(__file__).resolve().parent.parent

SMALL: dict[str, Any] = {
    "name": "small",
    "max_hop_km": 80,
    "nodes": [
        {"name": "A", "kme": True, "saes": ["alice"]},
        {"name": "R"},
        {"name": "B", "kme": True, "saes": ["bob"]},
    ],
    "links": [
        {"a": "A", "b": "R", "length_km": 50},
        {"a": "R", "b": "B", "length_km": 60.5},
    ],
}


def small(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc.update(changes)
    return doc


def test_bundled_names() -> None:
    assert {"beijing-hefei", "hefei-metro"} <= set(bundled_topologies())


def test_beijing_hefei_chain() -> None:
    topo = load_topology("beijing-hefei")
    assert abs(topo.total_length_km - 965) <= 5
    assert all(link.length_km <= 80 for link in topo.links.values())
    assert topo.max_hop_km == 80
    assert topo.sae_node("alice") == "Beijing"
    assert topo.sae_node("bob") == "Hefei"
    assert topo.kme_nodes == ["Beijing", "Hefei"]
    path = topo.shortest_path("Beijing", "Hefei")
    assert path is not None
    # A chain: the only path visits every node, each at most 80 km from the next.
    assert len(path) == len(topo.nodes) == len(topo.links) + 1
    assert [link.name for link in topo.path_links(path)] == list(topo.links)


def test_hefei_metro_counts() -> None:
    topo = load_topology("hefei-metro")
    kinds = [node.kind for node in topo]
    assert kinds.count("core") == 8
    assert kinds.count("access") == 159
    assert abs(topo.total_length_km - 1147) < 0.05
    assert set(topo.sae_ids) == {"alice", "bob", "carol"}
    # Every core link can fail and the SAEs still reach each other (ring + chords).
    cores = [n.name for n in topo if n.kind == "core"]
    for link in topo.links.values():
        if link.a in cores and link.b in cores:
            assert topo.shortest_path(
                topo.sae_node("alice"), topo.sae_node("bob"), exclude=[link.name]
            )
    # Access points hang off the cores: only core links and SAE access links serve routes.
    serving = topo.serving_links()
    assert len(serving) == 10 + 3


def test_hefei_metro_is_generated_by_committed_script() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_hefei_metro.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_national_topology() -> None:
    """16 metros, Hefei at its reported size, trunks of 60-80 km hops, demo route at protocol."""
    topo = load_topology("national")
    metros = topo.metros
    assert len(metros) == 16
    assert {"Beijing", "Shanghai", "Hefei", "Guangzhou", "Jinan", "Wuhan"} <= set(metros)
    hefei = [topo.nodes[n] for n in metros["Hefei"]]
    assert sum(n.kind == "core" for n in hefei) == 8
    assert sum(n.kind == "access" for n in hefei) == 159
    inside = [
        link.length_km
        for link in topo.links.values()
        if topo.nodes[link.a].metro == topo.nodes[link.b].metro == "Hefei"
    ]
    assert sum(inside) == pytest.approx(1147.0)
    # Every metro has a KME with an SAE; every SAE is in a metro.
    for name, members in metros.items():
        assert any(topo.nodes[n].saes for n in members), name
    assert all(topo.nodes[topo.sae_node(s)].metro for s in topo.sae_ids)
    # Trunk hops (relay to relay) are 60-80 km; the bundled chain keeps its own lengths.
    chain = set(load_topology("beijing-hefei").nodes)
    trunk = [
        link.length_km
        for link in topo.links.values()
        if "_R" in link.a + link.b and not {link.a, link.b} & chain
    ]
    assert len(trunk) > 100 and min(trunk) >= 60 and max(trunk) <= 80
    assert len(topo.links) > 300
    # The demo route runs at protocol fidelity, everything else at model fidelity.
    path = topo.shortest_path("Beijing", topo.sae_node("bob"))
    assert path is not None
    demo = topo.path_links(path)
    assert sum(link.length_km for link in demo) > 965
    assert {link.fidelity for link in demo} == {"protocol"}
    others = {link.fidelity for link in topo.links.values() if link not in demo}
    assert others == {"model"}
    # Several routes: Beijing-Hefei survives any one trunk hop failing.
    for link in demo[:3]:
        assert topo.shortest_path("Beijing", topo.sae_node("bob"), exclude=[link.name])


def test_national_is_generated_by_committed_script() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_national.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_small_topology_and_link_lookup() -> None:
    topo = parse_topology(small())
    assert topo.link("A-R") is topo.link("R-A")
    assert topo.link_between("B", "R") == topo.link("R-B")
    assert topo.link("A-R").other("A") == "R"
    assert topo.total_length_km == 110.5
    with pytest.raises(TopologyError, match="unknown link 'A-B'"):
        topo.link("A-B")
    with pytest.raises(TopologyError, match="unknown SAE 'carol'"):
        topo.sae_node("carol")


def test_json_and_toml_files(tmp_path: Path) -> None:
    json_file = tmp_path / "net.json"
    json_file.write_text(json.dumps(small()))
    toml_file = tmp_path / "net.toml"
    toml_file.write_text(
        'name = "t"\n[[nodes]]\nname = "A"\nkme = true\nsaes = ["a1", "a2"]\n'
        '[[nodes]]\nname = "B"\n[[links]]\na = "A"\nb = "B"\nlength_km = 3\n'
    )
    assert load_topology(json_file).sae_ids == ["alice", "bob"]
    assert load_topology(str(toml_file)).sae_node("a2") == "A"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (small(nodes=[*SMALL["nodes"], {"name": "R"}]), "duplicate node 'R'"),
        (
            small(links=[*SMALL["links"], {"a": "A", "b": "X", "length_km": 1}]),
            "link 'A-X': unknown node 'X'",
        ),
        (
            small(links=[{"a": "A", "b": "R", "length_km": -5}, SMALL["links"][1]]),
            "link 'A-R': length_km must be positive",
        ),
        (
            small(links=[{"a": "A", "b": "R", "length_km": 0}, SMALL["links"][1]]),
            "link 'A-R': length_km must be positive",
        ),
        (
            small(links=[{"a": "A", "b": "R", "length_km": "far"}, SMALL["links"][1]]),
            "link 'A-R': length_km must be a number",
        ),
        (
            small(links=[{"a": "A", "b": "R", "length_km": float("nan")}, SMALL["links"][1]]),
            "link 'A-R': length_km must be finite",
        ),
        (
            small(links=[{"a": "A", "b": "R", "length_km": 81}, SMALL["links"][1]]),
            "link 'A-R': 81 km exceeds max_hop_km 80",
        ),
        (small(links=[SMALL["links"][0]]), "SAE 'bob' on node 'B' is disconnected"),
        (
            small(links=[*SMALL["links"], {"a": "R", "b": "A", "length_km": 9}]),
            "link 'R-A' duplicates link 'A-R'",
        ),
        (
            small(links=[*SMALL["links"], {"a": "A", "b": "A", "length_km": 9}]),
            "both ends are node 'A'",
        ),
        (
            small(nodes=[{"name": "A", "saes": ["alice"]}, {"name": "R"}, {"name": "B"}]),
            "node 'A': has SAEs \\['alice'\\] but hosts no KME",
        ),
        (
            small(
                nodes=[
                    {"name": "A", "kme": True, "saes": ["alice"]},
                    {"name": "R"},
                    {"name": "B", "kme": True, "saes": ["alice"]},
                ]
            ),
            "duplicate SAE 'alice'",
        ),
        (small(nodes=[{"name": "A B"}]), "nodes\\[0\\].name 'A B' is not a valid name"),
        (small(nodes=[{"name": "A", "colour": "red"}]), "nodes\\[0\\]: unknown field 'colour'"),
        (small(nodes=[]), "nodes must be a non-empty list"),
        (small(nodes=["A"]), "nodes\\[0\\] must be a table"),
        (small(links=[{"a": "A", "b": "R"}]), "link 'A-R': missing length_km"),
        (small(max_hop_km=-1), "max_hop_km must be positive"),
        (
            small(links=[{"a": "A", "b": "R", "length_km": 5, "fidelity": "exact"}]),
            "link 'A-R': fidelity must be one of protocol, model, not 'exact'",
        ),
        (small(nodes=[{"name": "A", "metro": "New York"}]), "node 'A': metro 'New York'"),
        (small(extra=1), "topology: unknown field 'extra'"),
        ([1, 2], "top level"),
    ],
)
def test_validation_errors(doc: Any, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(doc)


def test_topology_error_is_config_and_qkd_error() -> None:
    assert issubclass(TopologyError, ConfigError)
    assert issubclass(TopologyError, QKDError)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="unknown topology 'atlantis'"):
        load_topology("atlantis")
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [")
    with pytest.raises(TopologyError, match="cannot parse"):
        load_topology(broken)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TopologyError, match="nested too deeply"):
        load_topology(deep)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TopologyError):
        load_topology(binary)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["A", "B", "R", "alice", "bob", "A-B", "", "x y", "ç"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["name", "a", "b", "kme", "saes", "length_km"]), inner),
    max_leaves=12,
)
_node = st.fixed_dictionaries(
    {"name": st.sampled_from(["A", "B", "R"])},
    optional={"kme": _json, "saes": _json, "kind": _json, "lat": _json},
)
_link = st.fixed_dictionaries(
    {"a": _json, "b": _json},
    optional={"length_km": _json, "name": _json},
)


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(_node | _json, max_size=4),
    links=st.lists(_link | _json, max_size=4),
    extra=st.dictionaries(st.sampled_from(["max_hop_km", "name", "source"]), _json),
)
def test_hostile_documents_raise_only_topology_error(
    nodes: list[Any], links: list[Any], extra: dict[str, Any]
) -> None:
    try:
        topo = parse_topology({"nodes": nodes, "links": links, **extra})
    except TopologyError:
        return
    # Whatever passed validation is consistent.
    for link in topo.links.values():
        assert link.a in topo.nodes and link.b in topo.nodes and link.length_km > 0
