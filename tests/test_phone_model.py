"""The pure parts of ``qcall phone``: display rules, the call history file, audio controls,
and the conversations model over a real MessagingClient and message store."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import av
import numpy as np
import pytest

from qcall import pqc
from qcall.call.audio_analysis import peak_frequency
from qcall.call.media import ToneTrack, make_frame
from qcall.call.status import CallState, CallStatus, IcePath
from qcall.contacts import ContactStore
from qcall.exceptions import ConfigError
from qcall.identity import Identity, fingerprint
from qcall.messaging.client import MessagingClient
from qcall.messaging.store import ClientStore
from qcall.phone import history as history_module
from qcall.phone.audio import (
    RINGBACK,
    RINGTONE,
    ControlledPlayback,
    ControlledSource,
    RingTrack,
    cadence,
    frame_rms,
)
from qcall.phone.conversations import Conversations
from qcall.phone.history import CallHistory, CallRecord, Outcome
from qcall.phone.model import (
    METER_FLOOR_DB,
    RosterEntry,
    Verification,
    call_title,
    contact_rows,
    format_duration,
    level_dbfs,
    meter,
    network_lines,
    security_lines,
    verification_of,
)
from tests.messaging_transport import Server

FP_A = "AAAA " * 12 + "AAAA"
FP_B = "BBBB " * 12 + "BBBB"


# --- verification and the contacts list ------------------------------------------------------


def test_verification_rules_in_order() -> None:
    pinned = RosterEntry("bob", pinned=FP_A)
    assert verification_of(None, None) is Verification.UNKNOWN
    assert verification_of(None, FP_A) is Verification.UNKNOWN  # online, never called
    assert verification_of(pinned, None) is Verification.UNVERIFIED
    assert verification_of(pinned, FP_A) is Verification.UNVERIFIED
    verified = RosterEntry("bob", pinned=FP_A, sas_verified=True)
    assert verification_of(verified, FP_A) is Verification.VERIFIED
    # The server announces another key than the pinned one: key changed, even if verified.
    assert verification_of(verified, FP_B) is Verification.KEY_CHANGED
    assert verification_of(verified, None, changed=True) is Verification.KEY_CHANGED
    assert verification_of(None, None, changed=True) is Verification.KEY_CHANGED
    # An organisation's certificate decides over the pin.
    certified = RosterEntry("bob", pinned=FP_B, certified=FP_A, organisation="Hefei")
    assert verification_of(certified, FP_A) is Verification.ORGANISATION
    assert verification_of(certified, FP_B) is Verification.KEY_CHANGED


def test_contact_rows_online_first_with_details() -> None:
    roster = [
        RosterEntry("zoe", pinned=FP_A, sas_verified=True),
        RosterEntry("carol", certified=FP_A, organisation="Hefei Municipal"),
        RosterEntry("dave", pinned=FP_A),
    ]
    rows = contact_rows(roster, {"zoe": FP_A, "eve": FP_B, "dave": FP_B})
    assert [(r.name, r.online, r.verification) for r in rows] == [
        ("dave", True, Verification.KEY_CHANGED),
        ("eve", True, Verification.UNKNOWN),
        ("zoe", True, Verification.VERIFIED),
        ("carol", False, Verification.ORGANISATION),
    ]
    assert rows[0].detail.startswith(f"expected {FP_A}, now {FP_B}")
    assert rows[3].detail == "certified by Hefei Municipal" and rows[3].fingerprint == FP_A


# --- the call screen ----------------------------------------------------------------------------


def test_durations_levels_and_meters() -> None:
    assert [format_duration(s) for s in (0, 9.9, 61, 3600 + 62)] == ["0:00", "0:09", "1:01",
                                                                    "1:01:02"]
    assert format_duration(-3) == "0:00"
    assert level_dbfs(1.0) == 0.0 and level_dbfs(0.1) == pytest.approx(-20.0)
    assert level_dbfs(0.0) == METER_FLOOR_DB and level_dbfs(float("nan")) == METER_FLOOR_DB
    assert meter(0.0, 10) == "█" * 10 and meter(METER_FLOOR_DB, 10) == "░" * 10
    assert meter(-30.0, 10) == "█" * 5 + "░" * 5


def test_panels_show_what_the_status_holds_and_no_key_bytes() -> None:
    status = CallStatus("c1", "caller", "bob", state=CallState.ACTIVE, policy="hybrid",
                        srtp_profile="AEAD_AES_256_GCM", sas="123 456",
                        qkd_key_ids=["k-1"], rekeys=2, epoch=2, rtt_ms=4.5)
    rows = dict(security_lines(status, verification=Verification.VERIFIED, route="a → b"))
    assert rows["policy"] == "hybrid" and rows["QKD key_IDs"] == "k-1"
    assert rows["QKD route"] == "a → b" and rows["rekeys"].startswith("2 (epoch 2")
    assert "press v" in rows["SAS"] and rows["peer"] == "bob: SAS verified"
    confirmed = dict(security_lines(status, verification=Verification.VERIFIED,
                                    sas_confirmed=True))
    assert "confirmed" in confirmed["SAS"] and confirmed["QKD route"] == "—"
    status.policy = "pqc"
    assert "no QKD" in dict(security_lines(status, verification=Verification.UNKNOWN))["policy"]
    net = dict(network_lines(status))
    assert net["RTT"] == "4.5 ms" and net["jitter"] == "—" and net["media path"] == "—"
    status.ice = IcePath("relay", "relay", "10.0.0.1:5000", "10.0.0.1:5002", policy="relay")
    assert dict(network_lines(status))["media path"] == status.ice.describe()
    assert "relay" in status.ice.describe()
    assert call_title(status, muted=True, held=True) == "call to bob — in call · on hold · muted"


# --- recent calls -------------------------------------------------------------------------------


def record(n: int, outcome: Outcome = Outcome.ANSWERED, **kw: object) -> CallRecord:
    return CallRecord(f"call-{n}", "bob", "incoming", outcome, 1_767_225_600.0 + n, **kw)  # type: ignore[arg-type]


def test_history_persists_atomically_private_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_module, "MAX_CALLS", 7)
    history = CallHistory.in_home(tmp_path)
    assert history.records() == []
    history.add(record(1, duration=12.5, policy="hybrid"))
    history.add(record(2, Outcome.MISSED, seen=False))
    assert os.stat(tmp_path / "calls.json").st_mode & 0o777 == 0o600
    again = CallHistory.in_home(tmp_path)
    assert [r.call_id for r in again.records()] == ["call-2", "call-1"]
    assert again.unseen_missed() == 1 and [r.call_id for r in again.missed()] == ["call-2"]
    again.mark_seen()
    assert CallHistory.in_home(tmp_path).unseen_missed() == 0
    for n in range(10):
        again.add(record(100 + n))
    kept = CallHistory.in_home(tmp_path).records()
    assert [r.call_id for r in kept] == [f"call-{100 + n}" for n in range(9, 2, -1)]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"version": 2, "calls": []}', "not a version 1"),
        (b'{"version": 1, "calls": [{"call_id": "x"}]}', "calls[0]: missing field 'peer'"),
        (b'{"version": 1, "calls": [{"call_id": "x", "peer": "bob", "direction": "up",'
         b' "outcome": "missed", "started_at": 1}]}', "direction"),
        (b'{"version": 1, "calls": [{"call_id": "x", "peer": "bob", "direction": "incoming",'
         b' "outcome": "lost", "started_at": 1}]}', "outcome"),
        (b'{"version": 1, "calls": [{"call_id": "x", "peer": "bob", "direction": "incoming",'
         b' "outcome": "missed", "started_at": -1}]}', "started_at"),
        (b'{"version": 1, "calls": [{"call_id": "x", "peer": "bob", "direction": "incoming",'
         b' "outcome": "missed", "started_at": 1, "key": "x"}]}', "unknown field"),
    ],
)
def test_corrupt_history_is_reported_never_replaced(
    tmp_path: Path, content: bytes, words: str
) -> None:
    (tmp_path / "calls.json").write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        CallHistory.in_home(tmp_path)
    assert "calls.json" in str(info.value)
    assert (tmp_path / "calls.json").read_bytes() == content


def test_record_round_trip() -> None:
    one = record(3, Outcome.FAILED, error="no QKD key", policy="pqc", duration=0.0)
    assert CallRecord.from_dict(json.loads(json.dumps(one.to_dict()))) == one


# --- audio controls --------------------------------------------------------------------------


def test_cadences_sound_and_pause_as_specified() -> None:
    rate = 48_000
    ringback = cadence(RINGBACK, 0, 5 * rate)
    assert peak_frequency(ringback[: rate].astype(float), rate) == pytest.approx(425, abs=2)
    assert not ringback[rate + 10 :].any()  # 4 s of silence
    assert np.array_equal(cadence(RINGBACK, 5 * rate, 100), cadence(RINGBACK, 0, 100))  # repeats
    ring = cadence(RINGTONE, 0, rate)
    assert np.abs(ring[: int(0.4 * rate)]).max() > 5000 and not ring[int(0.41 * rate) :
                                                                      int(0.59 * rate)].any()
    with pytest.raises(ValueError, match="longer than zero"):
        cadence(((( 440.0,), 0.0),), 0, 10)


async def recv_audio(track: ControlledSource | ControlledPlayback) -> av.AudioFrame:
    """The track's next frame: audio here (``recv`` is typed for any media)."""
    frame = await track.recv()
    assert isinstance(frame, av.AudioFrame)
    return frame


