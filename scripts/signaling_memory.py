#!/usr/bin/env python3
"""Memory a client can make the signaling server hold, per connection (tracemalloc).

Runs the real :class:`~signaling.server.SignalingServer` in this process on
127.0.0.1 with :mod:`tracemalloc` on, and for each kind of connection lets a
separate client process (``python -m tests.signaling_attacker``) open N of them
and hold them. With every connection held (and a full garbage collection), the
growth of the memory traced in the server process, divided by N, is the cost
of one connection: the protocol state and everything websockets and asyncio
keep for it. The client's own allocations are in another process and do not
count. The resident set size (RSS) delta is printed too (it also holds
allocator slack and, for the first connections, pages never returned).

Kinds (docs/signaling.md, "Limits"):

* ``unregistered``: a socket that read its challenge and never registers;
* ``plain``: registered, no ``watch`` list — the baseline of the ratios;
* ``watch``: registered with the largest ``watch`` list (1000 names filling a
  64 KiB frame), different names on each connection;
* ``watch-same``: the same, every connection watching the same 1000 names.

After a warm-up round (imports and caches filled on first use are not per
connection), each kind is measured ``--runs`` times; the script prints
medians and the ratio to ``plain`` measured in the same run. It also measures
one pin (:class:`~qcall.signaling.pins.PinRegistry`: 10,000 names of 13
characters, each with its own key, offline).

Usage::

    python scripts/signaling_memory.py --connections 50 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall.signaling.messages import fingerprint  # noqa: E402
from qcall.signaling.pins import PinRegistry  # noqa: E402
from qcall.signaling.protocol import ServerConfig  # noqa: E402
from qcall.typing import PeerId  # noqa: E402
from signaling.server import SignalingServer  # noqa: E402

KINDS = ("unregistered", "plain", "watch", "watch-same")


def rss_kib() -> int:
    """Resident set size of this process, KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pin_cost(count: int) -> float:
    """Traced bytes per pinned name: ``count`` names, each with its own key."""
    before = traced()
    pins = PinRegistry(count, 1, count, 3600.0, 86400.0)
    for n in range(count):
        name = PeerId(f"user-{n:08d}")  # 13 characters, as a short real name
        pins.pin(name, fingerprint(os.urandom(1952)), None, 0.0)
        pins.idle(name, 0.0)  # offline: the pin also waits in the expiry order
    cost = (traced() - before) / count
    del pins
    return cost


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def held_cost(url: str, kind: str, count: int) -> tuple[float, float, dict[str, int]]:
    """(traced KiB, RSS KiB) per connection while a client process holds ``count``."""
    before, rss_before = traced(), rss_kib()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.signaling_attacker", url, kind, str(count),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 300))
    await asyncio.sleep(0.2)  # the last frames are handled
    after, rss_after = traced(), rss_kib()
    proc.stdin.close()
    await proc.wait()
    held = max(report["held"], 1)
    return (after - before) / 1024 / held, (rss_after - rss_before) / held, report


async def run(args: argparse.Namespace) -> None:
    # One address, one process holding N connections: lift the per-address limits.
    config = ServerConfig(
        server_id="memory",
        max_unauthenticated_per_address=args.connections + 1,
        max_new_names_per_address=10 * args.connections * args.runs,
        auth_timeout=600,
    )
    tracemalloc.start()
    figures: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    async with SignalingServer(config) as server:
        await server.start("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}"
        for kind in KINDS:  # warm-up, not counted: imports, caches, first-use costs
            await held_cost(url, kind, 2)
        for run_index in range(args.runs):
            for kind in KINDS:
                per_traced, per_rss, report = await held_cost(url, kind, args.connections)
                figures[kind].append((per_traced, per_rss))
                print(
                    f"run {run_index + 1} {kind:>12}: {per_traced:7.1f} KiB traced, "
                    f"{per_rss:7.1f} KiB RSS per connection ({report})",
                    flush=True,
                )
                await asyncio.sleep(0.3)  # the server forgets the closed connections
    pins = statistics.median(pin_cost(10_000) for _ in range(args.runs))
    print(f"\nmedians over {args.runs} runs of {args.connections} connections:")
    base = statistics.median(t for t, _ in figures["plain"])
    for kind in KINDS:
        med = statistics.median(t for t, _ in figures[kind])
        rss = statistics.median(r for _, r in figures[kind])
        print(
            f"  {kind:>12}: {med:7.1f} KiB traced ({med / base:4.2f} x plain), "
            f"{rss:7.1f} KiB RSS per connection"
        )
    print(f"  a pinned name (offline, its own key): {pins:.0f} bytes traced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50, help="per kind (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    args = parser.parse_args()
    if not 1 <= args.connections <= 2000 or not 1 <= args.runs <= 10:
        parser.error("bounds: 1 <= --connections <= 2000, 1 <= --runs <= 10")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
