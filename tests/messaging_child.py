"""Child process for the kill -9 test of tests/test_messaging_client.py.

``python -m tests.messaging_child DIR COUNT [BURST]`` runs alice and bob (mode
``pqc``: see below) over the real SQLite server store in ``DIR``, until alice has
sent ``COUNT`` messages (in bursts of up to ``BURST`` with ``send_texts``: one
commit, then the envelopes pipelined), bob has received them all and alice every
reply. Every
envelope that leaves a client is first appended to ``DIR/wire.log`` (``u32
length ‖ bytes``, fsynced): what the network saw. Each text carries a random tag
of this run, so a message key used
twice (for two different texts) would show as two different ciphertexts at one
ratchet position. The parent kills this process with SIGKILL at random moments
and starts it again; everything must resume from the stores.

Why ``pqc``: ETSI GS QKD 014 hands a key out once, so a kill between the KME's
``dec_keys`` answer and the commit that stores the key loses that key (and the
messages that need it), a window ``docs/messaging.md`` §11 documents. With QKD
this test would fail in that window about once in five runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from qcall import pqc
from qcall.contacts import ContactStore
from qcall.identity import Identity
from qcall.messaging.client import MessagingClient
from qcall.messaging.store import ClientStore
from tests.messaging_transport import Server, ServerTransport

TAG = secrets.token_hex(4)


@dataclass
class LoggedTransport(ServerTransport):
    log: Path = Path("wire.log")
    #: Print "send" for each envelope (the parent's kill then lands inside bursts).
    announce: bool = False

    async def send(self, recipient: str, data: bytes, client_ref: bytes) -> int:
        with open(self.log, "ab") as f:
            f.write(len(data).to_bytes(4, "big") + data)
            f.flush()
            os.fsync(f.fileno())
        if self.announce:
            print("send", flush=True)
        return await super().send(recipient, data, client_ref)


def client(directory: Path, server: Server, name: str, announce: bool = False) -> MessagingClient:
    seed = hashlib.sha256(b"qcall test identity " + name.encode()).digest()
    ident = Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed)
    home = directory / name
    home.mkdir(exist_ok=True)
    store = ClientStore(home / "messages.db", seed)
    transport = LoggedTransport(server, name, log=directory / "wire.log", announce=announce)
    return MessagingClient(ident, store, transport, ContactStore(home / "contacts.json"))


def read_log(path: Path) -> tuple[list[bytes], int]:
    """The complete records of a wire log, and the length they span (a torn tail is not)."""
    data = path.read_bytes() if path.exists() else b""
    records, pos = [], 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 4 + n > len(data):
            break
        records.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return records, pos


def count(c: MessagingClient, peer: str, outgoing: bool) -> int:
    return sum(1 for e, _ in c.history(peer) if e.outgoing == outgoing)


async def main(directory: Path, total: int, burst: int = 1) -> None:
    log = directory / "wire.log"
    _, good = read_log(log)
    if log.exists():
        os.truncate(log, good)  # drop a record torn by the kill
    server = Server(directory / "server.db")
    alice, bob = client(directory, server, "alice", burst > 1), client(directory, server, "bob")
    await bob.ensure_prekeys()
    await alice.ensure_prekeys()
    rounds = 0
    while True:
        await alice.flush_outbox()
        await bob.flush_outbox()
        sent = count(alice, "bob", True)
        if sent < total:
            n = min(burst, total - sent, 1 + rounds % burst)
            await alice.send_texts("bob", [f"a{i} {TAG}" for i in range(sent, sent + n)])
        rounds += 1
        if rounds % 3 == 0 or sent >= total or burst > 1:  # bursts: fewer rounds
            await bob.receive()
            replies = count(bob, "alice", True)
            if replies < total // 3:
                await bob.send_text("alice", f"b{replies} {TAG}")
            await alice.receive()
        if (
            sent >= total
            and count(bob, "alice", False) >= total
            and count(alice, "bob", False) >= count(bob, "alice", True) >= total // 3
        ):
            break
        if rounds > 10 * total:  # stuck: messages that never open (the test reports it)
            print("stuck", flush=True)
            sys.exit(3)
        print("round", rounds, sent, flush=True)
    await server.close()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:])))
