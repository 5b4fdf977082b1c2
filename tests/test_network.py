"""Tests for qcall.qkd.network and ``qcall network``: real BB84 links, relay, mTLS KMEs.

Every network here runs the real link simulator (:mod:`qcall.qkd.sim`) with
small blocks and a large speed-up, the real KME servers with the test PKI,
and is reached through the real ETSI GS QKD 014 client over loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from qcall.cli import main
from qcall.exceptions import ConfigError, KMEUnavailableError, TopologyError
from qcall.qkd.client import ETSI014Client, open_key_source
from qcall.qkd.network import SimulatedNetwork, default_link_factory, kme_id_for
from qcall.qkd.topology import load_topology, parse_topology

from .utils import TIMEOUT_FACTOR

#: Small BB84 blocks: a few thousand sifted bits, tens of ms of CPU each.
FAST: dict[str, Any] = {"block_sifted_bits": 1 << 13}
TIMEOUT = 30 * TIMEOUT_FACTOR
KEY_BITS = 256


def fast_network(topology: Any, state: Path, **options: Any) -> Any:
    options.setdefault("speedup", 1e6)
    options.setdefault("pool_target", 4)
    options.setdefault("link_capacity_bits", 1 << 14)
    options.setdefault("seed", 1)
    options.setdefault("relay_interval", 0.01)
    options.setdefault("alarm_retry", 0.05)
    return SimulatedNetwork.start(
        topology, state, link_factory=default_link_factory(**FAST), **options
    )


async def test_beijing_hefei_end_to_end_keys_and_accounting(tmp_path: Path) -> None:
    topo = load_topology("beijing-hefei")
    async with fast_network(topo, tmp_path / "state") as net:
        await net.wait_ready(TIMEOUT)
        alice, bob = net.sae_credentials("alice"), net.sae_credentials("bob")
        assert alice.url == net.kme_url("Beijing") == net.kme_url("KME-Beijing")
        assert bob.kme_id == kme_id_for("Hefei") == "KME-Hefei"
        assert net.route("alice", "bob") == topo.shortest_path("Beijing", "Hefei")

        # network.json is what any client needs; the SAE keys are private files.
        doc = json.loads(net.network_file.read_text())
        assert doc["saes"]["alice"]["url"] == alice.url
        assert doc["kmes"]["KME-Hefei"]["url"] == bob.url
        assert stat.S_IMODE(Path(doc["saes"]["bob"]["key"]).stat().st_mode) == 0o600

        async with (
            open_key_source(alice.as_config()) as at_beijing,
            open_key_source(dict(bob.as_config())) as at_hefei,
        ):
            sent = await at_beijing.get_keys("bob", 2)
            got = await at_hefei.get_keys_by_id("alice", [k.key_id for k in sent])
            assert [k.key for k in got] == [k.key for k in sent]
            assert all(len(k.key) * 8 == KEY_BITS for k in sent)
            # And the other direction, bob as master.
            back = await at_hefei.get_key("alice")
            assert (await at_beijing.get_key_by_id("bob", back.key_id)).key == back.key

        # Per-hop accounting: every key crossed every hop of the chain, each hop
        # spent exactly |K| bits per key at each end.
        status = net.status()
        delivered = sum(p["delivered"] for p in status["pairs"])
        assert delivered >= 2 * 4
        for name, link in status["links"].items():
            buf = net.relay.buffers[name]
            assert link["consumed_bits"] == buf.consumed_bits == KEY_BITS * delivered
            assert buf.relayed_keys == delivered
            assert link["deposited_bits"] == buf.available_bits + buf.consumed_bits
            assert link["blocks"] >= 1 and 0 <= link["qber"] < 0.11


async def test_chain_eavesdropper_alarm_names_the_hop(tmp_path: Path) -> None:
    async with fast_network("beijing-hefei", tmp_path / "state", pool_target=2) as net:
        await net.wait_ready(TIMEOUT)
        net.set_eavesdropper("Taian-Jinan", 1.0)  # either spelling finds Jinan-Taian
        await net.wait_for(lambda: "Jinan-Taian" in net.relay.alarmed_links, TIMEOUT)
        assert net.status()["links"]["Jinan-Taian"]["qber"] > 0.11
        alice = net.sae_credentials("alice")
        async with open_key_source(alice.as_config()) as kme:
            assert isinstance(kme, ETSI014Client)
            status = await kme.status("bob")
            assert status.alarm == "eavesdropper alarm on link Jinan-Taian; relay stopped"
            assert status.qber is not None and status.qber > 0.11
            # Keys distilled before the alarm stay deliverable; then the pool runs dry.
            for _ in range(status.stored_key_count):
                await kme.get_key("bob")
            await net.wait_for(lambda: net.pair_status("alice", "bob")["failed_hop"], TIMEOUT)
            pair = net.pair_status("alice", "bob")
            assert pair["failed_hop"] == "Jinan-Taian"
            assert "eavesdropper alarm" in pair["error"]
            with pytest.raises(KMEUnavailableError):
                await kme.get_key("bob")
        # The slave side sees the alarm too.
        async with open_key_source(net.sae_credentials("bob").as_config()) as kme:
            assert (await kme.status("alice")).alarm is not None


async def test_metro_reroutes_around_alarmed_core_link(tmp_path: Path) -> None:
    topo = load_topology("hefei-metro")
    async with fast_network(topo, tmp_path / "state", pool_target=2) as net:
        await net.wait_ready(TIMEOUT)
        first = net.route("alice", "bob")
        core = next(
            link.name
            for link in topo.path_links(first)
            if topo.nodes[link.a].kind == topo.nodes[link.b].kind == "core"
        )
        net.set_eavesdropper(core, 1.0)
        await net.wait_for(lambda: core in net.relay.alarmed_links, TIMEOUT)
        delivered = net.pair_status("alice", "bob")["delivered"]  # all later keys: new route
        async with open_key_source(net.sae_credentials("alice").as_config()) as kme:
            for _ in range(2):  # drain, so the relay must deliver over the new route
                # The alarm withdrew the keys relayed over the tapped link: the KME may
                # answer 503 (no key yet) until the new route delivers, as a client
                # would see it, so retry for a while.
                deadline = asyncio.get_running_loop().time() + TIMEOUT
                while True:
                    try:
                        await kme.get_key("bob")
                        break
                    except KMEUnavailableError:
                        if asyncio.get_running_loop().time() > deadline:
                            raise
                        await asyncio.sleep(0.05)
            await net.wait_for(
                lambda: net.pair_status("alice", "bob")["delivered"] >= delivered + 2, TIMEOUT
            )
            rerouted = net.route("alice", "bob")
            assert core not in [link.name for link in topo.path_links(rerouted)]
            assert rerouted[0] == first[0] and rerouted[-1] == first[-1]
            status = await kme.status("bob")
            assert status.alarm is not None and status.alarm.startswith(
                f"eavesdropper alarm on link {core}; rerouted"
            )
        # Idle links (access points serving no SAE) never ran a block.
        idle = net.status()["links"]["Luyang-Luyang_AP01"]
        assert not idle["active"] and idle["blocks"] == 0


async def test_network_api_errors(tmp_path: Path) -> None:
    small = parse_topology(
        {
            "name": "pair",
            "nodes": [
                {"name": "A", "kme": True, "saes": ["a1", "a2"]},
                {"name": "B", "kme": True, "saes": ["b1"]},
                {"name": "C"},
            ],
            "links": [
                {"a": "A", "b": "B", "length_km": 5},
                {"a": "B", "b": "C", "length_km": 5},
            ],
        }
    )
    with pytest.raises(ConfigError, match="speedup"):
        SimulatedNetwork(small, tmp_path, speedup=0)
    async with fast_network(small, tmp_path / "state") as net:
        await net.wait_ready(TIMEOUT)
        with pytest.raises(ConfigError, match="no running KME at 'C'"):
            net.kme_url("C")
        with pytest.raises(ConfigError, match="no SAE 'zed'"):
            net.sae_credentials("zed")
        with pytest.raises(TopologyError, match="unknown link"):
            net.set_eavesdropper("A-C")
        with pytest.raises(ConfigError, match="not simulated"):
            net.set_eavesdropper("B-C")
        with pytest.raises(ConfigError, match="fraction"):
            net.set_eavesdropper("A-B", 2.0)
        # Two SAEs on one KME share a local pool: enc_keys then dec_keys there.
        a1 = net.sae_credentials("a1")
        a2 = net.sae_credentials("a2")
        assert a1.url == a2.url
        async with open_key_source(a1.as_config()) as s1, open_key_source(a2.as_config()) as s2:
            key = await s1.get_key("a2")
            assert (await s2.get_key_by_id("a1", key.key_id)).key == key.key
    assert not net._servers  # closed


def test_cli_network_json_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "line.toml"
    topo.write_text(
        'name = "line"\n'
        '[[nodes]]\nname = "A"\nkme = true\nsaes = ["alice"]\n'
        '[[nodes]]\nname = "R"\n'
        '[[nodes]]\nname = "B"\nkme = true\nsaes = ["bob"]\n'
        '[[links]]\na = "A"\nb = "R"\nlength_km = 20\n'
        '[[links]]\na = "R"\nb = "B"\nlength_km = 30\n'
    )
    state = tmp_path / "state"
    argv = ["network", "--topology", str(topo), "--state", str(state), "--duration", "1.5"]
    argv += ["--json-status", "--speedup", "1e6", "--pool", "2", "--seed", "3"]
    argv += ["--block-pulses", "2000000", "--eve", "R-B=1", "--eve-delay", "0.6"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and lines[0]["topology"] == "line"
    assert set(lines[-1]["links"]) == {"A-R", "R-B"}
    assert lines[-1]["links"]["R-B"]["eve_fraction"] == 1.0
    doc = json.loads((state / "network.json").read_text())
    assert set(doc["saes"]) == {"alice", "bob"}


def test_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["network", "--state", str(tmp_path), "--duration", "1"]
    assert main([*base, "--eve", "Nowhere-Hefei"]) == 1
    assert "unknown link 'Nowhere-Hefei'" in capsys.readouterr().err
    assert main([*base, "--eve", "Jinan-Taian=2"]) == 1
    assert "fraction must be in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--topology", "atlantis"]) == 1
    assert "unknown topology" in capsys.readouterr().err


def test_render_live_view(tmp_path: Path) -> None:
    from rich.console import Console

    from qcall.cli.network import render

    async def scenario() -> str:
        async with fast_network("hefei-metro", tmp_path / "s", pool_target=1) as net:
            await net.wait_ready(TIMEOUT)
            console = Console(width=140, record=True, file=io.StringIO())
            console.print(render(net))
            return console.export_text()

    text = asyncio.run(scenario())
    assert "Gaoxin-Gaoxin_AP01" in text and "alice → bob" in text
    assert "156 links serve no SAE route" in " ".join(text.split())


async def test_attacked_link_runs_out_of_authentication_key_and_network_survives(
    tmp_path: Path,
) -> None:
    line = parse_topology(
        {
            "name": "two",
            "nodes": [
                {"name": "A", "kme": True, "saes": ["a"]},
                {"name": "B", "kme": True, "saes": ["b"]},
            ],
            "links": [{"a": "A", "b": "B", "length_km": 10}],
        }
    )
    async with fast_network(line, tmp_path / "state", alarm_retry=0.0) as net:
        await net.wait_ready(TIMEOUT)
        net.set_eavesdropper("A-B", 1.0)
        # Every aborted block spends authentication key and refills none: the
        # link finally cannot authenticate at all; the link task survives.
        await net.wait_for(
            lambda: "KeyExhaustedError" in (net.status()["links"]["A-B"]["error"] or ""),
            TIMEOUT,
        )
        assert net.status()["links"]["A-B"]["state"] == "LINK_ALARM"
        async with open_key_source(net.sae_credentials("a").as_config()) as kme:
            status = await kme.status("b")
            assert status.alarm == "eavesdropper alarm on link A-B; relay stopped"
            await kme.get_key("b")  # keys distilled before the attack still flow
