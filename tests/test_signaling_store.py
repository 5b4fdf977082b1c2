"""The server's offline message store and prekey directory (signaling/store.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import pytest

from qcall.exceptions import MailboxFullError, MessageStoreError, MessageTooLargeError
from signaling.local_services import LocalPostgres
from signaling.store import SQLiteMessageStore, StoreLimits
from tests.utils import TIMEOUT_FACTOR

if TYPE_CHECKING:
    from signaling.pgstore import PostgresMessageStore

    #: Both implementations (the tests read their commit counters).
    AnyStore = SQLiteMessageStore | PostgresMessageStore


class MakeStore(Protocol):
    """The ``make_store`` fixture: opens a store of its ``kind``."""

    kind: str

    async def __call__(self, limits: StoreLimits | None = None) -> AnyStore: ...


ROOT = Path(__file__).resolve().parent.parent
NOW = 1_767_225_600.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Open a store (both implementations run the same tests), always on the same data."""
    opened: list[AnyStore] = []
    if request.param == "postgresql":
        from signaling.pgstore import PostgresMessageStore

        url = request.getfixturevalue("pg_url")

    async def make(limits: StoreLimits | None = None) -> AnyStore:
        if request.param == "sqlite":
            s: AnyStore = SQLiteMessageStore(tmp_path / "server.db", limits)
        else:
            s = await PostgresMessageStore.connect(url, limits)
        opened.append(s)
        return s

    make.kind = request.param  # type: ignore[attr-defined]
    yield cast(MakeStore, make)  # its kind is set just above
    for s in opened:
        await s.close()


@pytest.fixture
async def store(make_store: MakeStore) -> AnyStore:
    return await make_store()


async def test_put_fetch_ack_in_order(store: AnyStore) -> None:
    ids = [await store.put("bob", "alice", b"m%d" % i, NOW) for i in range(5)]
    await store.put("carol", "alice", b"other", NOW)
    got = await store.fetch("bob")
    assert [e.id for e in got] == ids and [e.data for e in got] == [b"m%d" % i for i in range(5)]
    assert got[0].sender == "alice" and got[0].received_at == NOW
    assert [e.id for e in await store.fetch("bob", after=ids[1], limit=2)] == ids[2:4]
    assert await store.mailbox("bob") == (5, 10)
    assert await store.ack("bob", ids[:3]) == 3
    assert await store.ack("bob", ids[:3]) == 0  # acknowledging twice is harmless
    assert await store.ack("carol", ids[3:]) == 0  # only the recipient's own
    assert [e.data for e in await store.fetch("bob")] == [b"m3", b"m4"]
    assert await store.mailbox("bob") == (2, 4)


async def test_resend_with_the_same_client_ref_is_idempotent(store: AnyStore) -> None:
    first = await store.put("bob", "alice", b"x", NOW, client_ref=b"r1")
    assert await store.put("bob", "alice", b"x", NOW, client_ref=b"r1") == first
    assert await store.put("bob", "carol", b"x", NOW, client_ref=b"r1") != first
    await store.ack("bob", [first])
    assert await store.put("bob", "alice", b"x", NOW, client_ref=b"r1") == first  # no redelivery
    assert len(await store.fetch("bob")) == 1


async def test_limits_are_refused_before_storing(make_store: MakeStore) -> None:
    limits = StoreLimits(max_envelope_size=100, max_messages=3, max_bytes=250)
    store = await make_store(limits)
    try:
        with pytest.raises(MessageTooLargeError, match="101 bytes for bob"):
            await store.put("bob", "alice", b"x" * 101, NOW)
        ids = [await store.put("bob", "alice", b"x" * 80, NOW) for _ in range(3)]
        with pytest.raises(MailboxFullError, match="mailbox of bob is full"):
            await store.put("bob", "alice", b"x", NOW)
        await store.ack("bob", ids[:1])
        with pytest.raises(MailboxFullError):  # 2 × 80 + 100 > 250 bytes
            await store.put("bob", "alice", b"x" * 100, NOW)
        await store.put("bob", "alice", b"x" * 90, NOW)
        # One refused write in a group commit does not undo the others.
        results = await asyncio.gather(
            store.put("carol", "alice", b"ok", NOW),
            store.put("bob", "alice", b"too much", NOW),
            store.put("carol", "alice", b"ok too", NOW),
            return_exceptions=True,
        )
        assert isinstance(results[1], MailboxFullError)
        assert sorted(e.data for e in await store.fetch("carol")) == [b"ok", b"ok too"]
    finally:
        await store.close()


