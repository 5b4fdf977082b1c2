"""The Sans-I/O handshake: full flows, rekeys, timers and every failure mode."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import pytest

from qcall import pqc
from qcall.exceptions import (
    BadSignatureError,
    DowngradeError,
    HandshakeError,
    HandshakeStateError,
    HandshakeTimeoutError,
    IdentityChangedError,
    InvalidKeyError,
    InvalidMessageError,
    KeyConfirmationError,
    KeyNotFoundError,
    QKDKeyMismatchError,
    ReplayError,
    SecurityPolicyError,
    TranscriptMismatchError,
    UnknownIdentityError,
    UnsupportedVersionError,
)
from qcall.handshake import (
    AnswerReceived,
    BackendKEM,
    CalleeHandshake,
    HandshakeFailed,
    HandshakeProtocol,
    KeyConfirmed,
    KeysDerived,
    OfferReceived,
    QKDKey,
    QKDKeysNeeded,
    RekeyCompleted,
    RekeyDue,
    ReplayCache,
    SRTPProfile,
    State,
)
from qcall.handshake.events import Event
from qcall.handshake.messages import Offer, parse_message
from qcall.handshake.protocol import ANSWER_CONTEXT, OFFER_CONTEXT, wire_code
from tests.test_handshake_support import (
    ALICE,
    BACKEND,
    BOB,
    NOW,
    SDP_ANSWER,
    SDP_OFFER,
    Pair,
    Pins,
    drain,
    events_of,
    make_pair,
    new_qkd_key,
    resign,
    run_handshake,
    serve_qkd,
    transfer,
)

EVE = BACKEND.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, bytes(32))


def keys_of(events: Sequence[object], epoch: int) -> KeysDerived:
    (ev,) = [e for e in events if isinstance(e, KeysDerived) and e.epoch == epoch]
    return ev


def confirmed_of(events: Sequence[object], epoch: int) -> KeyConfirmed:
    (ev,) = [e for e in events if isinstance(e, KeyConfirmed) and e.epoch == epoch]
    return ev


def assert_agree(pair: Pair, epoch: int = 0) -> None:
    a, b = keys_of(pair.caller_events, epoch), keys_of(pair.callee_events, epoch)
    assert a.local_keys == b.remote_keys and a.remote_keys == b.local_keys
    assert a.local_keys != a.remote_keys
    assert a.profile == b.profile
    sas_a = confirmed_of(pair.caller_events, epoch).sas
    assert sas_a == confirmed_of(pair.callee_events, epoch).sas == pair.caller.sas


def state_of(side: HandshakeProtocol) -> State:
    """The side's state, unnarrowed (for mypy: a later method call may change it)."""
    return side.state


def failure(events: Sequence[Event]) -> HandshakeFailed:
    (ev,) = events_of(events, HandshakeFailed)
    return ev


# --- successful handshakes ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["hybrid", "pqc"])
def test_full_handshake(policy: str) -> None:
    pair = run_handshake(make_pair(policy))
    assert pair.caller.state is State.ESTABLISHED and pair.callee.state is State.ESTABLISHED
    assert_agree(pair)
    assert pair.caller.sas == pair.callee.sas and len(pair.caller.sas or "") == 7
    assert [type(e) for e in pair.caller_events] == [AnswerReceived, KeysDerived, KeyConfirmed]
    expected = [OfferReceived, QKDKeysNeeded] if policy == "hybrid" else [OfferReceived]
    assert [type(e) for e in pair.callee_events] == [*expected, KeysDerived, KeyConfirmed]
    offer = events_of(pair.callee_events, OfferReceived)[0]
    assert offer.sdp == SDP_OFFER and offer.policy == policy and offer.peer_name == "alice"
    assert events_of(pair.caller_events, AnswerReceived)[0].sdp == SDP_ANSWER
    assert pair.caller.get_timer() is None and pair.callee.get_timer() is None


