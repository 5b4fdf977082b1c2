"""The pure KME state machine: pools per ordered SAE pair, ETSI GS QKD 014 semantics."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings, strategies as st

from qcall.exceptions import (
    KMEBadRequestError,
    KMEUnauthorizedError,
    KMEUnavailableError,
    QCallError,
)
from qcall.qkd.etsi014 import KeyRequest, parse_key_request
from qcall.qkd.kme import KME, PoolRole, random_keys
from qcall.typing import KeyId, SAEId

ALICE, BOB, EVE = SAEId("alice"), SAEId("bob"), SAEId("eve")


def local_kme(n: int = 10, **kwargs: int) -> tuple[KME, list[tuple[KeyId, bytes]]]:
    kme = KME("KME_A", **kwargs)
    keys = random_keys(n, kme.key_size)
    assert kme.supply(ALICE, BOB, keys, role="local") == n
    return kme, keys


def test_local_pool_enc_then_dec_then_erased() -> None:
    kme, keys = local_kme(3)
    got = kme.enc_keys(ALICE, BOB, KeyRequest(number=2))
    assert [(k.key_id, k.key) for k in got.keys] == keys[:2]  # oldest first
    assert kme.stored_key_count(ALICE, BOB) == 1
    # the slave gets each key once, in the order it asks
    dec = kme.dec_keys(BOB, ALICE, [keys[1][0], keys[0][0]])
    assert [(k.key_id, k.key) for k in dec.keys] == [keys[1], keys[0]]
    with pytest.raises(KMEBadRequestError, match="key_ID not found") as info:
        kme.dec_keys(BOB, ALICE, [keys[0][0]])
    assert info.value.details == [{"key_ID": keys[0][0]}]
    # a key not yet delivered to the master cannot be fetched by the slave
    with pytest.raises(KMEBadRequestError, match="key_ID not found"):
        kme.dec_keys(BOB, ALICE, [keys[2][0]])


def test_only_the_slave_gets_a_key() -> None:
    kme, _ = local_kme(2)
    kme.add_pair(EVE, BOB, "local")
    kid = kme.enc_keys(ALICE, BOB, KeyRequest()).keys[0].key_id
    # Eve is attached but the key was not issued for her: it does not exist for her.
    with pytest.raises(KMEBadRequestError, match="master_SAE_ID alice is not known"):
        kme.dec_keys(EVE, ALICE, [kid])
    # Alice (the master) cannot fetch it with dec_keys either.
    with pytest.raises(KMEBadRequestError):
        kme.dec_keys(ALICE, BOB, [kid])
    # nor can Bob through another pair
    with pytest.raises(KMEBadRequestError, match="key_ID not found"):
        kme.dec_keys(BOB, EVE, [kid])
    assert kme.dec_keys(BOB, ALICE, [kid]).keys[0].key_id == kid


def test_two_kmes_master_and_slave_roles() -> None:
    kme_a, kme_b = KME("KME_A"), KME("KME_B")
    keys = random_keys(4)
    kme_a.supply(ALICE, BOB, keys, role="master", peer_kme_id="KME_B")
    kme_b.supply(ALICE, BOB, keys, role=PoolRole.SLAVE, peer_kme_id="KME_A")
    assert kme_a.saes == {ALICE} and kme_b.saes == {BOB}

    sa, sb = kme_a.status(ALICE, BOB), kme_b.status(BOB, ALICE)
    assert (sa.source_kme_id, sa.target_kme_id) == ("KME_A", "KME_B")
    assert (sb.source_kme_id, sb.target_kme_id) == ("KME_A", "KME_B")
    assert (sb.master_sae_id, sb.slave_sae_id) == (ALICE, BOB)
    assert sa.stored_key_count == sb.stored_key_count == 4

    got = kme_a.enc_keys(ALICE, BOB, KeyRequest(number=3))
    assert kme_a.stored_key_count(ALICE, BOB) == 1
    dec = kme_b.dec_keys(BOB, ALICE, [k.key_id for k in got.keys])
    assert [k.key for k in dec.keys] == [k.key for k in got.keys]
    assert kme_b.stored_key_count(ALICE, BOB) == 1
    # Bob is not attached to KME A, Alice not to KME B
    with pytest.raises(KMEUnauthorizedError):
        kme_a.dec_keys(BOB, ALICE, [got.keys[0].key_id])
    with pytest.raises(KMEUnauthorizedError) as info:
        kme_b.enc_keys(ALICE, BOB, KeyRequest())
    assert info.value.status == 401
    # a master-role pool never answers dec_keys, a slave-role pool never enc_keys
    kme_a.add_sae(BOB)
    kme_b.add_sae(ALICE)
    with pytest.raises(KMEBadRequestError):
        kme_a.dec_keys(BOB, ALICE, [keys[3][0]])
    with pytest.raises(KMEBadRequestError):
        kme_b.enc_keys(ALICE, BOB, KeyRequest())


def test_pairs_are_directed() -> None:
    kme, _ = local_kme(2)
    with pytest.raises(KMEBadRequestError, match="slave_SAE_ID alice is not known"):
        kme.enc_keys(BOB, ALICE, KeyRequest())
    # status from the slave's side shows the incoming pool
    status = kme.status(BOB, ALICE)
    assert (status.master_sae_id, status.slave_sae_id) == (ALICE, BOB)


def test_empty_pool_is_503_and_all_or_nothing() -> None:
    kme, _ = local_kme(2)
    with pytest.raises(KMEUnavailableError, match="2 stored, 3 requested") as info:
        kme.enc_keys(ALICE, BOB, KeyRequest(number=3))
    assert info.value.status == 503
    assert kme.stored_key_count(ALICE, BOB) == 2
    kme.enc_keys(ALICE, BOB, KeyRequest(number=2))
    with pytest.raises(KMEUnavailableError):
        kme.enc_keys(ALICE, BOB, KeyRequest())


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (KeyRequest(size=56), "size 56 is not supported: min_key_size is 64, max_key_size is 4096"),
        (KeyRequest(size=4104), "size 4104 is not supported"),
        (KeyRequest(size=250), "size 250 is not a multiple of 8"),
        (KeyRequest(number=0), "number 0 is not in 1..4"),
        (KeyRequest(number=5), "number 5 is not in 1..4"),
        (KeyRequest(additional_slave_sae_ids=(EVE,)), "additional_slave_SAE_IDs"),
        (
            KeyRequest(extension_mandatory=({"abc_route_type": "direct"},)),
            "not all extension_mandatory parameters are supported",
        ),
    ],
)
def test_enc_keys_bad_requests(request_: KeyRequest, match: str) -> None:
    kme, _ = local_kme(10, max_key_per_request=4)
    with pytest.raises(KMEBadRequestError, match=match) as info:
        kme.enc_keys(ALICE, BOB, request_)
    assert info.value.status == 400 and info.value.message
    assert kme.stored_key_count(ALICE, BOB) == 10


def test_extension_mandatory_details() -> None:
    kme, _ = local_kme(1)
    with pytest.raises(KMEBadRequestError) as info:
        kme.enc_keys(ALICE, BOB, KeyRequest(extension_mandatory=({"b": 1}, {"a": 2})))
    assert info.value.details == [{"extension_mandatory_unsupported": ["a", "b"]}]


def test_optional_extensions_and_default_size_are_fine() -> None:
    kme, _ = local_kme(1)
    got = kme.enc_keys(ALICE, BOB, KeyRequest(size=256, extension_optional=({"x": 1},)))
    assert got.keys[0].size_bits == 256


def test_unknown_callers_and_peers() -> None:
    kme, _ = local_kme(1)
    with pytest.raises(KMEUnauthorizedError):
        kme.status(EVE, BOB)
    with pytest.raises(KMEBadRequestError, match="slave_SAE_ID carol is not known"):
        kme.status(ALICE, "carol")
    with pytest.raises(KMEBadRequestError, match="slave_SAE_ID"):
        kme.status(ALICE, "../etc")
    with pytest.raises(KMEBadRequestError, match="master_SAE_ID"):
        kme.dec_keys(BOB, "a b", [KeyId(str(uuid.uuid4()))])


def test_dec_keys_all_or_nothing_and_limits() -> None:
    kme, keys = local_kme(5, max_key_per_request=3)
    kme.enc_keys(ALICE, BOB, KeyRequest(number=3))
    ghost = KeyId(str(uuid.uuid4()))
    with pytest.raises(KMEBadRequestError) as info:
        kme.dec_keys(BOB, ALICE, [keys[0][0], ghost])
    assert info.value.details == [{"key_ID": ghost}]
    with pytest.raises(KMEBadRequestError, match="max_key_per_request"):
        kme.dec_keys(BOB, ALICE, [KeyId(str(uuid.uuid4())) for _ in range(4)])
    with pytest.raises(KMEBadRequestError, match="duplicate"):
        kme.dec_keys(BOB, ALICE, [keys[0][0], keys[0][0]])
    with pytest.raises(KMEBadRequestError, match="empty"):
        kme.dec_keys(BOB, ALICE, [])
    assert len(kme.dec_keys(BOB, ALICE, [keys[0][0]]).keys) == 1  # still there


def test_supply_checks_and_capacity() -> None:
    kme = KME("KME_A", max_key_count=3)
    with pytest.raises(ValueError, match="bits"):
        kme.supply(ALICE, BOB, [(KeyId(str(uuid.uuid4())), b"short")])
    with pytest.raises(ValueError, match="UUID"):
        kme.supply(ALICE, BOB, [("not-a-uuid", bytes(32))])
    keys = random_keys(5)
    with pytest.raises(ValueError, match="already in pool"):
        kme.supply(ALICE, BOB, [keys[0], keys[0]])
    assert kme.stored_key_count(ALICE, BOB) == 0  # nothing stored on error
    assert kme.free(ALICE, BOB) == 3
    assert kme.supply(ALICE, BOB, keys) == 3
    assert kme.free(ALICE, BOB) == 0
    status = kme.status(ALICE, BOB)
    assert (status.stored_key_count, status.max_key_count) == (3, 3)
    with pytest.raises(ValueError, match="already has role"):
        kme.add_pair(ALICE, BOB, "master")
    with pytest.raises(ValueError, match="differ"):
        kme.add_pair(ALICE, ALICE)
    assert kme.pairs() == [(ALICE, BOB, PoolRole.LOCAL)]


def test_status_fields_and_alarm() -> None:
    kme, _ = local_kme(7, key_size=512)
    status = kme.status(ALICE, BOB)
    assert status.to_json() == {
        "source_KME_ID": "KME_A",
        "target_KME_ID": "KME_A",
        "master_SAE_ID": "alice",
        "slave_SAE_ID": "bob",
        "key_size": 512,
        "stored_key_count": 7,
        "max_key_count": 100_000,
        "max_key_per_request": 128,
        "max_key_size": 4096,
        "min_key_size": 64,
        "max_SAE_ID_count": 0,
    }
    kme.set_alarm(ALICE, BOB, "eavesdropper suspected on link Hefei-Hop3", qber=0.26)
    ext = kme.status(ALICE, BOB).status_extension
    assert ext == {"alarm": "eavesdropper suspected on link Hefei-Hop3", "qber": 0.26}
    kme.set_alarm(ALICE, BOB, None)
    assert kme.status(ALICE, BOB).status_extension is None
    with pytest.raises(ValueError):
        kme.set_alarm(BOB, ALICE, "x")


def test_expire_erases_old_keys() -> None:
    kme = KME("KME_A", key_lifetime=10.0)
    old, new = random_keys(2), random_keys(1)
    kme.supply(ALICE, BOB, old, now=0.0)
    kme.supply(ALICE, BOB, new, now=8.0)
    delivered = kme.enc_keys(ALICE, BOB, KeyRequest(), now=9.0)  # waits for Bob from t=9
    assert kme.expire(now=15.0) == 1  # the other old key
    assert kme.stored_key_count(ALICE, BOB) == 1
    assert kme.expire(now=18.5) == 1  # the key supplied at t=8
    assert kme.stored_key_count(ALICE, BOB) == 0
    assert kme.expire(now=19.5) == 1  # the key delivered to Alice, never fetched by Bob
    with pytest.raises(KMEBadRequestError):
        kme.dec_keys(BOB, ALICE, [delivered.keys[0].key_id])
    assert KME("X").expire(1e9) == 0


def test_constructor_checks() -> None:
    for kwargs in ({"key_size": 0}, {"key_size": 12}, {"max_key_count": 0}):
        with pytest.raises(ValueError):
            KME("K", **kwargs)
    with pytest.raises(ValueError):
        KME("bad id")
    with pytest.raises(ValueError):
        random_keys(1, 7)
    assert "KME_A" in repr(KME("KME_A"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["number", "size", "additional_slave_SAE_IDs", "extension_mandatory"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(JSON, st.sampled_from([ALICE, BOB, EVE]), st.sampled_from(["bob", "alice", "x/y", ""]))
def test_hostile_enc_keys_requests(data: object, caller: SAEId, slave: str) -> None:
    kme, _ = local_kme(40, max_key_per_request=16)
    before = kme.stored_key_count(ALICE, BOB)
    try:
        got = kme.enc_keys(caller, slave, parse_key_request(data))
    except QCallError:
        assert kme.stored_key_count(ALICE, BOB) == before  # failed requests consume nothing
        return
    assert (caller, slave) == (ALICE, "bob")
    assert kme.stored_key_count(ALICE, BOB) == before - len(got.keys)
