"""Policy ``otp`` in the signed handshake (docs/handshake.md §3.2, docs/otp.md).

A one-time-pad call is stated in the caller's signed offer: a callee that does not
accept one refuses at once with ``otp_not_allowed`` (both sides see it), one that does
answers ``otp``; a man in the middle can neither strip nor change the policy.
"""

from __future__ import annotations

from qcall.exceptions import (
    BadSignatureError,
    DowngradeError,
    InvalidMessageError,
    OTPNotAllowedError,
)
from qcall.handshake import CalleeHandshake, HandshakeFailed, State
from qcall.handshake.messages import parse_message
from qcall.handshake.protocol import ANSWER_CONTEXT, OFFER_CONTEXT
from tests.test_handshake_support import (
    ALICE,
    BOB,
    NOW,
    SDP_ANSWER,
    SDP_OFFER,
    Pair,
    Pins,
    make_pair,
    new_qkd_key,
    resign,
    run_handshake,
    serve_qkd,
)


def _offer(pair_policy: str, **callee_kwargs: object) -> tuple[Pair, bytes]:
    pair = make_pair(pair_policy, callee_kwargs={"policy": "hybrid", **callee_kwargs})
    key = new_qkd_key()
    pair.qkd[key.key_id] = key.key
    pair.caller.send_offer(SDP_OFFER, NOW, [key])
    (data,) = pair.caller.data_to_send()
    return pair, data


def test_otp_call_to_a_callee_that_allows_it() -> None:
    accepted = {"policy": "hybrid", "accepted_policies": ["hybrid", "otp"]}
    pair = run_handshake(make_pair("otp", callee_kwargs=accepted))
    assert pair.caller.state is State.ESTABLISHED and pair.callee.state is State.ESTABLISHED
    assert pair.caller.policy == pair.callee.policy == "otp"


def test_otp_call_to_a_callee_that_does_not_allow_it_ends_at_once_on_both_sides() -> None:
    pair, offer = _offer("otp")  # the callee accepts only hybrid (the default)
    assert parse_message(offer).policy == "otp"  # type: ignore[attr-defined]
    pair.callee.receive_data(offer, NOW)
    (ev,) = [e for e in pair.callee.events_received() if isinstance(e, HandshakeFailed)]
    assert isinstance(ev.error, OTPNotAllowedError)
    assert str(ev.error) == "bob does not accept one-time-pad calls"
    (notice,) = pair.callee.data_to_send()
    assert parse_message(notice).code == "otp_not_allowed"  # type: ignore[attr-defined]
    pair.caller.receive_data(notice, NOW)
    (ev,) = [e for e in pair.caller.events_received() if isinstance(e, HandshakeFailed)]
    assert isinstance(ev.error, OTPNotAllowedError) and ev.error.code == "otp_not_allowed"
    assert pair.caller.state is State.FAILED


def test_mitm_cannot_strip_the_otp_policy() -> None:
    pair, offer = _offer("otp")
    # Same length on the wire: refused (by the offer's own checks, else by the signature).
    stripped = offer.replace(b"\x03otp", b"\x03pqc", 1)
    assert stripped != offer
    pair.callee.receive_data(stripped, NOW)
    (ev,) = [e for e in pair.callee.events_received() if isinstance(e, HandshakeFailed)]
    assert isinstance(ev.error, (BadSignatureError, InvalidMessageError))
    assert pair.callee.state is State.FAILED


def test_mitm_resigning_otp_as_hybrid_is_not_alice() -> None:
    pair, offer = _offer("otp", accepted_policies=["hybrid", "otp"])
    forged = resign(offer, BOB, OFFER_CONTEXT, policy="hybrid")  # not alice's key
    pair.callee.receive_data(forged, NOW)
    (ev,) = [e for e in pair.callee.events_received() if isinstance(e, HandshakeFailed)]
    assert isinstance(ev.error, BadSignatureError)


def test_policy_otp_needs_a_qkd_key() -> None:
    callee = CalleeHandshake(BOB, "bob", check_peer=Pins(alice=ALICE.public_bytes()), policy="otp")
    assert callee.policy == "otp"


def test_callee_answering_hybrid_to_an_otp_offer_is_a_downgrade() -> None:
    """Even an authentic callee cannot turn an otp call into a hybrid one."""
    pair, offer = _offer("otp", accepted_policies=["hybrid", "otp"])
    pair.callee.receive_data(offer, NOW)
    serve_qkd(pair)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = pair.callee.data_to_send()
    downgraded = resign(answer, BOB, ANSWER_CONTEXT, offer, policy="hybrid")
    pair.caller.receive_data(downgraded, NOW)
    (ev,) = [e for e in pair.caller.events_received() if isinstance(e, HandshakeFailed)]
    assert isinstance(ev.error, DowngradeError) and "'hybrid'" in str(ev.error)
