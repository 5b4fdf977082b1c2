"""MessagingClient end to end over the real SQLite server store, honest and malicious."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qcall import pqc
from qcall.contacts import ContactStore
from qcall.exceptions import (
    GroupError,
    IdentityChangedError,
    MessageAuthError,
    MessageFormatError,
    MessageStoreError,
    MessageTooLargeError,
    PrekeyError,
    ReplayedMessageError,
    SignalingError,
    UnknownSessionError,
)
from qcall.identity import Identity
from qcall.messaging.api import (
    ClientConfig,
    Envelope,
    Event,
    GroupChanged,
    MessagePending,
    MessageReceived,
    MessageRejected,
    ReceiptReceived,
)
from qcall.messaging.client import MessagingClient
from qcall.messaging.content import ReceiptStatus
from qcall.messaging.group import GroupMessage, SenderChain, encrypt_group
from qcall.messaging.messages import (
    MessageType,
    Mode,
    PrekeyMessage,
    RatchetMessage,
    message_type,
)
from qcall.messaging.prekeys import PrekeyBundle, PrekeyKind, make_prekey
from qcall.messaging.store import ClientStore
from qcall.qkd.client import KeySource
from qcall.qkd.keyfile import KeyFileSource, create_key_files
from tests.messaging_child import read_log
from tests.messaging_transport import MaliciousServer, ServerTransport
from tests.messaging_utils import identity
from tests.utils import TIMEOUT_FACTOR

BACKEND = pqc.get_backend("cryptography")
ROOT = Path(__file__).resolve().parent.parent
E = TypeVar("E")


def make_identity(name: str) -> Identity:
    seed = hashlib.sha256(b"qcall test identity " + name.encode()).digest()
    return Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed)


class World:
    def __init__(self, tmp_path: Path, server: MaliciousServer) -> None:
        self.tmp, self.server = tmp_path, server
        self.clients: dict[str, MessagingClient] = {}

    def client(
        self, name: str, key_source: KeySource | None = None, **config: Any
    ) -> MessagingClient:
        ident = make_identity(name)
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        store = ClientStore(home / "messages.db", ident.signing_key.seed_bytes())
        contacts = ContactStore(home / "contacts.json")
        c = MessagingClient(
            ident,
            store,
            self.server.connect(name),
            contacts,
            key_source=key_source,
            config=ClientConfig(**config),
            backend=BACKEND,
        )
        self.clients[name] = c
        return c

    async def users(self, *names: str, qkd: bool = False) -> list[MessagingClient]:
        sources: dict[str, KeySource] = {}
        if qkd:
            a, b = names[0], names[1]
            create_key_files(a, self.tmp / f"{a}.keys", b, self.tmp / f"{b}.keys", 20)
            sources = {n: KeyFileSource(self.tmp / f"{n}.keys") for n in (a, b)}
        out = [self.client(n, sources.get(n)) for n in names]
        for c in out:
            await c.ensure_prekeys()
        return out


def connection(client: MessagingClient) -> ServerTransport:
    """The test server's connection of ``client`` (what :meth:`World.client` gives it)."""
    assert isinstance(client.transport, ServerTransport)
    return client.transport


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    server = MaliciousServer(tmp_path / "server.db")
    yield World(tmp_path, server)
    await server.close()


def texts(events: Sequence[Event]) -> list[str]:
    return [e.content.text for e in events if isinstance(e, MessageReceived)]


def rejected(events: Sequence[Event]) -> list[type[Exception]]:
    return [type(e.error) for e in events if isinstance(e, MessageRejected)]


def event(e: Event, kind: type[E]) -> E:
    """``e``, which the test expects to be a ``kind`` (narrows the Event union for mypy)."""
    assert isinstance(e, kind), e
    return e


