"""Durable KME state (qcall/qkd/kmestore.py): reload, torn writes, corruption, compaction.

Each test "crashes" by opening a second DurableKME on the files of the first
without closing it (what a restart after SIGKILL sees); tests/test_fault_kill.py
does it with real processes and SIGKILL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import pytest

from qcall.exceptions import KMEBadRequestError, KMEStateError
from qcall.qkd.etsi014 import KeyRequest
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.kmestore import DurableKME
from qcall.typing import KeyId, SAEId

A, B = SAEId("alice"), SAEId("bob")


def make(path: Path, keys: int = 10, **options: object) -> tuple[DurableKME, dict[str, bytes]]:
    kme = DurableKME.open(path, "KME-A", **options)  # type: ignore[arg-type]
    supplied = random_keys(keys)
    kme.supply("alice", "bob", supplied, role="local")
    kme.store.flush()
    return kme, dict(supplied)


def take(kme: KME, number: int = 1) -> list[tuple[str, bytes]]:
    container = kme.enc_keys(A, "bob", KeyRequest(number=number))
    return [(k.key_id, k.key) for k in container.keys]


def test_reload_has_every_unused_key_and_no_consumed_one(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme, supplied = make(path, 10)
    got = take(kme, 3)  # alice has 3 keys; bob fetches one of them
    bob = kme.dec_keys(B, "alice", [KeyId(got[0][0])])
    kme.store.flush()
    assert bob.keys[0].key == supplied[got[0][0]]

    again = DurableKME.open(path, "KME-A")  # the first one "crashed"
    assert again.stored_key_count("alice", "bob") == 7
    rest = take(again, 7)
    assert {k for k, _ in rest} | {k for k, _ in got} == set(supplied)
    assert all(supplied[k] == v for k, v in rest)
    # Bob can still fetch the two keys alice got but he did not; never the one he did.
    left = again.dec_keys(B, "alice", [KeyId(got[1][0]), KeyId(got[2][0])])
    assert [k.key for k in left.keys] == [supplied[got[1][0]], supplied[got[2][0]]]
    with pytest.raises(KMEBadRequestError, match="key_ID not found"):
        again.dec_keys(B, "alice", [KeyId(got[0][0])])


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    make(path)
    for file in (path, path.with_name("kme.state.journal")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_unflushed_take_comes_back_unused(tmp_path: Path) -> None:
    """A take whose record never reached the disk was never answered: not consumed."""
    path = tmp_path / "kme.state"
    kme, _ = make(path, 4)
    take(kme, 2)  # in memory only: the server would not have answered yet
    assert DurableKME.open(path, "KME-A").stored_key_count("alice", "bob") == 4


def test_torn_last_record_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kme.state"
    kme, _ = make(path, 4)
    take(kme, 1)
    kme.store.flush()
    with open(path.with_name("kme.state.journal"), "ab") as f:
        f.write(b'{"op":"enc","m":"alice","s":"bob","now":0,"ids":["')  # cut by the crash
    assert DurableKME.open(path, "KME-A").stored_key_count("alice", "bob") == 3
    assert "torn" in caplog.text


def test_corrupt_record_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme, _ = make(path, 4)
    take(kme, 1)
    kme.store.flush()
    journal = path.with_name("kme.state.journal")
    lines = journal.read_bytes().split(b"\n")
    lines.insert(1, b'{"op":"bogus"}')
    journal.write_bytes(b"\n".join(lines))
    with pytest.raises(KMEStateError, match=r"line 2: bad record \(unknown op 'bogus'\)"):
        DurableKME.open(path, "KME-A")


def test_consumed_twice_in_the_journal_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme, _ = make(path, 4)
    take(kme, 1)
    kme.store.flush()
    journal = path.with_name("kme.state.journal")
    last = journal.read_bytes().split(b"\n")[-2]
    with open(journal, "ab") as f:
        f.write(last + b"\n")  # the same key handed out twice? never silently
    with pytest.raises(KMEStateError, match=r"line 5: .* not in the enc pool"):
        DurableKME.open(path, "KME-A")


def test_stale_journal_after_an_interrupted_compaction_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme, _ = make(path, 4)
    take(kme, 1)
    kme.store.flush()
    journal = path.with_name("kme.state.journal")
    stale = journal.read_bytes()
    kme.close()  # compaction: the snapshot now holds 3 keys, journal is empty
    journal.write_bytes(stale)  # as if the crash hit before the new journal replaced it
    assert DurableKME.open(path, "KME-A").stored_key_count("alice", "bob") == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kme_id": "KME-B"}, "field 'kme_id'"),
        ({"key_size": 128}, "field 'key_size'"),
        ({"format": "other"}, "field 'format'"),
        ({"version": 9}, "field 'version'"),
        ({"generation": -1}, "field 'generation'"),
        ({"pools": 3}, "field 'pools'"),
    ],
)
def test_bad_snapshot_fields_are_named(
    tmp_path: Path, change: dict[str, object], match: str
) -> None:
    path = tmp_path / "kme.state"
    make(path)[0].close()
    state = json.loads(path.read_bytes())
    state.update(change)
    path.write_text(json.dumps(state))
    with pytest.raises(KMEStateError, match=match):
        DurableKME.open(path, "KME-A")
    path.write_text("{not json")
    with pytest.raises(KMEStateError, match="bad JSON"):
        DurableKME.open(path, "KME-A")


def test_compaction_erases_consumed_keys_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme, supplied = make(path, 200, compact_bytes=4096)
    generation = kme.store.generation
    consumed = take(kme, 1)  # alice's copy (enc_keys), then bob's (dec_keys): gone
    kme.dec_keys(B, "alice", [KeyId(consumed[0][0])])
    kme.store.flush()
    on_disk = path.read_bytes() + path.with_name("kme.state.journal").read_bytes()
    assert base64.b64encode(consumed[0][1]) in on_disk  # in the snapshot, until compaction
    taken = 1
    while kme.store.generation == generation:  # the journal outgrows the snapshot
        take(kme, 1)
        kme.store.flush()
        taken += 1
        assert taken < 200
    on_disk = path.read_bytes() + path.with_name("kme.state.journal").read_bytes()
    assert base64.b64encode(consumed[0][1]) not in on_disk
    assert DurableKME.open(path, "KME-A").stored_key_count("alice", "bob") == 200 - taken
    assert supplied[consumed[0][0]] == consumed[0][1]


async def test_group_commit_and_failure_refuses_keys(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme, _ = make(path, 100)
    for _ in range(20):
        take(kme, 1)
    await asyncio.gather(*(kme.store.commit() for _ in range(20)))
    assert kme.store.flushes <= 3  # 20 records, one fdatasync (plus the fill)
    assert not kme.store.dirty

    # The disk fails: the commit raises, and the KME then refuses to serve (503).
    assert kme.store._fd is not None
    os.close(kme.store._fd)
    kme.store._fd = os.open(path, os.O_RDONLY)
    take(kme, 1)
    with pytest.raises(KMEStateError, match="cannot write"):
        await kme.store.commit()
    with pytest.raises(KMEStateError):
        await kme.store.commit()
    from qcall.exceptions import KMEUnavailableError

    with pytest.raises(KMEUnavailableError, match="storage failed"):
        take(kme, 1)
    # Nothing it took after the failure counts as consumed on disk: a restart has them.
    assert DurableKME.open(path, "KME-A").stored_key_count("alice", "bob") == 80


def test_expired_keys_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "kme.state"
    kme = DurableKME.open(path, "KME-A", key_lifetime=10.0)
    kme.supply("alice", "bob", random_keys(3), role="local", now=0.0)
    kme.supply("alice", "bob", random_keys(2), role="local", now=20.0)
    assert kme.expire(25.0) == 3
    kme.store.flush()
    assert DurableKME.open(path, "KME-A").stored_key_count("alice", "bob") == 2


@pytest.mark.slow
async def test_simulated_network_with_durable_kmes(tmp_path: Path) -> None:
    """The network's KMEs keep their pools on disk; a restarted network has them."""
    from qcall.qkd.client import open_key_source
    from qcall.qkd.topology import load_topology
    from tests.test_network import TIMEOUT, fast_network

    topo = load_topology("beijing-hefei")
    state = tmp_path / "state"
    async with fast_network(topo, state, durable_kmes=True) as net:
        await net.wait_ready(TIMEOUT)
        files = sorted(p.name for p in (state / "kme").iterdir())
        assert files == [
            "KME-Beijing.state",
            "KME-Beijing.state.journal",
            "KME-Hefei.state",
            "KME-Hefei.state.journal",
        ]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (state / "kme").iterdir())
        async with open_key_source(net.sae_credentials("alice").as_config()) as beijing:
            used = await beijing.get_keys("bob", 2)
    # Closed cleanly (compacted): the Beijing KME's pool for alice → bob survives,
    # without the two keys alice took.
    again = DurableKME.open(state / "kme" / "KME-Beijing.state", "KME-Beijing")
    left = again.stored_key_count("alice", "bob")
    assert left >= 1
    rest = again.enc_keys(A, "bob", KeyRequest(number=left)).keys
    assert not {k.key_id for k in rest} & {k.key_id for k in used}