async def test_source_mutes_and_holds_but_meters_the_microphone() -> None:
    source = ControlledSource(ToneTrack(1000.0))
    frame = await recv_audio(source)
    assert frame_rms(frame) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)
    source.muted = True
    muted = await source.recv()
    assert isinstance(muted, av.AudioFrame) and frame_rms(muted) == 0.0
    assert source.level == pytest.approx(0.3 / np.sqrt(2), rel=0.02)  # the meter still moves
    assert muted.pts == 960 and muted.sample_rate == 48_000
    source.muted, source.held = False, True
    assert frame_rms(await recv_audio(source)) == 0.0
    source.stop()


class _Frames:
    kind = "audio"

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = samples

    async def recv(self) -> av.AudioFrame:
        return make_frame(self.samples, 0)

    def stop(self) -> None:
        pass


async def test_playback_volume_clips_and_hold_silences() -> None:
    loud = np.full(960, 20000, np.int16)
    playback = ControlledPlayback(_Frames(loud))  # type: ignore[arg-type]
    playback.volume = 0.5
    frame = await playback.recv()
    assert isinstance(frame, av.AudioFrame) and int(frame.to_ndarray().max()) == 10000
    playback.volume = 2.0
    frame = await recv_audio(playback)
    assert int(frame.to_ndarray().max()) == 32767  # clipped, never wrapped around
    assert playback.level == pytest.approx(32767 / 32768, rel=1e-3)
    playback.held = True
    assert frame_rms(await recv_audio(playback)) == 0.0 and playback.level == 0.0