async def test_offline_exchange_in_hybrid_mode_with_receipts_and_history(world: World) -> None:
    alice, bob = await world.users("alice", "bob", qkd=True)
    first = await alice.send_text("bob", "hello bob")  # bob is offline: the server keeps it
    await alice.send_text("bob", "are you there?")
    events = await bob.receive()
    assert texts(events) == ["hello bob", "are you there?"]
    assert {event(e, MessageReceived).mode for e in events} == {Mode.HYBRID}
    await bob.send_text("alice", "yes")
    await bob.send_receipt("alice", [first], ReceiptStatus.READ)
    events = await alice.receive()
    assert texts(events) == ["yes"]
    assert [e.status for e in events if isinstance(e, ReceiptReceived)] == [ReceiptStatus.READ]
    history = alice.history("bob")
    assert [c.text for _, c in history] == ["hello bob", "are you there?", "yes"]
    assert history[0][0].status == ReceiptStatus.READ and history[0][0].outgoing
    assert [c.text for _, c in bob.history("alice", grep="THERE")] == ["are you there?"]
    assert await bob.receive() == []  # everything was acknowledged
    assert await world.server.store.mailbox("bob") == (0, 0)


async def test_pqc_mode_is_shown_and_prekeys_are_replenished(world: World) -> None:
    alice, bob = await world.users("alice", "bob")
    await alice.send_text("bob", "hi")
    assert [event(e, MessageReceived).mode for e in await bob.receive()] == [Mode.PQC]
    assert await world.server.store.one_time_prekeys("bob") == 49
    bob.config = dataclasses.replace(bob.config, low_water=50)
    assert await bob.ensure_prekeys() == 1
    assert await bob.ensure_prekeys() == 0


async def test_oversized_message_is_refused_before_upload(world: World) -> None:
    alice, _ = await world.users("alice", "bob")
    with pytest.raises(MessageTooLargeError, match="over the limit"):
        await alice.send_text("bob", "x" * (64 * 1024 + 1))
    assert connection(alice).sent == []


@pytest.mark.parametrize("mode", ["reorder", "drop", "duplicate"])
async def test_malicious_delivery_order_loss_and_duplicates(world: World, mode: str) -> None:
    alice, bob = await world.users("alice", "bob")
    for i in range(12):
        await alice.send_text("bob", f"m{i}")
    world.server.mode = mode
    world.server.keep = lambda e: e.id % 3 != 0
    events = await bob.receive()
    got = texts(events)
    if mode == "drop":
        assert len(got) == 8 and set(got) < {f"m{i}" for i in range(12)}
        assert rejected(events) == []
    else:
        assert sorted(got) == sorted(f"m{i}" for i in range(12))
    if mode == "duplicate":  # every copy is refused, none shown
        assert rejected(events) == [ReplayedMessageError] * 12
    # The conversation goes on afterwards.
    world.server.mode = "honest"
    await bob.send_text("alice", "still fine")
    assert texts(await alice.receive()) == ["still fine"]


async def test_replayed_and_tampered_envelopes_are_refused(world: World) -> None:
    alice, bob = await world.users("alice", "bob")
    await alice.send_text("bob", "one")
    assert texts(await bob.receive()) == ["one"]
    await bob.send_text("alice", "ack")  # from now on alice sends ratchet messages
    assert texts(await alice.receive()) == ["ack"]
    world.server.mode = "replay"
    await alice.send_text("bob", "two")
    events = await bob.receive()
    assert texts(events) == ["two"] and rejected(events) == [ReplayedMessageError]
    # Tampered header and ciphertext, a message for no session; then the genuine one.
    world.server.mode = "inject"
    await alice.send_text("bob", "three")
    genuine = await world.server.store.fetch("bob")
    data = bytearray(genuine[0].data)
    data[-5] ^= 1
    message = RatchetMessage.parse(connection(alice).sent[-1][1])
    world.server.injected = [
        Envelope(1 << 41, "alice", bytes(data)),
        Envelope(
            (1 << 41) + 1, "alice", dataclasses.replace(message, session_id=bytes(16)).serialize()
        ),
        Envelope((1 << 41) + 2, "alice", b"\x01\x02garbage"),
    ]
    await world.server.store.ack("bob", [genuine[0].id])  # hold the genuine one back
    events = await bob.receive()
    assert texts(events) == []
    assert rejected(events) == [MessageAuthError, UnknownSessionError, MessageFormatError]
    world.server.mode = "honest"
    await connection(bob).server.store.put("bob", "alice", genuine[0].data, 0)
    assert texts(await bob.receive()) == ["three"]


