"""The client store: encryption at rest, prekeys used once, migrations, corrupt files."""

from __future__ import annotations

import secrets
import sqlite3
import stat
from pathlib import Path
from typing import TypeVar

import pytest

from qcall.exceptions import MessageStoreError, PrekeyError
from qcall.messaging.group import GroupAction, GroupChange, GroupMember, SenderChain, apply_change
from qcall.messaging.messages import PrekeyMessage, RatchetMessage, identity_hash
from qcall.messaging.prekeys import PrekeyKind, make_prekey
from qcall.messaging.ratchet import Session
from qcall.messaging.store import SCHEMA_VERSION, ClientStore, Transfer
from tests.messaging_utils import BACKEND, NOW, User, identity, start

SEED = b"\x11" * 32
T = TypeVar("T")


def some(value: T | None) -> T:
    """``value``, which the test expects to be there (narrows ``X | None`` for mypy)."""
    assert value is not None
    return value


def open_store(path: Path, seed: bytes = SEED) -> ClientStore:
    return ClientStore(path, seed)


def test_new_store_is_private_versioned_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "messages.db"
    store = open_store(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    open_store(path).close()


def test_secrets_and_history_are_encrypted_at_rest(tmp_path: Path) -> None:
    path = tmp_path / "messages.db"
    store = open_store(path)
    a, _, _ = start(User.make("alice"), User.make("bob"))
    with store.transaction():
        store.save_session(a.state, NOW)
        store.add_history("bob", b"\1" * 16, outgoing=True, now=NOW, body=b"attack at dawn")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in (b"attack at dawn", a.state.root_key, some(a.state.send_chain).key, b"bob"):
        assert secret not in raw
    again = open_store(path)
    assert some(again.active_session("bob")).serialize() == a.state.serialize()
    assert [e.body for e in again.history("bob")] == [b"attack at dawn"]
    assert again.history("carol") == []


def test_store_of_another_identity_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "messages.db"
    open_store(path).close()
    with pytest.raises(MessageStoreError, match=r"messages\.db belongs to another identity"):
        open_store(path, b"\x22" * 32)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed-header"])
def test_corrupt_store_file_gives_a_clear_error_naming_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "messages.db"
    store = open_store(path)
    with store.transaction():
        for i in range(50):
            store.add_history(
                "bob", i.to_bytes(16, "big"), outgoing=False, now=NOW, body=b"x" * 500
            )
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(secrets.token_bytes(len(data)))
    elif damage == "truncated":
        path.write_bytes(data[:1500])
    else:
        path.write_bytes(bytes(100) + data[100:])
    with pytest.raises(MessageStoreError, match=str(path)):
        store = open_store(path)
        store.history("bob")


def test_newer_schema_is_refused_and_old_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "messages.db"
    store = ClientStore(path, SEED, max_version=1)
    store.add_history("bob", b"\1" * 16, outgoing=False, now=NOW, body=b"kept")
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    store = open_store(path)  # migrates 1 -> 2 (file transfers)
    assert [e.body for e in store.history("bob")] == [b"kept"]
    transfer = Transfer(b"\2" * 16, "bob", "bob", True, b"offer", 3, "/tmp/x")
    store.save_transfer(transfer, NOW)
    got = some(store.transfer(b"\2" * 16))
    assert (got.conversation, got.peer, got.offer, got.next_chunk, got.path, got.outgoing) == (
        "bob",
        "bob",
        b"offer",
        3,
        "/tmp/x",
        True,
    )
    assert store.transfers(outgoing=True) == [b"\2" * 16] and store.transfers(outgoing=False) == []
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(MessageStoreError, match="newer qcall"):
        open_store(path)


def test_one_time_prekey_used_twice_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path / "messages.db")
    me = identity("bob")
    for kind, pid in ((PrekeyKind.SIGNED, 1), (PrekeyKind.ONE_TIME, 2)):
        prekey, seed = make_prekey(
            me.signing_key,
            "bob",
            kind,
            pid,
            int(NOW * 1000),
            backend=BACKEND,
            random=secrets.token_bytes,
        )
        store.add_prekey(prekey, seed)
    assert store.next_prekey_id() == 3 and store.unused_one_time_prekeys() == 1
    record, seed = store.prekey(PrekeyKind.ONE_TIME, 2)
    assert record.prekey_id == 2 and len(seed) == 64
    with store.transaction():
        store.consume_one_time_prekey(2, NOW)
    assert store.unused_one_time_prekeys() == 0
    with pytest.raises(PrekeyError, match="used twice"):
        store.prekey(PrekeyKind.ONE_TIME, 2)
    with pytest.raises(PrekeyError, match="unknown"):
        store.prekey(PrekeyKind.ONE_TIME, 7)
    assert [p.record.prekey_id for p in store.signed_prekeys()] == [1]


