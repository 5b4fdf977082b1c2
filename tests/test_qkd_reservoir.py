"""QKD key prefetch (qcall/qkd/reservoir.py) and the pre-made ML-KEM pairs (KEMPool).

The core's rules on a simulated clock; the shell against a real KME (ETSI 014
over mutual TLS on loopback) and in real calls between two phones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qcall.call.session import CallOptions
from qcall.exceptions import ConfigError, KMEConnectionError, SecurityPolicyError
from qcall.handshake.kem import KEMPool
from qcall.qkd.client import open_key_source
from qcall.qkd.etsi014 import QKDKey
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.pki import create_pki, server_ssl_context
from qcall.qkd.reservoir import KeyReservoir, ReservoirConfig, ReservoirCore
from qcall.qkd.server import KMEServer
from qcall.typing import KeyId, SAEId
from tests.test_call_session import (
    Lab,
    connect,
    lab as lab,  # the fixture: two KMEs, signaling
)
from tests.utils import TIMEOUT_FACTOR as T


def key(fill: int) -> QKDKey:
    return QKDKey(KeyId(str(uuid.uuid4())), bytes([fill]) * 32)


# --- the core: exactly once, bounded, expiring, wiped -------------------------------------


def test_each_key_is_taken_once_oldest_first() -> None:
    core = ReservoirCore(ReservoirConfig(keys_per_peer=2, max_age=60))
    a, b = key(1), key(2)
    assert core.add("bob", [a, b], now=0.0) == [a.key_id, b.key_id]
    first, second = core.take("bob", 1.0), core.take("bob", 1.0)
    assert first == a and second == b  # same key_ID and bytes
    assert core.take("bob", 1.0) is None  # nothing is handed out twice
    assert core.taken == 2 and core.total() == 0
    # A KME delivering a key_ID again (held or handed out before): refused, never held.
    assert core.add("bob", [a], now=2.0) == []
    assert core.take("bob", 2.0) is None and core.discarded == 1


def test_keys_expire_unused_and_are_wiped() -> None:
    core = ReservoirCore(ReservoirConfig(keys_per_peer=2, max_age=10))
    old, young = key(7), key(8)
    core.add("bob", [old], now=0.0)
    core.add("bob", [young], now=5.0)
    old_buf = core._held["bob"][0].buf
    assert core.next_expiry() == 10.0
    assert core.missing("bob", 9.9) == 0
    assert core.take("bob", 10.0) == young  # the key of t=0 expired at 10: wiped, skipped
    assert not any(old_buf)
    assert core.expired == 1 and core.taken == 1
    core.add("bob", [key(9)], now=11.0)
    buf = core._held["bob"][0].buf
    assert core.take("bob", 21.0) is None  # held 10 s: never used
    assert not any(buf) and core.expired == 2


def test_take_wipes_the_held_copy() -> None:
    core = ReservoirCore(ReservoirConfig())
    core.add("bob", [key(0xAB)], now=0.0)
    buf = core._held["bob"][0].buf
    original = bytes(buf)
    taken = core.take("bob", 0.0)
    assert taken is not None and taken.key == original
    assert not any(buf)  # the reservoir's copy is overwritten


def test_bounded_per_peer_and_in_peers() -> None:
    core = ReservoirCore(ReservoirConfig(keys_per_peer=2, max_peers=2))
    assert len(core.add("bob", [key(1), key(2), key(3)], now=0.0)) == 2  # the third: wiped
    core.add("carol", [key(4)], now=0.0)
    core.add("dave", [key(5)], now=0.0)  # bob is the least recently used: wiped
    assert core.held("bob") == 0 and core.held("carol") == core.held("dave") == 1
    assert core.discarded == 3
    assert core.clear() == 2 and core.total() == 0


def test_repr_and_logs_give_no_key_bytes(caplog: pytest.LogCaptureFixture) -> None:
    secret = bytes(range(32))
    core = ReservoirCore(ReservoirConfig())
    core.add("bob", [QKDKey(KeyId(str(uuid.uuid4())), secret)], now=0.0)
    for text in (repr(core), str(core), repr(core._held["bob"][0].key), caplog.text):
        assert secret.hex() not in text and "\\x00\\x01\\x02" not in text
    assert "1 keys for 1 peers" in repr(core)


@pytest.mark.parametrize(
    "kwargs", [{"keys_per_peer": -1}, {"keys_per_peer": 17}, {"max_age": 0}, {"max_peers": 0}]
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="qkd prefetch"):
        ReservoirConfig(**kwargs)


def test_kem_pool_hands_each_pair_out_once() -> None:
    pool = KEMPool(size=2)
    assert pool.fill() == 2 and len(pool) == 2
    first, second, third = pool.generate(), pool.generate(), pool.generate()
    keys = {first.public_bytes(), second.public_bytes(), third.public_bytes()}
    assert len(keys) == 3  # never the same pair twice; the third made on the spot
    assert (pool.hits, pool.misses) == (2, 1) and len(pool) == 0
    assert "0/2 ready" in repr(pool)
    secret, ct = pool.encapsulate(first.public_bytes())
    assert first.decapsulate(ct) == secret


# --- the shell against a real KME --------------------------------------------------------


@pytest.fixture
async def kme_source(tmp_path: Path) -> AsyncIterator[tuple[Any, KME]]:
    pki = create_pki(tmp_path / "pki", ["KME-A"], ["alice", "bob"])
    kme = KME("KME-A")
    kme.supply("alice", "bob", random_keys(16), role="local", now=time.time())
    node = pki.kmes["KME-A"]
    ctx = server_ssl_context(node.cert, node.key, pki.ca_cert)
    async with KMEServer(kme, "127.0.0.1", 0, ctx) as server:
        creds = pki.saes["alice"]
        source = open_key_source(
            {"type": "etsi014", "url": server.url, "cert": str(creds.cert),
             "key": str(creds.key), "ca": str(pki.ca_cert), "timeout": 2.0}
        )  # fmt: skip
        async with source:
            yield source, kme


async def test_refill_fetches_what_is_missing_and_expiry_wipes(
    kme_source: tuple[Any, KME],
) -> None:
    source, kme = kme_source
    now = [0.0]
    config = ReservoirConfig(keys_per_peer=2, max_age=5)
    reservoir = KeyReservoir(source, config, clock=lambda: now[0])
    assert await reservoir.fill("bob") == 2
    assert await reservoir.fill("bob") == 0  # full: no request
    held = reservoir.take("bob")
    assert held is not None
    # The peer fetches exactly that key by its ID, once (the KME hands it out once).
    (delivered,) = kme.dec_keys(SAEId("bob"), "alice", [held.key_id]).keys
    assert delivered.key == held.key
    now[0] = 5.0  # the other key was held 5 s: expired, wiped, never used
    assert reservoir.take("bob") is None
    assert reservoir.core.expired == 1
    await reservoir.close()
    assert reservoir.take("bob") is None and reservoir.refill("bob") is None


async def test_refill_failure_is_kept_and_never_raises(kme_source: tuple[Any, KME]) -> None:
    source, _ = kme_source

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise KMEConnectionError("cannot connect to KME (test: switched off)")

    source.get_keys = down
    reservoir = KeyReservoir(source)
    task = reservoir.refill("bob")
    assert task is not None and await task == 0
    assert "switched off" in reservoir.last_error["bob"]
    assert reservoir.take("bob") is None
    await reservoir.close()


async def test_a_suspended_peer_gets_no_refill(kme_source: tuple[Any, KME]) -> None:
    source, _ = kme_source
    reservoir = KeyReservoir(source)
    await reservoir.fill("bob")
    reservoir.suspend("bob")  # a link alarm on the route: held keys wiped, none fetched
    assert reservoir.core.held("bob") == 0 and reservoir.refill("bob") is None
    reservoir.resume("bob")
    task = reservoir.refill("bob")
    assert task is not None and await task == 2
    await reservoir.close()
    assert reservoir.core.total() == 0


# --- in calls ----------------------------------------------------------------------------


async def test_the_second_call_takes_its_key_from_the_reservoir(lab: Lab) -> None:
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    assert alice.reservoir is not None
    used: list[str] = []
    for _ in range(3):
        caller, callee = await connect(alice, bob)
        assert caller.status.policy == callee.status.policy == "hybrid"
        assert caller.status.qkd_key_ids == callee.status.qkd_key_ids  # confirmed: same key
        used += caller.status.qkd_key_ids
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 5 * T)
        for _ in range(100):  # the refill follows the set-up
            if alice.reservoir.core.held("bob") == 2:
                break
            await asyncio.sleep(0.02)
    assert caller.status.timings_ms.get("qkd_prefetched") == 1.0
    assert len(set(used)) == 3  # each key used once
    assert alice.kem_pool.hits >= 3  # the offers' ML-KEM pairs were made ahead


async def test_kme_down_falls_back_to_the_dial_and_then_a_clear_error(lab: Lab) -> None:
    source = lab.key_source("alice")
    get_keys = source.get_keys
    up = [True]

    async def switchable(*args: Any, **kwargs: Any) -> Any:
        if not up[0]:
            raise KMEConnectionError("cannot connect to KME (test: switched off)")
        return await get_keys(*args, **kwargs)

    source.get_keys = switchable
    alice = await lab.phone("alice", tone=440, key_source=source,
                            prefetch=ReservoirConfig(keys_per_peer=1))  # fmt: skip
    bob = await lab.phone("bob")
    assert alice.reservoir is not None
    caller, callee = await connect(alice, bob)  # fetched at dial; the refill follows
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    for _ in range(100):
        if alice.reservoir.core.held("bob"):
            break
        await asyncio.sleep(0.02)
    # The held key is used; the refill after this call fails (KME down).
    up[0] = False
    caller, callee = await connect(alice, bob)
    assert caller.status.timings_ms.get("qkd_prefetched") == 1.0
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    await asyncio.sleep(0.1)
    assert alice.reservoir.core.held("bob") == 0
    assert "switched off" in alice.reservoir.last_error.get("bob", "")
    # No key at all: the dial's own request fails too, and says so.
    with pytest.raises(SecurityPolicyError, match=r"QKD key unavailable.*switched off"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    # KME back: the dial fetches the key itself again.
    up[0] = True
    caller, callee = await connect(alice, bob)
    assert "qkd_prefetched" not in caller.status.timings_ms
    await caller.hangup()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(callee.wait(), 5 * T)


async def test_prefetch_off_fetches_at_dial(lab: Lab) -> None:
    options = CallOptions(rekey_interval=None)
    alice = await lab.phone("alice", tone=440, options=options,
                            prefetch=ReservoirConfig(keys_per_peer=0))  # fmt: skip
    bob = await lab.phone("bob")
    for _ in range(2):
        caller, callee = await connect(alice, bob)
        assert "qkd_prefetched" not in caller.status.timings_ms
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 5 * T)
    assert alice.reservoir is not None and alice.reservoir.core.total() == 0


async def test_the_kme_status_waits_for_the_confirmation(lab: Lab) -> None:
    # The first call asks for the Status at dial (its offer needs the KME's ID); later
    # calls, whose key came without one, ask only once the call is confirmed: the
    # request does not share the event loop with ICE and DTLS.
    source = lab.key_source("alice")
    status = source.status
    confirmed_when_asked: list[bool] = []

    async def recording(peer_sae: str) -> Any:
        call = next(iter(alice.calls.values()), None)
        confirmed_when_asked.append(call is not None and call._confirmed0.done())
        return await status(peer_sae)

    source.status = recording
    alice = await lab.phone("alice", tone=440, key_source=source)
    bob = await lab.phone("bob")
    for _ in range(2):
        caller, callee = await connect(alice, bob)
        await asyncio.sleep(0.2)  # the Status request, if due, is answered meanwhile
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 5 * T)
    assert confirmed_when_asked == [False, True]
