"""Calls between two in-process phones through the real signaling server and real KMEs.

Each test builds a small lab on loopback: a signaling server, two ETSI 014 KMEs
(Beijing and Hefei) over mutual TLS sharing a pool of relayed keys, and two
:class:`~qcall.call.phone.Phone` objects (alice sends a tone, bob records).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pylibsrtp
import pytest

from qcall.call.audio_analysis import peak_frequency
from qcall.call.keylog import parse_keylog
from qcall.call.media import ToneTrack, WavRecorder, read_wav
from qcall.call.phone import Phone
from qcall.call.qkdkeys import SLOW_KME_MS
from qcall.call.session import CallOptions, CallSession
from qcall.call.srtp import dtls_srtp_keys
from qcall.call.srtpcore import srtp_session
from qcall.contacts import ContactStore
from qcall.exceptions import (
    BadSignatureError,
    CallError,
    IdentityChangedError,
    InvalidMessageError,
    QCallError,
    QKDKeyMismatchError,
    SecurityPolicyError,
)
from qcall.identity import Identity
from qcall.org import Authority, OrgTrust
from qcall.qkd.client import open_key_source
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.pki import create_pki, server_ssl_context
from qcall.qkd.reservoir import ReservoirConfig
from qcall.qkd.server import KMEServer
from signaling.server import SignalingServer
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow

Opt = str | None  # an optional payload (invite, accept)

#: For the tests of the key fetched at dial time (the reservoir: tests/test_qkd_reservoir.py).
NO_PREFETCH = ReservoirConfig(keys_per_peer=0)


@dataclass
class Lab:
    tmp: Path
    url: str
    kme_urls: dict[str, str]
    pki: Any
    identities: dict[str, Identity] = field(default_factory=dict)
    phones: list[Phone] = field(default_factory=list)
    recorders: list[WavRecorder] = field(default_factory=list)

    def key_source(self, sae: str, url: str | None = None) -> Any:
        creds = self.pki.saes[sae]
        return open_key_source(
            {
                "type": "etsi014",
                "url": url or self.kme_urls[sae],
                "cert": str(creds.cert),
                "key": str(creds.key),
                "ca": str(self.pki.ca_cert),
                "timeout": 2.0,
            }
        )

    def contacts(self, name: str) -> ContactStore:
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        return ContactStore.in_home(home)

    async def phone(
        self,
        name: str,
        *,
        options: CallOptions | None = None,
        key_source: Any = "default",
        tone: float | None = None,
        record: bool = False,
        check_peer: Callable[[str, bytes], None] | None = None,
        watch: list[str] | None = None,
        prefetch: ReservoirConfig | None = None,
        crypto_worker: bool = False,
    ) -> Phone:
        identity = self.identities.setdefault(name, Identity.generate(name))
        recorder = WavRecorder(self.tmp / f"{name}.wav") if record else None
        if recorder is not None:
            self.recorders.append(recorder)

        def on_track(_session: CallSession, track: Any) -> None:
            if recorder is not None:
                recorder.addTrack(track)
                self._start = asyncio.ensure_future(recorder.start())

        store = self.contacts(name)
        phone = Phone(
            self.url,
            identity.signing_key,
            name,
            check_peer=check_peer or store.check_peer,
            peer_trust=None if check_peer else store.peer_trust,
            key_source=self.key_source(name) if key_source == "default" else key_source,
            options=options or CallOptions(rekey_interval=None),
            make_source=(lambda: ToneTrack(tone)) if tone else (lambda: None),
            on_track=on_track,
            watch=watch,
            prefetch=prefetch,
            crypto_worker=crypto_worker,
        )
        await phone.start()
        self.phones.append(phone)
        return phone


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    pki = create_pki(tmp_path / "pki", ["KME-Beijing", "KME-Hefei"], ["alice", "bob"])
    now = time.time()
    kmes = {"alice": KME("KME-Beijing"), "bob": KME("KME-Hefei")}
    for master, slave in (("alice", "bob"), ("bob", "alice")):
        keys = random_keys(64)  # what the trusted-node relay would have delivered
        kmes[master].supply(master, slave, keys, role="master", peer_kme_id="x", now=now)
        kmes[slave].supply(master, slave, keys, role="slave", peer_kme_id="x", now=now)
    signaling = SignalingServer()
    await signaling.start("127.0.0.1", 0)
    async with contextlib.AsyncExitStack() as stack:
        urls = {}
        for sae, kme in kmes.items():
            node = pki.kmes[kme.kme_id]
            ctx = server_ssl_context(node.cert, node.key, pki.ca_cert)
            server = await stack.enter_async_context(KMEServer(kme, "127.0.0.1", 0, ctx))
            urls[sae] = server.url
        lab = Lab(tmp_path, f"ws://127.0.0.1:{signaling.port}", urls, pki)
        lab.kmes = kmes  # type: ignore[attr-defined]
        try:
            yield lab
        finally:
            for phone in lab.phones:
                await phone.close()
            for recorder in lab.recorders:
                await recorder.stop()
            await signaling.close()


async def connect(alice: Phone, bob: Phone) -> tuple[CallSession, CallSession]:
    incoming = asyncio.ensure_future(bob.incoming())
    try:
        caller = await asyncio.wait_for(alice.call("bob"), 15 * T)
    except BaseException:
        incoming.cancel()
        raise
    callee = await asyncio.wait_for(incoming, 15 * T)
    return caller, callee


def capture(session: CallSession) -> list[bytes]:
    """Record the SRTP packets this side sends from now on (RFC 5761 demux)."""
    assert session.pc is not None
    transport = session.pc.getTransceivers()[0].sender.transport
    ice = transport.transport
    original = ice._send
    sent: list[bytes] = []

    async def _send(data: bytes) -> None:
        if 127 < data[0] < 192 and not 192 <= data[1] <= 223:  # RTP, not RTCP
            sent.append(bytes(data))
        await original(data)

    ice._send = _send
    return sent


def decrypt_count(packets: list[bytes], master: bytes, profile: Any) -> int:
    session = srtp_session(master, profile, inbound=True)
    ok = 0
    for packet in packets:
        with contextlib.suppress(pylibsrtp.Error):
            session.unprotect(packet)
            ok += 1
    return ok


# --- a call, and what protects its media ------------------------------------------------


async def test_hybrid_call_tone_arrives_and_keys_are_hybrid(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keylog.txt"
    monkeypatch.setenv("QCALL_KEYLOG", str(keylog))
    alice = await lab.phone("alice", tone=523)
    bob = await lab.phone("bob", record=True)
    caller, callee = await connect(alice, bob)

    assert caller.status.policy == callee.status.policy == "hybrid"
    assert caller.status.sas == callee.status.sas is not None
    assert caller.status.qkd_key_ids == callee.status.qkd_key_ids
    assert len(caller.status.qkd_key_ids) == 1
    assert caller.status.srtp_profile == "AEAD_AES_256_GCM"

    sent = capture(caller)
    await asyncio.sleep(1.5)
    assert len(sent) > 20
    transport = caller.pc.getTransceivers()[0].sender.transport  # type: ignore[union-attr]
    dtls_only = dtls_srtp_keys(transport)
    records = [
        r
        for r in parse_keylog(keylog.read_text())
        if r.call_id == caller.call_id and r.generation == 0
    ]
    assert len(records) == 2  # one per side, same process here
    assert all(r.key_ids == tuple(caller.status.qkd_key_ids) for r in records)
    sent_ok = [
        r for r in records
        if decrypt_count(sent, r.srtp_keys.local_master, r.srtp_keys.profile) == len(sent)
    ]
    (record,) = sent_ok
    other = next(r for r in records if r is not record)
    assert other.srtp_keys.remote_master == record.srtp_keys.local_master
    keys = record.srtp_keys
    # Every packet decrypts with the hybrid key schedule's key for alice → bob ...
    assert decrypt_count(sent, keys.local_master, keys.profile) == len(sent)
    # ... and none with the keys stock DTLS-SRTP would derive from the exporter alone.
    assert decrypt_count(sent, dtls_only.local_master, dtls_only.profile) == 0
    assert decrypt_count(sent, dtls_only.remote_master, dtls_only.profile) == 0

    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    await lab.recorders[0].stop()
    samples, rate = read_wav(tmp_path / "bob.wav")
    assert len(samples) > rate  # more than a second of audio
    assert abs(peak_frequency(samples, rate) - 523) < 3
    assert caller.status.decrypt_failures == callee.status.decrypt_failures == 0


class SlowKeys:
    """A key source whose key requests take ``delay`` seconds longer (a distant KME)."""

    def __init__(self, source: Any, delay: float) -> None:
        self.source, self.delay = source, delay

    async def get_key(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await self.source.get_key(*args, **kwargs)

    async def get_keys_by_id(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await self.source.get_keys_by_id(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


@pytest.mark.parametrize("slow", ["alice", "bob"])
async def test_dtls_done_before_the_handshake_keys_wait_for_it(lab: Lab, slow: str) -> None:
    # Each side's SDP goes ahead of its signed message (alice's in the invite, bob's
    # in the accept), so ICE and DTLS may finish before the QKD key is in and the
    # handshake verified: media then waits (no DTLS-SRTP keys, ever) and starts
    # under the hybrid keys once they exist.
    delay = 0.4
    alice = await lab.phone(
        "alice", tone=440, key_source=SlowKeys(lab.key_source("alice"), delay)
        if slow == "alice" else "default",
    )
    bob = await lab.phone(
        "bob", record=True, key_source=SlowKeys(lab.key_source("bob"), delay)
        if slow == "bob" else "default",
    )
    caller, callee = await connect(alice, bob)
    assert caller.status.policy == callee.status.policy == "hybrid"
    assert caller.status.sas == callee.status.sas is not None
    waited = caller if slow == "alice" else callee
    timings = waited.status.timings_ms
    assert timings["dtls_done"] + 0.5 * delay * 1000 < timings["media"], timings
    await asyncio.sleep(1.0)
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    await lab.recorders[0].stop()
    samples, rate = read_wav(lab.tmp / "bob.wav")
    assert abs(peak_frequency(samples, rate) - 440) < 3
    assert caller.status.decrypt_failures == callee.status.decrypt_failures == 0


@pytest.mark.parametrize(("delay", "early"), [(0.0, False), (0.03, True)])
async def test_caller_asks_a_slow_kme_for_the_key_as_it_dials(
    lab: Lab, delay: float, early: bool
) -> None:
    # Unknown KME (first call): asked at once. Afterwards a fast KME is asked only
    # once ICE checks run; one that took more than SLOW_KME_MS, still at once.
    source = SlowKeys(lab.key_source("alice"), delay)
    alice = await lab.phone("alice", tone=440, key_source=source, prefetch=NO_PREFETCH)
    bob = await lab.phone("bob")
    for _ in range(2):  # the first call also opens the mutual-TLS connection
        caller, callee = await connect(alice, bob)
        assert caller.status.policy == "hybrid"
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 5 * T)
    last = caller.status.timings_ms["qkd_fetch"]  # the fast KME: ≈ 1-2 ms here
    assert last > SLOW_KME_MS if early else last < 5 * SLOW_KME_MS
    later = CallSession(
        signaling=alice.signaling, signing_key=alice.signing_key, name="alice",
        call_id="x" * 22, peer="bob", role="caller", check_peer=alice.check_peer,
        key_source=source,  # type: ignore[arg-type]  # SlowKeys: a KeySource by duck typing
        options=CallOptions(), source=None,
    )  # fmt: skip
    assert later.qkd.fetch_early() is (last > SLOW_KME_MS)


async def test_many_rekeys_lose_no_packet(lab: Lab) -> None:
    options = CallOptions(rekey_interval=0.2)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", record=True, options=options)
    caller, callee = await connect(alice, bob)
    deadline = time.monotonic() + 15 * T
    while caller.status.rekeys < 11 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    assert caller.status.rekeys >= 10
    assert callee.status.rekeys >= 10
    assert len(set(caller.status.all_key_ids)) == caller.status.rekeys + 1
    # Both KMEs counted the call's key by application (ETSI 014 qcall_application tag).
    # alice's KME also issued the keys her reservoir holds for the next call.
    kmes = lab.kmes  # type: ignore[attr-defined]
    held = alice.reservoir.core.total() if alice.reservoir is not None else 0
    for kme, issued in ((kmes["alice"], 1 + held), (kmes["bob"], 1)):
        usage = {row["application"]: row for row in kme.usage()}
        assert usage["call-setup"]["keys"] == issued
        assert usage["call-setup"]["bits"] == 256 * issued
        assert usage["rekey"]["keys"] >= 10
        assert {row["master"] for row in kme.usage()} == {"alice"}
    await caller.refresh_stats()
    await callee.refresh_stats()
    for session in (caller, callee):
        assert session.hook is not None
        stats = session.hook.stats
        assert stats.decrypt_failures == 0, stats
    # The callee's playout figures (adaptive jitter buffer) are in its status.
    st = callee.status
    assert st.playout_delay_ms is not None and 0 <= st.playout_delay_ms < 200, st
    assert st.frames_concealed is not None and st.frames_concealed <= 3, st
    assert st.packets_late is not None and st.packets_late <= 3, st
    # Bob's recording is continuous: no gap between frames longer than a few packets.
    arrivals = lab.recorders[0].arrivals
    assert len(arrivals) > 50
    assert lab.recorders[0].concealed_samples <= 3 * 960
    await caller.hangup()


# --- errors, each clear -------------------------------------------------------------------


async def test_call_shows_a_colleague_certified_by_the_organisation(lab: Lab) -> None:
    """Issue 11: a certified colleague shows as verified by the organisation, no TOFU."""
    org = Authority.create(lab.tmp / "ca", "Hefei Municipal")
    alice_id = lab.identities.setdefault("alice", Identity.generate("alice"))
    member = org.issue("alice", alice_id.public_key, department="Finance")
    trust = OrgTrust.in_home(lab.tmp / "bob")
    trust.trust((org.directory / "authority.pem").read_bytes())
    trust.update_crl((org.directory / "crl.pem").read_bytes())
    trust.import_member(org.issued_path(member.serial).read_bytes())
    alice, bob = await lab.phone("alice"), await lab.phone("bob")
    caller, callee = await connect(alice, bob)
    assert callee.status.peer_trust == "organisation: alice (Finance) of Hefei Municipal"
    assert caller.status.peer_trust == "unverified"  # bob has no certificate: pinned on first use
    assert callee.status.as_dict()["peer_trust"].startswith("organisation: ")
    assert ContactStore.in_home(lab.tmp / "bob").get("alice") is None  # nothing pinned


async def test_changed_identity_ends_the_call(lab: Lab) -> None:
    impostor = Identity.generate("alice")
    lab.contacts("bob").pin("alice", impostor.public_key)  # bob knew another 'alice' key
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(QCallError, match="bob"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(IdentityChangedError, match="alice"):
        await asyncio.wait_for(incoming, 5 * T)


def _flip_sdp_bit(payload: str) -> str:
    import base64

    data = bytearray(base64.b64decode(payload))
    index = data.find(b"a=fingerprint:sha-256 ") + 30  # inside the signed SDP
    data[index] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


def _other_fingerprint(payload: str) -> str:
    index = payload.index("a=fingerprint:sha-256 ") + 30  # a hex digit of it
    digit = "A" if payload[index] != "A" else "B"
    return payload[:index] + digit + payload[index + 1 :]


@pytest.mark.parametrize("where", ["offer", "offer-earlier-flow", "sdp-in-invite"])
async def test_tampered_offer_is_refused(lab: Lab, where: str) -> None:
    # One bit of the DTLS fingerprint changed on the way: inside the signed offer
    # (bad signature), or in the SDP the invite carried ahead of it (bob made his
    # peer connection on it: the signed SDP differs). Refused either way, before
    # any key exists.
    early = where != "offer-earlier-flow"
    alice = await lab.phone("alice", tone=440, options=CallOptions(early_offer=early))
    bob = await lab.phone("bob")
    invite, send_offer = alice.signaling.invite, alice.signaling.send_offer

    async def tamper_invite(peer: str, call_id: str | None = None, payload: Opt = None) -> str:
        assert payload is not None and payload.startswith("qcall-sdp:v=0")
        return await invite(peer, call_id, _other_fingerprint(payload))

    async def tamper_offer(call_id: str, payload: str, reason: str | None = None) -> None:
        await send_offer(call_id, _flip_sdp_bit(payload), reason)

    if where == "sdp-in-invite":
        alice.signaling.invite = tamper_invite  # type: ignore[method-assign]
    else:
        alice.signaling.send_offer = tamper_offer  # type: ignore[method-assign]
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(QCallError, match=r"bad_signature|refused|invalid"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    expected = InvalidMessageError if where == "sdp-in-invite" else BadSignatureError
    with pytest.raises(expected) as refused:
        await asyncio.wait_for(incoming, 5 * T)
    if where == "sdp-in-invite":
        assert "differs from the SDP sent ahead" in str(refused.value)
    assert not alice.calls and not bob.calls


async def test_mismatched_qkd_key_fails_fast_without_audio(lab: Lab) -> None:
    # Bob's KME hands out different bytes under the key_IDs alice uses.
    from qcall.qkd.etsi014 import QKDKey

    wrong = lab.key_source("bob")
    real = wrong.get_keys_by_id

    async def corrupted(peer_sae: str, key_ids: Any, **options: Any) -> list[QKDKey]:
        keys = await real(peer_sae, key_ids, **options)
        return [QKDKey(k.key_id, bytes(b ^ 0x01 for b in k.key)) for k in keys]

    wrong.get_keys_by_id = corrupted
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob", record=True, key_source=wrong)
    incoming = asyncio.ensure_future(bob.incoming())
    started = time.monotonic()
    # Whoever derives last sees the mismatch first; the other learns it from the alert.
    with pytest.raises(QKDKeyMismatchError, match=r"QKD key|qkd_key_mismatch"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError):
        await asyncio.wait_for(incoming, 5 * T)
    assert time.monotonic() - started < 5 * T
    assert not alice.calls  # the call is gone
    assert lab.recorders[0].arrivals == []  # never silent audio: no audio at all


async def test_qkd_unavailable_refused_or_pqc_when_allowed(lab: Lab) -> None:
    dead = "https://127.0.0.1:9"  # nothing listens on the discard port
    alice = await lab.phone("alice", tone=440, key_source=lab.key_source("alice", dead))
    bob = await lab.phone("bob")
    with pytest.raises(SecurityPolicyError, match="--allow-pqc-only"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    assert not alice.calls

    allowed = CallOptions(rekey_interval=None, allow_pqc_only=True)
    alice2 = await lab.phone("carol", tone=440, key_source=lab.key_source("alice", dead),
                             options=allowed)  # fmt: skip
    bob.options = allowed
    caller, callee = await connect(alice2, bob)
    assert caller.status.policy == callee.status.policy == "pqc"
    assert "QKD unavailable" in caller.status.notice
    assert "pqc" in callee.status.notice
    await caller.hangup()


async def test_callee_refuses_pqc_unless_allowed(lab: Lab) -> None:
    alice = await lab.phone("alice", tone=440, options=CallOptions(policy="pqc",
                                                                    rekey_interval=None))
    bob = await lab.phone("bob")
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(QCallError, match=r"downgrade|refused"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError, match=r"pqc|policy"):
        await asyncio.wait_for(incoming, 5 * T)


async def test_offline_callee_is_a_clear_error(lab: Lab) -> None:
    alice = await lab.phone("alice", tone=440)
    with pytest.raises(QCallError, match=r"offline|unavailable"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)


async def test_second_call_gets_busy(lab: Lab) -> None:
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    carol = await lab.phone("carol", tone=440, key_source=lab.key_source("alice"))
    caller, _ = await connect(alice, bob)
    with pytest.raises(CallError, match=r"declined|busy"):
        await asyncio.wait_for(carol.call("bob"), 10 * T)
    assert caller.status.state.name == "ACTIVE"
    await caller.hangup()


# --- the signaling server under bad input, while a real call goes on --------------------


async def test_bad_signaling_input_answered_while_a_call_proceeds(lab: Lab) -> None:
    import json

    from websockets.asyncio.client import connect as ws_connect

    from qcall.signaling.messages import (
        Challenge,
        ErrorMessage,
        Register,
        Registered,
        parse_server_message,
    )

    options = CallOptions(rekey_interval=0.3)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", record=True, options=options)
    caller, callee = await connect(alice, bob)
    rekeys_before = caller.status.rekeys
    mallory = Identity.generate("mallory")

    async def next_error(ws: Any) -> ErrorMessage:
        while True:
            message = parse_server_message(await asyncio.wait_for(ws.recv(), 5 * T))
            if isinstance(message, ErrorMessage):
                return message

    async with ws_connect(lab.url, max_size=None) as ws:
        challenge = parse_server_message(await ws.recv())
        assert isinstance(challenge, Challenge)
        await ws.send(json.dumps({"type": "invite", "call_id": "x" * 12, "peer": "bob"}))
        assert (await next_error(ws)).code == "auth_required"
        await ws.send(Register.create(mallory.signing_key, "mallory", challenge).serialize())
        assert isinstance(parse_server_message(await ws.recv()), Registered)
        cases = [
            ("{not json", "bad_message"),
            (json.dumps({"type": "teleport"}), "bad_message"),
            (json.dumps({"type": "invite", "peer": "bob"}), "bad_message"),  # no call_id
            (json.dumps({"type": "invite", "call_id": "y" * 12, "peer": "nobody"}),
             "unavailable"),
            (json.dumps({"type": "hangup", "call_id": caller.call_id}), "unknown_call"),
            ("x" * (70 * 1024), "too_big"),
        ]  # fmt: skip
        for frame, code in cases:
            await ws.send(frame)
            error = await next_error(ws)
            assert error.code == code, (frame[:40], error)
        # A second login of the same identity replaces the first connection.
        async with ws_connect(lab.url) as second:
            challenge2 = parse_server_message(await second.recv())
            assert isinstance(challenge2, Challenge)
            await second.send(
                Register.create(mallory.signing_key, "mallory", challenge2).serialize()
            )
            assert isinstance(parse_server_message(await second.recv()), Registered)
            assert (await next_error(ws)).code == "replaced"

    # The call went on untouched: still active, still rekeying, nothing lost.
    deadline = time.monotonic() + 5 * T
    while caller.status.rekeys < rekeys_before + 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert caller.status.rekeys >= rekeys_before + 3
    assert caller.status.state.name == callee.status.state.name == "ACTIVE"
    assert caller.hook is not None and caller.hook.stats.decrypt_failures == 0
    await caller.hangup()