async def test_concurrent_puts_share_commits(store: AnyStore) -> None:
    ids = await asyncio.gather(*(store.put("bob", "alice", b"%d" % i, NOW) for i in range(200)))
    assert len(set(ids)) == 200 and store.writes == 200
    assert await store.mailbox("bob") == (200, sum(len(b"%d" % i) for i in range(200)))
    assert store.commits < 200  # group commit (both stores)
    delivered = await store.fetch("bob", limit=1000)  # in the order of the puts
    assert [e.id for e in delivered] == ids and [e.data for e in delivered] == [
        b"%d" % i for i in range(200)
    ]


async def test_concurrent_resends_store_once(store: AnyStore) -> None:
    """The same client_ref put concurrently (two instances, say) stores one envelope."""
    ids = await asyncio.gather(*(store.put("bob", "alice", b"x", NOW, b"ref") for _ in range(20)))
    assert len(set(ids)) == 1 and await store.mailbox("bob") == (1, 1)


async def test_data_survives_reopening_and_expires(make_store: MakeStore) -> None:
    store = await make_store(StoreLimits(ttl=100.0))
    await store.put("bob", "alice", b"old", NOW - 200, client_ref=b"r")
    await store.put("bob", "alice", b"new", NOW)
    await store.close()
    await store.close()
    store = await make_store(StoreLimits(ttl=100.0))
    assert [e.data for e in await store.fetch("bob")] == [b"old", b"new"]
    assert await store.expire(NOW) == 1
    assert [e.data for e in await store.fetch("bob")] == [b"new"]
    assert await store.mailbox("bob") == (1, 3)
    await store.close()
    with pytest.raises(MessageStoreError, match="closed"):
        await store.fetch("bob")


async def test_prekeys_are_handed_out_once(store: AnyStore) -> None:
    ik, spk = b"I" * 1952, b"S" * 4000
    opks = [(i, b"O%d" % i) for i in range(1, 11)]
    assert await store.publish_prekeys("bob", ik, spk, opks, NOW) == 10
    claims = await asyncio.gather(*(store.claim_prekeys("bob") for _ in range(15)))
    handed = [c.one_time_prekey for c in claims if c and c.one_time_prekey]
    assert sorted(handed) == sorted(d for _, d in opks)  # each once, none twice
    assert all(c is not None and c.identity_key == ik and c.signed_prekey == spk for c in claims)
    assert await store.one_time_prekeys("bob") == 0
    assert await store.claim_prekeys("nobody") is None
    # Replenish, then a new identity: the old identity's one-time prekeys go.
    assert await store.publish_prekeys("bob", ik, spk, [(11, b"O11")], NOW) == 1
    assert await store.publish_prekeys("bob", b"J" * 1952, spk, [(1, b"new")], NOW) == 1
    claim = await store.claim_prekeys("bob")
    assert claim is not None and claim.one_time_prekey == b"new"


async def test_prekey_limits(make_store: MakeStore) -> None:
    store = await make_store(StoreLimits(max_one_time_prekeys=3))
    with pytest.raises(MailboxFullError, match="more than 3"):
        await store.publish_prekeys("bob", b"I", b"S", [(i, b"o") for i in range(4)], NOW)
    assert await store.claim_prekeys("bob") is None  # nothing of the refused publication
    with pytest.raises(MessageTooLargeError):
        await store.publish_prekeys("bob", b"I", b"S" * 9000, [], NOW)


