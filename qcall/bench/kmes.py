"""The harness's QKD network in a child process: ``python -m qcall.bench.kmes STATE``.

Runs :class:`~qcall.qkd.network.SimulatedNetwork` (the ``beijing-hefei``
topology: BB84 links, trusted-node relay, ETSI GS QKD 014 KMEs over mutual
TLS), waits until every SAE pair has keys and the links have filled their
(small) key buffers and gone idle, then prints one JSON line
``{"ready": true, "network_file": …}`` and serves until its stdin closes.

In a process of its own, the BB84 post-processing (which runs in threads) never
competes with the phones for the harness's GIL; the KMEs are reached over
loopback mTLS as real ones would be over the network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from qcall.qkd.network import SimulatedNetwork

__all__ = ["main", "serve"]

#: Link key buffered per link end: a few relayed keys' worth, so links go idle soon.
LINK_CAPACITY_BITS = 256 * 16


def _total_blocks(net: SimulatedNetwork) -> int:
    return sum(int(link.get("blocks", 0)) for link in net.status()["links"].values())


async def _wait_idle(net: SimulatedNetwork, timeout: float, quiet: float = 1.0) -> None:
    """Wait until no BB84 block has run for ``quiet`` seconds (buffers full)."""
    deadline = time.monotonic() + timeout
    blocks = _total_blocks(net)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now_blocks = _total_blocks(net)
        if now_blocks == blocks:
            return
        blocks = now_blocks


async def serve(state: str, *, pool: int, seed: int | None, timeout: float) -> int:
    """Run the network until stdin closes; print the ready line first."""
    async with SimulatedNetwork.start(
        "beijing-hefei",
        state,
        pool_target=pool,
        link_capacity_bits=LINK_CAPACITY_BITS,
        seed=seed,
    ) as net:
        await net.wait_ready(timeout=timeout)
        await _wait_idle(net, timeout)
        print(json.dumps({"ready": True, "network_file": str(net.network_file)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcall.bench.kmes")
    parser.add_argument("state", help="directory for the PKI and network.json")
    parser.add_argument("--pool", type=int, default=64, help="keys kept per SAE pair")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.state, pool=args.pool, seed=args.seed, timeout=args.timeout))


if __name__ == "__main__":
    sys.exit(main())
