#!/usr/bin/env python3
"""How faithfully the user-space emulator (qcall.call.netem) applies a profile.

Sends ``--count`` 160-byte datagrams, one every ``--interval`` seconds (an audio
packet every 20 ms by default), through an emulated UDP socket to a receiver on
loopback, for each profile, ``--repeat`` times, and prints the medians over the
runs of:

* the achieved one-way delay (p50, p90, max) against the requested mean;
* the timer error: achieved minus planned delay of each datagram (what the
  asyncio shell adds to the Sans-I/O core's decision), p50 / p99 / max;
* the release error at the sender: when the emulator let the datagram go
  minus when the model said it was due (``rel``; never below 0: a datagram is
  never released early), p50 / p99 / min;
* the achieved loss rate against the requested one;
* the RFC 3550 §6.4.1 interarrival jitter the receiver would report, and the
  same computed on the planned delays (the model's own figure).

Baseline in the same run: bare loopback (no emulation), whose delay is the
floor every figure above includes.

Then the signaling path: ``--count`` 8-byte messages, one every ``--interval``,
through a :class:`~qcall.call.netem.TCPDelayProxy` to an echo server in the
same process; the one-way delay of each direction (client to server ``up``,
server to client ``down``, each measured on the same monotonic clock) as
p50 / p90 / min / max against the configured delay, for the profile's one-way
delay and for half of it (what each of the harness's two proxy legs adds). The
``loopback`` row is the same exchange without a proxy (the floor).

Run it with ``PYTHONPATH`` naming another tree to measure that tree's
emulator (the header names the module measured); ``--json`` prints one JSON
object instead of the tables (for A/B runs).

Usage: ``python scripts/netem_accuracy.py [--count N] [--interval S] [--repeat R] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from qcall.call import netem
from qcall.call.netem import (
    PROFILES,
    LinkEmulator,
    NetworkProfile,
    TCPDelayProxy,
    _EmulatedTransport,
    run,
)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.arrivals[int.from_bytes(data[:4], "big")] = time.monotonic()


class _Stamped:
    """The real socket, noting when each datagram is handed to it (the release)."""

    def __init__(self, inner: asyncio.DatagramTransport, left: dict[int, float]) -> None:
        self._inner = inner
        self._left = left

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._left[int.from_bytes(data[:4], "big")] = time.monotonic()
        self._inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def rfc3550_jitter(transit_ms: list[float]) -> float:
    """Interarrival jitter J (RFC 3550 §6.4.1) over transit times in order of sending."""
    j = 0.0
    for a, b in itertools.pairwise(transit_ms):
        j += (abs(b - a) - j) / 16
    return j


async def run_once(
    profile: NetworkProfile, count: int, interval: float, seed: int
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    rx, receiver = await loop.create_datagram_endpoint(_Receiver, local_addr=("127.0.0.1", 0))
    tx, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    addr = rx.get_extra_info("sockname")
    link = LinkEmulator(profile, seed)
    left: dict[int, float] = {}  # when each datagram reached the real socket
    stamped = _Stamped(tx, left)
    sock: Any = stamped if profile.is_null else _EmulatedTransport(stamped, link)  # type: ignore[arg-type]
    sent: dict[int, float] = {}
    planned: dict[int, float] = {}
    start = time.monotonic()
    for i in range(count):
        now = time.monotonic()
        sent[i] = now
        before = len(link.stats.delays_ms)
        sock.sendto(i.to_bytes(4, "big") + bytes(156), addr)
        planned[i] = link.stats.delays_ms[-1] if len(link.stats.delays_ms) > before else 0.0
        # pace on the schedule, not on the previous sleep (no drift)
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
    await asyncio.sleep(0.3 + (profile.delay_ms + profile.jitter_ms) / 1000)
    tx.close()
    rx.close()
    got = receiver.arrivals
    order = sorted(got)
    delays = [(got[i] - sent[i]) * 1000 for i in order]
    errors = [(got[i] - sent[i]) * 1000 - planned[i] for i in order]
    released = [(left[i] - sent[i]) * 1000 - planned[i] for i in sorted(left)]
    return {
        "p50": float(np.percentile(delays, 50)),
        "p90": float(np.percentile(delays, 90)),
        "min": min(delays),
        "max": max(delays),
        "rel_p50": float(np.percentile(released, 50)),
        "rel_p99": float(np.percentile(released, 99)),
        "rel_min": min(released),
        "err_p50": float(np.percentile(errors, 50)),
        "err_p99": float(np.percentile(errors, 99)),
        "err_max": max(errors),
        "loss": 1 - len(got) / count,
        "jitter": rfc3550_jitter(delays),
        "model_jitter": rfc3550_jitter([planned[i] for i in order]),
    }


class _Echo(asyncio.Protocol):
    """The signaling server's stand-in: notes each 8-byte message's arrival, echoes it."""

    def __init__(self, arrived: dict[int, float]) -> None:
        self.arrived = arrived
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buffer += data
        while len(self.buffer) >= 8:
            message, self.buffer = self.buffer[:8], self.buffer[8:]
            self.arrived[int.from_bytes(message, "big")] = now
            assert self.transport is not None
            self.transport.write(message)


async def tcp_once(delay_ms: float | None, count: int, interval: float) -> dict[str, float]:
    """One-way delays through a TCPDelayProxy of ``delay_ms`` (``None``: no proxy)."""
    loop = asyncio.get_running_loop()
    arrived: dict[int, float] = {}
    server = await loop.create_server(lambda: _Echo(arrived), "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[:2]
    proxy = TCPDelayProxy(target, delay_ms) if delay_ms is not None else None
    if proxy is not None:
        await proxy.start()
    port = proxy.port if proxy is not None else target[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent: dict[int, float] = {}
    back: dict[int, float] = {}

    async def receive() -> None:
        for _ in range(count):
            message = await reader.readexactly(8)
            back[int.from_bytes(message, "big")] = time.monotonic()

    receiving = asyncio.ensure_future(receive())
    start = time.monotonic()
    for i in range(count):
        sent[i] = time.monotonic()
        writer.write(i.to_bytes(8, "big"))
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
    await asyncio.wait_for(receiving, 5 + 2 * (delay_ms or 0) / 1000)
    writer.close()
    if proxy is not None:
        await proxy.close()
    server.close()
    up = [(arrived[i] - sent[i]) * 1000 for i in range(count)]
    down = [(back[i] - arrived[i]) * 1000 for i in range(count)]
    out: dict[str, float] = {}
    for way, delays in (("up", up), ("down", down)):
        out[f"{way}_p50"] = float(np.percentile(delays, 50))
        out[f"{way}_p90"] = float(np.percentile(delays, 90))
        out[f"{way}_min"] = min(delays)
        out[f"{way}_max"] = max(delays)
    return out


def combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the runs; the extremes (``*min``, ``*max``) over all of them."""
    combined = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key.endswith("min"):
            combined[key] = min(values)
        elif key.endswith("max"):
            combined[key] = max(values)
        else:
            combined[key] = statistics.median(values)
    return combined


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timers", choices=("precise", "epoll"), default="precise",
                        help="the event loop (qcall.call.netem.run; precise)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args()


