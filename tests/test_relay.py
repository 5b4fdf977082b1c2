"""Tests for qcall.qkd.relay: OTP chain, per-hop accounting, routing, failures."""

from __future__ import annotations

import os
import random

import pytest

from qcall.exceptions import KeyExhaustedError, RelayError
from qcall.qkd.relay import LinkKeyBuffer, LinkState, TrustedNodeRelay, xor_bytes
from qcall.qkd.topology import Topology, load_topology, parse_topology

KEY = 32  # bytes per relayed key (256 bits)


def fill(relay: TrustedNodeRelay, nbytes: int, *, only: set[str] | None = None) -> None:
    """Deposit identical random link key at both ends of every link."""
    for name, buf in relay.buffers.items():
        if only is None or name in only:
            block = os.urandom(nbytes)
            buf.deposit(block, bytes(block))


@pytest.fixture(scope="module")
def chain() -> Topology:
    return load_topology("beijing-hefei")


@pytest.fixture(scope="module")
def metro() -> Topology:
    return load_topology("hefei-metro")


def square() -> Topology:
    """A—B—D and A—C—D: two disjoint two-hop routes."""
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
                {"a": "A", "b": "B", "length_km": 10},
                {"a": "B", "b": "D", "length_km": 10},
                {"a": "A", "b": "C", "length_km": 20},
                {"a": "C", "b": "D", "length_km": 20},
            ],
        }
    )


def test_xor() -> None:
    assert xor_bytes(b"\x0f\xf0", b"\xff\xff") == b"\xf0\x0f"
    assert xor_bytes(b"", b"") == b""
    with pytest.raises(ValueError, match="equal lengths"):
        xor_bytes(b"a", b"ab")


def test_buffer_both_ends_consumed_once() -> None:
    buf = LinkKeyBuffer("A-B", "A", "B")
    block_a, block_b = os.urandom(64), os.urandom(64)  # different, to see which end is read
    assert buf.deposit(block_a, block_b) == 512
    pads = buf.take(16)
    assert pads == (block_a[:16], block_b[:16])
    assert buf.pad_at("A", pads) == block_a[:16]
    assert buf.pad_at("B", pads) == block_b[:16]
    assert buf.take(16) == (block_a[16:32], block_b[16:32])  # never the same bits twice
    assert (buf.available_bits, buf.consumed_bits, buf.deposited_bits) == (256, 256, 512)
    with pytest.raises(KeyExhaustedError, match="256 bits left, 264 needed"):
        buf.take(33)
    assert buf.available_bits == 256  # a failed take consumes nothing
    with pytest.raises(RelayError) as info:
        buf.deposit(b"ab", b"abc")
    assert info.value.hop == "A-B"


def test_buffer_capacity_and_repr() -> None:
    buf = LinkKeyBuffer("A-B", "A", "B", capacity_bits=128)
    secret = bytes(range(1, 33))
    assert buf.deposit(secret, secret) == 128
    assert buf.space_bits == 0 and buf.dropped_bits == 128
    assert buf.deposit(secret, secret) == 0
    assert secret[:16].hex() not in repr(buf) and str(list(secret[:4])) not in repr(buf)


def test_chain_delivers_identical_key_and_accounts_per_hop(chain: Topology) -> None:
    relay = TrustedNodeRelay(chain)
    fill(relay, 4 * KEY)
    before = {name: buf.available_bits for name, buf in relay.buffers.items()}
    result = relay.relay("Beijing", "Hefei", KEY)
    assert result.key_at_source == result.key_at_destination
    assert len(result.key_at_source) == KEY and result.bits == 256
    assert result.route == tuple(chain.shortest_path("Beijing", "Hefei") or ())
    assert [hop.link for hop in result.hops] == list(chain.links)
    assert result.hops[0].sender == "Beijing" and result.hops[-1].receiver == "Hefei"
    for name, buf in relay.buffers.items():
        assert before[name] - buf.available_bits == 256  # exactly |K| bits per hop
        assert buf.consumed_bits == 256 and buf.relayed_keys == 1
    assert result.key_at_source.hex() not in repr(result)


def test_otp_uses_each_ends_own_copy() -> None:
    topo = square()
    relay = TrustedNodeRelay(topo, random_bytes=lambda n: b"\x42" * n)
    for name in ("A-B", "B-D"):
        pad = os.urandom(KEY)
        relay.deposit(name, pad, pad)
    good = relay.relay("A", "D", KEY)
    assert good.route == ("A", "B", "D")
    assert good.key_at_destination == b"\x42" * KEY
    # Now the ends of B-D disagree (a broken link): the hop that fails is named.
    relay.deposit("A-B", b"\x00" * KEY, b"\x00" * KEY)
    relay.deposit("B-D", b"\x01" * KEY, b"\x02" * KEY)
    with pytest.raises(RelayError) as info:
        relay.relay("A", "D", KEY)
    assert info.value.hop == "B-D"
    assert relay.buffer("B-D").consumed_bits == 2 * KEY * 8  # spent anyway
    assert "42" * 4 not in str(info.value)


def test_relay_in_reverse_direction(chain: Topology) -> None:
    relay = TrustedNodeRelay(chain)
    fill(relay, KEY)
    result = relay.relay("Hefei", "Beijing", KEY)
    assert result.key_at_source == result.key_at_destination
    assert result.hops[0].link == "Huainan-Hefei" and result.hops[0].sender == "Hefei"
    assert all(buf.available_bits == 0 for buf in relay.buffers.values())