def test_keys_of_any_size_are_exact_across_a_crash(tmp_path: Path) -> None:
    """Keys cut from the pool (128, 512, 1024 bits): a reload hands out no byte twice."""
    path = tmp_path / "kme.state"
    kme = DurableKME.open(path, "KME-A")
    supplied = random_keys(10)  # 320 bytes, in this order
    stream = b"".join(k for _, k in supplied)
    kme.supply("alice", "bob", supplied, role="local")
    small, large = (kme.enc_keys(A, "bob", KeyRequest(size=s)).keys[0] for s in (128, 512))
    kme.dec_keys(B, "alice", [large.key_id])  # bob takes the 512-bit key, not the other
    kme.store.flush()
    assert small.key + large.key == stream[:80]

    again = DurableKME.open(path, "KME-A")  # the first one "crashed"
    assert again.stored_key_count("alice", "bob") == (320 - 80) // 32
    (key,) = again.dec_keys(B, "alice", [small.key_id]).keys  # still there for bob
    assert key.key == small.key
    with pytest.raises(KMEBadRequestError, match="key_ID not found"):
        again.dec_keys(B, "alice", [large.key_id])
    (big,) = again.enc_keys(A, "bob", KeyRequest(size=1024)).keys
    assert big.key == stream[80:208]  # the next bytes, none of the old ones
    again.store.flush()
    again.close()  # compaction: a version-2 snapshot with a partly used key
    third = DurableKME.open(path, "KME-A")
    rest = third.enc_keys(A, "bob", KeyRequest(number=3, size=256)).keys
    assert b"".join(k.key for k in rest) == stream[208:304]
    assert third.stored_key_count("alice", "bob") == 0