def test_transaction_rolls_back_everything(tmp_path: Path) -> None:
    store = open_store(tmp_path / "messages.db")
    with pytest.raises(RuntimeError), store.transaction():
        store.add_outbox("bob", b"envelope", NOW)
        store.mark_processed(7, NOW)
        raise RuntimeError("crash in the middle")
    assert store.outbox() == [] and not store.processed(7)


def test_nested_transaction_that_fails_rolls_back_only_its_own_writes(tmp_path: Path) -> None:
    """A savepoint per nested transaction: one bad item of a batch loses nothing else."""
    path = tmp_path / "messages.db"
    store = open_store(path)
    with store.transaction():
        store.mark_processed(1, NOW)
        with pytest.raises(RuntimeError), store.transaction():
            store.add_outbox("bob", b"envelope", NOW)
            store.mark_processed(2, NOW)
            raise RuntimeError("bad envelope")
        with store.transaction():
            store.mark_processed(3, NOW)
    store.close()
    store = open_store(path)
    assert store.processed(1) and store.processed(3)
    assert not store.processed(2) and store.outbox() == []


def test_groups_sender_chains_qkd_keys_pending(tmp_path: Path) -> None:
    store = open_store(tmp_path / "messages.db")
    alice = identity("alice")
    members = [GroupMember(n, identity_hash(identity(n).public_key)) for n in ("alice", "bob")]
    change = GroupChange.make(alice, None, GroupAction.CREATE, members, NOW, name="team")
    state = apply_change(None, change, alice.public_key, "alice", BACKEND)
    chain = SenderChain.new()
    with store.transaction():
        store.save_group(state)
        store.save_sender_chain(state.group_id, 1, "alice", chain)
        store.put_qkd_key("k1", b"\5" * 32, NOW)
        store.add_pending(3, "bob", b"later", "no sender key", NOW)
    assert store.group_by_name("team") == state == store.group(state.group_id)
    assert store.groups() == [state]
    assert some(store.sender_chain(state.group_id, 1, "alice")).serialize() == chain.serialize()
    assert store.sender_chain(state.group_id, 1, "bob") is None
    store.delete_sender_chains_before(state.group_id, 2)
    assert store.sender_chain(state.group_id, 1, "alice") is None
    assert store.qkd_keys(["k1", "k2"]) == {"k1": b"\5" * 32}
    store.delete_qkd_keys(["k1"])
    assert store.qkd_keys(["k1"]) == {}
    [(pid, eid, sender, env)] = store.pending()
    assert (eid, sender, env) == (3, "bob", b"later")
    store.remove_pending(pid)
    assert store.pending() == []


def test_row_swapping_is_detected(tmp_path: Path) -> None:
    """Encrypted values are bound to their rows: moving one to another row fails loudly."""
    path = tmp_path / "messages.db"
    store = open_store(path)
    store.add_history("bob", b"\1" * 16, outgoing=False, now=NOW, body=b"one")
    store.add_history("bob", b"\2" * 16, outgoing=False, now=NOW, body=b"two")
    store._db.execute(
        "UPDATE history SET body = (SELECT body FROM history WHERE id = 1) WHERE id = 2"
    )
    with pytest.raises(MessageStoreError, match="does not decrypt"):
        store.history("bob")


