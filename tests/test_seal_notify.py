"""The shared workflow store, the default notifier, and the seal home's files."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from qcall.exceptions import ConfigError, SealFormatError, WorkflowError
from qcall.seal.notify import DirectoryNotifier, WorkflowStore, make_notifier
from qcall.seal.service import SealHome, seal_document
from qcall.seal.statement import Mode, Policy
from qcall.seal.workflow import Notify, Workflow
from tests.seal_helpers import World, make_world, write_document


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path, members=("alice", "bob"))


async def test_store_notify_and_resolve(world: World, tmp_path: Path) -> None:
    doc = tmp_path / "c.txt"
    write_document(doc)
    alice = world.signers["alice"]
    bundle = await seal_document(
        alice, doc, world.sink, world.logs, policy=Policy(Mode.ORDERED, 1, ("bob",))
    )
    store = WorkflowStore(tmp_path / "wf")
    wid = store.save(bundle, document=str(doc), bundle_path=str(doc) + ".qseal")
    assert store.resolve(wid[:8]) == wid and store.resolve(wid.upper()) == wid
    loaded, meta = store.load(wid)
    assert loaded == bundle and meta == {"document": str(doc), "bundle": str(doc) + ".qseal"}
    notifier = make_notifier(tmp_path / "wf")
    assert isinstance(notifier, DirectoryNotifier)
    workflow = Workflow(bundle.seal.statement, "alice", alice.member.issuer_fingerprint)
    for notice in workflow.start():
        notifier.notify(notice, bundle, str(doc))
    (received,) = notifier.inbox("bob")
    assert received["workflow"] == wid and received["what"] == "review"
    assert received["document"] == "c.txt" and received["document_path"] == str(doc)
    assert notifier.inbox("alice") == []
    notifier.clear("bob", wid)
    notifier.clear("bob", wid)  # twice is fine
    assert notifier.inbox("bob") == []
    # Bad IDs and a corrupt stored bundle get clear errors.
    with pytest.raises(WorkflowError, match="not a workflow ID"):
        store.resolve("12")
    with pytest.raises(WorkflowError, match="no workflow"):
        store.resolve("0" * 12)
    (tmp_path / "wf" / f"{wid}.qseal").write_text("{")
    with pytest.raises(SealFormatError, match="not JSON"):
        store.load(wid)


def test_ambiguous_prefix_and_corrupt_notice(tmp_path: Path) -> None:
    store = WorkflowStore(tmp_path)
    for wid in ("ab" * 48, "ab" * 47 + "cd"):
        (tmp_path / f"{wid}.qseal").write_text("{}")
    with pytest.raises(WorkflowError, match="ambiguous"):
        store.resolve("abababab")
    notifier = DirectoryNotifier(tmp_path)
    (tmp_path / "inbox" / "bob").mkdir(parents=True)
    (tmp_path / "inbox" / "bob" / "x.json").write_text("not json")
    assert notifier.inbox("bob") == []  # noise, not a crash: the store is the truth


def test_the_lock_serialises_decisions(tmp_path: Path) -> None:
    store = WorkflowStore(tmp_path)
    order: list[str] = []

    def decide(name: str) -> None:
        with store.locked("w"):
            order.append(f"{name} in")
            time.sleep(0.05)
            order.append(f"{name} out")

    threads = [threading.Thread(target=decide, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[0][0] == order[1][0] and order[2][0] == order[3][0]


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    home = SealHome(tmp_path)
    home.directory.mkdir()
    line = {"digest": "aa" * 48, "log_id": "bb" * 32, "leaf_index": 3, "leaf_hash": "cc" * 32}
    (home.directory / "signed.jsonl").write_text(
        json.dumps({"digest": "aa" * 48}) + "\n" + json.dumps(line) + "\n" + '{"digest": "d'
    )
    assert home.journal(bytes.fromhex("bb" * 32)) == {bytes.fromhex("aa" * 48): b"\xcc" * 32}
    assert home.journal(bytes.fromhex("ee" * 32)) == {bytes.fromhex("aa" * 48): None}
    (home.directory / "signed.jsonl").write_text("garbage\n" + json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match="line 1 is corrupt"):
        home.journal()


def test_seal_home_configuration(world: World, tmp_path: Path) -> None:
    home = SealHome(tmp_path / "h")
    with pytest.raises(ConfigError, match="no transparency log configured"):
        home.default_log()
    home.trust_log(world.log.log_key, url="https://log:8470", tls_ca="/ca.pem")
    key, url, ca = home.default_log()
    assert key == world.log.log_key and url == "https://log:8470" and ca == "/ca.pem"
    assert home.workflows() == home.directory / "workflows"
    home.set_config(workflows="/shared")
    assert home.workflows() == Path("/shared")
    (home.directory / "config.json").write_text("[")
    with pytest.raises(ConfigError, match="corrupt"):
        home.config()
    assert Notify("a", "b", "review").detail == ""