def _timer_slack_ns() -> int | None:
    try:
        return int(Path("/proc/self/timerslack_ns").read_text())
    except (OSError, ValueError):
        return None


async def main(args: argparse.Namespace) -> None:
    profiles = [PROFILES["loopback"], PROFILES["beijing-hefei"], PROFILES["lossy"],
                NetworkProfile("lossy-reorder", 30.0, 20.0, 0.05, reorder=True)]  # fmt: skip
    udp = {}
    for profile in profiles:
        runs = [await run_once(profile, args.count, args.interval, s) for s in range(args.repeat)]
        udp[profile.name] = {"req": profile.delay_ms, "req_loss": profile.loss, **combine(runs)}
    one_way = PROFILES["beijing-hefei"].delay_ms
    tcp = {}
    for name, delay in (("loopback", None), ("bh-leg", one_way / 2), ("beijing-hefei", one_way)):
        runs = [await tcp_once(delay, args.count, args.interval) for _ in range(args.repeat)]
        tcp[name] = {"req": delay or 0.0, **combine(runs)}
    loop = asyncio.get_running_loop()
    header = {
        "module": str(Path(netem.__file__).resolve()),
        "selector": type(getattr(loop, "_selector", None)).__name__,
        "timer_slack_ns": _timer_slack_ns(),  # main thread, after the runs
        "count": args.count,
        "interval_ms": args.interval * 1000,
        "repeat": args.repeat,
    }
    wake = getattr(netem, "_WAKE", {}).get(loop)  # this branch's busy-wait, if any
    if wake is not None:
        header["wake_lead_us"] = round(wake.lead * 1e6, 1)
        header["spin_us_per_release"] = round(wake.spun / max(1, wake.releases) * 1e6, 1)
    if args.json:
        print(json.dumps({**header, "udp": udp, "tcp": tcp}))
        return
    print(
        f"{header['module']}: {args.count} datagrams / messages every "
        f"{args.interval * 1000:g} ms, {args.repeat} runs ({header['selector']}, "
        f"timer slack {header['timer_slack_ns']} ns); medians over the runs, min / max over all"
    )
    if wake is not None:
        print(
            f"wake-up lead now {header['wake_lead_us']} us; busy-wait "
            f"{header['spin_us_per_release']} us per timer firing on average"
        )
    print("UDP (emulated socket); rel = release at the sender minus planned, err = arrival "
          "minus planned")  # fmt: skip
    print(
        f"{'profile':<14} {'req':>6} {'p50':>7} {'p90':>7} {'min':>7} {'max':>7} | {'rel50':>6} "
        f"{'rel99':>6} {'relmin':>6} | {'err50':>6} {'err99':>6} {'errmax':>6} | "
        f"{'loss':>6} {'req':>5} | {'jitter':>6} {'model':>6}"
    )
    for name, m in udp.items():
        print(
            f"{name:<14} {m['req']:6.2f} {m['p50']:7.2f} {m['p90']:7.2f} {m['min']:7.2f} "
            f"{m['max']:7.2f} | {m['rel_p50']:6.3f} {m['rel_p99']:6.3f} {m['rel_min']:6.3f} | "
            f"{m['err_p50']:6.2f} {m['err_p99']:6.2f} {m['err_max']:6.2f} | "
            f"{m['loss']:6.1%} {m['req_loss']:5.0%} | {m['jitter']:6.2f} {m['model_jitter']:6.2f}"
        )
    print("TCP (TCPDelayProxy to an echo server; one way, ms)")
    print(
        f"{'path':<14} {'req':>6} | {'up50':>6} {'up90':>6} {'upmin':>6} {'upmax':>6} | "
        f"{'dn50':>6} {'dn90':>6} {'dnmin':>6} {'dnmax':>6}"
    )
    for name, m in tcp.items():
        print(
            f"{name:<14} {m['req']:6.3f} | {m['up_p50']:6.3f} {m['up_p90']:6.3f} "
            f"{m['up_min']:6.3f} {m['up_max']:6.3f} | {m['down_p50']:6.3f} {m['down_p90']:6.3f} "
            f"{m['down_min']:6.3f} {m['down_max']:6.3f}"
        )


if __name__ == "__main__":
    arguments = parse_args()
    run(main(arguments), arguments.timers)
