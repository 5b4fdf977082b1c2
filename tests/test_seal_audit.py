"""The audit monitor: forks, split views, rewritten or rolled-back history, omitted and
unknown entries — each raises an alarm with signed evidence; an honest log raises none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qcall.seal.audit import AuditResult, AuditStore, Monitor, own_key_id
from qcall.seal.log import Submission, TransparencyLog
from qcall.seal.logclient import LogClient
from qcall.seal.logserver import LogServer
from qcall.seal.service import LocalLog, SealHome, seal_document
from tests.seal_helpers import World, make_world, statement, write_document


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, members=("alice", "bob"))


def add(log: TransparencyLog, world: World, who: str, n: int, tag: str) -> None:
    signer = world.signers[who]
    results = log.add(
        [Submission(statement(signer, reason=f"{tag}{i}"), signer.chain_ders) for i in range(n)]
    )
    assert all(r.error is None for r in results)


def fork(world: World, name: str) -> TransparencyLog:
    """A copy of the log's directory: the same key, from now on its own history."""
    world.log.close()
    shutil.copytree(world.root / "log", world.root / name)
    world.log = TransparencyLog.open(world.root / "log")
    copy = TransparencyLog.open(world.root / name)
    copy.trust = world.log.trust
    return copy


def monitor(world: World, who: str = "alice") -> Monitor:
    home = SealHome(world.homes[who])
    key = world.signers[who].identity.public_key
    store = AuditStore(home.directory / "audit.db")
    return Monitor(
        store,
        world.log.log_key,
        own_keys={own_key_id(key)},
        signed=home.journal(world.log.log_id),
    )


async def audit(
    mon: Monitor, log: TransparencyLog, server_cls: type[LogServer] = LogServer
) -> AuditResult:
    async with server_cls(log) as server, LogClient(server.url, log.log_key) as client:
        return await mon.audit(client)


async def test_an_honest_log_raises_no_alarm(world: World, tmp_path: Path) -> None:
    home = SealHome(world.homes["alice"])
    doc = tmp_path / "d.txt"
    write_document(doc)
    await seal_document(world.signers["alice"], doc, LocalLog(world.log), world.logs, home=home)
    add(world.log, world, "bob", 3, "b")
    result = await audit(monitor(world), world.log)
    assert result.alarms == [] and result.tree_size == 4 and result.own_entries == 1
    add(world.log, world, "bob", 300, "more")  # more than one page of entries
    result = await audit(monitor(world), world.log)
    assert result.alarms == [] and result.entries_checked == 300


async def test_fork_two_heads_of_the_same_size(world: World) -> None:
    add(world.log, world, "bob", 2, "common")
    other = fork(world, "fork")
    add(world.log, world, "bob", 2, "left")
    add(other, world, "bob", 2, "right")
    mon = monitor(world)
    assert (await audit(mon, world.log)).alarms == []
    alarms = (await audit(mon, other)).alarms
    kinds = {a.kind for a in alarms}
    assert "fork" in kinds
    fork_alarm = next(a for a in alarms if a.kind == "fork")
    assert "split view" in fork_alarm.message
    assert len(fork_alarm.evidence["heads"]) == 2  # two signed heads: proof of misbehaviour
    # A bundle's receipt from the other branch, seen offline, raises it too.
    mon2 = monitor(world, "bob")
    mon2.observe(world.log.head, "log")
    assert [a.kind for a in mon2.observe(other.head, "bundle")] == ["fork"]


async def test_rewritten_history_and_omitted_entry(world: World, tmp_path: Path) -> None:
    home = SealHome(world.homes["alice"])
    add(world.log, world, "bob", 1, "first")
    doc = tmp_path / "d.txt"
    write_document(doc)
    rewritten = fork(world, "rewritten")
    await seal_document(world.signers["alice"], doc, LocalLog(world.log), world.logs, home=home)
    add(world.log, world, "bob", 1, "b")
    mon = monitor(world)
    assert (await audit(mon, world.log)).alarms == []
    # The operator replaces the database: alice's entry 1 is gone, the tree is larger.
    add(rewritten, world, "bob", 4, "replacement")
    kinds = [a.kind for a in (await audit(monitor(world), rewritten)).alarms]
    assert "rewritten" in kinds and "entries_mismatch" in kinds and "omitted_entry" in kinds


async def test_rollback_to_an_older_tree(world: World) -> None:
    add(world.log, world, "bob", 2, "a")
    old = fork(world, "old")
    add(world.log, world, "bob", 3, "b")
    mon = monitor(world)
    await audit(mon, world.log)
    kinds = [a.kind for a in (await audit(mon, old)).alarms]
    assert kinds == ["rollback"]


class OmittingServer(LogServer):
    """Serves get-entries without entry 1 (what a log hiding an entry would do)."""

    async def _get_entries(self, request):  # type: ignore[no-untyped-def]
        response = await super()._get_entries(request)
        import json

        body = json.loads(response.body)  # type: ignore[arg-type]
        if request.query["start"] == "0":
            del body["entries"][1]
        response.body = json.dumps(body).encode()
        return response


async def test_log_that_omits_an_entry_from_get_entries(world: World) -> None:
    add(world.log, world, "bob", 4, "x")
    alarms = (await audit(monitor(world), world.log, OmittingServer)).alarms
    assert [a.kind for a in alarms] == ["entries_mismatch"]
    assert "omitted, changed or reordered" in alarms[0].message


async def test_entry_made_with_my_key_but_not_by_me(world: World) -> None:
    # Someone with alice's key (stolen) seals: alice's home never signed it.
    add(world.log, world, "alice", 1, "stolen")
    alarms = (await audit(monitor(world), world.log)).alarms
    assert [a.kind for a in alarms] == ["unknown_entry"]
    assert "your key may be stolen" in alarms[0].message
    # Bob's monitor does not mind alice's entries.
    assert (await audit(monitor(world, "bob"), world.log)).alarms == []


def test_a_head_not_signed_by_the_log_is_refused(world: World, tmp_path: Path) -> None:
    from qcall.exceptions import LogProofError

    impostor = TransparencyLog.create(tmp_path / "impostor", "test log")
    with pytest.raises(LogProofError, match="unknown log"):
        monitor(world).observe(impostor.head, "bundle")
