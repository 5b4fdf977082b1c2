"""Attacks on real calls: a malicious signaling server, replays, downgrades, garbage, key theft.

Each test builds the lab of ``tests/test_call_session.py`` (two mTLS ETSI 014
KMEs sharing relayed keys, real :class:`~qcall.call.phone.Phone` objects over
loopback) but with :class:`tests.malicious_signaling.MaliciousSignalingServer`
in place of the honest server: the real signaling protocol, rewriting the
offer/answer payloads it relays. Every call it touches must be refused with a
clear error, and none may connect (no audio arrives). The threat model behind
each test is ``docs/threat-model.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qcall import pqc
from qcall.call import session_sdp
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.exceptions import (
    BadSignatureError,
    CallError,
    DowngradeError,
    IdentityChangedError,
    InvalidMessageError,
    KMEBadRequestError,
    KMEUnauthorizedError,
    QCallError,
    QKDKeyMismatchError,
    ReplayError,
    TranscriptMismatchError,
    UnknownIdentityError,
    UnsupportedVersionError,
)
from qcall.handshake.messages import Answer, Offer
from qcall.identity import Identity
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.pki import create_pki, server_ssl_context
from qcall.qkd.server import KMEServer
from tests.malicious_signaling import (
    MaliciousProtocol,
    MaliciousSignalingServer,
    Recorder,
    Rewrite,
    replace_fields,
    resign_answer,
    resign_offer,
    set_field,
)
from tests.test_call_session import Lab, connect
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow

MALLORY = Identity.generate("mallory")  # the server operator's own ML-DSA identity
_FINGERPRINT = re.compile(r"a=fingerprint:sha-256 [0-9A-F:]+")


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    """The call lab, served by a malicious signaling server (``lab.server``)."""
    pki = create_pki(
        tmp_path / "pki", ["KME-Beijing", "KME-Hefei"], ["alice", "bob", "carol", "mallory"]
    )
    now = time.time()
    kmes = {"alice": KME("KME-Beijing"), "bob": KME("KME-Hefei")}
    kmes["bob"].add_sae("carol")  # another user of bob's site: attached, no pool with alice
    for master, slave in (("alice", "bob"), ("bob", "alice")):
        keys = random_keys(16)
        kmes[master].supply(master, slave, keys, role="master", peer_kme_id="x", now=now)
        kmes[slave].supply(master, slave, keys, role="slave", peer_kme_id="x", now=now)
    server = MaliciousSignalingServer()
    await server.start("127.0.0.1", 0)
    async with contextlib.AsyncExitStack() as stack:
        urls = {}
        for sae, kme in kmes.items():
            node = pki.kmes[kme.kme_id]
            ctx = server_ssl_context(node.cert, node.key, pki.ca_cert)
            urls[sae] = (await stack.enter_async_context(KMEServer(kme, "127.0.0.1", 0, ctx))).url
        lab = Lab(tmp_path, f"ws://127.0.0.1:{server.port}", urls, pki)
        lab.server = server.protocol  # type: ignore[attr-defined]
        try:
            yield lab
        finally:
            for phone in lab.phones:
                await phone.close()
            for recorder in lab.recorders:
                await recorder.stop()
            await server.close()


def attacker(lab: Lab) -> MaliciousProtocol:
    server = lab.server  # type: ignore[attr-defined]
    assert isinstance(server, MaliciousProtocol)
    return server


async def refused(
    lab: Lab, alice: Phone, bob: Phone, callee_error: type[QCallError], match: str | None = None
) -> tuple[QCallError, QCallError]:
    """Place a call that must fail on both sides; return (caller's, callee's) errors."""
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(QCallError) as at_caller:
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(callee_error, match=match) as at_callee:
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls and not bob.calls  # nothing left: no call connected
    for recorder in lab.recorders:
        assert recorder.arrivals == []  # not a single audio frame
    return at_caller.value, at_callee.value


async def phones(
    lab: Lab, *, pin: bool = True, record: bool = True, early_offer: bool = True
) -> tuple[Phone, Phone]:
    """alice (tone) and bob (records one call), each with the other's identity pinned.

    ``early_offer=False``: alice calls in the earlier flow (the offer after the accept).
    """
    options = CallOptions(rekey_interval=None, early_offer=early_offer)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", record=record)
    if pin:
        lab.contacts("alice").pin("bob", lab.identities["bob"].public_key, verified=True)
        lab.contacts("bob").pin("alice", lab.identities["alice"].public_key, verified=True)
    return alice, bob


def mallory_kem_key() -> bytes:
    return pqc.get_backend().kem_generate(pqc.KEM.ML_KEM_768).public_bytes()


def mallory_fingerprint(sdp: str) -> str:
    """The SDP with mallory's DTLS certificate fingerprint in place of the peer's."""
    fake = ":".join(f"{b:02X}" for b in os.urandom(32))
    return _FINGERPRINT.sub(f"a=fingerprint:sha-256 {fake}", sdp)


# --- a malicious signaling server swaps signed fields ------------------------------------

OFFER_SWAPS: dict[str, Rewrite] = {
    "ML-KEM encapsulation key": replace_fields(kem_ek=lambda _: mallory_kem_key()),
    "DTLS fingerprint in the SDP": replace_fields(sdp=mallory_fingerprint),
    "QKD key_IDs": replace_fields(qkd_key_ids=lambda _: (str(uuid.uuid4()),)),
    "QKD KME and SAE IDs": replace_fields(kme_id="KME-Mallory", master_sae_id="mallory"),
    "SRTP profiles": replace_fields(srtp_profiles=("AES128_CM_HMAC_SHA1_80",)),
    "timestamp": replace_fields(timestamp_ms=lambda t: t + 1000),
}


@pytest.mark.parametrize("swap", list(OFFER_SWAPS))
async def test_server_swapping_an_offer_field_is_refused(lab: Lab, swap: str) -> None:
    alice, bob = await phones(lab)
    attacker(lab).rewrite_offer = OFFER_SWAPS[swap]
    at_alice, at_bob = await refused(lab, alice, bob, BadSignatureError, "alice")
    assert "does not verify" in str(at_bob)
    assert "bad_signature" in str(at_alice)
    assert attacker(lab).rewritten == 1


ANSWER_SWAPS: dict[str, Rewrite] = {
    "ML-KEM ciphertext": replace_fields(kem_ct=lambda ct: os.urandom(len(ct))),
    "DTLS fingerprint in the SDP": replace_fields(sdp=mallory_fingerprint),
    "policy hybrid -> pqc": replace_fields(policy="pqc"),
    "SRTP profile": replace_fields(srtp_profile="AES128_CM_HMAC_SHA1_80"),
}


@pytest.mark.parametrize("swap", list(ANSWER_SWAPS))
async def test_server_swapping_an_answer_field_is_refused(lab: Lab, swap: str) -> None:
    alice, bob = await phones(lab)
    attacker(lab).rewrite_answer = ANSWER_SWAPS[swap]
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(BadSignatureError, match="answer signature of 'bob'"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError, match="bad_signature"):
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls and lab.recorders[0].arrivals == []


PQC_OFFER = replace_fields(
    policy="pqc", qkd_key_ids=(), qkd_key_size=0, kme_id="", master_sae_id="", slave_sae_id=""
)


async def test_server_downgrading_the_offer_policy_is_refused(lab: Lab) -> None:
    alice, bob = await phones(lab)
    attacker(lab).rewrite_offer = PQC_OFFER  # hybrid -> pqc, QKD fields emptied
    # A callee that requires hybrid refuses the policy itself ...
    at_alice, _ = await refused(lab, alice, bob, DowngradeError, "pqc")
    assert "downgrade" in str(at_alice)
    # ... and one that would accept pqc finds alice's signature broken.
    bob.options = CallOptions(rekey_interval=None, allow_pqc_only=True)
    await refused(lab, alice, bob, BadSignatureError, "alice")


async def test_server_resigning_the_offer_with_its_own_identity(lab: Lab) -> None:
    alice, bob = await phones(lab)
    # A full man in the middle: mallory's ML-KEM key and DTLS certificate, signed
    # by mallory's ML-DSA key under alice's name. The signature verifies; bob's
    # pinned contact does not match.
    attacker(lab).rewrite_offer = resign_offer(
        MALLORY.signing_key, kem_ek=mallory_kem_key(), sdp=mallory_fingerprint
    )
    at_alice, _ = await refused(lab, alice, bob, IdentityChangedError, "alice")
    assert "identity_rejected" in str(at_alice)


@pytest.mark.parametrize("early", [True, False], ids=["invite-accept", "earlier-flow"])
@pytest.mark.parametrize("direction", ["offer", "answer", "both"])
async def test_server_tampering_with_the_sdp_sent_ahead_is_refused(
    lab: Lab, direction: str, early: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each side sends its SDP ahead of its signed message — in the invite and the
    # accept, or (earlier flow: the offer after the accept) in ice messages — and
    # ICE (then DTLS) starts on it. The server swaps in mallory's DTLS fingerprint
    # there and relays the signed messages untouched: the side that receives a
    # signed SDP unlike the one it applied refuses the call, before any key exists.
    # (Earlier flow: an offer signed before the pick-up — after RING_HEADSTART of
    # ringing — goes without an SDP ahead; on a loaded machine bob's accept can
    # take longer than that, so the head start is made long here.)
    monkeypatch.setattr(session_sdp, "RING_HEADSTART", 5.0)
    alice, bob = await phones(lab, early_offer=early)

    def tamper(sdp: str) -> str:
        kind = "answer" if re.search(r"a=setup:(active|passive)", sdp) else "offer"
        return mallory_fingerprint(sdp) if direction in (kind, "both") else sdp

    attacker(lab).rewrite_sdp_ahead = tamper
    at_alice, at_bob = await refused(lab, alice, bob, QCallError)
    detected = at_bob if direction in ("offer", "both") else at_alice
    assert isinstance(detected, InvalidMessageError), detected
    assert "differs from the SDP sent ahead" in str(detected)
    assert attacker(lab).rewritten >= 1


async def test_server_resigning_the_answer_with_its_own_identity(lab: Lab) -> None:
    alice, bob = await phones(lab)
    attacker(lab).rewrite_answer = resign_answer(
        MALLORY.signing_key, kem_ct=lambda ct: os.urandom(len(ct)), sdp=mallory_fingerprint
    )
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(IdentityChangedError, match="bob"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError, match="identity_rejected"):
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls and lab.recorders[0].arrivals == []


async def test_first_contact_forgery_fails_but_leaves_an_unverified_pin(lab: Lab) -> None:
    """Trust on first use: what a malicious server can and cannot do to strangers.

    bob has never seen alice. The server re-signs alice's offer with its own key:
    bob's TOFU store pins that key as alice (unverified, with a warning), but the
    call still fails: bob's answer signs the transcript of the forged offer,
    which alice never sent. The pin is the documented TOFU limit
    (``docs/threat-model.md``): the next genuine call from alice is refused
    loudly until bob compares fingerprints or the SAS and re-pins.
    """
    alice, bob = await phones(lab, pin=False)
    attacker(lab).rewrite_offer = resign_offer(MALLORY.signing_key)
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(BadSignatureError, match="answer signature of 'bob'"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError, match="bad_signature"):
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls and lab.recorders[0].arrivals == []
    pinned = lab.contacts("bob").get("alice")
    assert pinned is not None and not pinned.verified
    assert pinned.public_key == MALLORY.public_key  # the forger's key, unverified
    attacker(lab).honest()
    await refused(lab, alice, bob, IdentityChangedError, "alice")


async def test_first_contact_man_in_the_middle_is_not_blamed_on_the_kmes(lab: Lab) -> None:
    """A man in the middle at first contact is reported as such, not as a KME fault.

    Neither phone has seen the other. The server re-signs alice's offer and bob's
    answer with its own key and relays everything else: both sides pin mallory's
    key (TOFU), the QKD key, ML-KEM secret and DTLS exporter are equal, and only the
    transcripts differ. Each side must say the handshake was altered in transit;
    version 1 told both users that the QKD key differed between the two KMEs.
    """
    alice, bob = await phones(lab, pin=False)
    attacker(lab).rewrite_offer = resign_offer(MALLORY.signing_key)
    attacker(lab).rewrite_answer = resign_answer(MALLORY.signing_key)
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(TranscriptMismatchError, match="altered in transit") as at_alice:
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    assert not isinstance(at_alice.value, QKDKeyMismatchError)
    with pytest.raises(TranscriptMismatchError, match="altered in transit"):
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls


async def test_server_claiming_another_sender_name(lab: Lab) -> None:
    # Re-signed by mallory under her own name, while the server tells bob that
    # alice is calling: the name bob sees must be the name the offer proves.
    alice, bob = await phones(lab)
    attacker(lab).rewrite_offer = resign_offer(MALLORY.signing_key, sender="mallory")
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(QCallError, match="identity_rejected"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(UnknownIdentityError, match="'mallory', not from 'alice'"):
        await asyncio.wait_for(incoming, 5 * T)
    assert lab.contacts("bob").get("mallory") is None  # refused before any pinning
    assert not alice.calls and lab.recorders[0].arrivals == []


# --- replay and downgrade ----------------------------------------------------------------


async def test_replayed_offer_is_refused(lab: Lab) -> None:
    alice, bob = await phones(lab)
    recorder = Recorder()
    attacker(lab).rewrite_offer = recorder.record  # passive: the first call goes through
    caller, callee = await connect(alice, bob)
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    assert len(recorder.offers) == 1
    # bob's recorder heard the first call if its audio began before the hang-up:
    # only the refused call below must add nothing.
    lab.recorders[0].arrivals.clear()

    # A new call (new call_id): the server hands bob alice's recorded offer.
    attacker(lab).rewrite_offer = recorder.replay
    _, at_bob = await refused(lab, alice, bob, ReplayError)
    assert "nonce" in str(at_bob) or "seen" in str(at_bob), at_bob

    # Bob restarted (his replay cache is empty): the offer's signature and
    # timestamp are fine, but its QKD key was consumed by the first call.
    lab.phones.remove(bob)
    await bob.close()
    bob2 = await lab.phone("bob")
    await refused(lab, alice, bob2, KMEBadRequestError, "key_ID not found")


async def test_replayed_answer_is_refused(lab: Lab) -> None:
    alice, bob = await phones(lab, record=False)
    recorder = Recorder()
    attacker(lab).rewrite_answer = recorder.record
    caller, callee = await connect(alice, bob)
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    # Bob's genuine, signed answer of the first call, handed to alice in a new call.
    attacker(lab).rewrite_answer = recorder.replay
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(InvalidMessageError, match="offer_nonce"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError, match="invalid_message"):
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls


async def test_downgrade_by_cutting_the_kme_is_refused_by_a_hybrid_callee(lab: Lab) -> None:
    # The attacker blocks alice's KME; alice allows an ML-KEM-only call and
    # offers, genuinely signed, policy pqc. Bob requires hybrid: refused, loudly.
    allow = CallOptions(rekey_interval=None, allow_pqc_only=True)
    dead = lab.key_source("alice", "https://127.0.0.1:9")
    alice = await lab.phone("alice", tone=440, options=allow, key_source=dead)
    bob = await lab.phone("bob", record=True)
    await refused(lab, alice, bob, DowngradeError, "pqc")


# --- garbage and oversized handshake fields ------------------------------------------------

def _offer(name: str, value: bytes) -> Rewrite:
    """Put raw ``value`` into the OFFER field ``name`` (its tag from the schema)."""
    return set_field(Offer.SCHEMA[name].tag, value)


GARBAGE: dict[str, tuple[Rewrite, type[QCallError], str]] = {
    "random bytes": (lambda d, r: os.urandom(len(d)), InvalidMessageError, ""),
    "truncated": (lambda d, r: d[:200], InvalidMessageError, ""),
    "trailing bytes": (lambda d, r: d + b"\x00", InvalidMessageError, ""),
    "version 1": (lambda d, r: d[:4] + b"\x01" + d[5:], UnsupportedVersionError, ""),
    "version 3": (lambda d, r: d[:4] + b"\x03" + d[5:], UnsupportedVersionError, ""),
    "oversized public_key": (
        _offer("public_key", os.urandom(2593)), InvalidMessageError, "public_key"
    ),
    "oversized signature": (
        _offer("signature", os.urandom(4628)), InvalidMessageError, "signature"
    ),
    "oversized sender": (_offer("sender", b"a" * 65), InvalidMessageError, "sender"),
    "oversized kem_ek": (_offer("kem_ek", os.urandom(1569)), InvalidMessageError, "kem_ek"),
    "short nonce": (_offer("nonce", b"n" * 31), InvalidMessageError, "nonce"),
    "short sas_commit": (_offer("sas_commit", b"c" * 47), InvalidMessageError, "sas_commit"),
    "bad sender": (_offer("sender", b"al\x00ce"), InvalidMessageError, "sender"),
    "not base64": (lambda d, r: "%%% not base64 %%%", CallError, "base64"),
    "an answer instead": (lambda d, r: d[:5] + b"\x02" + d[6:], InvalidMessageError, ""),
}


async def test_garbage_offers_are_refused_and_the_phone_keeps_working(lab: Lab) -> None:
    alice, bob = await phones(lab)
    for name, (rewrite, error, field) in GARBAGE.items():
        attacker(lab).rewrite_offer = rewrite
        _, at_bob = await refused(lab, alice, bob, error)
        assert field in str(at_bob), (name, at_bob)
        await asyncio.sleep(0.2)  # stay under the server's rate limit (20 messages/s)
    # The same phones, the next honest call: connected, hybrid, audio flows.
    attacker(lab).honest()
    caller, callee = await connect(alice, bob)
    assert caller.status.policy == callee.status.policy == "hybrid"
    await asyncio.sleep(0.5)
    assert lab.recorders[0].arrivals
    await caller.hangup()


ANSWER_GARBAGE: dict[str, Rewrite] = {
    "random bytes": GARBAGE["random bytes"][0],
    "truncated": GARBAGE["truncated"][0],
    "oversized public_key": set_field(Answer.SCHEMA["public_key"].tag, os.urandom(2593)),
    "short offer_nonce": set_field(Answer.SCHEMA["offer_nonce"].tag, b"n" * 31),
    "not base64": GARBAGE["not base64"][0],
}


async def test_garbage_answers_are_refused_and_the_phone_keeps_working(lab: Lab) -> None:
    alice, bob = await phones(lab, record=False)
    for name, rewrite in ANSWER_GARBAGE.items():
        attacker(lab).rewrite_answer = rewrite
        incoming = asyncio.ensure_future(bob.incoming())
        with pytest.raises((InvalidMessageError, CallError)) as at_alice:
            await asyncio.wait_for(alice.call("bob"), 10 * T)
        assert isinstance(at_alice.value, InvalidMessageError) or "base64" in str(at_alice.value)
        with pytest.raises(QCallError):
            await asyncio.wait_for(incoming, 5 * T)
        assert not alice.calls, name
    attacker(lab).honest()
    caller, callee = await connect(alice, bob)
    assert caller.status.state.name == callee.status.state.name == "ACTIVE"
    await caller.hangup()


# --- an SAE asking a KME for another pair's keys ------------------------------------------


async def test_sae_cannot_get_another_pairs_keys(lab: Lab) -> None:
    """ETSI 014 ``dec_keys`` for alice→bob key_IDs by anyone but bob is refused.

    carol is attached to bob's KME (400: no such pair for her), mallory has a
    certificate from the same CA but is attached nowhere (401), alice asks the
    wrong KME (401). None of it consumes the key: bob still gets it.
    """
    async with lab.key_source("alice") as at_beijing:
        key = await at_beijing.get_key("bob")
    thieves: list[tuple[str, str, type[Exception]]] = [
        ("carol", lab.kme_urls["bob"], KMEBadRequestError),
        ("mallory", lab.kme_urls["bob"], KMEUnauthorizedError),
        ("alice", lab.kme_urls["bob"], KMEUnauthorizedError),
        ("carol", lab.kme_urls["alice"], KMEUnauthorizedError),
    ]
    for sae, url, error in thieves:
        async with lab.key_source(sae, url) as source:
            with pytest.raises(error):
                await source.get_keys_by_id("alice", [key.key_id])
    async with lab.key_source("bob") as at_hefei:
        (got,) = await at_hefei.get_keys_by_id("alice", [key.key_id])
        assert got.key == key.key
        with pytest.raises(KMEBadRequestError, match="not found"):  # once only
            await at_hefei.get_keys_by_id("alice", [key.key_id])
