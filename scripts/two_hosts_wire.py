#!/usr/bin/env python3
"""The "wire" between the two hosts of scripts/two_hosts.sh: a user-space delaying bridge.

The kernel here has no netem, so the Beijing–Hefei one-way delay cannot be a
qdisc. This program runs in a middle network namespace holding the far ends
of the two hosts' veth pairs (``qa`` ↔ ``wa`` … ``wb`` ↔ ``qb``). It reads every
Ethernet frame arriving on one side with an ``AF_PACKET`` socket and writes it
out of the other side ``--delay-ms`` later, in order: a transparent bridge
whose egress is delayed, like ``tc qdisc add … netem delay D`` on each host.
Everything between the hosts crosses it — ARP, signaling (TCP), the QKD site
link (TCP), ICE/DTLS/SRTP (UDP).

Frames must be real frames: on the hosts' interfaces, transmit checksum
offload must be off (``--tx-csum-off IFACE``, run inside that host's
namespace; it also turns TSO off) and ``gso_max_segs 1`` set, else the kernel
hands over 64 KiB super-frames with unfinished checksums.

Usage::

    ip netns exec qw python3 two_hosts_wire.py --delay-ms 5.53 wa wb
    ip netns exec qa python3 two_hosts_wire.py --tx-csum-off va
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Socket buffer: room for a burst (a BB84 detector record is ~1 MB) while
#: this process waits for the CPU on a loaded machine.
BUFFER_BYTES = 32 << 20
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17


def _ethtool(ifname: str, cmd: int, value: int = 0) -> int:
    """One ``struct ethtool_value`` ioctl (what ``ethtool -K`` does); returns ``data``."""
    buf = ctypes.create_string_buffer(struct.pack("II", cmd, value))
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf))
    ifr += bytes(40 - len(ifr))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCETHTOOL, ifr)
    data: int = struct.unpack("II", buf.raw[:8])[1]
    return data


def tx_csum_off(ifname: str) -> None:
    """Turn transmit checksum offload (and with it TSO) off on ``ifname``."""
    _ethtool(ifname, ETHTOOL_STXCSUM, 0)
    if _ethtool(ifname, ETHTOOL_GTXCSUM) != 0:
        raise SystemExit(f"{ifname}: tx checksum offload is still on")


def bridge(left: str, right: str, delay: float) -> None:
    """Forward frames between two interfaces, each ``delay`` seconds late, until SIGTERM."""
    socks = {}
    for name in (left, right):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER_BYTES)
        sock.bind((name, 0))
        sock.setblocking(False)
        socks[name] = sock
    other = {socks[left]: socks[right], socks[right]: socks[left]}
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = forwarded = 0
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"wire {left} <-> {right}: one-way delay {delay * 1000:.2f} ms", flush=True)
    while running:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                forwarded += 1
            except OSError as exc:  # e.g. a frame larger than the MTU: dropped, like a wire
                print(f"wire: dropped a {len(frame)}-byte frame: {exc}", file=sys.stderr)
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        try:
            ready, _, _ = select.select(list(other), [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for sock in ready:
            while True:
                try:
                    frame, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:  # our own transmissions
                    continue
                seq += 1  # FIFO per direction: equal delays keep the order
                heapq.heappush(queue, (now + delay, seq, other[sock], frame))
    # Frames the kernel dropped because this process did not read them in time.
    drops = 0
    for sock in socks.values():
        _, dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        drops += dropped
    print(f"wire: {forwarded} frames forwarded, {drops} dropped (receive buffer)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per frame")
    parser.add_argument("--tx-csum-off", metavar="IFACE", help="only switch offloads off")
    parser.add_argument("ifaces", nargs="*", metavar="IFACE", help="the two sides")
    args = parser.parse_args()
    if args.tx_csum_off:
        tx_csum_off(args.tx_csum_off)
        return 0
    if len(args.ifaces) != 2 or args.delay_ms < 0:
        parser.error("give two interfaces and a non-negative delay")
    bridge(args.ifaces[0], args.ifaces[1], args.delay_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
