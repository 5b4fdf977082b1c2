#!/usr/bin/env python3
"""Many short ``pqc`` calls on an emulated path, in one process: how many fail, and why.

The latency harness (``scripts/latency.py``) places each call between two processes and
holds it for seconds, so a failure that hits 1 call in 20 needs hundreds of minutes
to count. This script places ``--calls`` calls between two in-process phones through a
real signaling server (each phone behind a :class:`~qcall.call.netem.TCPDelayProxy` of
half the profile's one-way delay, as the harness does) with the profile on both
peers' datagrams (seed = call number), hangs each up after ``--hold`` seconds, and
prints the failed calls with their errors, the caller's set-up (media enabled) and
how long after it the callee's key confirmation came (p50, p90, max).

It uses public APIs only, so the same file runs against another tree's ``qcall``
(an A/B in the same period: ``/other/tree/.venv/bin/python scripts/bench_setup_failures.py``).
``--logs DIR`` writes the debug log of each failed call there (docs/performance.md,
"Failed calls on lossy").

Usage: ``python scripts/bench_setup_failures.py --calls 250 --profile lossy``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path

from qcall.call.netem import TCPDelayProxy, get_profile
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.exceptions import QCallError
from qcall.identity import Identity
from signaling.server import SignalingServer


class _Lines(logging.Handler):
    """Keeps the log lines of the call in progress."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.created:.3f} {record.name} {record.getMessage()}")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def run(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    lines = _Lines()
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        root.addHandler(lines)
        root.setLevel(logging.DEBUG)
        for noisy in ("websockets", "aioice", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    server = SignalingServer()
    await server.start("127.0.0.1", 0)
    proxies = [TCPDelayProxy(("127.0.0.1", server.port), profile.delay_ms / 2) for _ in "ab"]
    phones: dict[str, Phone] = {}
    setups: list[float] = []
    lags: list[float] = []
    failures: list[str] = []
    try:
        for proxy in proxies:
            await proxy.start()
        for name, proxy in zip(("alice", "bob"), proxies, strict=True):
            phone = Phone(
                f"ws://127.0.0.1:{proxy.port}",
                Identity.generate(name).signing_key,
                name,
                check_peer=lambda _name, _key: None,
                key_source=None,
                make_source=lambda: None,
            )
            await phone.start()
            phones[name] = phone
        for call in range(args.seed, args.seed + args.calls):
            options = CallOptions(
                policy="pqc",
                allow_pqc_only=True,
                rekey_interval=None,
                network=None if profile.is_null else profile,
                network_seed=call,
            )
            for phone in phones.values():
                phone.options = options
            lines.lines.clear()
            incoming = asyncio.ensure_future(phones["bob"].incoming())
            try:
                caller = await asyncio.wait_for(phones["alice"].call("bob"), 30)
                callee = await asyncio.wait_for(incoming, 30)
            except (QCallError, TimeoutError) as exc:
                incoming.cancel()
                failures.append(f"call {call}: {type(exc).__name__}: {exc}")
                if args.logs is not None:
                    (args.logs / f"failed-{call}.log").write_text("\n".join(lines.lines))
                await asyncio.sleep(0.3)
                continue
            timings = caller.status.timings_ms
            setups.append(timings["media"])
            lags.append(timings["confirmed"] - timings["media"])
            await asyncio.sleep(args.hold)
            await caller.hangup()
            try:
                await asyncio.wait_for(callee.wait(), 5)
            except (QCallError, TimeoutError):
                pass
            await asyncio.sleep(0.2)  # both phones forget the call before the next invite
    finally:
        for phone in phones.values():
            await phone.close()
        for proxy in proxies:
            await proxy.close()
        await server.close()
    print(f"profile {profile.name}: {profile.description}")
    print(f"calls {args.calls} (seeds {args.seed}..{args.seed + args.calls - 1}), "
          f"failed {len(failures)}")  # fmt: skip
    for failure in failures:
        print(f"  {failure}")
    mean = round(statistics.mean(setups), 1) if setups else None
    print(f"set-up (media) ms: p50 {_quantile(setups, 0.5)}, p90 {_quantile(setups, 0.9)}, "
          f"max {_quantile(setups, 1.0)}, mean {mean}")  # fmt: skip
    print(f"callee's confirmation after media, ms: p50 {_quantile(lags, 0.5)}, "
          f"p90 {_quantile(lags, 0.9)}, max {_quantile(lags, 1.0)}")  # fmt: skip
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--profile", default="lossy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first call")
    parser.add_argument("--hold", type=float, default=0.2, help="seconds each call is held")
    parser.add_argument("--logs", type=Path, default=None, help="debug logs of failed calls")
    started = time.monotonic()
    code = asyncio.run(run(parser.parse_args()))
    print(f"wall {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
