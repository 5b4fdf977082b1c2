"""docs/otp.md vectors: the implementation and an independent re-implementation agree.

The ``_ref_*`` functions below were written from docs/otp.md alone (explicit
powers instead of Horner's rule, byte-wise XOR, no qcall import), so the file
pins the spec, not just the code.
"""

from __future__ import annotations

from typing import Any

import pytest

from qcall.otp.keystream import ControlMessage, MessageType
from qcall.otp.mac import one_time_mac
from qcall.otp.packet import PadReceiver, seal_packet
from tests.utils import load_vectors

VECTORS = load_vectors("otp.json")
PRIME = 2**127 - 1


def _ref_tag(key: bytes, message: bytes) -> bytes:
    r = int.from_bytes(key[:16], "big") % PRIME
    s = int.from_bytes(key[16:32], "big") % PRIME
    blocks = [message[i : i + 15] for i in range(0, len(message), 15)]
    coeffs = [int.from_bytes(b + bytes(15 - len(b)), "big") for b in blocks] + [len(message)]
    n1 = len(coeffs)  # the first coefficient multiplies r^(n+1), the last r^1
    h = sum(c * pow(r, n1 - i, PRIME) for i, c in enumerate(coeffs)) % PRIME
    return ((h + s) % PRIME).to_bytes(16, "big")


def _ref_header_len(packet: bytes) -> int:
    cc = packet[0] % 16
    length = 12 + 4 * cc
    if (packet[0] >> 4) & 1:
        length += 4 + 4 * int.from_bytes(packet[length + 2 : length + 4], "big")
    return length


def _ref_seal(rtp: bytes, index: int, offset: int, pad: bytes) -> bytes:
    h = _ref_header_len(rtp)
    payload = rtp[h:]
    cipher = bytes(p ^ k for p, k in zip(payload, pad[32:], strict=True))
    body = rtp[:h] + index.to_bytes(4, "big") + offset.to_bytes(2, "big") + cipher
    return body + _ref_tag(pad[:32], body)


def _ref_control(case: dict[str, Any]) -> bytes:
    types = {"BLOCKS": 1, "ACK": 2, "NACK": 3, "END": 4, "FALLBACK": 5}
    head: bytes = b"QOTP" + bytes([1, types[case["type"]]]) + case["first"].to_bytes(4, "big")
    head += bytes([case["count"]])
    if case["type"] == "BLOCKS":
        return head + b"".join(bytes([len(k)]) + k.encode() for k in case["key_ids"])
    if case["type"] == "ACK":
        return head
    return head + bytes([case["code"]])


@pytest.mark.parametrize("case", VECTORS["mac"], ids=lambda c: c["name"])
def test_mac_vectors(case: dict[str, Any]) -> None:
    key, message = bytes.fromhex(case["key"]), bytes.fromhex(case["message"])
    assert one_time_mac(key, message).hex() == case["tag"]
    assert _ref_tag(key, message).hex() == case["tag"]


@pytest.mark.parametrize("case", VECTORS["packets"], ids=lambda c: c["name"])
def test_packet_vectors(case: dict[str, Any]) -> None:
    rtp, pad = bytes.fromhex(case["rtp"]), bytes.fromhex(case["pad"])
    assert seal_packet(rtp, case["index"], case["offset"], pad).hex() == case["packet"]
    assert _ref_seal(rtp, case["index"], case["offset"], pad).hex() == case["packet"]
    # A receiver holding the block opens it back to the RTP packet.
    receiver = PadReceiver()
    for index in range(case["index"] + 1):
        block = bytearray(b"\xa5" * 1024)
        if index == case["index"]:
            block[case["offset"] : case["offset"] + len(pad)] = pad
        receiver.add_block(index, f"k{index}", bytes(block))
    assert receiver.unprotect(bytes.fromhex(case["packet"])) == rtp


@pytest.mark.parametrize("case", VECTORS["control"], ids=lambda c: c["name"])
def test_control_vectors(case: dict[str, Any]) -> None:
    message = ControlMessage(
        MessageType[case["type"]],
        case["first"],
        case["count"],
        tuple(case["key_ids"]),
        case["code"],
    )
    assert message.serialize().hex() == case["bytes"]
    assert _ref_control(case).hex() == case["bytes"]
    assert ControlMessage.parse(bytes.fromhex(case["bytes"])) == message


def test_vectors_file_is_current() -> None:
    from scripts.gen_otp_vectors import build

    assert build() == VECTORS