def test_qkd_keys_needed_names_route_and_ids() -> None:
    pair = run_handshake(make_pair("hybrid"), qkd_size=64)
    (need,) = events_of(pair.callee_events, QKDKeysNeeded)
    assert need.key_ids == pair.caller.qkd_key_ids and need.key_size == 64
    assert (need.kme_id, need.master_sae_id, need.slave_sae_id) == (
        "KME-Beijing",
        "SAE-alice",
        "SAE-bob",
    )


def test_srtp_profile_negotiation() -> None:
    pair = make_pair("pqc", caller_kwargs={"srtp_profiles": [SRTPProfile.AES128_CM_HMAC_SHA1_80]})
    run_handshake(pair, exporter=os.urandom(60))
    a = keys_of(pair.caller_events, 0)
    assert a.profile is SRTPProfile.AES128_CM_HMAC_SHA1_80
    assert len(a.local_keys.key) == 16 and len(a.local_keys.salt) == 14
    assert_agree(pair)


def test_qkd_keys_may_arrive_after_answer_and_exporter() -> None:
    pair = make_pair("hybrid")
    key = new_qkd_key()
    pair.caller.send_offer(SDP_OFFER, NOW, [key])
    transfer(pair.caller, pair.callee, NOW)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    transfer(pair.callee, pair.caller, NOW)
    exporter = os.urandom(88)
    pair.caller.receive_dtls_exporter(exporter)
    transfer(pair.caller, pair.callee, NOW)  # caller's CONFIRM arrives early: buffered
    pair.callee.receive_dtls_exporter(exporter)
    assert state_of(pair.callee) is State.EXPECT_KEY_MATERIAL
    pair.callee.receive_qkd_keys([QKDKey(key.key_id.upper(), key.key)])
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    assert pair.caller.state is pair.callee.state is State.ESTABLISHED
    assert_agree(pair)


# --- rekey ------------------------------------------------------------------------------------


def rekey(
    pair: Pair, now: float, *, fresh_kem: bool, qkd: bool = True, wrong: bool = False
) -> None:
    keys = []
    if qkd:
        key = new_qkd_key()
        pair.qkd[key.key_id] = key.key
        keys.append(key)
    pair.caller.rekey(now, keys, fresh_kem=fresh_kem)
    transfer(pair.caller, pair.callee, now)
    serve_qkd(pair, wrong=wrong)
    transfer(pair.callee, pair.caller, now)
    transfer(pair.caller, pair.callee, now)
    drain(pair)


def test_rekey_steps_hybrid() -> None:
    pair = run_handshake(make_pair("hybrid"))
    rekey(pair, NOW + 60, fresh_kem=False)
    rekey(pair, NOW + 120, fresh_kem=True)
    rekey(pair, NOW + 180, fresh_kem=False)
    for epoch in (1, 2, 3):
        assert_agree(pair, epoch)
        assert (
            keys_of(pair.caller_events, epoch).local_keys
            != keys_of(pair.caller_events, epoch - 1).local_keys
        )
    assert [e.epoch for e in events_of(pair.caller_events, RekeyCompleted)] == [1, 2, 3]
    assert [e.epoch for e in events_of(pair.callee_events, RekeyCompleted)] == [1, 2, 3]
    assert keys_of(pair.callee_events, 2).kem_fresh and not keys_of(pair.callee_events, 3).kem_fresh
    assert pair.caller.epoch == pair.callee.epoch == 3


def test_rekey_pqc_with_fresh_kem() -> None:
    pair = run_handshake(make_pair("pqc"))
    rekey(pair, NOW + 1, fresh_kem=True, qkd=False)
    assert_agree(pair, 1)
    assert events_of(pair.callee_events, RekeyCompleted)[0].qkd_key_ids == ()


