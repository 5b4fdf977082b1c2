"""What a TURN server carried, read from a tcpdump capture (for tests/test_signaling_nat.py).

A capture (libpcap file; Ethernet, Linux cooked ``SLL`` or ``SLL2`` link layer,
as ``tcpdump -i any`` writes) is cut into IPv4 UDP datagrams; those are unwrapped
as a TURN server sees them:

* to or from the TURN port: a STUN/TURN message (RFC 8489 §5: first two bits 0,
  magic cookie ``0x2112A442``) or a ChannelData message (RFC 8656 §12.4: channel
  number ``0x4000``-``0x4FFF``, length, data). A Send or Data indication
  (RFC 8656 §11.4/§11.6) carries a datagram in its DATA attribute (``0x0013``),
  a ChannelData message in its data; the other messages (Allocate, Refresh,
  CreatePermission, ChannelBind, Binding) are the TURN server's own;
* between two relayed transport addresses (both peers relayed: coturn talks to
  itself over ``lo``): the datagram itself.

Each relayed datagram is then told apart as RFC 7983 §7 does (first byte 0-3
STUN, 20-63 DTLS, 128-191 RTP/RTCP) and its framing is checked: a STUN message
with the cookie and its length; DTLS records (content type 20-23, version
1.0/1.2, lengths adding up to the datagram); RTP/RTCP version 2 (RFC 5761 §4:
the second byte 192-223 is RTCP). Anything else raises :class:`ValueError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Datagram", "classify", "read_pcap", "unwrap_turn"]

STUN_COOKIE = 0x2112A442
_SEND_INDICATION = 0x0016
_DATA_INDICATION = 0x0017
_DATA_ATTRIBUTE = 0x0013
#: Link-layer header lengths by pcap LINKTYPE (Ethernet, SLL, SLL2) and where the
#: EtherType / protocol field sits in it.
_LINK = {1: (14, 12), 113: (16, 14), 276: (20, 0)}


@dataclass(frozen=True)
class Datagram:
    """One IPv4 UDP datagram of the capture."""

    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


def read_pcap(path: str | Path) -> list[Datagram]:
    """Return the IPv4 UDP datagrams of a pcap file, in capture order.

    Raises:
        ValueError: not a pcap file, an unknown link type, or a truncated record.
    """
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: too short for a pcap header")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    (linktype,) = struct.unpack(endian + "I", data[20:24])
    if linktype not in _LINK:
        raise ValueError(f"{path}: link type {linktype} is not Ethernet, SLL or SLL2")
    header, proto_at = _LINK[linktype]
    out: list[Datagram] = []
    offset = 24
    while offset < len(data):
        if offset + 16 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        _, _, caplen, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) != caplen:
            raise ValueError(f"{path}: truncated record at byte {offset}")
        (proto,) = struct.unpack("!H", frame[proto_at : proto_at + 2])
        if proto != 0x0800 or len(frame) < header + 20:
            continue  # not IPv4
        ip = frame[header:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[0] >> 4 != 4 or ip[9] != 17 or len(ip) < total:
            continue  # not UDP (or cut short by the snap length: tcpdump's default keeps all)
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        sport, dport, length = struct.unpack("!HHH", ip[ihl : ihl + 6])
        out.append(Datagram((src, sport), (dst, dport), bytes(ip[ihl + 8 : ihl + length])))
    return out


def _stun_attributes(message: bytes) -> tuple[int, dict[int, bytes]]:
    """``(message type, {attribute type: value})`` of a well-formed STUN message."""
    if len(message) < 20 or message[0] >> 6 != 0:
        raise ValueError("not a STUN message (first two bits)")
    kind, length, cookie = struct.unpack("!HHI", message[:8])
    if cookie != STUN_COOKIE or length % 4 or 20 + length != len(message):
        raise ValueError("not a STUN message (cookie or length)")
    attributes: dict[int, bytes] = {}
    at = 20
    while at < len(message):
        if at + 4 > len(message):
            raise ValueError("STUN attribute header cut short")
        atype, alen = struct.unpack("!HH", message[at : at + 4])
        value = message[at + 4 : at + 4 + alen]
        if len(value) != alen:
            raise ValueError("STUN attribute cut short")
        attributes.setdefault(atype, value)
        at += 4 + alen + (-alen % 4)
    return kind, attributes


def unwrap_turn(datagrams: list[Datagram], turn_port: int) -> tuple[list[bytes], list[bytes]]:
    """Split what a TURN server carried into its own messages and the relayed datagrams.

    Returns:
        ``(control, relayed)``: the TURN/STUN messages addressed to or sent by the
        server itself, and every datagram it relayed for a peer, in capture order.

    Raises:
        ValueError: a datagram on the TURN port is neither STUN nor ChannelData.
    """
    control: list[bytes] = []
    relayed: list[bytes] = []
    for dgram in datagrams:
        data = dgram.payload
        if turn_port not in (dgram.src[1], dgram.dst[1]):
            relayed.append(data)  # between relayed transport addresses
            continue
        if len(data) >= 4 and 0x40 <= data[0] <= 0x4F:  # ChannelData
            (length,) = struct.unpack("!H", data[2:4])
            if 4 + length > len(data) or len(data) > 4 + length + 3:
                raise ValueError(f"ChannelData length {length} in a {len(data)}-byte datagram")
            relayed.append(data[4 : 4 + length])
            continue
        kind, attributes = _stun_attributes(data)
        if kind in (_SEND_INDICATION, _DATA_INDICATION):
            if _DATA_ATTRIBUTE not in attributes:
                raise ValueError("Send/Data indication without a DATA attribute")
            relayed.append(attributes[_DATA_ATTRIBUTE])
        else:
            control.append(data)
    return control, relayed


def classify(datagram: bytes) -> str:
    """``"stun"``, ``"dtls"``, ``"rtp"`` or ``"rtcp"`` (RFC 7983 §7), framing checked.

    Raises:
        ValueError: anything else (the message says what is wrong).
    """
    if not datagram:
        raise ValueError("empty datagram")
    first = datagram[0]
    if first <= 3:
        _stun_attributes(datagram)
        return "stun"
    if 20 <= first <= 63:
        at = 0
        while at < len(datagram):
            if at + 13 > len(datagram):
                raise ValueError("DTLS record header cut short")
            ctype, major, minor = datagram[at], datagram[at + 1], datagram[at + 2]
            (length,) = struct.unpack("!H", datagram[at + 11 : at + 13])
            if not 20 <= ctype <= 23 or major != 0xFE or minor not in (0xFF, 0xFD):
                raise ValueError(f"not a DTLS 1.0/1.2 record (type {ctype})")
            at += 13 + length
        if at != len(datagram):
            raise ValueError("DTLS record lengths do not add up to the datagram")
        return "dtls"
    if 128 <= first <= 191:
        if len(datagram) < 12:
            raise ValueError("RTP/RTCP header cut short")
        return "rtcp" if 192 <= datagram[1] <= 223 else "rtp"
    raise ValueError(f"first byte {first}: not STUN, DTLS, RTP or RTCP (RFC 7983)")


def rtp_header_length(packet: bytes) -> int:
    """Length of an RTP packet's header: 12 + CSRCs + header extension (RFC 3550 §5.3.1)."""
    length = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:
        (words,) = struct.unpack("!H", packet[length + 2 : length + 4])
        length += 4 + 4 * words
    return length
