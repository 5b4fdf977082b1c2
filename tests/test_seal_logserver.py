"""The seal log over HTTP(S): the API, bad input, group commit, storage failure, kill -9."""

from __future__ import annotations

import asyncio
import base64
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qcall.exceptions import LogError, LogProofError
from qcall.qkd.pki import create_pki
from qcall.seal.log import Submission, TransparencyLog
from qcall.seal.logclient import LogClient, client_tls_context
from qcall.seal.logserver import API, LogServer, server_tls_context, submission_json
from qcall.seal.merkle import verify_consistency, verify_inclusion
from tests.seal_helpers import World, make_world, start_log, statement


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, members=("alice", "bob"))


def subs(world: World, n: int, who: str = "alice", tag: str = "") -> list[Submission]:
    signer = world.signers[who]
    return [Submission(statement(signer, reason=f"{tag}{i}"), signer.chain_ders) for i in range(n)]


async def test_add_and_read_back_over_https(world: World, tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "tls", ["seal-log"], [])
    ctx = server_tls_context(str(pki.kmes["seal-log"].cert), str(pki.kmes["seal-log"].key))
    async with LogServer(world.log, "127.0.0.1", 0, ctx) as server:
        async with LogClient(
            server.url, world.log.log_key, client_tls_context(str(pki.ca_cert))
        ) as c:
            batch = subs(world, 3)
            receipts = [await c.add(s) for s in batch]
            assert [r.leaf_index for r in receipts] == [0, 1, 2]
            head = await c.get_sth()
            assert head.tree_size == 3
            for sub, r in zip(batch, receipts, strict=True):
                leaf = r.entry(sub.signed).leaf_hash()
                index, path = await c.get_proof(leaf, 3)
                verify_inclusion(leaf, index, 3, path, head.root_hash)
            await c.verify_consistency(receipts[0].tree_head, head)
            entries = await c.get_entries(0, 10)
            assert [e.signed for e, _ in entries] == [s.signed for s in batch]
            assert entries[0][1] == list(batch[0].chain)
            again = await c.add(batch[0])  # idempotent
            assert again.leaf_index == 0 and (await c.get_sth()).tree_size == 3


async def test_add_entries_batch_and_group_commit(world: World) -> None:
    async with LogServer(world.log) as server, LogClient(server.url, world.log.log_key) as c:
        results = await c.add_many(subs(world, 40))
        assert sorted(r.leaf_index for r in results if not isinstance(r, LogError)) == list(
            range(40)
        )
        assert server.batches == 1
        # 30 concurrent single adds share transactions.
        before = server.batches
        receipts = await asyncio.gather(*(c.add(s) for s in subs(world, 30, tag="c")))
        assert len({r.leaf_index for r in receipts}) == 30
        assert server.batches - before < 30
        head = await c.get_sth()
        for r in receipts:  # every receipt's head is consistent with the latest
            await c.verify_consistency(r.tree_head, head)


async def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(world: World) -> None:
    async with LogServer(world.log) as server, aiohttp.ClientSession() as http:
        base = server.url + API

        async def post(path: str, **kw: object) -> tuple[int, dict[str, Any]]:
            async with http.post(base + path, **kw) as resp:  # type: ignore[arg-type]
                return resp.status, await resp.json()

        async def get(path: str) -> tuple[int, dict[str, Any]]:
            async with http.get(base + path) as resp:
                return resp.status, await resp.json()

        assert (await post("/add-entry", data=b"{nope"))[0] == 400
        status, body = await post(
            "/add-entry", json={"statement": "!!", "signature": "", "chain": []}
        )
        assert status == 400 and "statement" in body["error"]
        good = submission_json(subs(world, 1)[0])
        forged = {**good, "signature": base64.b64encode(b"\x00" * 3309).decode()}
        status, body = await post("/add-entry", json=forged)
        assert status == 400 and "signature does not verify" in body["error"]
        status, body = await post("/add-entries", json={"entries": []})
        assert status == 400
        status, body = await post("/add-entries", json={"entries": [good, forged]})
        assert status == 200 and "receipt" in body["results"][0]
        assert "error" in body["results"][1]
        for path in (
            "/get-sth-consistency?first=0",
            "/get-sth-consistency?first=2&second=1",
            "/get-sth-consistency?first=x&second=1",
            "/get-proof-by-hash?hash=zz&tree_size=1",
            "/get-proof-by-hash?hash=" + "00" * 32 + "&tree_size=1",
            "/get-entries?start=5&end=1",
            "/get-entries?start=99&end=100",
            "/no-such-thing",
        ):
            status, body = await get(path)
            assert status in (400, 404) and body["error"], path
        status, body = await get("/get-sth")
        assert status == 200 and body["tree_size"] == 1
        async with http.post(base + "/add-entry", data=b"x" * (9 * 1024 * 1024)) as resp:
            assert resp.status == 413