def test_same_node_needs_no_hop(chain: Topology) -> None:
    relay = TrustedNodeRelay(chain)
    result = relay.relay("Jinan", "Jinan", KEY)
    assert result.route == ("Jinan",) and result.hops == ()


def test_chain_exhausted_hop_is_named(chain: Topology) -> None:
    relay = TrustedNodeRelay(chain)
    fill(relay, KEY)
    relay.buffer("Jinan-Taian").take(1)  # one byte short on one hop
    with pytest.raises(RelayError) as info:
        relay.relay("Beijing", "Hefei", KEY)
    assert info.value.hop == "Jinan-Taian"
    assert "out of key (248 bits, 256 needed)" in str(info.value)
    # Nothing was consumed on the other hops: the route is checked first.
    assert relay.buffer("Beijing-Langfang").available_bits == 256


def test_chain_alarm_hop_is_named(chain: Topology) -> None:
    relay = TrustedNodeRelay(chain)
    fill(relay, 2 * KEY)
    relay.set_alarm("Xuzhou-Suzhou", qber=0.25)
    assert relay.alarmed_links == ["Xuzhou-Suzhou"]
    assert relay.buffer("Suzhou-Xuzhou").state is LinkState.LINK_ALARM
    with pytest.raises(RelayError, match=r"eavesdropper alarm \(QBER 25\.0%\)") as info:
        relay.relay("Beijing", "Hefei", KEY)
    assert info.value.hop == "Xuzhou-Suzhou"
    relay.clear_alarm("Xuzhou-Suzhou", qber=0.02)
    assert relay.relay("Beijing", "Hefei", KEY).key_at_destination


def test_square_reroutes_around_alarm_and_exhaustion() -> None:
    relay = TrustedNodeRelay(square())
    fill(relay, 2 * KEY)
    assert relay.route("A", "D", 8 * KEY) == ["A", "B", "D"]  # shorter on ties
    relay.set_alarm("A-B")
    assert relay.relay("A", "D", KEY).route == ("A", "C", "D")
    relay.clear_alarm("A-B")
    relay.buffer("B-D").take(2 * KEY)
    assert relay.relay("A", "D", KEY).route == ("A", "C", "D")
    # Both routes now dead: the error names the hop on the default route.
    with pytest.raises(RelayError) as info:
        relay.relay("A", "D", KEY)
    assert info.value.hop == "B-D"


def test_route_prefers_links_with_more_key() -> None:
    relay = TrustedNodeRelay(square())
    relay.deposit("A-B", bytes(KEY), bytes(KEY))  # exactly one key: costly
    relay.deposit("B-D", bytes(64 * KEY), bytes(64 * KEY))
    relay.deposit("A-C", bytes(64 * KEY), bytes(64 * KEY))
    relay.deposit("C-D", bytes(64 * KEY), bytes(64 * KEY))
    assert relay.route("A", "D", 8 * KEY) == ["A", "C", "D"]
    assert relay.route("A", "D", 8 * KEY, exclude=["A-C"]) == ["A", "B", "D"]


def test_metro_reroute_around_alarmed_core_link(metro: Topology) -> None:
    relay = TrustedNodeRelay(metro)
    fill(relay, 8 * KEY, only=metro.serving_links())
    alice, bob = metro.sae_node("alice"), metro.sae_node("bob")
    first = relay.relay(alice, bob, KEY)
    assert first.key_at_source == first.key_at_destination
    core_hops = [h.link for h in first.hops if "_AP" not in h.link]
    relay.set_alarm(core_hops[0], qber=0.3)
    second = relay.relay(alice, bob, KEY)
    assert second.key_at_source == second.key_at_destination
    assert core_hops[0] not in [h.link for h in second.hops]
    assert second.route[0] == alice and second.route[-1] == bob
    # The access link itself has no alternative: alarm there stops the pair.
    relay.set_alarm(first.hops[0].link)
    with pytest.raises(RelayError) as info:
        relay.relay(alice, bob, KEY)
    assert info.value.hop == first.hops[0].link


def test_many_random_relays_conserve_bits(metro: Topology) -> None:
    rng = random.Random(7)
    relay = TrustedNodeRelay(metro)
    fill(relay, 40 * KEY, only=metro.serving_links())
    saes = [metro.sae_node(s) for s in metro.sae_ids]
    hops = 0
    for _ in range(40):
        src, dst = rng.sample(saes, 2)
        result = relay.relay(src, dst, KEY)
        assert result.key_at_source == result.key_at_destination
        hops += len(result.hops)
    consumed = sum(buf.consumed_bits for buf in relay.buffers.values())
    assert consumed == hops * 8 * KEY


def test_bad_arguments(chain: Topology) -> None:
    relay = TrustedNodeRelay(chain)
    with pytest.raises(RelayError, match="unknown node 'Paris'"):
        relay.route("Paris", "Hefei", 256)
    with pytest.raises(ValueError, match="multiple of 8"):
        relay.route("Beijing", "Hefei", 12)
    with pytest.raises(RelayError, match="does not join"):
        relay.relay("Beijing", "Hefei", KEY, route=["Beijing", "Langfang"])
