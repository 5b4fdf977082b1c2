"""The messaging part of ``qcall demo``: alice and bob exchange a message and a file.

:func:`run_messaging_demo` runs two :class:`~qcall.messaging.client.MessagingClient`
in this process, each over its own signaling connection to the demo's server,
with QKD keys from the demo network's KMEs (``network.json``): bob publishes his
prekeys and goes offline; alice writes to him (the server stores it), then bob
comes online and replies; alice sends a file, bob receives it while online and
checks its SHA-256. It takes about a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["run_messaging_demo"]

TEXT = "Hefei, this is Beijing: the link budget is approved."
REPLY = "Received, thank you."
FILE_SIZE = 1024 * 1024


async def run_messaging_demo(
    url: str, homes: dict[str, Path], network_file: Path | None, directory: Path
) -> dict[str, Any]:
    """Run the exchange; return the ``messages`` and ``files`` sections of the report.

    ``messages``: ``sent``, ``received``, ``mode`` (``hybrid``/``pqc``), ``seconds``.
    ``files``: ``name``, ``size``, ``sha256``, ``sha256_match``, ``seconds``.
    """
    from qcall.contacts import ContactStore
    from qcall.identity import Identity
    from qcall.messaging.api import FileReceived, MessageReceived
    from qcall.messaging.client import MessagingClient
    from qcall.messaging.store import ClientStore
    from qcall.messaging.transport import SignalingTransport
    from qcall.qkd.client import open_key_source
    from qcall.signaling.client import SignalingClient

    directory.mkdir(parents=True, exist_ok=True)
    saes = json.loads(network_file.read_text())["saes"] if network_file else {}
    clients: dict[str, MessagingClient] = {}
    links: dict[str, SignalingClient] = {}
    sources = []
    for name, home in homes.items():
        identity = Identity.load(home)
        store = ClientStore(home / "messages.db", identity.signing_key.seed_bytes())
        creds = saes.get(name)
        source = None
        if creds is not None:
            source = open_key_source(
                {"type": "etsi014", "url": creds["url"], "cert": creds["cert"],
                 "key": creds["key"], "ca": creds["ca"]}
            )  # fmt: skip
            sources.append(source)
        link = SignalingClient(url, identity.signing_key, name)
        clients[name] = MessagingClient(
            identity, store, SignalingTransport(link), ContactStore.in_home(home),
            key_source=source,
        )  # fmt: skip
        links[name] = link
    alice, bob = clients["alice"], clients["bob"]
    t0 = time.monotonic()
    sent = received = 0
    try:
        await links["bob"].connect()
        await bob.ensure_prekeys()
        await links["bob"].close()  # offline: the server keeps alice's message
        links["bob"] = SignalingClient(url, bob.me.signing_key, "bob")
        transport = SignalingTransport(links["bob"])
        bob.transport = transport
        await links["alice"].connect()
        await alice.ensure_prekeys()
        await alice.send_text("bob", TEXT)
        sent += 1
        await links["bob"].connect()
        events = await bob.receive()
        texts = [e.content.text for e in events if isinstance(e, MessageReceived)]
        received += texts.count(TEXT)
        await bob.send_text("alice", REPLY)
        sent += 1
        events = await alice.receive()
        received += [e.content.text for e in events if isinstance(e, MessageReceived)].count(REPLY)
        state = alice.store.active_session("bob")
        mode = state.mode.value if state is not None else "none"
        messages_s = time.monotonic() - t0

        path = directory / "link-budget-2027.bin"
        path.write_bytes(os.urandom(FILE_SIZE))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        t1 = time.monotonic()
        offer = await alice.send_file("bob", path)
        got: list[FileReceived] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            pushed = transport.take_pushed()
            events = await bob.deliver(pushed) if pushed else await bob.receive()
            got += [e for e in events if isinstance(e, FileReceived)]
            if not got:
                await asyncio.sleep(0.01)
        match = bool(got) and hashlib.sha256(got[0].path.read_bytes()).hexdigest() == digest
        files_s = time.monotonic() - t1
    finally:
        for link in links.values():
            await link.close()
        for source in sources:
            await source.close()
        for client in clients.values():
            client.store.close()
    return {
        "messages": {
            "sent": sent, "received": received, "mode": mode,
            "seconds": round(messages_s, 3),
        },
        "files": {
            "name": offer.name, "size": offer.size, "sha256": digest, "sha256_match": match,
            "seconds": round(files_s, 3),
        },
    }  # fmt: skip
