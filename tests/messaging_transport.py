"""Transports for messaging tests: a server made of signaling/store.py, honest or malicious.

:class:`Server` plays the signaling server's part in messaging (until the real
server is wired to the store): it routes by the authenticated name of each
client, keeps envelopes in a real :class:`~signaling.store.SQLiteMessageStore`
and hands out prekeys. :class:`MaliciousServer` can reorder, drop, duplicate or
replay envelopes, swap prekey bundles, and inject envelopes of its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qcall.messaging.api import Envelope
from qcall.messaging.prekeys import PrekeyBundle, SignedPrekey
from signaling.store import SQLiteMessageStore

NOW = 1_767_225_600.0


class Server:
    """The messaging half of a signaling server, over the real SQLite store."""

    def __init__(self, path: Path) -> None:
        self.store = SQLiteMessageStore(path)

    def connect(self, name: str) -> ServerTransport:
        return ServerTransport(self, name)

    async def close(self) -> None:
        await self.store.close()

    # hooks a malicious server overrides
    async def deliver(self, recipient: str, envelopes: list[Envelope]) -> list[Envelope]:
        return envelopes

    async def bundle_for(self, asker: str, peer: str, data: bytes | None) -> bytes | None:
        return data


@dataclass
class ServerTransport:
    """One authenticated client's connection (the :class:`~qcall.messaging.client.Transport`)."""

    server: Server
    name: str
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish_prekeys(self, bundle: bytes) -> int:
        parsed = PrekeyBundle.parse(bundle)  # the server checks the format and the owner
        assert parsed.owner == self.name
        one_time = [(p.record.prekey_id, p.serialize()) for p in parsed.one_time_prekeys]
        return await self.server.store.publish_prekeys(
            self.name, parsed.identity_key, parsed.signed_prekey.serialize(), one_time, NOW
        )

    async def prekey_count(self) -> int:
        return await self.server.store.one_time_prekeys(self.name)

    async def claim_prekeys(self, peer: str) -> bytes | None:
        claimed = await self.server.store.claim_prekeys(peer)
        data = None
        if claimed is not None:
            opk = (SignedPrekey.parse(claimed.one_time_prekey),) if claimed.one_time_prekey else ()
            data = PrekeyBundle(
                peer, claimed.identity_key, SignedPrekey.parse(claimed.signed_prekey), opk
            ).serialize()
        return await self.server.bundle_for(self.name, peer, data)

    async def send(self, recipient: str, data: bytes, client_ref: bytes) -> int:
        self.sent.append((recipient, data))
        return await self.server.store.put(recipient, self.name, data, NOW, client_ref)

    async def fetch(self, after: int = 0, limit: int = 100) -> list[Envelope]:
        stored = await self.server.store.fetch(self.name, after, limit)
        envelopes = [Envelope(e.id, e.sender, e.data) for e in stored]
        return await self.server.deliver(self.name, envelopes)

    async def ack(self, ids: Sequence[int]) -> None:
        await self.server.store.ack(self.name, ids)


class MaliciousServer(Server):
    """A server that tampers with delivery. Set ``mode`` (and ``rng``) before fetching.

    Modes: ``reorder`` (shuffle each batch), ``drop`` (deliver only envelopes
    ``keep`` accepts; the rest are deleted), ``duplicate`` (every envelope twice,
    with a fresh id), ``replay`` (re-inject every envelope already delivered),
    ``inject`` (add ``injected`` envelopes), ``swap`` (``swap_bundle`` rewrites
    claimed bundles).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.mode = "honest"
        self.rng = random.Random(1)
        self.keep: Callable[[Envelope], bool] = lambda e: True
        self.delivered: dict[str, list[Envelope]] = {}
        self.injected: list[Envelope] = []
        self.swap_bundle: Callable[[str, bytes | None], bytes | None] = lambda peer, data: data
        self._fake_id = 1 << 40

    def _fresh(self, envelope: Envelope) -> Envelope:
        self._fake_id += 1
        return Envelope(self._fake_id, envelope.sender, envelope.data)

    async def deliver(self, recipient: str, envelopes: list[Envelope]) -> list[Envelope]:
        out = list(envelopes)
        if self.mode == "reorder":
            self.rng.shuffle(out)
        elif self.mode == "drop":
            dropped = [e.id for e in out if not self.keep(e)]
            await self.store.ack(recipient, dropped)
            out = [e for e in out if self.keep(e)]
        elif self.mode == "duplicate":
            out = [x for e in out for x in (e, self._fresh(e))]
        elif self.mode == "replay" and out:  # each envelope delivered before, once more
            out = out + [self._fresh(e) for e in self.delivered.pop(recipient, [])]
        elif self.mode == "inject":
            out = out + self.injected
            self.injected = []
        self.delivered.setdefault(recipient, []).extend(e for e in envelopes if e.id < 1 << 40)
        return out

    async def bundle_for(self, asker: str, peer: str, data: bytes | None) -> bytes | None:
        return self.swap_bundle(peer, data) if self.mode == "swap" else data
