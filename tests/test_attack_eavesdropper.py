"""Attack: an eavesdropper on one fibre link of the Beijing-Hefei chain.

The real simulated network (BB84 links with post-processing, trusted-node
relay, mTLS ETSI 014 KMEs), the real signaling server and two real phones. The
eavesdropper (intercept-resend on every photon) makes the link's QBER jump; the
link raises its alarm, the relay stops using it, and the KMEs of every pair
whose route crosses it show the alarm in their Status (``docs/relay.md``).

What qcall does with that (``docs/threat-model.md``, "Eavesdropper on a fibre
link"): a key relayed *before* the alarm is still used (it is not compromised),
and the call says so; once no key can be delivered, a call is refused with an
error that names the link. On a mesh the relay reroutes and calls go on
(``tests/test_network.py::test_metro_reroutes_around_alarmed_core_link``).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.contacts import ContactStore
from qcall.exceptions import KMEUnavailableError, LinkAlarmError, QCallError
from qcall.identity import Identity
from qcall.qkd.client import open_key_source
from qcall.qkd.network import SimulatedNetwork, default_link_factory
from signaling.server import SignalingServer
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow

LINK = "Jinan-Taian"


def fast_network(state: Path) -> Any:
    """The real beijing-hefei chain with small BB84 blocks (as tests/test_network.py)."""
    return SimulatedNetwork.start(
        "beijing-hefei",
        state,
        link_factory=default_link_factory(block_sifted_bits=1 << 13),
        speedup=1e6,
        pool_target=2,
        link_capacity_bits=1 << 14,
        seed=1,
        relay_interval=0.01,
        alarm_retry=0.05,
    )


async def test_eavesdropper_on_a_chain_link_refuses_calls_naming_the_link(
    tmp_path: Path,
) -> None:
    signaling = SignalingServer()
    await signaling.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{signaling.port}"
    phones: list[Phone] = []
    try:
        async with fast_network(tmp_path / "net") as net:
            await net.wait_ready(30 * T)

            async def phone(name: str) -> Phone:
                home = tmp_path / name
                home.mkdir()
                p = Phone(
                    url,
                    Identity.generate(name).signing_key,
                    name,
                    check_peer=ContactStore.in_home(home).check_peer,
                    key_source=open_key_source(net.sae_credentials(name).as_config()),
                    options=CallOptions(rekey_interval=None),
                    make_source=lambda: None,
                )
                await p.start()
                phones.append(p)
                return p

            alice, bob = await phone("alice"), await phone("bob")

            net.set_eavesdropper(LINK, 1.0)
            await net.wait_for(lambda: LINK in net.relay.alarmed_links, 30 * T)
            assert net.status()["links"][LINK]["qber"] > 0.11

            # 1. A key relayed before the alarm is still good: the call connects
            #    and its status shows the alarm.
            async with open_key_source(net.sae_credentials("alice").as_config()) as kme:
                status = await kme.status("bob")
                assert status.alarm == f"eavesdropper alarm on link {LINK}; relay stopped"
                assert status.stored_key_count >= 1
            incoming = asyncio.ensure_future(bob.incoming())
            caller = await asyncio.wait_for(alice.call("bob"), 20 * T)
            callee = await asyncio.wait_for(incoming, 10 * T)
            assert caller.status.policy == callee.status.policy == "hybrid"
            assert LINK in caller.status.notice and "before the alarm" in caller.status.notice
            await caller.hangup()
            await asyncio.wait_for(callee.wait(), 5 * T)

            # 2. Drain what is left of the pre-alarm pool; nothing new can come.
            async with open_key_source(net.sae_credentials("alice").as_config()) as kme:
                while (await kme.status("bob")).stored_key_count:
                    await kme.get_key("bob")
                await net.wait_for(
                    lambda: net.pair_status("alice", "bob")["failed_hop"] == LINK, 30 * T
                )
                with pytest.raises(KMEUnavailableError):
                    await kme.get_key("bob")

            # 3. Now a call that needs the route is refused, naming the link.
            incoming = asyncio.ensure_future(bob.incoming())
            with pytest.raises(LinkAlarmError, match=LINK) as refused:
                await asyncio.wait_for(alice.call("bob"), 20 * T)
            assert refused.value.link == LINK
            assert refused.value.qber is not None and refused.value.qber > 0.11
            assert "not placed" in str(refused.value)
            assert not alice.calls
            incoming.cancel()  # bob never gets an offer: alice gave up before it
            with contextlib.suppress(asyncio.CancelledError, QCallError):
                await incoming

            # 4. The user may still accept an ML-KEM-only call, told why.
            alice.options = bob.options = CallOptions(rekey_interval=None, allow_pqc_only=True)
            incoming = asyncio.ensure_future(bob.incoming())
            caller = await asyncio.wait_for(alice.call("bob"), 20 * T)
            callee = await asyncio.wait_for(incoming, 10 * T)
            assert caller.status.policy == "pqc"
            assert LINK in caller.status.notice and "pqc only" in caller.status.notice
            await caller.hangup()
    finally:
        for p in phones:
            await p.close()
        await signaling.close()