async def test_swapped_bundles_are_refused(world: World) -> None:
    alice, bob, carol = await world.users("alice", "bob", "carol")
    world.server.mode = "swap"
    carols = await connection(carol).claim_prekeys("carol")
    world.server.swap_bundle = lambda peer, data: carols
    with pytest.raises(PrekeyError, match="asked for 'bob'"):
        await alice.send_text("bob", "hi")
    # A bob alice pinned already, replaced by an impostor's genuine-looking bundle.
    world.server.mode = "honest"
    await alice.send_text("bob", "hi")
    impostor = identity("bob-impostor")  # a key the server made, signing as "bob"
    spk, _ = make_prekey(
        impostor.signing_key,
        "bob",
        PrekeyKind.SIGNED,
        1,
        int(time.time() * 1000),
        backend=BACKEND,
        random=os.urandom,
    )
    fake_bundle = PrekeyBundle("bob", impostor.public_key, spk).serialize()
    dave = world.client("dave")
    assert isinstance(dave.contacts, ContactStore)
    dave.contacts.pin("bob", bob.me.public_key)
    world.server.mode = "swap"
    world.server.swap_bundle = lambda peer, data: fake_bundle
    with pytest.raises(IdentityChangedError, match="HAS CHANGED"):
        await dave.send_text("bob", "hi")
    assert connection(dave).sent == []


async def test_one_time_prekey_handed_out_twice_is_refused(world: World) -> None:
    alice, bob, carol = await world.users("alice", "bob", "carol")
    bundle = await connection(alice).claim_prekeys("bob")  # the server keeps a copy...
    world.server.mode = "swap"
    world.server.swap_bundle = lambda peer, data: bundle  # ...and hands it out twice
    await alice.send_text("bob", "first")
    await carol.send_text("bob", "second")
    events = await bob.receive()
    assert texts(events) == ["first"]
    assert rejected(events) == [PrekeyError]
    assert "used twice" in str(event(events[1], MessageRejected).error)


async def test_group_lifecycle_and_removed_member(world: World) -> None:
    alice, bob, carol = await world.users("alice", "bob", "carol")
    team = await alice.create_group("team", ["bob", "carol"])
    assert team.names == ["alice", "bob", "carol"]
    await alice.send_text("@team", "hello team")
    for member in (bob, carol):
        events = await member.receive()
        assert isinstance(events[0], GroupChanged) and not events[0].left
        assert texts(events) == ["hello team"]
        last = event(events[-1], MessageReceived)
        assert last.conversation == "@team" and last.sender == "alice"
    await bob.send_text("@team", "hi from bob")
    assert texts(await alice.receive()) == ["hi from bob"]
    assert texts(await carol.receive()) == ["hi from bob"]
    # bob removes carol; alice's next message is for alice and bob only.
    await bob.remove_members("team", ["carol"])
    changed = [e for e in await carol.receive() if isinstance(e, GroupChanged)]
    assert changed and changed[0].left
    assert any(isinstance(e, GroupChanged) for e in await alice.receive())
    await alice.send_text("@team", "carol cannot read this")
    wire = connection(alice).sent[-1][1]
    assert texts(await bob.receive()) == ["carol cannot read this"]
    # The server slips the group message to carol anyway: she has no key for it.
    world.server.mode = "inject"
    world.server.injected = [Envelope(1 << 42, "alice", wire)]
    events = await carol.receive()
    assert texts(events) == [] and isinstance(events[0], MessagePending | MessageRejected)
    with pytest.raises(GroupError, match="no longer a member"):
        await carol.send_text("@team", "hello?")
    assert [c.text for _, c in bob.history("@team")] == [
        "hello team",
        "hi from bob",
        "carol cannot read this",
    ]


