"""The harness's QKD network in a child process: ``python -m qcall.bench.kmes STATE``.

Runs :class:`~qcall.qkd.network.SimulatedNetwork` (the ``beijing-hefei``
topology: BB84 links, trusted-node relay, ETSI GS QKD 014 KMEs over mutual
TLS) until the alice → bob pool holds ``--pool`` relayed keys, then **pauses
the links** (their BB84 blocks fail fast with a "paused" error, so the relay
only hands out keys relayed beforehand), prints one JSON line
``{"ready": true, "network_file": …, "pool": N}`` and serves until its stdin
closes.

Why pause: on these 2-core machines each relayed key costs about 1.1 s of CPU
(one BB84 block per each of the 16 links to refill what the relay spent),
which a real network spends on its own hardware. Left running, that work would
land on the very cores the calls are being timed on, right when a hybrid call
has just consumed a key. In a process of its own, the network also never
competes for the harness's GIL; the KMEs are reached over loopback mTLS, as
real ones are over the network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

from qcall.exceptions import PostProcessingError
from qcall.qkd.network import LinkSimulator, SimulatedNetwork, default_link_factory

__all__ = ["main", "serve"]

#: Link key buffered per link end: a few relayed keys' worth.
LINK_CAPACITY_BITS = 256 * 16


class _PausableLink:
    """A real BB84 link whose blocks fail fast (no CPU) once ``paused`` is set."""

    def __init__(self, sim: LinkSimulator, paused: threading.Event) -> None:
        self.sim = sim
        self.paused = paused
        self.params = getattr(sim, "params", None)  # the network reads the pulse rate

    def run_block(self) -> Any:
        if self.paused.is_set():
            raise PostProcessingError("link paused by the latency harness")
        return self.sim.run_block()

    def set_eavesdropper(self, fraction: float) -> None:
        self.sim.set_eavesdropper(fraction)

    def expected_secret_key_rate(self) -> float:
        return self.sim.expected_secret_key_rate()


async def serve(state: str, *, pool: int, seed: int | None, timeout: float) -> int:
    """Run the network until stdin closes; print the ready line first."""
    paused = threading.Event()
    make = default_link_factory()

    def factory(link: Any, link_seed: int | None) -> LinkSimulator:
        return _PausableLink(make(link, link_seed), paused)

    async with SimulatedNetwork.start(
        "beijing-hefei",
        state,
        pool_target=pool,
        link_capacity_bits=LINK_CAPACITY_BITS,
        seed=seed,
        link_factory=factory,
    ) as net:
        await net.wait_for(
            lambda: net.pair_status("alice", "bob")["stored_keys"] >= pool, timeout=timeout
        )
        paused.set()
        ready = {"ready": True, "network_file": str(net.network_file), "pool": pool}
        print(json.dumps(ready), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcall.bench.kmes")
    parser.add_argument("state", help="directory for the PKI and network.json")
    parser.add_argument("--pool", type=int, default=64, help="keys kept per SAE pair")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.state, pool=args.pool, seed=args.seed, timeout=args.timeout))


if __name__ == "__main__":
    sys.exit(main())
