"""The harness's signaling server in a child process: ``python -m qcall.bench.sigserver``.

A real caller does not host the signaling server: its own CPU work (the QKD
request, ML-KEM, the ML-DSA signature) never delays the relaying of the
callee's messages. In the harness's process the server would share alice's
event loop and her GIL, so every millisecond she computes would also hold up
bob's messages to her — a cost no real call pays. Here the server runs alone,
as on a machine of its own, and so do the :class:`~qcall.call.netem.TCPDelayProxy`
legs in front of it: with ``--delay-ms D`` each of the ``--legs`` users reaches
the server through a proxy adding ``D`` ms each way (the server sits half-way
between the users: the runner passes half the profile's one-way delay).

It prints one JSON line ``{"ready": true, "urls": ["ws://127.0.0.1:PORT", …]}``
(one URL per leg; all the server's own URL without a delay) and serves until
its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence

from qcall.call.netem import TCPDelayProxy, run as run_loop

__all__ = ["main", "serve"]


async def serve(*, legs: int, delay_ms: float) -> int:
    """Run the server (and its delay proxies) until stdin closes; print the ready line first."""
    from signaling.server import SignalingServer

    server = SignalingServer()
    await server.start("127.0.0.1", 0)
    proxies: list[TCPDelayProxy] = []
    try:
        urls = []
        for _ in range(legs):
            port = server.port
            if delay_ms > 0:
                proxy = TCPDelayProxy(("127.0.0.1", port), delay_ms)
                await proxy.start()
                proxies.append(proxy)
                port = proxy.port
            urls.append(f"ws://127.0.0.1:{port}")
        print(json.dumps({"ready": True, "urls": urls}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        for proxy in proxies:
            with contextlib.suppress(Exception):
                await proxy.close()
        await server.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcall.bench.sigserver")
    parser.add_argument("--legs", type=int, default=2, help="users, one proxy each (2)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="one-way delay of each user's leg (0: none)"
    )
    args = parser.parse_args(argv)
    if args.legs < 1 or args.delay_ms < 0:
        parser.error("--legs must be >= 1 and --delay-ms >= 0")
    return run_loop(serve(legs=args.legs, delay_ms=args.delay_ms))


if __name__ == "__main__":
    sys.exit(main())