def test_master_and_slave_state_files_agree_on_cut_keys(tmp_path: Path) -> None:
    master = DurableKME.open(tmp_path / "a.state", "KME-A")
    slave = DurableKME.open(tmp_path / "b.state", "KME-B")
    keys = random_keys(6)
    master.supply("alice", "bob", keys, role="master", peer_kme_id="KME-B")
    slave.supply("alice", "bob", keys, role="slave", peer_kme_id="KME-A")
    got = [master.enc_keys(A, "bob", KeyRequest(size=s)).keys[0] for s in (72, 512, 640)]
    assert slave.dec_keys(B, "alice", [got[1].key_id]).keys[0].key == got[1].key
    master.store.flush()
    slave.store.flush()
    slave_again = DurableKME.open(tmp_path / "b.state", "KME-B")  # both "crashed"
    master_again = DurableKME.open(tmp_path / "a.state", "KME-A")
    back = slave_again.dec_keys(B, "alice", [got[2].key_id, got[0].key_id]).keys
    assert [k.key for k in back] == [got[2].key, got[0].key]
    with pytest.raises(KMEBadRequestError):
        slave_again.dec_keys(B, "alice", [got[1].key_id])
    (nxt,) = master_again.enc_keys(A, "bob", KeyRequest(size=64)).keys
    assert slave_again.dec_keys(B, "alice", [nxt.key_id]).keys[0].key == nxt.key
    assert nxt.key not in b"".join(k.key for k in got)


def test_version_1_state_files_still_load(tmp_path: Path) -> None:
    """Files written before keys could be cut (every key whole) load unchanged."""
    path = tmp_path / "kme.state"
    (k1, v1), (k2, v2), (k3, v3) = random_keys(3)
    b64 = [base64.b64encode(v).decode() for v in (v1, v2, v3)]
    state = {
        "format": "qcall-kme-state",
        "version": 1,
        "kme_id": "KME-A",
        "key_size": 256,
        "generation": 4,
        "saes": ["alice", "bob"],
        "pools": [
            {
                "master": "alice",
                "slave": "bob",
                "role": "local",
                "peer_kme_id": "KME-A",
                "enc": [[k1, b64[0], 0.0], [k2, b64[1], 0.0]],
                "dec": [[k3, b64[2], 1.0]],  # issued to alice, waiting for bob
            }
        ],
    }
    path.write_text(json.dumps(state))
    kme = DurableKME.open(path, "KME-A")
    assert kme.stored_key_count("alice", "bob") == 2
    assert kme.dec_keys(B, "alice", [k3]).keys[0].key == v3
    assert [k.key for k in kme.enc_keys(A, "bob", KeyRequest(number=2)).keys] == [v1, v2]
    kme.close()
    assert json.loads(path.read_bytes())["version"] == 2