async def test_ring_track_is_paced_in_real_time() -> None:
    now = [100.0]
    track = RingTrack(RINGBACK, clock=lambda: now[0])
    first = await track.recv()
    second = await track.recv()  # due 20 ms later: the clock is moved, so no sleep is long
    assert (first.pts, second.pts) == (0, 960)
    track.stop()


# --- conversations over a real MessagingClient and SQLite stores -----------------------------


def _client(tmp: Path, server: Server, name: str) -> MessagingClient:
    seed = hashlib.sha256(b"qcall test identity " + name.encode()).digest()
    ident = Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed)
    home = tmp / name
    home.mkdir()
    store = ClientStore(home / "messages.db", ident.signing_key.seed_bytes())
    return MessagingClient(ident, store, server.connect(name), ContactStore(home / "contacts.json"))


async def test_conversations_send_receive_list_and_unread(tmp_path: Path) -> None:
    server = Server(tmp_path / "server.db")
    try:
        alice, bob = _client(tmp_path, server, "alice"), _client(tmp_path, server, "bob")
        changes: list[int] = []
        mine = Conversations(alice, lambda: ["bob"], poll_interval=None)
        theirs = Conversations(bob, lambda: ["alice", "carol"], poll_interval=None,
                               on_change=lambda: changes.append(1))
        await mine.start()
        await theirs.start()
        await mine.send("bob", "hello bob")
        await mine.send("bob", "are you there?")
        assert await theirs.poll() == 2 and changes
        [summary] = theirs.summaries()
        assert (summary.name, summary.last, summary.unread) == ("alice", "are you there?", 2)
        lines = theirs.lines("alice")
        assert [(line.outgoing, line.text) for line in lines] == [
            (False, "hello bob"), (False, "are you there?")
        ]
        assert theirs.summaries()[0].unread == 0  # read
        await theirs.send("alice", "yes")
        await mine.poll()
        assert [line.text for line in mine.lines("bob")] == ["hello bob", "are you there?", "yes"]
        assert [line.outgoing for line in mine.lines("bob")] == [True, True, False]
        await mine.close()
        await theirs.close()
    finally:
        await server.close()


def test_cli_phone_is_registered_and_fails_clearly_without_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qcall.cli import main

    assert main(["--home", str(tmp_path), "phone", "--policy", "pqc", "--tone", "440"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcall: error:") and "identity" in err


async def test_contacts_verified_by_the_organisation_and_revocation(tmp_path: Path) -> None:
    from qcall.call.phone import Phone
    from qcall.phone.controller import PhoneController
    from tests.seal_helpers import make_world

    world = make_world(tmp_path, ("alice", "carol", "dave"))
    trust = world.trust("alice")
    for name in ("carol", "dave"):
        serial = world.signers[name].member.serial
        trust.import_member(world.org.issued_path(serial).read_bytes())
    home = world.homes["alice"]
    identity = Identity.load(home)
    contacts = ContactStore.in_home(home)
    phone = Phone("ws://127.0.0.1:1", identity.signing_key, "alice",
                  check_peer=contacts.check_peer, key_source=None)
    ctl = PhoneController(phone, contacts, CallHistory.in_home(home))
    rows = {row.name: row for row in ctl.contact_rows()}
    assert set(rows) == {"carol", "dave"}  # not oneself
    assert rows["carol"].verification is Verification.ORGANISATION
    assert rows["carol"].detail == "certified by Hefei Municipal" and not rows["carol"].online
    carol_key = Identity.load(world.homes["carol"]).public_key
    assert rows["carol"].fingerprint == fingerprint(carol_key)
    # The server announcing another key for carol: key changed, despite the certificate.
    phone.signaling.online["carol"] = fingerprint(Identity.generate("carol").public_key)
    assert ctl.verification("carol") is Verification.KEY_CHANGED
    # A revoked member is no longer verified by the organisation.
    world.revoke("dave")
    trust.update_crl((world.org.directory / "crl.pem").read_bytes())
    assert "dave" not in {row.name for row in ctl.contact_rows()}