def _advanced(store: ClientStore, session_id: bytes) -> tuple[Session, bytes]:
    """Load a session from ``store``, send one message with it (advances it in place)."""
    state = store.session(session_id)
    assert state is not None
    session = Session(state, backend=BACKEND)
    return session, session.encrypt(b"m", NOW)


def test_session_cache_never_serves_a_rolled_back_or_unsaved_state(tmp_path: Path) -> None:
    """The store keeps the parsed state it last wrote: a transaction or savepoint that
    rolled back, or a state advanced and never saved, must not be served (the next
    message would reuse a message key)."""
    store = open_store(tmp_path / "messages.db")
    a, _, _ = start(User.make("alice"), User.make("bob"))
    sid = a.session_id
    with store.transaction():
        store.save_session(a.state, NOW)
    committed = some(store.session(sid)).serialize()
    # saved in a transaction that rolls back
    with pytest.raises(RuntimeError), store.transaction():
        session, _ = _advanced(store, sid)
        store.save_session(session.state, NOW)
        assert some(store.session(sid)).serialize() != committed  # read inside: the new state
        raise RuntimeError("crash before the commit")
    assert some(store.session(sid)).serialize() == committed
    assert some(store.active_session("bob")).serialize() == committed
    # saved in a savepoint that rolls back, inside a transaction that commits
    with store.transaction():
        with pytest.raises(RuntimeError), store.transaction():
            session, _ = _advanced(store, sid)
            store.save_session(session.state, NOW)
            raise RuntimeError("bad envelope")
    assert some(store.session(sid)).serialize() == committed
    # a committed save is what the file holds, and is served
    session, _ = _advanced(store, sid)
    with store.transaction():
        store.save_session(session.state, NOW)
    committed = session.state.serialize()
    assert some(store.session(sid)).serialize() == committed
    # advanced in place by an operation that failed before saving it
    _advanced(store, sid)
    assert some(store.session(sid)).serialize() == committed
    store.close()
    assert some(open_store(tmp_path / "messages.db").session(sid)).serialize() == committed


def test_session_cache_sees_another_process_write(tmp_path: Path) -> None:
    """Two stores on one file (two qcall processes): a state the other one wrote is read
    from the file, not the one kept in memory."""
    path = tmp_path / "messages.db"
    one, two = open_store(path), open_store(path)
    a, _, _ = start(User.make("alice"), User.make("bob"))
    with one.transaction():
        one.save_session(a.state, NOW)  # kept in one's memory
    session, _ = _advanced(two, a.session_id)
    with two.transaction():
        two.save_session(session.state, NOW)
    assert some(one.session(a.session_id)).serialize() == session.state.serialize()


def _msg(wire: bytes) -> RatchetMessage:
    return RatchetMessage.parse(PrekeyMessage.parse(wire).inner if wire[1] == 1 else wire)


def _parts(path: Path, sid: bytes) -> tuple[bytes, bytes, bytes]:
    """(epoch part, chain part, tag) of a session as the file holds them."""
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT e.state, s.state, s.tag FROM sessions s "
            "JOIN session_epochs e ON e.session_id = s.session_id WHERE s.session_id = ?",
            (sid,),
        ).fetchone()
    return bytes(row[0]), bytes(row[1]), bytes(row[2])


def _saved(tmp_path: Path) -> tuple[Path, ClientStore, Session, Session]:
    """A store holding alice's new session with bob (and both sessions)."""
    path = tmp_path / "messages.db"
    store = open_store(path)
    a, b, _ = start(User.make("alice"), User.make("bob"))
    with store.transaction():
        store.save_session(a.state, NOW)
    return path, store, a, b


