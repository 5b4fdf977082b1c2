"""One ICE agent behind a NAT, for tests/test_signaling_nat.py (run inside a namespace).

``python -m tests.nat_peer ROLE TURN_HOST TURN_PORT USERNAME`` (the TURN password
on stdin's first line): gathers candidates with aioice through the TURN server,
prints ``{"ufrag", "pwd", "candidates"}`` as one JSON line, reads the peer's on
stdin, runs ICE (the controlling side is ``alice``), exchanges one datagram each
way, and prints ``{"pair": [local type, remote type], "got": TEXT}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aioice

RELAY_ONLY = True


async def main(role: str, host: str, port: int, username: str) -> None:
    loop = asyncio.get_running_loop()
    password = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
    conn = aioice.Connection(
        ice_controlling=role == "alice",
        components=1,
        turn_server=(host, port),
        turn_username=username,
        turn_password=password,
        turn_transport="udp",
        stun_server=(host, port),  # the NAT's mapped address (server-reflexive)
    )
    await conn.gather_candidates()
    mine = {
        "ufrag": conn.local_username,
        "pwd": conn.local_password,
        "candidates": [c.to_sdp() for c in conn.local_candidates],
    }
    print(json.dumps(mine), flush=True)
    peer = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    conn.remote_username, conn.remote_password = peer["ufrag"], peer["pwd"]
    for sdp in peer["candidates"]:
        candidate = aioice.Candidate.from_sdp(sdp)
        if RELAY_ONLY and candidate.type != "relay":
            continue
        await conn.add_remote_candidate(candidate)
    await conn.add_remote_candidate(None)
    await asyncio.wait_for(conn.connect(), 30)
    await conn.send(f"hello from {role}".encode())
    data, _ = await asyncio.wait_for(conn.recvfrom(), 10)
    pair = conn._nominated.get(1)  # the selected pair of component 1
    types = [pair.local_candidate.type, pair.remote_candidate.type] if pair else None
    print(json.dumps({"pair": types, "got": data.decode()}), flush=True)
    await asyncio.sleep(1.0)  # let the peer receive ours
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