def test_rekey_timer() -> None:
    pair = run_handshake(make_pair("hybrid", caller_kwargs={"rekey_interval": 30.0}))
    assert pair.caller.get_timer() == NOW + 30
    pair.caller.handle_timer(NOW + 29)
    assert pair.caller.events_received() == []
    pair.caller.handle_timer(NOW + 30)
    assert pair.caller.events_received() == [RekeyDue(epoch=1)]
    assert pair.caller.get_timer() is None
    rekey(pair, NOW + 31, fresh_kem=False)
    assert pair.caller.get_timer() == NOW + 61


def test_rekey_qkd_mismatch() -> None:
    pair = run_handshake(make_pair("hybrid"))
    rekey(pair, NOW + 1, fresh_kem=True, wrong=True)
    assert isinstance(failure(pair.caller_events).error, QKDKeyMismatchError)
    assert isinstance(failure(pair.callee_events).error, QKDKeyMismatchError)


def test_rekey_kme_failure_reaches_peer_as_code() -> None:
    pair = run_handshake(make_pair("hybrid"))
    pair.caller.rekey(NOW + 1, [new_qkd_key()])
    transfer(pair.caller, pair.callee, NOW + 1)
    assert events_of(pair.callee.events_received(), QKDKeysNeeded)
    pair.callee.fail(KeyNotFoundError("dec_keys: no such key_ID"))
    transfer(pair.callee, pair.caller, NOW + 1)
    remote = failure(pair.caller.events_received())
    assert remote.remote and remote.error.code == "qkd_unavailable"  # type: ignore[attr-defined]
    assert "dec_keys" not in str(remote.error)  # details stay local


def test_rekey_misuse() -> None:
    pair = run_handshake(make_pair("hybrid"))
    with pytest.raises(SecurityPolicyError):
        pair.caller.rekey(NOW)  # hybrid needs a fresh QKD key
    pair.caller.rekey(NOW, [new_qkd_key()])
    with pytest.raises(HandshakeStateError):
        pair.caller.rekey(NOW, [new_qkd_key()])  # one at a time


def test_rekey_without_qkd_under_hybrid_is_downgrade() -> None:
    pair = run_handshake(make_pair("hybrid"))
    from qcall.handshake.messages import Rekey

    pair.callee.receive_data(Rekey(1, (), 0, b"").serialize(), NOW)
    assert isinstance(failure(pair.callee.events_received()).error, DowngradeError)


# --- every error ---------------------------------------------------------------------------


def offer_bytes(pair: Pair, now: float = NOW) -> bytes:
    keys = [new_qkd_key()] if pair.caller.policy == "hybrid" else []
    for key in keys:
        pair.qkd[key.key_id] = key.key
    pair.caller.send_offer(SDP_OFFER, now, keys)
    (data,) = pair.caller.data_to_send()
    return data


def callee_failure(pair: Pair, data: bytes, now: float = NOW) -> HandshakeFailed:
    pair.callee.receive_data(data, now)
    ev = failure(pair.callee.events_received())
    assert pair.callee.state is State.FAILED
    (notice,) = pair.callee.data_to_send()
    assert parse_message(notice).code == wire_code(ev.error)  # type: ignore[attr-defined]
    return ev


def test_bad_signature_on_offer() -> None:
    pair = make_pair()
    data = bytearray(offer_bytes(pair))
    data[-100] ^= 1
    assert isinstance(callee_failure(pair, bytes(data)).error, BadSignatureError)


def test_signed_sdp_cannot_be_changed() -> None:
    pair = make_pair()
    data = offer_bytes(pair)
    tampered = data.replace(b"AA:BB", b"EE:BB")  # another DTLS fingerprint
    assert isinstance(callee_failure(pair, tampered).error, BadSignatureError)


def test_bad_signature_on_answer() -> None:
    pair = make_pair()

    def flip(data: bytes) -> bytes:
        return data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:]

    run_handshake(pair, mutate_answer=flip)
    assert isinstance(failure(pair.caller_events).error, BadSignatureError)
    assert pair.caller.state is State.FAILED