async def test_member_inserted_by_the_server_is_detected(world: World) -> None:
    alice, bob, mallory = await world.users("alice", "bob", "mallory")
    team = await alice.create_group("team", ["bob"])
    await bob.receive()
    # mallory (a real user the server favours) writes into the group.
    chain = SenderChain.new()
    state = dataclasses.replace(
        team, members=(*team.members, *(await mallory._members(["mallory"])))
    )
    wire = encrypt_group(state, mallory.me, chain, b"\x01" + bytes(63))
    world.server.mode = "inject"
    world.server.injected = [Envelope(1 << 43, "mallory", wire)]
    events = await bob.receive()
    assert rejected(events) == [GroupError]
    assert "not a member" in str(event(events[0], MessageRejected).error)
    assert bob.groups()[0].names == ["alice", "bob"]
    assert GroupMessage.parse(wire).sender == "mallory"
    assert identity("mallory").public_key == mallory.me.public_key


@pytest.mark.parametrize("burst", [1, 6])
async def test_kill_9_mid_conversation_loses_nothing_and_never_reuses_a_key(
    tmp_path: Path, burst: int
) -> None:
    """alice and bob in a real process, killed with SIGKILL at random moments, restarted.

    With ``burst`` > 1 alice sends with ``send_texts`` (one commit for the burst, then
    the envelopes pipelined; the child prints a line per envelope sent, so kills land
    inside bursts too): a kill in the middle of a burst must lose nothing, reuse no
    key, and each resent envelope must be delivered once."""
    total, rng = 24, random.Random(7 + burst)
    inside = 0  # kills right after an envelope of a burst left, before the others' answers
    for attempt in range(12):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.messaging_child",
            str(tmp_path),
            str(total),
            str(burst),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        kill = attempt < 11
        lines = rng.randint(1, 5)  # rounds to let pass before the kill
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 60 * TIMEOUT_FACTOR)
            if not line or line in (b"done\n", b"stuck\n"):
                break
            lines -= 1
            at_send = line == b"send\n"
            if kill and lines <= 0 and (burst == 1 or attempt % 2 or at_send):
                if at_send and not attempt % 2:
                    inside += 1
                else:
                    await asyncio.sleep(rng.random() * 0.02)
                proc.send_signal(signal.SIGKILL)
                break
        code = await proc.wait()
        assert code in (0, -signal.SIGKILL), "the conversation got stuck: a message never opened"
        if code == 0:
            break
    assert code == 0, "the conversation got stuck: some messages never decrypted"
    assert burst == 1 or inside >= 3
    alice, bob = (_reopen(tmp_path, n) for n in ("alice", "bob"))
    received = [c.text.split()[0] for e, c in bob.history("alice") if not e.outgoing]
    assert received == [f"a{i}" for i in range(total)]  # all, once each, in order
    replies = [c.text.split()[0] for e, c in bob.history("alice") if e.outgoing]
    assert [c.text.split()[0] for e, c in alice.history("bob") if not e.outgoing] == replies
    # What the network saw: one ciphertext per ratchet position, whatever the crashes.
    records, _ = read_log(tmp_path / "wire.log")
    positions: dict[tuple[bytes, int, int, int], bytes] = {}
    for data in records:
        if data[1] == 1:
            data = PrekeyMessage.parse(data).inner
        message = RatchetMessage.parse(data)
        key = (message.session_id, message.epoch, message.generation, message.index)
        assert positions.setdefault(key, data) == data, f"message key reused at {key}"
    assert len(positions) >= total + len(replies)
    assert max(m[1] for m in positions) > 2  # ML-KEM epochs were exercised


def _reopen(directory: Path, name: str) -> MessagingClient:
    ident = make_identity(name)
    store = ClientStore(directory / name / "messages.db", ident.signing_key.seed_bytes())
    return MessagingClient(ident, store, None, None)  # type: ignore[arg-type]


