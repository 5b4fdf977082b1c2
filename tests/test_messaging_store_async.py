"""ClientStore.transaction_async: the COMMIT (fsync) in a worker thread, the event loop free.

docs/messaging.md §10.3: the caller resumes only once the commit is on disk, and any
other use of the store meanwhile waits for that commit (never reads the writes before
they are durable, never joins the transaction).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qcall.exceptions import MessageStoreError
from qcall.messaging.store import ClientStore
from tests.messaging_utils import NOW

SEED = b"\x11" * 32


class SlowCommit:
    """The store's connection, with a slow (or failing) COMMIT and a log of statements."""

    def __init__(self, db: sqlite3.Connection, delay: float, fail: bool = False) -> None:
        self.db, self.delay, self.fail = db, delay, fail
        self.log: list[tuple[str, str]] = []  # (statement, thread name)

    def execute(self, sql: str, *args: Any) -> Any:
        self.log.append((sql.split()[0], threading.current_thread().name))
        if sql == "COMMIT":
            time.sleep(self.delay)
            if self.fail:
                raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def slow_store(
    path: Path, delay: float = 0.3, fail: bool = False
) -> tuple[ClientStore, SlowCommit]:
    store = ClientStore(path, SEED)
    slow = SlowCommit(store._db, delay, fail)
    store._db = slow  # type: ignore[assignment]
    return store, slow


async def ticking(ticks: list[float]) -> None:
    while True:
        ticks.append(time.monotonic())
        await asyncio.sleep(0.01)


async def test_the_event_loop_runs_during_the_commit_and_the_caller_resumes_after_it(tmp_path):
    store, slow = slow_store(tmp_path / "m.db")
    ticks: list[float] = []
    ticker = asyncio.create_task(ticking(ticks))
    await asyncio.sleep(0)
    async with store.transaction_async():
        store.add_outbox("bob", b"envelope", NOW)
    during = len(ticks)
    ticker.cancel()
    assert during >= 10  # ~0.3 s of COMMIT: the loop ticked every 10 ms meanwhile
    commits = [thread for sql, thread in slow.log if sql == "COMMIT"]
    assert commits and commits[-1] != threading.main_thread().name
    # On disk once the caller resumed: another connection sees it.
    other = sqlite3.connect(tmp_path / "m.db")
    assert other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1
    other.close()
    store.close()


class LateLock:
    """The store's lock, taken 0.1 s late by any thread but the main one (the committer):
    the window between the end of the writes and the COMMIT, made wide."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.1)
        self.lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.lock.__exit__(*exc)


async def test_a_store_use_during_a_pending_commit_waits_for_it_and_never_joins_it(tmp_path):
    store, slow = slow_store(tmp_path / "m.db")
    store._lock = LateLock(store._lock)  # type: ignore[assignment]

    async def first() -> None:
        async with store.transaction_async():
            store.mark_processed(1, NOW)

    async def second() -> None:
        await asyncio.sleep(0.05)  # first's COMMIT is under way in its thread
        assert not store.processed(2)  # a read waits for the commit too
        with pytest.raises(RuntimeError), store.transaction():
            store.mark_processed(2, NOW)
            raise RuntimeError("this one fails")

    await asyncio.gather(first(), second())
    statements = [sql for sql, _ in slow.log if sql in ("BEGIN", "COMMIT", "ROLLBACK")]
    assert statements == ["BEGIN", "COMMIT", "BEGIN", "ROLLBACK"]  # one after the other
    store.close()
    reopened = ClientStore(tmp_path / "m.db", SEED)
    assert reopened.processed(1) and not reopened.processed(2)
    reopened.close()


async def test_a_failed_commit_raises_rolls_back_and_the_store_goes_on(tmp_path):
    store, slow = slow_store(tmp_path / "m.db", delay=0.0, fail=True)
    with pytest.raises(MessageStoreError, match="cannot commit"):
        async with store.transaction_async():
            store.mark_processed(1, NOW)
    slow.fail = False
    assert not store.processed(1)
    async with store.transaction_async():
        store.mark_processed(2, NOW)
    assert store.processed(2)
    store.close()


async def test_inside_a_transaction_it_is_a_savepoint(tmp_path):
    store, slow = slow_store(tmp_path / "m.db", delay=0.0)
    with store.transaction():
        store.mark_processed(1, NOW)
        with pytest.raises(RuntimeError):
            async with store.transaction_async():
                store.mark_processed(2, NOW)
                raise RuntimeError("bad item")
    assert store.processed(1) and not store.processed(2)
    assert [sql for sql, _ in slow.log].count("COMMIT") == 1
    store.close()


async def test_a_forked_child_gets_a_commit_thread_of_its_own(tmp_path):
    """A child forked after the parent's first async commit has no commit thread: it
    must not queue its commit to the parent's (it would wait forever)."""
    import multiprocessing

    store = ClientStore(tmp_path / "m.db", SEED)
    async with store.transaction_async():
        store.mark_processed(1, NOW)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_inherited_commit, args=(store, results))
    child.start()
    assert results.get(timeout=30) == "committed"
    child.join(10)
    assert store.processed(9)
    store.close()


def _inherited_commit(store: ClientStore, results: Any) -> None:
    async def run() -> None:
        async with store.transaction_async():
            store.mark_processed(9, NOW)

    try:
        asyncio.run(asyncio.wait_for(run(), 10))
        results.put("committed")
    except BaseException as exc:  # (reported to the parent)
        results.put(repr(exc))
