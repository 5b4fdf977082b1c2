"""The log's SQLite store and the log core: durability rules and clear errors on damage."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from qcall.exceptions import ConfigError, LogError, LogStorageError
from qcall.seal.log import Submission, TransparencyLog
from qcall.seal.logstore import LogStore
from tests.seal_helpers import World, make_world, statement


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, members=("alice",))


def fill(world: World, n: int) -> None:
    alice = world.signers["alice"]
    subs = [Submission(statement(alice, reason=f"r{i}"), alice.chain_ders) for i in range(n)]
    results = world.log.add(subs)
    assert all(r.error is None for r in results)


def reopen(world: World) -> TransparencyLog:
    world.log.close()
    return TransparencyLog.open(world.root / "log")


def test_reopen_keeps_every_entry_and_the_head(world: World) -> None:
    fill(world, 5)
    head = world.log.head
    log = reopen(world)
    assert log.head == head and log.tree.size == 5
    assert log.store.latest_head() == head
    with sqlite3.connect(world.root / "log" / "log.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    log.close()


def test_duplicates_are_idempotent(world: World) -> None:
    alice = world.signers["alice"]
    sub = Submission(statement(alice), alice.chain_ders)
    first, again_in_batch = world.log.add([sub, sub])
    assert not first.duplicate and again_in_batch.duplicate
    assert again_in_batch.index == first.index
    (later,) = world.log.add([sub])
    assert later.duplicate and later.index == first.index and world.log.head.tree_size == 1


def test_not_a_database(world: World) -> None:
    world.log.close()
    db = world.root / "log" / "log.db"
    db.write_bytes(b"this is not SQLite" * 100)
    for wal in db.parent.glob("log.db-*"):
        wal.unlink()
    with pytest.raises(LogStorageError, match=r"log\.db is corrupt or not a database"):
        TransparencyLog.open(world.root / "log")


def test_damaged_pages_are_a_clear_error(world: World) -> None:
    fill(world, 60)
    world.log.close()
    db = world.root / "log" / "log.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    for i in range(8192, len(data) - 4096, 4096):  # overwrite every other page's middle
        data[i + 100 : i + 400] = b"\xa5" * 300
    db.write_bytes(bytes(data))
    with pytest.raises(LogStorageError) as info:
        TransparencyLog.open(world.root / "log")
    assert "log.db" in str(info.value)


def test_a_missing_entry_is_detected(world: World) -> None:
    fill(world, 4)
    world.log.close()
    with sqlite3.connect(world.root / "log" / "log.db") as db:
        db.execute("DELETE FROM entries WHERE idx = 1")
    with pytest.raises(LogStorageError, match="entry 1 is missing"):
        TransparencyLog.open(world.root / "log")


def test_a_changed_leaf_hash_is_detected(world: World) -> None:
    fill(world, 4)
    world.log.close()
    with sqlite3.connect(world.root / "log" / "log.db") as db:
        db.execute("UPDATE entries SET leaf_hash = ? WHERE idx = 2", (b"\x00" * 32,))
    with pytest.raises(LogStorageError, match="not the one the log signed"):
        TransparencyLog.open(world.root / "log")


def test_another_logs_database_and_schema(world: World, tmp_path: Path) -> None:
    other = TransparencyLog.create(tmp_path / "other", "other")
    other.close()
    world.log.close()
    shutil.copy(tmp_path / "other" / "log.db", world.root / "log" / "log.db")
    for wal in (world.root / "log").glob("log.db-*"):
        wal.unlink()
    with pytest.raises(LogStorageError, match="belongs to another log"):
        TransparencyLog.open(world.root / "log")
    with sqlite3.connect(tmp_path / "other" / "log.db") as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(LogStorageError, match="schema version 7"):
        LogStore.open(tmp_path / "other" / "log.db")
    with pytest.raises(LogStorageError, match="does not exist"):
        LogStore.open(tmp_path / "nothing.db")
    with pytest.raises(ConfigError, match="no seal log"):
        TransparencyLog.open(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="already exists"):
        TransparencyLog.create(tmp_path / "other", "again")


def test_a_failed_write_changes_nothing(world: World) -> None:
    fill(world, 3)
    head = world.log.head
    alice = world.signers["alice"]
    batch = world.log.prepare([Submission(statement(alice, reason="x"), alice.chain_ders)], 1)
    assert world.log.tree.size == 4
    world.log.store.close()  # the disk goes away
    with pytest.raises(LogStorageError, match="closed"):
        world.log.write(batch)
    world.log.abort(batch)
    assert world.log.tree.size == 3 and world.log.head == head
    assert world.log.tree.root() == head.root_hash


def test_admission_rules(world: World) -> None:
    alice = world.signers["alice"]
    now = world.log.now_ms()
    old = Submission(statement(alice, now_ms=now - 11 * 60 * 1000), alice.chain_ders)
    with pytest.raises(LogError, match="away from the log's clock"):
        world.log.check_submission(old, now)
    bad_chain = Submission(statement(alice), (alice.chain_ders[1],))
    with pytest.raises(LogError, match="names another signer certificate"):
        world.log.check_submission(bad_chain, now)
    with pytest.raises(LogError, match="chain is empty"):
        world.log.check_submission(Submission(statement(alice), ()), now)
    garbage = Submission(statement(alice), (b"\x30\x00",))
    with pytest.raises(LogError) as info:
        world.log.check_submission(garbage, now)
    assert info.value.status == 403 and "not an X.509 certificate" in str(info.value)
    with pytest.raises(LogError, match="second <= 0"):
        world.log.consistency(0, 99)