async def test_forged_set_up_cannot_spend_the_qkd_key_it_names(world: World) -> None:
    alice, bob = await world.users("alice", "bob", qkd=True)
    await alice.send_text("bob", "hello")
    [genuine] = await world.server.store.fetch("bob")
    await world.server.store.ack("bob", [genuine.id])
    forged = PrekeyMessage.parse(genuine.data)
    forged = dataclasses.replace(forged, signature=bytes(len(forged.signature)))
    world.server.mode = "inject"
    world.server.injected = [Envelope(1 << 44, "alice", forged.serialize())]
    events = await bob.receive()
    assert rejected(events) == [MessageAuthError]
    assert forged.qkd is not None
    assert list(bob.store.qkd_keys([forged.qkd.key_id])) == []  # the KME was not asked
    world.server.mode = "honest"
    await world.server.store.put("bob", "alice", genuine.data, 0)
    events = await bob.receive()  # the key named in the set-up was not spent
    assert texts(events) == ["hello"] and event(events[0], MessageReceived).mode is Mode.HYBRID


async def test_messages_spend_qkd_key_counted_as_message_at_both_kmes(
    world: World, tmp_path: Path
) -> None:
    """Key accounting (issue 14): the KMEs count a messaging session's QKD key as
    ``message`` (the ETSI 014 ``qcall_application`` tag), at enc_keys and at dec_keys."""
    import contextlib
    import time

    from qcall.qkd.client import open_key_source
    from qcall.qkd.kme import KME, random_keys
    from qcall.qkd.pki import create_pki, server_ssl_context
    from qcall.qkd.server import KMEServer

    pki = create_pki(tmp_path / "pki", ["KME-A", "KME-B"], ["alice", "bob"])
    kmes = {"alice": KME("KME-A"), "bob": KME("KME-B")}
    now = time.time()
    for master, slave in (("alice", "bob"), ("bob", "alice")):
        keys = random_keys(8)
        kmes[master].supply(master, slave, keys, role="master", peer_kme_id="x", now=now)
        kmes[slave].supply(master, slave, keys, role="slave", peer_kme_id="x", now=now)
    async with contextlib.AsyncExitStack() as stack:
        sources = {}
        for sae, kme in kmes.items():
            node = pki.kmes[kme.kme_id]
            ctx = server_ssl_context(node.cert, node.key, pki.ca_cert)
            server = await stack.enter_async_context(KMEServer(kme, "127.0.0.1", 0, ctx))
            creds = pki.saes[sae]
            sources[sae] = open_key_source({
                "type": "etsi014", "url": server.url, "cert": str(creds.cert),
                "key": str(creds.key), "ca": str(pki.ca_cert),
            })  # fmt: skip
            stack.push_async_callback(sources[sae].close)
        alice = world.client("alice", sources["alice"])
        bob = world.client("bob", sources["bob"])
        for c in (alice, bob):
            await c.ensure_prekeys()
        await alice.send_text("bob", "counted")
        events = await bob.receive()
        assert [e.content.text for e in events if hasattr(e, "content")] == ["counted"]
        for kme in kmes.values():
            usage = {row["application"]: row for row in kme.usage()}
            assert usage["message"]["keys"] == 1, kme.usage()
            assert set(usage) == {"message"}