def test_unknown_identity() -> None:
    pair = make_pair(callee_kwargs={"check_peer": Pins()})
    assert isinstance(callee_failure(pair, offer_bytes(pair)).error, UnknownIdentityError)


def test_changed_identity() -> None:
    pair = make_pair(callee_kwargs={"check_peer": Pins(alice=EVE.public_bytes())})
    ev = callee_failure(pair, offer_bytes(pair))
    assert isinstance(ev.error, IdentityChangedError)


def test_identity_checked_only_after_signature() -> None:
    pins = Pins(alice=ALICE.public_bytes())
    pair = make_pair(callee_kwargs={"check_peer": pins})
    data = bytearray(offer_bytes(pair))
    data[-1] ^= 1
    callee_failure(pair, bytes(data))
    assert pins.calls == []  # a forged offer never reaches the contacts store


def test_answer_from_someone_else() -> None:
    pair = make_pair(
        caller_kwargs={"check_peer": Pins(bob=BOB.public_bytes(), eve=EVE.public_bytes())}
    )
    offer = offer_bytes(pair)
    pair.callee.receive_data(offer, NOW)
    serve_qkd(pair)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = pair.callee.data_to_send()
    forged = resign(answer, EVE, ANSWER_CONTEXT, offer, sender="eve", public_key=EVE.public_bytes())
    pair.caller.receive_data(forged, NOW)
    assert isinstance(failure(pair.caller.events_received()).error, UnknownIdentityError)


def test_replayed_offer_nonce() -> None:
    cache = ReplayCache()
    first = make_pair(callee_kwargs={"replay_cache": cache})
    data = offer_bytes(first)
    first.callee.receive_data(data, NOW)
    assert events_of(first.callee.events_received(), OfferReceived)
    second = CalleeHandshake(
        BOB, "bob", check_peer=Pins(alice=ALICE.public_bytes()), replay_cache=cache
    )
    second.receive_data(data, NOW + 1)
    ev = failure(second.events_received())
    assert isinstance(ev.error, ReplayError) and "already seen" in str(ev.error)
    # the first session is unaffected
    assert first.callee.state is State.CALLEE_EXPECT_ANSWER_SDP


@pytest.mark.parametrize("skew", [-61.0, 61.0])
def test_offer_outside_time_window(skew: float) -> None:
    pair = make_pair()
    ev = callee_failure(pair, offer_bytes(pair, NOW + skew), now=NOW)
    assert isinstance(ev.error, ReplayError) and "window" in str(ev.error)


def test_replay_cache_is_bounded_and_safe() -> None:
    cache = ReplayCache(window=60, max_entries=3)
    for i in range(5):
        cache.check(bytes([i]), 100.0 + i, 100.0 + i)
        cache.add(bytes([i]), 100.0 + i, 100.0 + i)
    assert len(cache) == 3
    with pytest.raises(ReplayError, match="horizon"):
        cache.check(bytes([0]), 100.0, 105.0)  # evicted, but still refused
    with pytest.raises(ReplayError, match="already seen"):
        cache.check(bytes([4]), 104.0, 105.0)
    cache.check(bytes([9]), 106.0, 106.0)  # fresh offers still pass
    cache.add(bytes([9]), 106.0, 300.0)
    assert len(cache) == 1  # old entries expired


def test_downgraded_answer_policy() -> None:
    pair = make_pair("hybrid")
    offer = offer_bytes(pair)
    pair.callee.receive_data(offer, NOW)
    serve_qkd(pair)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = pair.callee.data_to_send()
    downgraded = resign(answer, BOB, ANSWER_CONTEXT, offer, policy="pqc")
    pair.caller.receive_data(downgraded, NOW)
    ev = failure(pair.caller.events_received())
    assert isinstance(ev.error, DowngradeError) and "'pqc'" in str(ev.error)


def test_callee_refuses_pqc_when_requiring_hybrid() -> None:
    pair = make_pair("pqc")
    pair.callee = CalleeHandshake(BOB, "bob", check_peer=Pins(alice=ALICE.public_bytes()))
    assert isinstance(callee_failure(pair, offer_bytes(pair)).error, DowngradeError)