def test_a_message_rewrites_only_the_chain_part_of_its_session(tmp_path: Path) -> None:
    """§10.4: a message in the same epoch rewrites the small chain part only; a new epoch
    (the peer's reply carries a new ML-KEM key) rewrites both; a fresh store reads both."""
    path, store, a, b = _saved(tmp_path)
    sid = a.session_id
    epoch, chain, tag = _parts(path, sid)
    assert len(epoch) > 4000 > 1000 > len(chain)  # the ML-KEM keys are in the epoch part
    wire = a.encrypt(b"one more", NOW)
    with store.transaction():
        store.save_session(a.state, NOW)
    epoch2, chain2, tag2 = _parts(path, sid)
    assert (epoch2, tag2) == (epoch, tag) and chain2 != chain
    assert some(open_store(path).session(sid)).serialize() == a.state.serialize()
    b.decrypt(_msg(wire), NOW)
    a.decrypt(_msg(b.encrypt(b"reply", NOW)), NOW)  # a new epoch
    with store.transaction():
        store.save_session(a.state, NOW)
    epoch3, _, tag3 = _parts(path, sid)
    assert epoch3 != epoch and tag3 != tag
    assert some(open_store(path).session(sid)).serialize() == a.state.serialize()


def test_a_rolled_back_epoch_write_is_never_paired_with_a_later_chain_part(tmp_path: Path) -> None:
    """A new epoch part written in a transaction that rolled back is not in the file: a
    later save of a state with that epoch (here: the same state saved again, as a retry
    would) must write both parts again, never a chain part alone under the rolled-back
    tag (the file would keep the old state)."""
    path, store, a, b = _saved(tmp_path)
    sid = a.session_id
    b.decrypt(_msg(a.encrypt(b"m", NOW)), NOW)
    a.decrypt(_msg(b.encrypt(b"reply", NOW)), NOW)  # a new epoch
    with pytest.raises(RuntimeError), store.transaction():
        store.save_session(a.state, NOW)
        raise RuntimeError("crash before the commit")
    with store.transaction():
        store.save_session(a.state, NOW)
    assert some(open_store(path).session(sid)).serialize() == a.state.serialize()


def test_a_session_written_before_schema_3_is_read_and_rewritten_in_two_parts(
    tmp_path: Path,
) -> None:
    """A row from schema version 2 holds the whole state (tag NULL): it opens as before, and
    its next save writes the two parts."""
    path, store, a, _ = _saved(tmp_path)
    sid = a.session_id
    whole = store._seal("sessions", sid, a.state.serialize())  # the version-2 row
    store._exec("DELETE FROM session_epochs")
    store._exec("UPDATE sessions SET state = ?, tag = NULL", (whole,))
    store.close()
    store = open_store(path)
    state = store.session(sid)
    assert state is not None and state.serialize() == a.state.serialize()
    with store.transaction():
        store.save_session(state, NOW)
    assert _parts(path, sid)[2]
    assert some(open_store(path).session(sid)).serialize() == a.state.serialize()


def test_schema_4_indexes_only_sent_messages_by_message_id(tmp_path: Path) -> None:
    """Receipts look up sent messages by id; received ones are not indexed by their random
    id any more (one dirty index page per received message). A version-3 store migrates."""
    path = tmp_path / "messages.db"
    store = ClientStore(path, SEED, max_version=3)
    store.add_history("bob", b"\1" * 16, outgoing=True, now=NOW, body=b"sent")
    store.add_history("bob", b"\2" * 16, outgoing=False, now=NOW, body=b"received")
    store.close()
    store = open_store(path)
    indexes = {
        name: sql
        for name, sql in store._db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'history'"
        )
    }
    assert set(indexes) == {"history_conversation", "history_sent"}
    assert "WHERE outgoing = 1" in indexes["history_sent"]
    plan = store._db.execute(
        "EXPLAIN QUERY PLAN UPDATE history SET status = 2 WHERE conversation = ? "
        "AND message_id = ? AND outgoing = 1 AND status < 2",
        (store.tag("bob"), b"\1" * 16),
    ).fetchall()
    assert "history_sent" in str(plan)  # set_status's query still uses an index
    assert store.set_status("bob", b"\1" * 16, 2) and not store.set_status("bob", b"\2" * 16, 2)
    assert [(e.body, e.status) for e in store.history("bob")] == [(b"sent", 2), (b"received", 0)]
    with pytest.raises(MessageStoreError):  # a sent message id stays unique
        store.add_history("bob", b"\1" * 16, outgoing=True, now=NOW, body=b"again")
    store.close()
