"""Killed processes lose no unused key and never reuse a consumed one (docs/faults.md).

Real processes and SIGKILL:

* a ``qcall qkd serve --state FILE`` KME killed while four clients fetch keys
  restarts from its state with every key it had not handed out, and never
  hands out (or lets the slave fetch twice) one it had;
* a caller process killed in the middle of a call: the keys its call used are
  gone with it — the KME never hands those key_IDs out again.

The key-file source's own kill test is in tests/test_keyfile.py; the ETSI 014
client holds no key state beyond the call that asked for the keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from qcall.exceptions import KMEBadRequestError, KMEUnavailableError, QCallError, QKDError
from qcall.qkd.client import ETSI014Client
from qcall.qkd.pki import PKIPaths, client_ssl_context, create_pki
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FILL = 200


async def start_kme(
    pki: PKIPaths, state: Path, *extra: str, fill: int = FILL
) -> tuple[asyncio.subprocess.Process, str]:
    """``qcall qkd serve --state`` in its own process; return it and its URL."""
    node = pki.kmes["KME-A"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qcall",
        "qkd",
        "serve",
        "--id",
        "KME-A",
        "--cert",
        str(node.cert),
        "--key",
        str(node.key),
        "--ca",
        str(pki.ca_cert),
        "--pair",
        "alice:bob",
        "--fill",
        str(fill),
        "--port",
        "0",
        "--state",
        str(state),
        *extra,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30 * T)).decode()
        assert line, "the KME exited before serving"
        if "serving " in line:
            return proc, line.split("serving ")[1].strip()


def client(pki: PKIPaths, sae: str, url: str) -> ETSI014Client:
    creds = pki.saes[sae]
    return ETSI014Client(url, client_ssl_context(creds.cert, creds.key, pki.ca_cert), timeout=5)


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL


async def test_killed_kme_restarts_with_every_unused_key(tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "pki", ["KME-A"], ["alice", "bob"])
    state = tmp_path / "kme-a.state"
    proc, url = await start_kme(pki, state)
    alice_keys: dict[str, str] = {}  # key_ID -> fingerprint, as alice received them
    bob_fetched: set[str] = set()
    failed_requests = 0
    try:
        async with client(pki, "alice", url) as alice, client(pki, "bob", url) as bob:

            async def alice_worker() -> None:
                nonlocal failed_requests
                while True:
                    try:
                        key = await alice.get_key("bob")
                    except QKDError:
                        failed_requests += 1  # the kill: this answer never came
                        return
                    assert key.key_id not in alice_keys
                    alice_keys[key.key_id] = key.fingerprint

            alice_done = asyncio.Event()
            bob_cut: set[str] = set()

            async def bob_worker() -> None:
                while True:  # bob fetches every third key alice got
                    wanted = [k for k in list(alice_keys)[::3] if k not in bob_fetched][:1]
                    if not wanted:
                        if alice_done.is_set():
                            return  # nothing left to fetch and no more will come
                        await asyncio.sleep(0.005)
                        continue
                    try:
                        (key,) = await bob.get_keys_by_id("alice", wanted)
                    except QKDError:
                        bob_cut.update(wanted)  # maybe consumed on disk, answer lost
                        return
                    assert key.fingerprint == alice_keys[wanted[0]]
                    bob_fetched.add(wanted[0])

            alices = [asyncio.ensure_future(alice_worker()) for _ in range(4)]
            bobs = asyncio.ensure_future(bob_worker())
            while len(alice_keys) < 80:
                await asyncio.sleep(0.01)
            await kill(proc)  # SIGKILL while requests are in flight
            await asyncio.wait_for(asyncio.gather(*alices), 30 * T)
            alice_done.set()
            await asyncio.wait_for(bobs, 30 * T)
    finally:
        if proc.returncode is None:
            await kill(proc)
    assert failed_requests == 4

    proc, url = await start_kme(pki, state)  # restart from the state file
    try:
        async with client(pki, "alice", url) as alice, client(pki, "bob", url) as bob:
            after: dict[str, str] = {}
            while True:
                try:
                    keys = await alice.get_keys("bob", 16)
                except KMEUnavailableError:  # 503: fewer than 16 left
                    try:
                        keys = [await alice.get_key("bob")]
                    except KMEUnavailableError:
                        break
                for key in keys:
                    assert key.key_id not in after
                    after[key.key_id] = key.fingerprint
            # Never reused: nothing alice got before the kill comes out again.
            assert not set(after) & set(alice_keys)
            # Nothing unused was lost: at most the 4 requests cut by the kill (their
            # keys were consumed on disk, but the answers never arrived).
            lost = FILL - len(alice_keys) - len(after)
            assert 0 <= lost <= failed_requests

            # Bob: every key alice got and he did not fetch is still there for him,
            # with the same bytes; the ones he fetched are gone.
            pending = [k for k in alice_keys if k not in bob_fetched | bob_cut][:40]
            got = await bob.get_keys_by_id("alice", pending)
            assert [k.fingerprint for k in got] == [alice_keys[k] for k in pending]
            for key_id in list(bob_fetched)[:5]:
                with pytest.raises(KMEBadRequestError, match="key_ID not found"):
                    await bob.get_keys_by_id("alice", [key_id])
            assert bob_fetched
    finally:
        await kill(proc)
    assert state.stat().st_mode & 0o777 == 0o600


CALLER = r"""
import asyncio, json, sys
from pathlib import Path
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.call.media import ToneTrack
from qcall.contacts import ContactStore
from qcall.identity import Identity
from qcall.qkd.client import open_key_source