def test_callee_may_accept_both_policies() -> None:
    pair = make_pair(
        "pqc", callee_kwargs={"accepted_policies": ["hybrid", "pqc"], "policy": "hybrid"}
    )
    run_handshake(pair)
    assert pair.callee.state is State.ESTABLISHED and pair.callee.policy == "pqc"


def test_policy_is_signed() -> None:
    pair = make_pair("hybrid", callee_kwargs={"accepted_policies": ["hybrid", "pqc"]})
    data = offer_bytes(pair).replace(b"hybrid", b"pqc\0\0\0", 1)
    assert isinstance(callee_failure(pair, data).error, InvalidMessageError)


class TamperingKEM(BackendKEM):
    """A faulty callee KEM: encapsulates, then corrupts the ciphertext it returns."""

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        shared, ct = super().encapsulate(public_key)
        return shared, bytes([ct[0] ^ 1]) + ct[1:]


def test_tampered_kem_ciphertext_caught_by_key_confirmation() -> None:
    pair = run_handshake(make_pair("hybrid", callee_kwargs={"kem": TamperingKEM()}))
    for events in (pair.caller_events, pair.callee_events):
        err = failure(events).error
        assert type(err) is KeyConfirmationError  # not a QKD problem
    assert keys_of(pair.caller_events, 0).local_keys != keys_of(pair.callee_events, 0).remote_keys


def test_first_contact_mitm_is_reported_as_an_altered_handshake_not_a_kme_fault() -> None:
    # Mallory sits on the signaling path at first contact: each side pins her key
    # under the other's name. She re-signs the offer and the answer with it and
    # relays everything else unchanged, so the QKD keys, the ML-KEM secret and the
    # DTLS exporter are equal on both sides, and only the transcripts differ. The
    # confirmation fails; the cause named must be the altered handshake (version 1
    # said "the QKD key differs between the two KMEs" on both sides).
    pair = make_pair(
        "hybrid",
        caller_kwargs={"check_peer": Pins(bob=EVE.public_bytes())},
        callee_kwargs={"check_peer": Pins(alice=EVE.public_bytes())},
    )
    key = new_qkd_key()
    pair.qkd[key.key_id] = key.key
    pair.caller.send_offer(SDP_OFFER, NOW, [key])
    (offer,) = pair.caller.data_to_send()
    forged_offer = resign(offer, EVE, OFFER_CONTEXT, public_key=EVE.public_bytes())
    pair.callee.receive_data(forged_offer, NOW)
    serve_qkd(pair)  # the same key_ID: bob's KME gives bob the same QKD key
    pair.callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = pair.callee.data_to_send()
    forged_answer = resign(answer, EVE, ANSWER_CONTEXT, offer, public_key=EVE.public_bytes())
    pair.caller.receive_data(forged_answer, NOW)
    exporter = os.urandom(88)
    pair.caller.receive_dtls_exporter(exporter)
    pair.callee.receive_dtls_exporter(exporter)
    transfer(pair.caller, pair.callee, NOW)
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    for events in (pair.caller_events, pair.callee_events):
        error = failure(events).error
        assert isinstance(error, TranscriptMismatchError), error
        assert not isinstance(error, QKDKeyMismatchError)
        assert "altered in transit" in str(error) and "QKD keys are not the cause" in str(error)
        assert error.code == "transcript_mismatch"


def test_mismatched_qkd_key_caught_by_key_confirmation() -> None:
    pair = run_handshake(make_pair("hybrid"), wrong_qkd=True)
    for events in (pair.caller_events, pair.callee_events):
        err = failure(events).error
        assert isinstance(err, QKDKeyMismatchError) and pair.caller.qkd_key_ids[0] in str(err)


