"""How many one-time-pad calls a QKD link sustains (pure; docs/otp.md §6).

A call spends, in each direction, :func:`~qcall.otp.keystream.packet_key_rate`
pad bytes per second (a 32-byte MAC key and one pad byte per payload byte, 50
packets a second), plus what is wasted at the end of each pad block (a packet
never straddles two blocks). Through trusted relays every link of the route
spends the same bytes again (hop-by-hop one-time-pad relay, docs/relay.md), so
the link with the least key per call bounds the route.

This is the OTP column of a capacity planner; the national planner
(``qcall network capacity``) may reconcile its own model with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from qcall.otp.keystream import PACKETS_PER_SECOND, OTPPolicy
from qcall.otp.packet import key_bytes_per_packet
from qcall.qkd.capacity import CallMode

__all__ = [
    "call_key_rate_bps",
    "call_mode",
    "opus_payload_bytes",
    "predict_capacity",
    "route_capacity",
]


def opus_payload_bytes(bitrate: int, packets_per_second: int = PACKETS_PER_SECOND) -> int:
    """Payload bytes of one constant-bitrate Opus packet."""
    return math.ceil(bitrate / 8 / packets_per_second)


def call_key_rate_bps(policy: OTPPolicy | None = None, payload_bytes: int | None = None) -> float:
    """Key bits per second one OTP call spends on each link of its route (both directions).

    Args:
        policy: the call's :class:`~qcall.otp.keystream.OTPPolicy` (bitrate, block size).
        payload_bytes: the measured Opus payload per packet, if known (the
            nominal constant-bitrate size otherwise).
    """
    policy = policy or OTPPolicy()
    payload = opus_payload_bytes(policy.bitrate) if payload_bytes is None else payload_bytes
    need = key_bytes_per_packet(payload)
    block = policy.block_bits // 8
    per_block = block // need  # packets one block serves; the rest is wasted
    bytes_per_packet = block / per_block
    return 2 * PACKETS_PER_SECOND * bytes_per_packet * 8


def call_mode(policy: OTPPolicy | None = None) -> CallMode:
    """The capacity planner's OTP mode (:mod:`qcall.qkd.capacity`) at what an OTP call of
    ``policy`` really spends (:func:`call_key_rate_bps`: payload, MAC key, block ends).

    ``qcall network capacity`` plans with it, so that the planner and the calls agree.
    """
    policy = policy or OTPPolicy()
    return CallMode(f"otp-{policy.bitrate / 1000:g}k", "otp", 0, call_key_rate_bps(policy))


def predict_capacity(link_rate_bps: float, policy: OTPPolicy | None = None) -> int:
    """Simultaneous OTP calls a link of ``link_rate_bps`` secret key sustains forever."""
    if link_rate_bps <= 0:
        return 0
    return math.floor(link_rate_bps / call_key_rate_bps(policy))


def route_capacity(link_rates_bps: Iterable[float], policy: OTPPolicy | None = None) -> int:
    """Calls a relayed route sustains: its slowest link bounds it (0 for an empty route)."""
    rates = list(link_rates_bps)
    return predict_capacity(min(rates), policy) if rates else 0