async def test_crash_in_the_middle_of_a_received_batch_loses_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deliver() commits a batch of envelopes in one transaction, acknowledged only after
    it: a crash in the middle rolls back the whole batch (nothing acknowledged, no session
    advanced), and the re-delivered batch is processed exactly once."""
    alice, bob = await world.users("alice", "bob")
    for i in range(5):
        await alice.send_text("bob", f"m{i}")
    envelopes = await bob.transport.fetch(0)
    assert len(envelopes) == 5
    real = bob.store.mark_processed
    calls = []

    def crash_on_third(envelope_id: int, now: float) -> None:
        calls.append(envelope_id)
        if len(calls) == 3:
            raise KeyboardInterrupt("kill in the middle of the batch")
        real(envelope_id, now)

    monkeypatch.setattr(bob.store, "mark_processed", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        await bob.deliver(envelopes)
    bob.store.close()
    monkeypatch.undo()
    bob = world.client("bob")  # restarted on the same files
    assert not any(bob.store.processed(e.id) for e in envelopes)  # one transaction
    assert bob.history("bob") == [] and bob.history("alice") == []
    events = await bob.receive()  # the server re-delivers: nothing was acknowledged
    assert texts(events) == [f"m{i}" for i in range(5)] and rejected(events) == []
    assert await bob.receive() == []
    assert [c.text for _, c in bob.history("alice")] == [f"m{i}" for i in range(5)]
    await alice.send_text("bob", "after")  # the sessions go on: no key reused or lost
    assert texts(await bob.receive()) == ["after"]


async def test_burst_is_one_commit_then_pipelined(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_texts: the whole burst (session, history, outbox) in one transaction, then
    up to send_window envelopes in flight at once, delivered in order."""
    alice, bob = await world.users("alice", "bob")
    alice = world.client("alice", send_window=4)
    await alice.send_text("bob", "set-up")
    commits = []
    real_transaction = alice.store.transaction

    def counting(**options: Any) -> AbstractContextManager[None]:
        if not alice.store._depth:
            commits.append(1)
        return real_transaction(**options)

    monkeypatch.setattr(alice.store, "transaction", counting)
    real_send = alice.transport.send
    in_flight, most = 0, 0

    async def slow_send(recipient: str, data: bytes, client_ref: bytes) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)  # the server's commit
        in_flight -= 1
        return await real_send(recipient, data, client_ref)

    monkeypatch.setattr(alice.transport, "send", slow_send)
    ids = await alice.send_texts("bob", [f"m{i}" for i in range(10)])
    assert len(set(ids)) == 10 and len(commits) == 1
    assert most == 4  # pipelined, within the window
    assert texts(await bob.receive()) == ["set-up"] + [f"m{i}" for i in range(10)]
    assert [c.text for e, c in alice.history("bob") if e.outgoing][1:] == [
        f"m{i}" for i in range(10)
    ]