def test_mismatched_dtls_exporter() -> None:
    pair = make_pair("pqc")
    offer = offer_bytes(pair)
    pair.callee.receive_data(offer, NOW)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    transfer(pair.callee, pair.caller, NOW)
    pair.caller.receive_dtls_exporter(os.urandom(88))
    pair.callee.receive_dtls_exporter(os.urandom(88))
    transfer(pair.caller, pair.callee, NOW)
    assert type(failure(pair.callee.events_received()).error) is KeyConfirmationError


def test_wrong_qkd_key_size_from_kme() -> None:
    pair = make_pair("hybrid")
    pair.callee.receive_data(offer_bytes(pair), NOW)
    (need,) = events_of(pair.callee.events_received(), QKDKeysNeeded)
    pair.callee.receive_qkd_keys([QKDKey(need.key_ids[0], b"x" * 16)])
    assert isinstance(failure(pair.callee.events_received()).error, QKDKeyMismatchError)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidMessageError),
        (b"garbage", InvalidMessageError),
        (b"QCHS\x01\x01", UnsupportedVersionError),  # version 1 (before the SAS commitment)
        (b"QCHS\x03\x01", UnsupportedVersionError),
        (b"QCHS\x02\x09", InvalidMessageError),
        (b"QCHS\x02\x01" + b"\x01\xff\xff" + b"x" * 65535, InvalidMessageError),
    ],
)
def test_malformed_input(data: bytes, error: type[HandshakeError]) -> None:
    pair = make_pair()
    assert isinstance(callee_failure(pair, data).error, error)


def test_oversized_field_is_named() -> None:
    pair = make_pair("pqc")
    offer = parse_message(offer_bytes(pair))
    assert isinstance(offer, Offer)
    data = replace(offer, sdp="a" * 40_000)
    with pytest.raises(InvalidMessageError, match="'sdp'"):
        data.serialize()


def test_remote_error_propagates_as_same_class() -> None:
    pair = make_pair(callee_kwargs={"check_peer": Pins()})
    pair.callee.receive_data(offer_bytes(pair), NOW)
    transfer(pair.callee, pair.caller, NOW)
    ev = failure(pair.caller.events_received())
    assert ev.remote and ev.error.code == "identity_rejected"  # type: ignore[attr-defined]
    assert pair.caller.data_to_send() == []  # no error ping-pong


def test_messages_in_wrong_state_fail_session() -> None:
    pair = run_handshake(make_pair("pqc"))
    pair.callee.receive_data(pair.caller._offer_bytes, NOW)
    assert isinstance(failure(pair.callee.events_received()).error, HandshakeStateError)
    pair.callee.receive_data(b"anything", NOW)  # ignored after failure
    assert pair.callee.events_received() == []


def test_reflected_confirm_is_rejected() -> None:
    pair = make_pair("pqc")
    pair.callee.receive_data(offer_bytes(pair), NOW)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    pair.callee.data_to_send()
    pair.callee.receive_dtls_exporter(os.urandom(88))
    (confirm,) = pair.callee.data_to_send()
    pair.callee.events_received()
    pair.callee.receive_data(confirm, NOW)
    assert isinstance(failure(pair.callee.events_received()).error, InvalidMessageError)


def test_api_misuse_raises() -> None:
    pair = make_pair("hybrid")
    with pytest.raises(SecurityPolicyError):
        pair.caller.send_offer(SDP_OFFER, NOW)  # hybrid without a QKD key
    with pytest.raises(HandshakeStateError):
        pair.callee.send_answer(SDP_ANSWER, NOW)
    with pytest.raises(HandshakeStateError):
        pair.callee.receive_qkd_keys([])
    with pytest.raises(HandshakeStateError):
        pair.caller.receive_dtls_exporter(os.urandom(88))
    run_handshake(pair)
    with pytest.raises(HandshakeStateError):
        pair.caller.send_offer(SDP_OFFER, NOW, [new_qkd_key()])
    pqc_pair = make_pair("pqc")
    with pytest.raises(SecurityPolicyError):
        pqc_pair.caller.send_offer(SDP_OFFER, NOW, [new_qkd_key()])
    pqc_pair.caller.send_offer(SDP_OFFER, NOW)
    transfer(pqc_pair.caller, pqc_pair.callee, NOW)
    pqc_pair.callee.send_answer(SDP_ANSWER, NOW)
    with pytest.raises(InvalidKeyError):
        pqc_pair.callee.receive_dtls_exporter(b"short")