async def main(url, source, home):
    identity = Identity.generate("alice")
    Path(home).mkdir(exist_ok=True)
    phone = Phone(url, identity.signing_key, "alice",
                  check_peer=ContactStore.in_home(Path(home)).check_peer,
                  key_source=open_key_source(json.loads(source)),
                  options=CallOptions(rekey_interval=0.3), make_source=lambda: ToneTrack(440))
    await phone.start()
    session = await phone.call("bob")
    reported = 0
    while True:  # mid-call: report each key the call used, as soon as it is used
        ids = session.status.all_key_ids
        for key_id in ids[reported:]:
            print(key_id, flush=True)
        reported = len(ids)
        await asyncio.sleep(0.05)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_killed_caller_keys_are_never_handed_out_again(tmp_path: Path) -> None:
    from qcall.call.phone import Phone
    from qcall.call.session import CallOptions
    from qcall.contacts import ContactStore
    from qcall.identity import Identity
    from qcall.qkd.client import open_key_source
    from qcall.qkd.kme import random_keys
    from qcall.qkd.kmestore import DurableKME
    from qcall.qkd.pki import server_ssl_context
    from qcall.qkd.server import KMEServer
    from signaling.server import SignalingServer

    pki = create_pki(tmp_path / "pki", ["KME-Beijing", "KME-Hefei"], ["alice", "bob"])
    kmes = {
        "alice": DurableKME.open(tmp_path / "beijing.state", "KME-Beijing"),
        "bob": DurableKME.open(tmp_path / "hefei.state", "KME-Hefei"),
    }
    keys = random_keys(40)
    kmes["alice"].supply("alice", "bob", keys, role="master", peer_kme_id="KME-Hefei")
    kmes["bob"].supply("alice", "bob", keys, role="slave", peer_kme_id="KME-Beijing")
    signaling = SignalingServer()
    await signaling.start("127.0.0.1", 0)
    servers: dict[str, KMEServer] = {}
    for sae, kme in kmes.items():
        kme.store.flush()
        node = pki.kmes[kme.kme_id]
        ctx = server_ssl_context(node.cert, node.key, pki.ca_cert)
        servers[sae] = KMEServer(kme, "127.0.0.1", 0, ctx)
        await servers[sae].start()

    def source(sae: str) -> dict[str, Any]:
        creds = pki.saes[sae]
        return {
            "type": "etsi014",
            "url": servers[sae].url,
            "cert": str(creds.cert),
            "key": str(creds.key),
            "ca": str(pki.ca_cert),
            "timeout": 2.0,
        }

    bob_id = Identity.generate("bob")
    (tmp_path / "bob").mkdir()
    bob = Phone(
        f"ws://127.0.0.1:{signaling.port}",
        bob_id.signing_key,
        "bob",
        check_peer=ContactStore.in_home(tmp_path / "bob").check_peer,
        key_source=open_key_source(source("bob")),
        options=CallOptions(rekey_interval=None),
    )
    await bob.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CALLER,
        f"ws://127.0.0.1:{signaling.port}",
        json.dumps(source("alice")),
        str(tmp_path / "alice"),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        callee = await asyncio.wait_for(bob.incoming(), 40 * T)
        assert proc.stdout is not None
        used: list[str] = []
        while len(used) < 4:  # the call and three rekeys
            line = await asyncio.wait_for(proc.stdout.readline(), 20 * T)
            assert line, "the caller process ended"
            used.append(line.decode().strip())
        await kill(proc)  # the caller dies mid-call, its keys with it
        assert used == callee.status.all_key_ids[: len(used)]
        with contextlib.suppress(QCallError):
            await callee.hangup()

        # Its KME (Beijing) never hands those key_IDs out again, even after its
        # own restart from the state file.
        await servers["alice"].close()
        again = DurableKME.open(tmp_path / "beijing.state", "KME-Beijing")
        left = again.stored_key_count("alice", "bob")
        from qcall.qkd.etsi014 import KeyRequest
        from qcall.typing import SAEId

        rest = again.enc_keys(SAEId("alice"), "bob", KeyRequest(number=left)).keys
        assert not {k.key_id for k in rest} & set(used)
        assert len(rest) + len(callee.status.all_key_ids) <= 40
        # And Hefei's copies of them were consumed by bob's dec_keys: gone there too.
        for key_id in used:
            assert key_id not in kmes["bob"]._pools[(SAEId("alice"), SAEId("bob"))].dec
    finally:
        if proc.returncode is None:
            await kill(proc)
        await bob.close()
        for server in servers.values():
            await server.close()
        await signaling.close()


