"""The harness's callee, in its own process: ``python -m qcall.bench.callee``.

Two hosts do not share a CPU or an event loop; two phones in one process do,
and then each side's cryptography and DTLS work delays the other. The runner
(:mod:`qcall.bench.runner`) therefore keeps alice in its own process and runs
bob here. Both read the same ``CLOCK_MONOTONIC``, so chirp send and receive
times still compare directly.

Protocol, one JSON object per line: the first line on stdin configures the
phone (``url``, ``home``, optional ``key_source``); the worker answers
``{"ready": true}``. Then, per call, the runner sends ``{"cmd": "answer",
"options": {...}, "wav": PATH}``; the worker answers ``{"answered": ...}`` once
the call is up, ``{"stats": ...}`` when asked with ``{"cmd": "stats"}``, and
``{"ended": ...}`` (timings, frame arrivals, decrypt failures) once the caller
hung up. ``{"cmd": "quit"}`` (or end of input) closes the phone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qcall.bench.runner import _cpu_s
from qcall.call.netem import run as run_loop

__all__ = ["main"]

CALLEE = "bob"


async def _lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _receiver_stats(session: Any) -> dict[str, Any]:
    from qcall.bench.runner import _receiver_stats as stats

    jitter, received, lost = await stats(session)
    return {"jitter_ms": jitter, "packets_received": received, "packets_lost": lost}


async def _serve(reader: asyncio.StreamReader) -> None:
    from qcall.call.media import WavRecorder
    from qcall.call.netem import NetworkProfile
    from qcall.call.phone import Phone
    from qcall.call.session import CallOptions
    from qcall.contacts import ContactStore
    from qcall.identity import Identity
    from qcall.qkd.client import open_key_source

    config = json.loads(await reader.readline())
    home = Path(config["home"])
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    recorder: list[Any] = []

    def on_track(_session: Any, track: Any) -> None:
        if recorder:
            recorder[0].addTrack(track)
            recorder.append(asyncio.ensure_future(recorder[0].start()))

    # The same identity across restarts of this process (after a failed call): the
    # signaling server pins a name to its key, and the caller pins bob's key too.
    if Identity.exists(home):
        identity = Identity.load(home)
    else:
        identity = Identity.generate(CALLEE)
        identity.save(home)
    source = open_key_source(config["key_source"]) if config.get("key_source") else None
    phone = Phone(
        config["url"],
        identity.signing_key,
        CALLEE,
        check_peer=ContactStore.in_home(home).check_peer,
        key_source=source,
        on_track=on_track,
        # QCALL_BENCH_CRYPTO_WORKER=1: bob signs his answers in a crypto worker
        # process, to measure what it changes (docs/performance.md, round 5).
        crypto_worker=os.environ.get("QCALL_BENCH_CRYPTO_WORKER", "0") == "1",
    )
    await phone.start()
    _say({"ready": True})
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            options = dict(command["options"])
            if options.get("network") is not None:
                options["network"] = NetworkProfile(**options["network"])
            phone.options = CallOptions(**options)
            recorder[:] = [WavRecorder(command["wav"])]
            cpu0 = _cpu_s()
            try:
                session = await phone.incoming()
            except Exception as exc:
                _say({"answered": False, "error": f"{type(exc).__name__}: {exc}"})
                continue
            _say({"answered": True})
            while True:  # "stats" requests until the caller hangs up
                waiter = asyncio.ensure_future(reader.readline())
                watched: set[asyncio.Future[Any]] = {waiter, session.ended}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    break
                if json.loads(waiter.result() or b'{"cmd": "stats"}')["cmd"] == "stats":
                    _say({"stats": await _receiver_stats(session)})
            with contextlib.suppress(Exception):
                await session.wait()
            cpu_ms = round((_cpu_s() - cpu0) * 1000, 1)  # the call's, not the report's
            await recorder[0].stop()
            hook = session.hook
            _say(
                {
                    "ended": {
                        "callee_ms": dict(session.status.timings_ms),
                        "decrypt_failures": hook.stats.decrypt_failures if hook else 0,
                        "arrivals": [list(asdict(a).values()) for a in recorder[0].arrivals],
                        "emulation": _emulation(session),
                        "cpu_ms": cpu_ms,
                    }
                }
            )
    finally:
        await phone.close()


def _emulation(session: Any) -> dict[str, Any]:
    emulation = getattr(session, "emulation", None)
    if emulation is None:
        return {}
    stats = emulation.stats
    return {"sent": stats.sent, "dropped": stats.dropped, "achieved_ms": list(stats.achieved_ms)}


async def _main() -> None:
    await _serve(await _lines())


def main() -> None:
    """Run the callee worker until ``quit`` or end of input.

    With ``QCALL_BENCH_PROFILE=PATH`` in the environment, the worker runs under
    cProfile (CPU time, ``time.process_time``) and writes its stats to ``PATH``
    (docs/performance.md, "CPU per call"). ``QCALL_BENCH_CRYPTO_WORKER=1``: the
    phone signs its answers in a crypto worker process (:mod:`qcall.call.crypto_worker`).
    """
    path = os.environ.get("QCALL_BENCH_PROFILE")
    if not path:
        run_loop(_main())
        return
    import cProfile
    import time

    profiler = cProfile.Profile(time.process_time)
    try:
        profiler.runcall(run_loop, _main())
    finally:
        profiler.dump_stats(path)


if __name__ == "__main__":
    main()
