"""Tests for qcall.qkd.site: beijing-hefei split over a real TCP + mutual TLS site link.

Two :class:`NetworkSite` objects run in one event loop but share nothing
except the TCP connection (over loopback) and the provisioned files (PKI,
split-link PSK), as two hosts would. Keys are fetched through the real ETSI
GS QKD 014 client from each site's own KME.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qcall.exceptions import ConfigError
from qcall.qkd.client import open_key_source
from qcall.qkd.pki import create_pki
from qcall.qkd.site import PSK_BYTES, NetworkSite, create_psk, split_sides
from qcall.qkd.sitewire import PROTOCOL_VERSION, Hello, encode_frame
from qcall.qkd.topology import load_topology

from .utils import TIMEOUT_FACTOR

FAST = {"block_sifted_bits": 1 << 13}
TIMEOUT = 60 * TIMEOUT_FACTOR
SPLIT = "Jinan-Taian"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    topo = load_topology("beijing-hefei")
    create_pki(out / "pki", ["KME-Beijing", "KME-Hefei"], topo.sae_ids)
    create_psk(out / "split.psk")
    return out


@contextlib.asynccontextmanager
async def two_sites(
    bundle: Path, tmp: Path, *, psk_b: Path | None = None, **options: Any
) -> AsyncIterator[tuple[NetworkSite, NetworkSite]]:
    common: dict[str, Any] = {
        "pki_dir": bundle / "pki", "speedup": 1e6, "pool_target": 4, "seed": 3,
        "link_capacity_bits": 1 << 14, "relay_interval": 0.01, "alarm_retry": 0.05,
        "link_overrides": FAST,
    }  # fmt: skip
    common.update(options)
    async with NetworkSite.start(
        "beijing-hefei", SPLIT, "Beijing", tmp / "a", psk_file=bundle / "split.psk",
        listen=("127.0.0.1", 0), **common,
    ) as a:  # fmt: skip
        async with NetworkSite.start(
            "beijing-hefei", SPLIT, "Hefei", tmp / "b", psk_file=psk_b or bundle / "split.psk",
            connect=("127.0.0.1", a.listen_port), **common,
        ) as b:  # fmt: skip
            yield a, b


def test_split_sides() -> None:
    topo = load_topology("beijing-hefei")
    a, b = split_sides(topo, SPLIT)
    assert "Beijing" in a and "Jinan" in a and "Taian" not in a
    assert "Hefei" in b and "Taian" in b and len(a) + len(b) == len(topo.nodes)
    # In the hefei-metro mesh some links lie on a ring: cutting one splits nothing.
    metro = load_topology("hefei-metro")
    refused = 0
    for name in metro.links:
        try:
            split_sides(metro, name)
        except ConfigError as exc:
            assert "does not split" in str(exc)
            refused += 1
    assert refused > 0


async def test_keys_relayed_across_the_split_link(bundle: Path, tmp_path: Path) -> None:
    async with two_sites(bundle, tmp_path) as (a, b):
        await asyncio.gather(a.wait_ready(TIMEOUT), b.wait_ready(TIMEOUT))
        assert a.transmitter and not b.transmitter
        doc_a = json.loads(a.network_file.read_text())
        doc_b = json.loads(b.network_file.read_text())
        assert set(doc_a["saes"]) == {"alice"} and set(doc_b["saes"]) == {"bob"}
        assert set(doc_a["kmes"]) == {"KME-Beijing"} and set(doc_b["kmes"]) == {"KME-Hefei"}
        alice, bob = doc_a["saes"]["alice"], doc_b["saes"]["bob"]
        assert stat.S_IMODE(Path(bob["key"]).stat().st_mode) == 0o600
        async with (
            open_key_source({"type": "etsi014", **alice}) as at_beijing,
            open_key_source({"type": "etsi014", **bob}) as at_hefei,
        ):
            sent = await at_beijing.get_keys("bob", 3)
            got = await at_hefei.get_keys_by_id("alice", [k.key_id for k in sent])
            assert [k.key for k in got] == [k.key for k in sent]
            back = await at_hefei.get_key("alice")
            assert (await at_beijing.get_key_by_id("bob", back.key_id)).key == back.key

        # Let both master pools fill up again: then nothing is in flight.
        def full() -> bool:
            pairs = a.status()["pairs"] + b.status()["pairs"]
            return all(p["stored_keys"] >= 4 for p in pairs if p["role"] == "master")

        await asyncio.gather(a.wait_for(full, TIMEOUT), b.wait_for(full, TIMEOUT))
        sa, sb = a.status(), b.status()
        # The split link's BB84 ran across the connection, and both ends spent the
        # same link key on the relay hop (key + 256-bit HMAC key per relayed key).
        assert sa["split_link"]["blocks"] >= 1 and sb["split_link"]["connected"]
        assert sa["split_link"]["end"] == "transmitter" and sb["split_link"]["end"] == "receiver"
        relayed = next(p["delivered"] for p in sa["pairs"] if p["role"] == "master")
        relayed_back = next(p["delivered"] for p in sb["pairs"] if p["role"] == "master")
        assert relayed >= 4 + 3 and relayed_back >= 4 + 1
        assert sa["split_link"]["consumed_bits"] == sb["split_link"]["consumed_bits"]
        assert sa["split_link"]["consumed_bits"] == 512 * (relayed + relayed_back)
        # Local links only: A simulates Beijing..Jinan (8 hops), B Taian..Hefei (7 hops),
        # and every local hop carried every key, both directions.
        assert len(sa["links"]) == 8 and len(sb["links"]) == 7
        for status in (sa, sb):
            for link in status["links"].values():
                assert link["consumed_bits"] == 256 * (relayed + relayed_back)
        pair = next(p for p in sa["pairs"] if p["master"] == "alice")
        assert pair["route"][0] == "Beijing" and pair["route"][-2:] == ["Jinan", "Taian"]
        assert "bits" in repr(a.pads) and a.route("alice", "bob")[-1] == "Hefei"


async def test_wrong_psk_never_delivers(bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.psk"
    create_psk(other)
    assert other.stat().st_size == PSK_BYTES
    async with two_sites(bundle, tmp_path, psk_b=other) as (a, b):
        with pytest.raises(TimeoutError):
            await a.wait_ready(3)
        assert a.status()["split_link"]["error"] or b.status()["split_link"]["error"]
        assert all(p["delivered"] == 0 for p in a.status()["pairs"])


async def test_eavesdropper_on_the_split_link_stops_the_relay(bundle: Path, tmp_path: Path) -> None:
    async with two_sites(bundle, tmp_path) as (a, b):
        await asyncio.gather(a.wait_ready(TIMEOUT), b.wait_ready(TIMEOUT))
        with pytest.raises(ConfigError, match="set Eve there"):
            b.set_eavesdropper(SPLIT, 1.0)  # the optics run at the transmitter's site
        a.set_eavesdropper(SPLIT, 1.0)

        def alarmed() -> bool:
            return bool(a.status()["split_link"]["alarm"] and b.status()["split_link"]["alarm"])

        await asyncio.gather(a.wait_for(alarmed, TIMEOUT), b.wait_for(alarmed, TIMEOUT))
        assert a.status()["split_link"]["qber"] > 0.11
        # Both KMEs say so in their ETSI 014 Status, for the pairs crossing the split.
        for site, node, caller, peer in (
            (a, "Beijing", "alice", "bob"),
            (b, "Hefei", "bob", "alice"),
        ):
            ext = site.kmes[node].status(caller, peer).status_extension  # type: ignore[arg-type]
            assert ext is not None and SPLIT in ext["alarm"] and ext["qber"] > 0.11
        # Keys already relayed stay usable; new ones do not cross while the alarm lasts.
        alice = json.loads(a.network_file.read_text())["saes"]["alice"]
        async with open_key_source({"type": "etsi014", **alice}) as at_beijing:
            stored = a.kmes["Beijing"].stored_key_count("alice", "bob")
            assert len(await at_beijing.get_keys("bob", stored)) == stored
        pair = next(cp for cp in a.cross_pairs if cp.outgoing)
        delivered = pair.delivered
        await a.wait_for(lambda: pair.error is not None and "alarm" in pair.error, TIMEOUT)
        assert pair.delivered == delivered
        # Eve leaves: the next good block clears the alarm and keys flow again.
        a.set_eavesdropper(SPLIT, 0.0)
        await a.wait_for(lambda: pair.delivered > delivered, TIMEOUT)
        assert not a.status()["split_link"]["alarm"]


async def test_hostile_peer_bytes_and_a_wrong_hello_leave_the_site_serving(
    bundle: Path, tmp_path: Path
) -> None:
    options: dict[str, Any] = {
        "pki_dir": bundle / "pki", "psk_file": bundle / "split.psk", "tls": False,
        "speedup": 1e6, "pool_target": 2, "seed": 5, "link_capacity_bits": 1 << 14,
        "relay_interval": 0.01, "link_overrides": FAST,
    }  # fmt: skip
    async with NetworkSite.start(
        "beijing-hefei", SPLIT, "Beijing", tmp_path / "a", listen=("127.0.0.1", 0), **options
    ) as a:
        port = a.listen_port
        # Garbage, then a Hello for another split: each connection is dropped with a reason.
        bad_hello = Hello(PROTOCOL_VERSION, "beijing-hefei", "Taian-Qufu", "Taian", 0, 0)
        for data, reason in (
            (b"\xff" * 64, "exceeds the limit"),
            (b"\x01\x00\x00\x00\x02{}", "Hello.version"),
            (encode_frame(bad_hello), "expected 'beijing-hefei'/'Jinan-Taian' at 'Taian'"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), TIMEOUT)  # its Hello, then EOF
            writer.close()

            def refused(r: str = reason) -> bool:
                return r in (a.status()["split_link"]["error"] or "")

            await a.wait_for(refused, TIMEOUT)
        assert not a.status()["split_link"]["connected"]
        # The real other site still gets through.
        async with NetworkSite.start(
            "beijing-hefei", SPLIT, "Hefei", tmp_path / "b", connect=("127.0.0.1", port), **options
        ) as b:
            await asyncio.gather(a.wait_ready(TIMEOUT), b.wait_ready(TIMEOUT))
            assert a.status()["split_link"]["connections"] == 1


async def test_the_other_site_must_present_its_kme_certificate(
    bundle: Path, tmp_path: Path
) -> None:
    # A "Hefei" site whose certificate is really Beijing's KME's is refused by name.
    forged = tmp_path / "pki"
    shutil.copytree(bundle / "pki", forged)
    for suffix in (".pem", ".key"):
        shutil.copyfile(
            forged / "kme" / f"KME-Beijing{suffix}", forged / "kme" / f"KME-Hefei{suffix}"
        )
    options: dict[str, Any] = {"psk_file": bundle / "split.psk", "speedup": 1e6,
                               "link_overrides": FAST}  # fmt: skip
    async with NetworkSite.start(
        "beijing-hefei", SPLIT, "Beijing", tmp_path / "a", pki_dir=bundle / "pki",
        listen=("127.0.0.1", 0), **options,
    ) as a:  # fmt: skip
        async with NetworkSite.start(
            "beijing-hefei", SPLIT, "Hefei", tmp_path / "b", pki_dir=forged,
            connect=("127.0.0.1", a.listen_port), **options,
        ):  # fmt: skip
            await a.wait_for(
                lambda: (
                    "presents ['KME-Beijing'], not 'KME-Hefei'"
                    in (a.status()["split_link"]["error"] or "")
                ),
                TIMEOUT,
            )
            assert a.status()["split_link"]["connections"] == 0


def test_constructor_checks(bundle: Path, tmp_path: Path) -> None:
    files: dict[str, Any] = {"pki_dir": bundle / "pki", "psk_file": bundle / "split.psk"}
    site = NetworkSite("beijing-hefei", SPLIT, "Hefei", tmp_path / "b",
                       connect=("127.0.0.1", 1), **files)  # fmt: skip
    assert site.peer_kme == "KME-Beijing" and site.identity_kme == "KME-Hefei"
    assert site.border == "Taian" and not site.transmitter and "receiver" in repr(site)
    with pytest.raises(ConfigError, match="exactly one of listen and connect"):
        NetworkSite("beijing-hefei", SPLIT, "Hefei", tmp_path / "c", **files)
    with pytest.raises(ConfigError, match="durable KMEs are not supported"):
        NetworkSite("beijing-hefei", SPLIT, "Hefei", tmp_path / "c", listen=("", 0),
                    durable_kmes=True, **files)  # fmt: skip
    with pytest.raises(ConfigError, match="not in topology"):
        NetworkSite("beijing-hefei", SPLIT, "Paris", tmp_path / "c", listen=("", 0), **files)
    metro = load_topology("hefei-metro")
    with pytest.raises(ConfigError, match="does not split"):
        NetworkSite(metro, _ring_link(), next(iter(metro.nodes)), tmp_path / "d",
                    listen=("127.0.0.1", 0), **files)  # fmt: skip


def _ring_link() -> str:
    metro = load_topology("hefei-metro")
    for name in metro.links:
        try:
            split_sides(metro, name)
        except ConfigError:
            return name
    raise AssertionError("hefei-metro has no ring")