async def test_unauthenticated_member_is_refused(world: World) -> None:
    sub = subs(world, 1)[0]
    world.revoke("alice")
    async with LogServer(world.log) as server, LogClient(server.url, world.log.log_key) as c:
        with pytest.raises(LogError, match="revoked") as info:
            await c.add(sub)
        assert info.value.status == 403
        assert (await c.get_sth()).tree_size == 0


async def test_storage_failure_answers_503_and_loses_nothing(world: World) -> None:
    async with LogServer(world.log) as server, LogClient(server.url, world.log.log_key) as c:
        await c.add(subs(world, 1)[0])
        head = await c.get_sth()
        real = world.log.store.append

        def broken(*args: object, **kw: object) -> None:
            from qcall.exceptions import LogStorageError

            raise LogStorageError("disk full")

        world.log.store.append = broken  # type: ignore[method-assign]
        with pytest.raises(LogError, match="storage failed") as info:
            await c.add(subs(world, 1, tag="x")[0])
        assert info.value.status == 503
        assert await c.get_sth() == head and world.log.tree.size == 1
        world.log.store.append = real  # type: ignore[method-assign]
        receipt = await c.add(subs(world, 1, tag="y")[0])
        assert receipt.leaf_index == 1


# --- kill -9 during a burst ---------------------------------------------------------------


async def test_kill_9_during_a_burst_loses_no_acknowledged_entry(world: World) -> None:
    key = world.log.log_key
    world.log.close()
    pending = subs(world, 150, "alice") + subs(world, 150, "bob")
    proc, url = await start_log(world.root / "log")
    acked: list[tuple[Submission, object]] = []
    try:
        async with LogClient(url, key, timeout=5) as c:

            async def worker(mine: list[Submission]) -> None:
                for sub in mine:
                    try:
                        acked.append((sub, await c.add(sub)))
                    except LogError:
                        return

            tasks = [asyncio.create_task(worker(pending[i::6])) for i in range(6)]
            while len(acked) < 60:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            await asyncio.gather(*tasks)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert 60 <= len(acked) < len(pending)
    log = TransparencyLog.open(world.root / "log")  # the database is consistent
    try:
        head = log.head
        for sub, receipt in acked:
            row = log.store.find(sub.signed.statement.digest())
            assert row is not None and row.index == receipt.leaf_index  # type: ignore[attr-defined]
            old = receipt.tree_head  # type: ignore[attr-defined]
            proof = log.tree.consistency_proof(old.tree_size, head.tree_size)
            verify_consistency(old.tree_size, head.tree_size, old.root_hash, head.root_hash, proof)
        # The restarted log carries on from there.
        (result,) = log.add(subs(world, 1, "alice", tag="after"))
        assert result.index == head.tree_size
    finally:
        log.close()


async def test_client_refuses_a_receipt_that_does_not_include_the_entry(world: World) -> None:
    """A log that acknowledges an entry but serves a receipt for another one."""
    first, second = subs(world, 2)
    async with LogServer(world.log) as server, LogClient(server.url, world.log.log_key) as c:
        await c.add(first)
        real = server._answer

        def lying(result):  # type: ignore[no-untyped-def]
            answer = real(result)
            answer["receipt"]["leaf_index"] = 0  # points at the first entry
            return answer

        server._answer = lying  # type: ignore[method-assign]
        with pytest.raises(LogProofError, match="does not prove inclusion"):
            await c.add(second)