@pytest.mark.parametrize("damage", ["garbage", "newer"])
async def test_corrupt_or_newer_file_is_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "server.db"
    store = SQLiteMessageStore(path)
    for i in range(100):
        await store.put("bob", "alice", os.urandom(200), NOW)
    await store.close()
    if damage == "garbage":
        data = path.read_bytes()
        path.write_bytes(data[:100] + os.urandom(len(data) - 100))
        for extra in ("-wal", "-shm"):
            Path(str(path) + extra).unlink(missing_ok=True)
    else:
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 7")
    with pytest.raises(MessageStoreError, match=str(path)):
        SQLiteMessageStore(path)


async def _child(path: Path | str, count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.store_child",
        str(path),
        str(count),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_acknowledged_envelopes_survive_kill_9_and_arrive_exactly_once(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """A real process puts envelopes and is killed with SIGKILL mid-stream, twice."""
    count = 400
    path = (
        tmp_path / "server.db"
        if make_store.kind == "sqlite"
        else cast("PostgresMessageStore", await make_store()).url
    )
    acked: dict[int, int] = {}
    for kill_after in (60, 150, None):
        proc = await _child(path, count)
        assert proc.stdout is not None
        seen = 0
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 30 * TIMEOUT_FACTOR)
            if not line or line == b"done\n":
                break
            i, envelope_id = map(int, line.split())
            assert acked.setdefault(i, envelope_id) == envelope_id  # resend: same id
            seen += 1
            if kill_after is not None and seen == kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        assert await proc.wait() == (-signal.SIGKILL if kill_after else 0)
        store = await make_store()  # what a restarted server finds
        stored = {e.id: e.data for e in await store.fetch("bob", limit=10_000)}
        await store.close()
        for i, envelope_id in acked.items():  # every acknowledged envelope is there
            assert stored[envelope_id] == b"envelope %d" % i
    assert len(acked) == count
    store = await make_store()
    delivered = await store.fetch("bob", limit=10_000)
    assert sorted(e.data for e in delivered) == sorted(b"envelope %d" % i for i in range(count))
    await store.ack("bob", [e.id for e in delivered])
    assert await store.fetch("bob") == [] and await store.mailbox("bob") == (0, 0)


async def test_postgres_unavailable_refuses_clearly_then_recovers(
    pg_url: str, postgres_server: LocalPostgres
) -> None:
    """PostgreSQL down: puts fail with the server named (never accepted), then work again."""
    from signaling.pgstore import PostgresMessageStore

    store = await PostgresMessageStore.connect(pg_url, pool_size=1)
    try:
        first = await store.put("bob", "alice", b"before", NOW, b"r0")
        postgres_server.stop()
        try:
            with pytest.raises(MessageStoreError, match=r"postgresql://127\.0\.0\.1:\d+/test_"):
                await store.put("bob", "alice", b"during", NOW, b"r1")
            with pytest.raises(MessageStoreError, match="unavailable"):
                await store.put("bob", "alice", b"during", NOW, b"r1")
        finally:
            postgres_server.start()
        assert await store.put("bob", "alice", b"after", NOW, b"r2") > first
        assert [e.data for e in await store.fetch("bob")] == [b"before", b"after"]
    finally:
        await store.close()


async def test_postgres_schema_1_is_migrated_to_2(pg_url: str) -> None:
    """A database of the previous version (five statements per put) gets qcall_put."""
    import psycopg

    from signaling.pgstore import PG_SCHEMA_VERSION, PostgresMessageStore

    store = await PostgresMessageStore.connect(pg_url)
    first = await store.put("bob", "alice", b"v1", NOW, b"r1")
    await store.close()
    with psycopg.connect(pg_url, autocommit=True) as db:  # back to version 1
        db.execute("DROP FUNCTION qcall_put")
        db.execute("DELETE FROM qcall_schema WHERE version > 1")
    store = await PostgresMessageStore.connect(pg_url)
    try:
        assert await store.put("bob", "alice", b"v1", NOW, b"r1") == first  # the ref is kept
        await store.put("bob", "alice", b"v2", NOW, b"r2")
        assert [e.data for e in await store.fetch("bob")] == [b"v1", b"v2"]
        with psycopg.connect(pg_url) as db:
            row = db.execute("SELECT max(version) FROM qcall_schema").fetchone()
        assert row is not None and row[0] == PG_SCHEMA_VERSION == 2
    finally:
        await store.close()
