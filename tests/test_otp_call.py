"""A real one-time-pad call between two in-process phones over loopback.

The lab of tests/test_call_session.py: a signaling server, two ETSI 014 KMEs
over mutual TLS sharing relayed key pools, two :class:`~qcall.call.phone.Phone`
objects; alice sends a tone, bob records. The OTP pads come from the KMEs as
4096-bit keys, agreed by key_ID over the call's control channel.
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest

from qcall.call.audio_analysis import peak_frequency
from qcall.call.media import read_wav
from qcall.call.session import CallOptions
from qcall.exceptions import OTPKeyExhaustedError, OTPNotAllowedError, QCallError
from qcall.otp.keystream import OTPPolicy
from qcall.otp.packet import rtp_header_length
from qcall.qkd.kme import random_keys
from tests.test_call_session import (
    Lab,
    capture,
    connect,
    lab as lab,  # the fixture
)
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow


def otp_options(**policy: object) -> CallOptions:
    return CallOptions(rekey_interval=None, otp=OTPPolicy(**policy))  # type: ignore[arg-type]


def supply_pads(lab: Lab, blocks: int) -> None:
    """Put ``blocks`` 4096-bit keys in each direction's pools (what the relay delivers)."""
    kmes = lab.kmes  # type: ignore[attr-defined]
    now = time.time()
    for master, slave in (("alice", "bob"), ("bob", "alice")):
        keys = random_keys(blocks * 16)  # 256-bit keys: the pool is a byte stream
        kmes[master].supply(master, slave, keys, role="master", peer_kme_id="x", now=now)
        kmes[slave].supply(master, slave, keys, role="slave", peer_kme_id="x", now=now)


async def test_otp_call_tone_arrives_every_packet_is_sealed_once(lab: Lab, tmp_path: Path) -> None:
    supply_pads(lab, 60)
    alice = await lab.phone("alice", tone=523, options=otp_options())
    bob = await lab.phone("bob", record=True, options=otp_options())
    caller, callee = await connect(alice, bob)
    sent = capture(caller)
    await asyncio.sleep(2.0 * T)
    await caller.refresh_stats()
    assert caller.status.policy == callee.status.policy == "otp"
    assert "OTP key used" in caller.status.otp_budget and "s left" in caller.status.otp_budget
    media = caller.otp
    assert media is not None and media.protocol.tx_no_key == 0
    assert len(sent) > 40
    # Every media packet is an OTP packet: locator after the RTP header, each key range
    # used once, constant size (CBR Opus at the policy's bitrate).
    ranges = set()
    for packet in sent:
        hlen = rtp_header_length(packet)
        ranges.add(struct.unpack_from("!IH", packet, hlen))
    assert len(ranges) == len(sent)
    received = callee.otp.protocol.receiver.stats  # type: ignore[union-attr]
    assert received.packets >= len(sent) - 5 and not received.rejected
    # Both KMEs counted the pad blocks as one-time-pad key (ETSI 014 qcall_application tag).
    kmes = lab.kmes  # type: ignore[attr-defined]
    for kme in (kmes["alice"], kmes["bob"]):
        usage = {row["application"]: row for row in kme.usage()}
        assert usage["otp"]["keys"] >= 1 and usage["otp"]["bits"] % 4096 == 0, usage
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    await lab.recorders[0].stop()
    samples, rate = read_wav(tmp_path / "bob.wav")
    assert len(samples) > rate
    assert abs(peak_frequency(samples, rate) - 523) < 3


@pytest.mark.parametrize("on_exhausted", ["end", "hybrid"])
async def test_pool_runs_low_call_ends_or_falls_back_and_says_so(
    lab: Lab, on_exhausted: str
) -> None:
    supply_pads(lab, 12)  # ≈ 2 s of pad each way
    alice = await lab.phone("alice", tone=440, options=otp_options(on_exhausted=on_exhausted))
    bob = await lab.phone("bob", options=otp_options(on_exhausted=on_exhausted))
    caller, _callee = await connect(alice, bob)
    if on_exhausted == "end":
        with pytest.raises(OTPKeyExhaustedError, match=r"pad low|pool low"):
            await asyncio.wait_for(caller.wait(), 15 * T)
        assert caller.status.error and "OTP call ended" in caller.status.error
    else:
        deadline = time.monotonic() + 15 * T
        while caller.status.policy != "hybrid" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert caller.status.policy == "hybrid"
        assert "fell back to hybrid" in caller.status.notice
        sent = capture(caller)
        await asyncio.sleep(0.5)
        assert sent  # media goes on, under the hybrid SRTP keys
        assert caller.otp is not None and caller.otp.protocol.tx_no_key == 0
        await caller.hangup()


async def test_otp_across_rekeys_and_a_restarted_call_never_reuses_a_key_range(lab: Lab) -> None:
    supply_pads(lab, 80)
    options = CallOptions(rekey_interval=0.3, otp=OTPPolicy())
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", options=options)
    used_key_ids: list[str] = []
    for _ in range(2):  # the second call is a "restart": new sessions, same KMEs and users
        caller, callee = await connect(alice, bob)
        sent = capture(caller)
        await asyncio.sleep(1.5 * T)
        assert caller.status.rekeys >= 2  # the handshake rekeyed meanwhile
        assert caller.otp is not None and callee.otp is not None
        ranges = [struct.unpack_from("!IH", p, rtp_header_length(p)) for p in sent]
        assert len(ranges) == len(set(ranges)) > 30
        assert caller.otp.protocol.tx_no_key == 0
        assert not callee.otp.protocol.receiver.stats.rejected
        held = set()  # pad blocks still held at hang-up, both directions, both sides
        for side in (caller.otp, callee.otp):
            held |= {b.key_id for b in side.protocol.sender._blocks}
            held |= {b.key_id for b in side.protocol.receiver._blocks.values()}
        used_key_ids += sorted(held)
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 5 * T)
    # The pads' key_IDs still held at hang-up never repeat across the two calls.
    assert len(used_key_ids) == len(set(used_key_ids))


async def test_otp_call_to_a_callee_without_otp_is_refused_at_once_on_both_sides(lab: Lab) -> None:
    """Policy otp is in the signed offer: bob (no --otp) refuses it, both sides say why."""
    supply_pads(lab, 4)
    alice = await lab.phone("alice", tone=440, options=otp_options())
    bob = await lab.phone("bob")  # hybrid only, as `qcall listen` without --otp
    incoming = asyncio.ensure_future(bob.incoming())
    started = time.monotonic()
    with pytest.raises(QCallError, match=r"otp_not_allowed.*bob does not accept one-time-pad"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(OTPNotAllowedError, match="bob does not accept one-time-pad calls"):
        await asyncio.wait_for(incoming, 5 * T)
    assert time.monotonic() - started < 5 * T  # at once, not after a media timeout