def test_handshake_timeout() -> None:
    pair = make_pair("pqc")
    offer_bytes(pair)
    assert pair.caller.get_timer() == NOW + 30
    pair.caller.handle_timer(NOW + 10)
    assert pair.caller.events_received() == []
    pair.caller.handle_timer(NOW + 30)
    assert isinstance(failure(pair.caller.events_received()).error, HandshakeTimeoutError)


def test_rekey_timeout() -> None:
    pair = run_handshake(make_pair("pqc"))
    pair.caller.rekey(NOW + 5, fresh_kem=True)
    assert pair.caller.get_timer() == NOW + 35
    pair.caller.handle_timer(NOW + 35)
    ev = failure(pair.caller.events_received())
    assert isinstance(ev.error, HandshakeTimeoutError) and "rekey" in str(ev.error)


def test_offer_to_someone_else() -> None:
    pair = make_pair()
    pair.callee.name = "carol"
    ev = callee_failure(pair, offer_bytes(pair))
    assert isinstance(ev.error, InvalidMessageError) and "recipient" in str(ev.error)


def test_offer_resigned_with_wrong_context_fails() -> None:
    pair = make_pair("pqc")
    data = resign(offer_bytes(pair), ALICE, ANSWER_CONTEXT)  # domain separation
    assert isinstance(callee_failure(pair, data).error, BadSignatureError)
    good = make_pair("pqc")
    data = resign(offer_bytes(good), ALICE, OFFER_CONTEXT)
    good.callee.receive_data(data, NOW)
    assert events_of(good.callee.events_received(), OfferReceived)


# --- more hostile inputs --------------------------------------------------------------------


def test_offer_with_other_kem_is_refused() -> None:
    pair = make_pair("pqc", caller_kwargs={"kem": BackendKEM(pqc.KEM.ML_KEM_1024)})
    ev = callee_failure(pair, offer_bytes(pair))
    assert isinstance(ev.error, InvalidMessageError) and "kem_alg" in str(ev.error)


def test_no_common_srtp_profile() -> None:
    pair = make_pair(
        "pqc",
        caller_kwargs={"srtp_profiles": [SRTPProfile.AES128_CM_HMAC_SHA1_80]},
        callee_kwargs={"srtp_profiles": [SRTPProfile.AEAD_AES_256_GCM]},
    )
    ev = callee_failure(pair, offer_bytes(pair))
    assert isinstance(ev.error, InvalidMessageError) and "srtp_profiles" in str(ev.error)


def test_invalid_encapsulation_key_is_refused() -> None:
    pair = make_pair("pqc")
    offer = offer_bytes(pair)
    # FIPS 203 §7.2 input check: coefficients ≥ q make ek invalid (right length, bad value)
    data = resign(offer, ALICE, OFFER_CONTEXT, kem_ek=b"\xff" * 1184)
    ev = callee_failure(pair, data)
    assert isinstance(ev.error, InvalidMessageError) and "kem_ek" in str(ev.error)


def test_qkd_keys_with_other_ids_fail() -> None:
    pair = make_pair("hybrid")
    pair.callee.receive_data(offer_bytes(pair), NOW)
    pair.callee.events_received()
    pair.callee.receive_qkd_keys([new_qkd_key()])
    ev = failure(pair.callee.events_received())
    assert isinstance(ev.error, QKDKeyMismatchError) and "announced" in str(ev.error)


