"""A client process that holds many signaling connections, for memory measurements.

Run as ``python -m tests.signaling_attacker URL MODE COUNT [--source ADDR]``; it
opens ``COUNT`` connections to the server at ``URL`` (from the local address
``ADDR``), prints one JSON line (``{"held": n, "codes": {...}}``: connections
held, error codes met) and holds them until its standard input closes. Being
its own process, it keeps its allocations out of the server's
:mod:`tracemalloc` figures (``tests/test_signaling_abuse.py``,
``scripts/signaling_memory.py``).

Modes:

* ``plain``: registered, no ``watch`` list (the smallest registered connection);
* ``watch``: registered with the longest ``watch`` list the wire allows
  (:data:`~qcall.signaling.messages.MAX_WATCH` names of :func:`watch_name_length`
  characters: the ``register`` frame just under 64 KiB, the attack of issue
  point 6);
* ``watch-same``: the same, every connection watching the same 1000 names
  (each name then has a set of watchers in the server's index);
* ``unregistered``: reads the challenge and never registers.

A fresh identity key serves every ``max_names_per_key`` (4) names, as an
attacker would make them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import sys

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qcall import pqc
from qcall.signaling import messages as m

NAMES_PER_KEY = 4
PREFIX = secrets.token_hex(4)  # names of this process: never pinned to another key


def watch_name_length() -> int:
    """Longest ASCII name such that MAX_WATCH of them fit in a 64 KiB ``register``."""
    key = pqc.get_backend().signing_generate(pqc.SignatureScheme.ML_DSA_65)
    challenge = m.Challenge(bytes(m.NONCE_SIZE), "x" * 128, 0)
    length = 1
    while True:
        watch = [f"{n:04d}".ljust(length + 1, "w") for n in range(m.MAX_WATCH)]
        frame = m.Register.create(key, "w" * 64, challenge, watch).serialize()
        if len(frame) > m.MAX_MESSAGE_SIZE:
            return length
        length += 1


def watch_list(index: int, length: int) -> list[str]:
    """MAX_WATCH distinct names of ``length`` characters for connection ``index``."""
    return [f"{index:05d}{n:04d}".ljust(length, "w") for n in range(m.MAX_WATCH)]


async def open_one(
    url: str, mode: str, index: int, key: pqc.SigningKey, length: int, source: str | None
) -> tuple[ClientConnection | None, str]:
    local = (source, 0) if source else None
    ws = await connect(url, compression=None, ping_interval=None, local_addr=local)
    challenge = m.parse_server_message(await ws.recv())
    if not isinstance(challenge, m.Challenge):
        await ws.close()
        return None, getattr(challenge, "code", challenge.TYPE)
    if mode == "unregistered":
        return ws, "held"
    watch = None
    if mode.startswith("watch"):
        watch = watch_list(0 if mode == "watch-same" else index, length)
    name = f"{PREFIX}-{index:05d}"
    await ws.send(m.Register.create(key, name, challenge, watch).serialize())
    try:
        reply = m.parse_server_message(await ws.recv())
    except ConnectionClosed:
        return None, "closed"
    if isinstance(reply, m.Registered):
        return ws, "held"
    await ws.close()
    return None, getattr(reply, "code", reply.TYPE)


async def main(url: str, mode: str, count: int, source: str | None) -> None:
    backend = pqc.get_backend()
    length = watch_name_length() if mode.startswith("watch") else 0
    keys = [
        backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
        for _ in range((count + NAMES_PER_KEY - 1) // NAMES_PER_KEY)
    ]
    held: list[ClientConnection] = []
    codes: collections.Counter[str] = collections.Counter()
    for index in range(count):
        ws, code = await open_one(url, mode, index, keys[index // NAMES_PER_KEY], length, source)
        codes[code] += 1
        if ws is not None:
            held.append(ws)
    print(json.dumps({"held": len(held), "codes": dict(codes), "name_length": length}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for ws in held:  # not ws.close(): a connection that never reads would wait for
        ws.transport.abort()  # the server's close frame behind the unread ones


if __name__ == "__main__":
    source = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--source" else None
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), source))