async def test_a_group_burst_is_one_commit_then_delivered_in_order_to_every_member(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_texts to @group: the sender chain, the history rows and every member's outbox
    entries in one transaction (it used to be one per message), then sent."""
    alice, bob, carol = await world.users("alice", "bob", "carol")
    await alice.create_group("team", ["bob", "carol"])
    await alice.send_text("@team", "set-up")  # (the sender keys go out with it)
    commits = []
    real_transaction = alice.store.transaction

    def counting(**options: Any) -> AbstractContextManager[None]:
        if not alice.store._depth:
            commits.append(1)
        return real_transaction(**options)

    monkeypatch.setattr(alice.store, "transaction", counting)
    await alice.send_texts("@team", [f"g{i}" for i in range(6)])
    assert len(commits) == 1
    for member in (bob, carol):
        assert texts(await member.receive()) == ["set-up"] + [f"g{i}" for i in range(6)]
    assert [c.text for _, c in alice.history("@team")] == ["set-up"] + [f"g{i}" for i in range(6)]


async def test_connection_lost_in_the_middle_of_a_burst_resends_exactly_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The burst is committed before any envelope leaves; the connection breaks after 3
    of 8 reached the server. After a restart every envelope is sent again with the same
    client_ref: the server keeps each once, bob gets each once, no key is reused."""
    alice, bob = await world.users("alice", "bob")
    await alice.send_text("bob", "set-up")
    real_send = alice.transport.send
    reached: list[bytes] = []

    async def breaking_send(recipient: str, data: bytes, client_ref: bytes) -> int:
        if len(reached) >= 3:
            raise SignalingError("the signaling connection was lost")
        reached.append(data)
        return await real_send(recipient, data, client_ref)

    monkeypatch.setattr(alice.transport, "send", breaking_send)
    with pytest.raises(SignalingError):
        await alice.send_texts("bob", [f"m{i}" for i in range(8)])
    alice.store.close()
    before = connection(alice)
    alice = world.client("alice")  # restarted on the same files
    assert len(alice.store.outbox()) == 8  # "set-up" was answered: deleted with the burst
    assert await alice.flush_outbox() == 8
    stored = await world.server.store.fetch("bob", 0, 100)
    assert len(stored) == 9  # the resends were not stored twice
    assert texts(await bob.receive()) == ["set-up"] + [f"m{i}" for i in range(8)]
    assert await bob.receive() == []
    await alice.send_text("bob", "after")  # the session goes on: no key reused or lost
    assert texts(await bob.receive()) == ["after"]
    sent = before.sent + connection(alice).sent
    assert len(sent) == 1 + 3 + 8 + 1
    inner = [PrekeyMessage.parse(d).inner if d[1] == 1 else d for _, d in sent]
    wires = [RatchetMessage.parse(d) for d in inner]
    positions = {(m.session_id, m.epoch, m.generation, m.index): d for m, d in zip(wires, inner)}
    assert len(positions) == len(set(inner)) == 10  # one ciphertext per key: none reused


async def test_process_batch_commits_but_leaves_the_acknowledgement_to_the_caller(
    world: World,
) -> None:
    """process_batch: the messages are processed and committed (they can be shown) but
    stay on the server until acknowledged; deliver acknowledges, opening nothing twice."""
    alice, bob = await world.users("alice", "bob")
    await alice.send_texts("bob", ["m0", "m1", "m2"])
    envelopes = await bob.transport.fetch(0)
    assert texts(await bob.process_batch(envelopes)) == ["m0", "m1", "m2"]
    assert all(bob.store.processed(e.id) for e in envelopes)
    assert [e.id for e in await bob.transport.fetch(0)] == [e.id for e in envelopes]
    assert await bob.deliver(envelopes) == []  # only acknowledged now
    assert await bob.transport.fetch(0) == []
    assert [c.text for _, c in bob.history("alice")] == ["m0", "m1", "m2"]


async def _acknowledged(world: World) -> tuple[MessagingClient, MessagingClient]:
    """alice and bob with a session both ways: alice's next message opens epoch 3."""
    alice, bob = await world.users("alice", "bob")
    await alice.send_text("bob", "hi")
    assert texts(await bob.receive()) == ["hi"]
    await bob.send_text("alice", "ack")
    assert texts(await alice.receive()) == ["ack"]
    return alice, bob


async def test_a_received_batch_writes_each_session_once_and_a_crash_in_it_loses_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """process_batch writes the session a batch advanced once, at the batch's end, in the
    batch's transaction: after a restart a replay of the batch opens nothing again, and a
    crash in the middle of a batch rolls all of it back (redelivered, opened once)."""
    alice, bob = await _acknowledged(world)
    await alice.send_texts("bob", [f"m{i}" for i in range(6)])
    envelopes = await bob.transport.fetch(0)
    saves = []
    real_save = bob.store.save_session

    def counted_save(*a: Any, **k: Any) -> None:
        saves.append(1)
        real_save(*a, **k)

    monkeypatch.setattr(bob.store, "save_session", counted_save)
    real_apply = bob._apply_content
    applied = []

    def crash_on_fourth(*args: Any, **kwargs: Any) -> list[Event]:
        applied.append(1)
        if len(applied) == 4:
            raise KeyboardInterrupt("kill in the middle of the batch")
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(bob, "_apply_content", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        await bob.deliver(envelopes)
    assert saves == []  # the session is written only at the end of the batch
    assert bob._received == []  # the rolled-back texts' rows are never written later
    bob.store.close()
    monkeypatch.undo()
    bob = world.client("bob")  # restarted on the same files
    assert not any(bob.store.processed(e.id) for e in envelopes)
    real_save = bob.store.save_session
    monkeypatch.setattr(bob.store, "save_session", counted_save)
    assert texts(await bob.deliver(envelopes)) == [f"m{i}" for i in range(6)]
    assert saves == [1]  # six messages, one session write
    bob.store.close()
    monkeypatch.undo()
    bob = world.client("bob")  # the advanced session is in the file, not only in memory
    replayed = [Envelope(e.id + (1 << 40), e.sender, e.data) for e in envelopes]
    events = await bob.process_batch(replayed)
    assert texts(events) == [] and rejected(events) == [ReplayedMessageError] * 6
    await alice.send_text("bob", "after")  # no key reused or lost
    assert texts(await bob.receive()) == ["after"]
    history = [c.text for _, c in bob.history("alice")]
    assert history == ["hi", "ack"] + [f"m{i}" for i in range(6)] + ["after"]


async def test_a_batch_writes_its_texts_history_in_one_statement_in_order(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history rows of a received batch's texts are written together at its end (one
    statement), before any other history row of the batch (order kept); a failure of that
    write rolls the whole batch back: nothing processed, all of it opened again later."""
    alice, bob = await _acknowledged(world)
    await alice.send_texts("bob", [f"m{i}" for i in range(5)])
    envelopes = await bob.transport.fetch(0)
    calls: list[int] = []
    real_received, real_add = bob.store.add_received, bob.store.add_history

    def fail_once(rows: list[tuple[str, bytes, bytes]], now: float) -> None:
        calls.append(len(rows))
        if len(calls) == 1:
            raise MessageStoreError("disk full")
        return real_received(rows, now)

    monkeypatch.setattr(bob.store, "add_received", fail_once)
    monkeypatch.setattr(
        bob.store, "add_history", lambda *a, **k: pytest.fail("a batch text written alone")
    )
    with pytest.raises(MessageStoreError):
        await bob.process_batch(envelopes)
    assert not any(bob.store.processed(e.id) for e in envelopes)
    assert [c.text for _, c in bob.history("alice")] == ["hi", "ack"]
    assert texts(await bob.deliver(envelopes)) == [f"m{i}" for i in range(5)]
    assert calls == [5, 5]  # one statement for the batch's five texts
    monkeypatch.setattr(bob.store, "add_history", real_add)
    # a text, then a file offer (written on its own, in its savepoint), then a text:
    # the first text's row is written before the offer's, so history keeps their order
    path = world.tmp / "f.bin"
    path.write_bytes(b"x" * 1000)
    await alice.send_text("bob", "before")
    await alice.send_file("bob", path)
    await alice.send_text("bob", "after")
    await bob.receive()
    shown = [c.text or c.kind.name for _, c in bob.history("alice")]
    assert shown[-3:] == ["before", "FILE", "after"]


async def test_short_messages_ahead_of_their_epoch_wait_then_arrive_once(world: World) -> None:
    """Short messages (type 5) that arrive before their epoch's full message are kept
    (MessagePending, never shown) and opened once it arrives; a batch in any order
    opens them all (docs/messaging.md §7.4)."""
    alice, bob = await _acknowledged(world)
    await alice.send_texts("bob", [f"m{i}" for i in range(6)])
    sent = [d for _, d in connection(alice).sent[-6:]]
    assert [message_type(d) for d in sent] == [MessageType.RATCHET] + [
        MessageType.RATCHET_SHORT
    ] * 5
    stored = await world.server.store.fetch("bob")
    first = stored[0]
    await world.server.store.ack("bob", [first.id])  # the server holds the full one back
    events = await bob.receive()
    assert texts(events) == [] and rejected(events) == []
    assert [type(e) for e in events] == [MessagePending] * 5
    await world.server.store.put("bob", "alice", first.data, 0)
    assert texts(await bob.receive()) == [f"m{i}" for i in range(6)]
    assert await bob.receive() == []
    # One batch in reverse order: the pending ones are opened in the same call.
    await alice.send_texts("bob", [f"n{i}" for i in range(3)])
    await bob.send_text("alice", "new epoch")  # so that alice's next burst opens one
    assert texts(await alice.receive()) == ["new epoch"]
    await alice.send_texts("bob", [f"p{i}" for i in range(4)])
    envelopes = await bob.transport.fetch(0)
    got = texts(await bob.process_batch(list(reversed(envelopes))))
    assert sorted(got) == sorted([f"n{i}" for i in range(3)] + [f"p{i}" for i in range(4)])
    assert len(got) == 7