def test_duplicate_confirm_fails() -> None:
    pair = make_pair("pqc")
    pair.callee.receive_data(offer_bytes(pair), NOW)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    transfer(pair.callee, pair.caller, NOW)
    pair.caller.receive_dtls_exporter(os.urandom(88))
    (confirm,) = pair.caller.data_to_send()
    pair.callee.receive_data(confirm, NOW)  # buffered: no exporter yet
    pair.callee.receive_data(confirm, NOW)
    ev = failure(pair.callee.events_received())
    assert isinstance(ev.error, HandshakeStateError) and "duplicate" in str(ev.error)


def test_rekey_for_wrong_epoch() -> None:
    from qcall.handshake.messages import Rekey

    pair = run_handshake(make_pair("pqc"))
    pair.callee.receive_data(Rekey(2, (), 0, b"").serialize(), NOW)
    ev = failure(pair.callee.events_received())
    assert isinstance(ev.error, HandshakeStateError) and "expected 1" in str(ev.error)


def test_rekey_ack_mismatches() -> None:
    from qcall.handshake.messages import RekeyAck

    pair = run_handshake(make_pair("pqc"))
    pair.caller.rekey(NOW, fresh_kem=False)
    pair.caller.receive_data(RekeyAck(1, b"c" * 1088).serialize(), NOW)
    ev = failure(pair.caller.events_received())
    assert isinstance(ev.error, InvalidMessageError) and "kem_ct" in str(ev.error)
    pair = run_handshake(make_pair("pqc"))
    pair.caller.rekey(NOW, fresh_kem=True)
    pair.caller.receive_data(RekeyAck(5, b"").serialize(), NOW)
    assert isinstance(failure(pair.caller.events_received()).error, HandshakeStateError)


def test_callee_never_initiates_rekey() -> None:
    pair = run_handshake(make_pair("pqc"))
    assert not hasattr(pair.callee, "rekey")
    from qcall.handshake.messages import Rekey

    pair.caller.receive_data(Rekey(1, (), 0, b"").serialize(), NOW)
    assert isinstance(failure(pair.caller.events_received()).error, HandshakeStateError)


def test_forged_downgrade_is_a_bad_signature() -> None:
    pair = make_pair("hybrid")
    offer = offer_bytes(pair)
    pair.callee.receive_data(offer, NOW)
    serve_qkd(pair)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = pair.callee.data_to_send()
    forged = replace(parse_message(answer), policy="pqc").serialize()  # type: ignore[type-var]
    pair.caller.receive_data(forged, NOW)
    assert isinstance(failure(pair.caller.events_received()).error, BadSignatureError)


@pytest.mark.parametrize("policy", ["hybrid", "pqc"])
def test_every_rekey_runs_a_fresh_ml_kem_exchange_by_default(policy: str) -> None:
    # Post-compromise security by default, for every policy: a pqc rekey used to be a
    # pure hash ratchet unless the caller asked (fresh_kem_on_rekey=False).
    from qcall.call.status import CallOptions
    from qcall.handshake.messages import Rekey

    assert CallOptions().fresh_kem_on_rekey is True
    pair = run_handshake(make_pair(policy))
    keys = []
    if policy == "hybrid":
        key = new_qkd_key()
        pair.qkd[key.key_id] = key.key
        keys.append(key)
    pair.caller.rekey(NOW + 1, keys)  # no fresh_kem argument: the default
    (data,) = pair.caller.data_to_send()
    rekey = parse_message(data)
    assert isinstance(rekey, Rekey) and len(rekey.kem_ek) == 1184
    pair.callee.receive_data(data, NOW + 1)
    serve_qkd(pair)
    transfer(pair.callee, pair.caller, NOW + 1)
    transfer(pair.caller, pair.callee, NOW + 1)
    drain(pair)
    derived = [e for e in pair.caller_events if isinstance(e, KeysDerived) and e.epoch == 1]
    assert derived and derived[0].kem_fresh
    assert pair.caller.epoch == pair.callee.epoch == 1