async def test_killed_kme_keeps_keys_of_any_size_exact(tmp_path: Path) -> None:
    """Keys of 128, 512 and 384 bits cut from one pool: after SIGKILL, no byte twice."""
    pki = create_pki(tmp_path / "pki", ["KME-A"], ["alice", "bob"])
    state = tmp_path / "kme-a.state"
    proc, url = await start_kme(pki, state, "--max-key-size", "1024", fill=4)
    journal = state.with_name(state.name + ".journal").read_bytes().splitlines()
    (supply,) = [r for r in map(json.loads, journal[1:]) if r["op"] == "supply"]
    stream = b"".join(base64.b64decode(key) for _, key in supply["keys"])  # 128 bytes
    try:
        async with client(pki, "alice", url) as alice, client(pki, "bob", url) as bob:
            small = await alice.get_key("bob", 128)
            large = await alice.get_key("bob", 512)
            assert (await bob.get_key_by_id("alice", large.key_id)).key == large.key
        await kill(proc)
        proc, url = await start_kme(pki, state, "--max-key-size", "1024", fill=4)
        async with client(pki, "alice", url) as alice, client(pki, "bob", url) as bob:
            assert (await alice.status("bob")).stored_key_count == (128 - 80) // 32
            assert (await bob.get_key_by_id("alice", small.key_id)).key == small.key
            with pytest.raises(KMEBadRequestError, match="key_ID not found"):
                await bob.get_key_by_id("alice", large.key_id)
            rest = await alice.get_key("bob", 384)
            assert small.key + large.key + rest.key == stream  # every byte once
            with pytest.raises(KMEUnavailableError):
                await alice.get_key("bob", 64)
    finally:
        if proc.returncode is None:
            await kill(proc)
