#!/usr/bin/env python3
"""CPU per message, encrypted vs plain: one sender/recipient pair and a signaling server.

Usage::

    python scripts/cpu_messaging.py [--messages 2000] [--window 32] [--rounds 3]
                                    [--profile FILE]

Where ``scripts/bench_messaging.py`` measures throughput (which on a shared
machine moves with everyone's load), this counts CPU time, which moves much less:
the pair runs in this process (``time.process_time``) against a real ``python -m
signaling`` process (its utime + stime from ``/proc``), and each round sends
``--messages`` messages in bursts of ``--window`` the way the throughput phase of
``bench_messaging.py`` does (same helpers): plain, then encrypted. It prints the
median over ``--rounds`` of µs of CPU per message in the clients (sender and
recipient together) and in the server, and the ratio of the totals; and the wall time
per message of that one pair (it moves with the load, but shows what the clients wait
for, e.g. their store's fsync, which costs little CPU). With
``--profile FILE`` the clients' encrypted rounds run under cProfile (CPU time) and
the stats are written to FILE (read them with ``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from scripts import bench_messaging as bench


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args: argparse.Namespace) -> dict[str, list[tuple[float, float, float]]]:
    out: dict[str, list[tuple[float, float, float]]] = {"plain": [], "encrypted": []}
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    with tempfile.TemporaryDirectory(prefix="cpu-messaging-") as tmp:
        directory = Path(tmp)
        with bench.server_process(directory) as url:
            pid = server_pid(directory / "server.db")
            async with bench.peers(url, directory, 1, "c") as pair:
                await bench.warm_up(pair)
                for _ in range(args.rounds):
                    for kind in ("plain", "encrypted"):
                        encrypted = kind == "encrypted"
                        c0, s0, w0 = time.process_time(), server_cpu(pid), time.perf_counter()
                        if profiler is not None and encrypted:
                            profiler.enable()
                        await bench.throughput(pair, encrypted, args.messages, args.window)
                        if profiler is not None and encrypted:
                            profiler.disable()
                        c1, s1, w1 = time.process_time(), server_cpu(pid), time.perf_counter()
                        n = args.messages
                        out[kind].append(((c1 - c0) / n * 1e6, (s1 - s0) / n * 1e6,
                                          (w1 - w0) / n * 1e6))  # fmt: skip
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return out


def server_pid(mailbox: Path) -> int:
    """The pid of the ``python -m signaling`` child serving ``mailbox``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mailbox).encode() in cmdline and entry.name != str(os.getpid()):
                return int(entry.name)
    raise RuntimeError("the signaling server process was not found")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per round and kind")
    parser.add_argument("--window", type=int, default=32, help="burst size (1: one at a time)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write the encrypted rounds' cProfile stats here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    result = asyncio.run(measure(args))
    print(f"CPU per message, 1 pair, {args.messages} messages, window {args.window}, "
          f"medians of {args.rounds} rounds (load average {os.getloadavg()[0]:.2f})")  # fmt: skip
    totals, walls = {}, {}
    for kind, rounds in result.items():
        client = statistics.median(c for c, _, _ in rounds)
        server = statistics.median(s for _, s, _ in rounds)
        totals[kind], walls[kind] = client + server, statistics.median(w for _, _, w in rounds)
        print(f"  {kind:9} clients {client:5.0f} µs  server {server:5.0f} µs  "
              f"total {client + server:5.0f} µs  wall {walls[kind]:5.0f} µs")  # fmt: skip
    print(f"  encrypted/plain CPU: {totals['encrypted'] / totals['plain']:.2f}, "
          f"wall: {walls['encrypted'] / walls['plain']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
