"""tests/turn_capture.py: the capture reader the NAT test trusts to find plaintext.

Built from hand-made pcap files (the framing of RFC 8489 STUN, RFC 8656 TURN
ChannelData and Send indications, DTLS records and RTP) so that a reader that
let plaintext through, or mis-split a TURN message, fails here without root.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.turn_capture import STUN_COOKIE, classify, read_pcap, rtp_header_length, unwrap_turn

TURN = ("10.0.0.1", 3478)
CLIENT = ("10.0.0.2", 40000)


def ipv4_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    def addr(ip: str) -> bytes:
        return bytes(int(part) for part in ip.split("."))

    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0)
    return header + addr(src[0]) + addr(dst[0]) + udp


def pcap(path: Path, frames: list[bytes], linktype: int = 1) -> Path:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for frame in frames:
        if linktype == 1:  # Ethernet: two MACs and EtherType IPv4
            frame = b"\x00" * 12 + b"\x08\x00" + frame
        else:  # Linux cooked (SLL): protocol field at 14
            frame = b"\x00" * 14 + b"\x08\x00" + frame
        out += struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame
    path.write_bytes(out)
    return path


def stun(kind: int, attributes: list[tuple[int, bytes]]) -> bytes:
    body = b""
    for atype, value in attributes:
        body += struct.pack("!HH", atype, len(value)) + value + b"\x00" * (-len(value) % 4)
    return struct.pack("!HHI", kind, len(body), STUN_COOKIE) + b"\x07" * 12 + body


def channel_data(data: bytes, channel: int = 0x4001) -> bytes:
    return struct.pack("!HH", channel, len(data)) + data + b"\x00" * (-len(data) % 4)


RTP = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 8 + b"ciphertext-and-tag"
DTLS = bytes([23, 0xFE, 0xFD]) + b"\x00" * 8 + struct.pack("!H", 5) + b"12345"
BINDING = stun(0x0001, [(0x0006, b"user:frag")])


@pytest.mark.parametrize("linktype", [1, 113])
def test_turn_messages_are_unwrapped_and_classified(tmp_path: Path, linktype: int) -> None:
    frames = [
        ipv4_udp(CLIENT, TURN, stun(0x0003, [(0x0006, b"1767225660:alice")])),  # Allocate
        ipv4_udp(CLIENT, TURN, stun(0x0016, [(0x0013, BINDING)])),  # Send indication
        ipv4_udp(TURN, CLIENT, stun(0x0017, [(0x0013, DTLS)])),  # Data indication
        ipv4_udp(CLIENT, TURN, channel_data(RTP)),
        ipv4_udp(("10.0.0.1", 49152), ("10.0.0.1", 49153), RTP),  # relay to relay
    ]
    datagrams = read_pcap(pcap(tmp_path / "c.pcap", frames, linktype))
    assert [d.src for d in datagrams][:2] == [CLIENT, CLIENT]
    control, relayed = unwrap_turn(datagrams, TURN[1])
    assert len(control) == 1
    assert relayed == [BINDING, DTLS, RTP, RTP]
    assert [classify(d) for d in relayed] == ["stun", "dtls", "rtp", "rtp"]
    rtcp = bytes([0x80, 200]) + b"\x00" * 10
    assert classify(rtcp) == "rtcp"
    assert rtp_header_length(RTP) == 12


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (b"hello from alice", "not STUN, DTLS, RTP or RTCP"),  # plaintext is refused
        (b"\x00\x01\x00\x00" + b"\x00" * 16, "cookie"),  # STUN-like without the cookie
        (DTLS[:-1], "do not add up"),  # a record longer than the datagram
        (bytes([24, 0xFE, 0xFD]) + DTLS[3:], "not a DTLS"),  # heartbeat: not expected
        (RTP[:8], "cut short"),
        (b"", "empty"),
    ],
)
def test_anything_else_is_refused(datagram: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classify(datagram)


def test_bad_turn_framing_is_refused(tmp_path: Path) -> None:
    for payload, message in (
        (struct.pack("!HH", 0x4001, 200) + RTP, "ChannelData length"),
        (stun(0x0016, [(0x0006, b"x")]), "without a DATA attribute"),
        (b"plain text to the TURN port", "not a STUN message"),
    ):
        datagrams = read_pcap(pcap(tmp_path / "bad.pcap", [ipv4_udp(CLIENT, TURN, payload)]))
        with pytest.raises(ValueError, match=message):
            unwrap_turn(datagrams, TURN[1])
    (tmp_path / "x.pcap").write_bytes(b"not a capture at all, long enough to have a header")
    with pytest.raises(ValueError, match="not a pcap file"):
        read_pcap(tmp_path / "x.pcap")
