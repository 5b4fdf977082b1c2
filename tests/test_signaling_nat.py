"""Two peers behind separate NATs with no direct path: calls succeed only through coturn.

Network namespaces (root), addresses only inside them::

    alice 10.78.1.2 ── nat1 (MASQUERADE) 10.78.10.2 ──┐
                                                      inet 10.78.10.1 / 10.78.20.1: coturn
    bob   10.78.2.2 ── nat2 (MASQUERADE) 10.78.20.2 ──┘   (no forwarding: no direct path)

Each NAT drops new inbound connections, and ``inet`` forwards nothing, so the
peers cannot reach each other directly (checked with ping). The TURN
credentials are the ones the signaling server issues (``qcall.signaling.turn``).

``test_hybrid_call_between_nats_…`` is the call a user places (issue 13): in
``inet`` run coturn (``use-auth-secret``), ``python -m signaling`` with
``--turn-url``/``--turn-secret-file`` (it issues each user coturn credentials),
and the simulated QKD network's KMEs (``qcall network --host 10.78.10.1``; each
user's ``[key_source]`` names its KME by ``server_name``). Bob runs ``qcall
listen`` (``ice_policy = "relay"`` in his config.toml) and alice ``qcall call
bob --ice-policy relay --input sweep.wav --json``, each in its namespace. The
call is hybrid (QKD + ML-KEM-768 + ML-DSA-65), rekeys every 2 s, has no decrypt
failure, bob's recording correlates with alice's sweeps, and both reports name
the selected pair (``ice.local_candidate_type``/``remote_candidate_type``:
``relay``, addresses on coturn). tcpdump in ``inet`` (``-i any``: both NAT-side
interfaces and ``lo``, where coturn relays between the two allocations)
captures every UDP datagram; ``tests/turn_capture.py`` unwraps the TURN framing
(ChannelData, Send/Data indications) and checks every relayed datagram is STUN,
DTLS or RTP/RTCP (RFC 7983); each RTP/RTCP packet must open under exactly one of
the call's SRTP keys (``QCALL_KEYLOG``) with the AES-256-GCM tag length, and no
Opus frame the sender produced (the decrypted payloads) may appear anywhere in
the capture.

``test_peers_behind_separate_nats_connect_through_coturn`` is the lower layer
alone: two bare aioice agents (the library under aiortc) exchanging test strings
through the relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qcall.signaling.turn import rest_credentials
from signaling.local_services import LocalTurn
from tests.utils import stop_processes

ROOT = Path(__file__).resolve().parent.parent
SECRET = "nat-test-secret-0123456789"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, iptables"),
    pytest.mark.skipif(
        not all(shutil.which(p) for p in ("ip", "iptables", "turnserver")),
        reason="needs iproute2, iptables and coturn (./run.sh test installs them)",
    ),
]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def ns(name: str, *args: str) -> None:
    sh("ip", "netns", "exec", name, *args)


@pytest.fixture
def network() -> Iterator[dict[str, str]]:
    tag = str(os.getpid() % 100000)
    names = {k: f"q{k}{tag}" for k in ("alice", "bob", "nat1", "nat2", "inet")}
    try:
        for n in names.values():
            sh("ip", "netns", "add", n)
            ns(n, "ip", "link", "set", "lo", "up")

        def link(a: str, a_if: str, a_ip: str, b: str, b_if: str, b_ip: str) -> None:
            sh("ip", "link", "add", a_if + tag, "netns", names[a], "type", "veth",
               "peer", "name", b_if + tag, "netns", names[b])  # fmt: skip
            ns(names[a], "ip", "addr", "add", a_ip, "dev", a_if + tag)
            ns(names[b], "ip", "addr", "add", b_ip, "dev", b_if + tag)
            ns(names[a], "ip", "link", "set", a_if + tag, "up")
            ns(names[b], "ip", "link", "set", b_if + tag, "up")

        link("alice", "a", "10.78.1.2/24", "nat1", "n1i", "10.78.1.1/24")
        link("nat1", "n1o", "10.78.10.2/24", "inet", "i1", "10.78.10.1/24")
        link("bob", "b", "10.78.2.2/24", "nat2", "n2i", "10.78.2.1/24")
        link("nat2", "n2o", "10.78.20.2/24", "inet", "i2", "10.78.20.1/24")
        ns(names["alice"], "ip", "route", "add", "default", "via", "10.78.1.1")
        ns(names["bob"], "ip", "route", "add", "default", "via", "10.78.2.1")
        for nat, out, gw in (("nat1", "n1o", "10.78.10.1"), ("nat2", "n2o", "10.78.20.1")):
            ns(names[nat], "ip", "route", "add", "default", "via", gw)
            ns(names[nat], "sysctl", "-qw", "net.ipv4.ip_forward=1")
            ns(names[nat], "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", out + tag,
               "-j", "MASQUERADE")  # fmt: skip
            ns(names[nat], "iptables", "-A", "FORWARD", "-i", out + tag, "-m", "conntrack",
               "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
            ns(names[nat], "iptables", "-A", "FORWARD", "-i", out + tag, "-j", "DROP")
        ns(names["inet"], "sysctl", "-qw", "net.ipv4.ip_forward=0")  # no direct path
        yield names
    finally:
        for n in names.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)


def assert_no_direct_path(names: dict[str, str]) -> None:
    """Alice cannot reach bob, nor bob's NAT, directly (ping)."""
    for target in ("10.78.2.2", "10.78.20.2"):
        blocked = subprocess.run(
            ["ip", "netns", "exec", names["alice"], "ping", "-c1", "-W1", target],
            capture_output=True, check=False,
        )  # fmt: skip
        assert blocked.returncode != 0, f"alice reaches {target} directly"


async def peer(name: str, role: str, username: str, password: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", name, sys.executable, "-m", "tests.nat_peer", role,
        "10.78.10.1", "3478", username,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(password.encode() + b"\n")
    await proc.stdin.drain()
    return proc


async def test_peers_behind_separate_nats_connect_through_coturn(
    network: dict[str, str], tmp_path: Path
) -> None:
    names = network
    turn = LocalTurn(SECRET, "10.78.10.1", 3478, allow_loopback=True)
    turn.preexec = lambda: ["ip", "netns", "exec", names["inet"]]  # type: ignore[method-assign]
    turn.start = _start_in_namespace(turn)  # type: ignore[method-assign]
    capture = subprocess.Popen(
        ["ip", "netns", "exec", names["inet"], "tcpdump", "-i", "any", "-n", "-U", "-w",
         str(tmp_path / "turn.pcap"), "udp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    turn.start()
    assert_no_direct_path(names)
    try:
        now = time.time()
        creds = {n: rest_credentials(SECRET.encode(), n, [turn.url], now) for n in ("alice", "bob")}
        procs = {
            n: await peer(names[n], n, creds[n].username, creds[n].credential)
            for n in ("alice", "bob")
        }
        offers = {}
        for n, proc in procs.items():
            assert proc.stdout is not None
            offers[n] = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            assert any(" typ relay" in c for c in offers[n]["candidates"]), offers[n]
        for n, other in (("alice", "bob"), ("bob", "alice")):
            stdin = procs[n].stdin
            assert stdin is not None
            stdin.write(json.dumps(offers[other]).encode() + b"\n")
            await stdin.drain()
        results = {}
        for n, proc in procs.items():
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, f"{n} did not connect"
            results[n] = json.loads(line)
            await asyncio.wait_for(proc.wait(), 10)
        assert results["alice"]["got"] == "hello from bob"
        assert results["bob"]["got"] == "hello from alice"
        for n in ("alice", "bob"):  # no direct path: every selected pair uses a relay
            assert "relay" in results[n]["pair"], results[n]
    finally:
        capture.terminate()
        capture.wait()
        turn.close()
    if shutil.which("tcpdump"):
        shown = subprocess.run(
            ["tcpdump", "-n", "-r", str(tmp_path / "turn.pcap"), "-A"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        # Both NATs' public addresses talked to the TURN server: it carried the exchange.
        assert "10.78.10.2." in shown and "10.78.20.2." in shown


def _start_in_namespace(turn: LocalTurn):  # type: ignore[no-untyped-def]
    """LocalTurn.start without the loopback probe: its address is inside a namespace."""

    def start() -> None:
        with open(turn.dir / "server.log", "ab") as log:
            turn.proc = subprocess.Popen(
                [*turn.preexec(), *turn.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        time.sleep(1.0)
        assert turn.proc.poll() is None, turn.log_tail()

    return start


# --- a hybrid call through the relay, driven through the command line -------------------

SIGNALING_PORT = 8765
CALL_SECONDS = 6.0
REKEY_INTERVAL = 2.0
#: AEAD_AES_256_GCM (RFC 7714): a 16-byte tag on SRTP; SRTCP adds it and the 4-byte index.
GCM_TAG = 16
SRTCP_INDEX = 4


def sweep_wav(path: Path, seconds: float = 12.0) -> None:
    """A WAV of 1-second linear sweeps 300 -> 3000 Hz (48 kHz mono): sharp to correlate."""
    import numpy as np

    rate = 48_000
    t = np.arange(rate) / rate
    one = 0.3 * np.sin(2 * np.pi * (300 * t + (3000 - 300) / 2 * t * t))
    samples = np.tile(one, int(seconds))
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())


def best_correlation(received: Any, sent: Any) -> float:
    """Highest normalized cross-correlation of ``received`` against any stretch of ``sent``."""
    import numpy as np

    w = received.astype(float)
    r = sent.astype(float)
    n = len(r) + len(w)
    corr = np.fft.irfft(np.fft.rfft(r, n) * np.conj(np.fft.rfft(w, n)), n)[: len(r) - len(w) + 1]
    energy = np.concatenate(([0.0], np.cumsum(r * r)))
    window = energy[len(w) :] - energy[: len(r) - len(w) + 1]
    norm = np.sqrt(np.maximum(window, 1e-9) * float(np.dot(w, w)))
    return float(np.max(corr / norm))


def wait_for_text(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"{proc.args!r} exited:\n{log.read_text(errors='replace')}"
        time.sleep(0.1)
    raise AssertionError(f"{proc.args!r} did not print {text!r}:\n{log.read_text()}")


def user_config(home: Path, sae: dict[str, str], extra: str = "") -> None:
    """config.toml as a user writes it for a KME reached by address (verified by its KME ID)."""
    home.joinpath("config.toml").write_text(
        f'signaling = "ws://10.78.10.1:{SIGNALING_PORT}"\n'
        f"rekey_interval = {REKEY_INTERVAL}\n{extra}"
        "[key_source]\n"
        'type = "etsi014"\n'
        f'url = "{sae["url"]}"\n'
        f'cert = "{sae["cert"]}"\n'
        f'key = "{sae["key"]}"\n'
        f'ca = "{sae["ca"]}"\n'
        f'server_name = "{sae["kme_id"].lower()}"\n',
        encoding="utf-8",
    )


@pytest.mark.skipif(
    not all(shutil.which(p) for p in ("tcpdump", "ping")),
    reason="needs tcpdump and ping (./run.sh test installs them)",
)
def test_hybrid_call_between_nats_goes_through_coturn_as_ciphertext_only(
    network: dict[str, str], tmp_path: Path
) -> None:
    """``qcall listen`` / ``qcall call`` behind two NATs: relayed, rekeyed, only ciphertext."""
    import numpy as np
    import pylibsrtp

    from qcall.call.keylog import parse_keylog
    from qcall.call.media import read_wav
    from qcall.call.srtpcore import srtp_session
    from tests.turn_capture import classify, read_pcap, rtp_header_length, unwrap_turn

    names = network
    env = {k: v for k, v in os.environ.items() if k != "QCALL_HOME"}
    keylog = tmp_path / "keylog.txt"
    env.update(PYTHONUNBUFFERED="1", QCALL_KEYLOG=str(keylog))
    started: list[subprocess.Popen[bytes]] = []

    def run_bg(where: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", names[where], *argv],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        started.append(proc)
        return proc

    qcall = [sys.executable, "-m", "qcall"]
    secret = tmp_path / "turn.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    turn = LocalTurn(SECRET, "10.78.10.1", 3478, allow_loopback=False)
    turn.preexec = lambda: ["ip", "netns", "exec", names["inet"]]  # type: ignore[method-assign]
    turn.start = _start_in_namespace(turn)  # type: ignore[method-assign]
    pcap = tmp_path / "turn.pcap"
    try:
        # The TURN server's namespace: a capture of every UDP datagram on all its
        # interfaces (both NAT sides and lo), coturn, the signaling server issuing
        # coturn credentials, and the simulated QKD network's KMEs.
        capture = run_bg("inet", ["tcpdump", "-i", "any", "-n", "-U", "-w", str(pcap), "udp"],
                         tmp_path / "tcpdump.log")  # fmt: skip
        wait_for_text(tmp_path / "tcpdump.log", "listening on", capture, 20)
        turn.start()
        qnet = run_bg("inet", [*qcall, "--home", str(tmp_path / "ops"), "network",
                               "--topology", "hefei-metro", "--host", "10.78.10.1",
                               "--state", str(tmp_path / "qnet"), "--quiet"],
                      tmp_path / "network.log")  # fmt: skip
        server = run_bg("inet", [sys.executable, "-m", "signaling", "--host", "10.78.10.1",
                                 "--port", str(SIGNALING_PORT), "--no-mailbox",
                                 "--turn-url", turn.url, "--turn-secret-file", str(secret)],
                        tmp_path / "signaling.log")  # fmt: skip
        assert_no_direct_path(names)
        wait_for_text(tmp_path / "network.log", "ready:", qnet, 60)
        wait_for_text(tmp_path / "signaling.log", "listening on", server, 30)
        saes = json.loads((tmp_path / "qnet" / "network.json").read_text())["saes"]
        for user in ("alice", "bob"):
            subprocess.run([*qcall, "--home", str(tmp_path / user), "identity", "new",
                            "--name", user], check=True, capture_output=True, env=env)  # fmt: skip
        user_config(tmp_path / "alice", saes["alice"])
        user_config(tmp_path / "bob", saes["bob"], 'ice_policy = "relay"\n')  # (config file)
        sweep_wav(tmp_path / "sweep.wav")

        bob = run_bg("bob", [*qcall, "--home", str(tmp_path / "bob"), "listen", "--auto-answer",
                             "--once", "--output", str(tmp_path / "bob.wav"),
                             "--report", str(tmp_path / "bob.json")],
                     tmp_path / "bob.log")  # fmt: skip
        wait_for_text(tmp_path / "bob.log", "listening as bob", bob, 30)
        alice = subprocess.run(
            ["ip", "netns", "exec", names["alice"], *qcall, "--home", str(tmp_path / "alice"),
             "call", "bob", "--input", str(tmp_path / "sweep.wav"), "--ice-policy", "relay",
             "--seconds", str(CALL_SECONDS), "--json"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert alice.returncode == 0, alice.stderr[-3000:]
        assert bob.wait(30) == 0, (tmp_path / "bob.log").read_text()[-3000:]
    finally:
        stop_processes(reversed(started))  # tcpdump flushes its file on SIGTERM
        turn.close()

    # --- the reports: a hybrid call, rekeyed, nothing failed, through the relay ----------
    reports = {
        "alice": json.loads(alice.stdout),
        "bob": json.loads((tmp_path / "bob.json").read_text()),
    }
    for user, report in reports.items():
        assert report["connected"] and report["error"] is None, (user, report)
        assert report["policy"] == "hybrid" and report["state"] == "ENDED", (user, report)
        assert report["rekeys"] >= 1 and report["rekey_failures"] == 0, (user, report)
        assert report["decrypt_failures"] == 0, (user, report)
        ice = report["ice"]
        assert ice["local_candidate_type"] == ice["remote_candidate_type"] == "relay", ice
        assert ice["policy"] == "relay", ice
        for side in ("local_address", "remote_address"):  # relayed addresses: coturn's
            assert ice[side].startswith("10.78.10.1:"), ice
    a, b = reports["alice"], reports["bob"]
    assert a["sas"] == b["sas"] is not None
    assert a["qkd_key_ids"] and a["all_key_ids"] == b["all_key_ids"]
    assert (a["ice"]["local_address"], a["ice"]["remote_address"]) == (
        b["ice"]["remote_address"], b["ice"]["local_address"])  # fmt: skip
    assert "media path: relay 10.78.10.1:" in alice.stderr  # what the user sees

    # --- the audio: bob recorded alice's sweeps --------------------------------------------
    sent, _ = read_wav(tmp_path / "sweep.wav")
    heard, rate = read_wav(tmp_path / "bob.wav")
    assert rate == 48_000 and len(heard) > 3 * rate
    loud = np.flatnonzero(np.abs(heard) > 2000)
    assert loud.size, "bob heard silence"
    window = heard[loud[0] + rate // 2 : loud[0] + rate // 2 + rate // 2]
    assert best_correlation(window, sent[: 3 * rate]) > 0.8

    # --- the capture at the TURN server: only STUN, DTLS and SRTP/SRTCP ------------------
    datagrams = read_pcap(pcap)
    assert datagrams
    for d in datagrams:  # every datagram has coturn at one end: no direct path was used
        assert "10.78.10.1" in (d.src[0], d.dst[0]), d
    peers = {d.src[0] for d in datagrams} | {d.dst[0] for d in datagrams}
    assert {"10.78.10.2", "10.78.20.2"} <= peers  # both NATs' public addresses
    control, relayed = unwrap_turn(datagrams, 3478)
    assert control and relayed
    kinds: dict[str, list[bytes]] = {"stun": [], "dtls": [], "rtp": [], "rtcp": []}
    for inner in relayed:
        kinds[classify(inner)].append(inner)  # raises on anything else
    assert kinds["stun"] and kinds["dtls"] and len(kinds["rtp"]) > 100, {
        k: len(v) for k, v in kinds.items()}  # fmt: skip

    # Every RTP and RTCP packet is SRTP/SRTCP that authenticates under one of the
    # call's hybrid keys (QCALL_KEYLOG, both phones), with the GCM tag length.
    records = parse_keylog(keylog.read_text())
    masters = {(r.generation, r.srtp_keys.local_master, r.srtp_keys.profile) for r in records}
    assert {p.name for _, _, p in masters} == {"AEAD_AES_256_GCM"}
    sessions = {(g, m): srtp_session(m, p, inbound=True) for g, m, p in masters}
    blob = b"\x00".join(d.payload for d in datagrams)
    generations: set[int] = set()
    plaintexts = 0
    checks = (("rtp", "unprotect", GCM_TAG), ("rtcp", "unprotect_rtcp", GCM_TAG + SRTCP_INDEX))
    for kind, unprotect, overhead in checks:
        for packet in dict.fromkeys(kinds[kind]):  # each once (several legs carry it)
            opened = []
            for (generation, _), session in sessions.items():
                try:
                    opened.append((generation, getattr(session, unprotect)(packet)))
                except pylibsrtp.Error:
                    continue
            assert len(opened) == 1, f"{kind} packet opened by {len(opened)} keys"
            generation, plain = opened[0]
            generations.add(generation)
            assert len(packet) == len(plain) + overhead
            if kind == "rtp":
                payload = plain[rtp_header_length(plain) :]
                if len(payload) >= 8:  # the Opus frame the sender produced: never on the wire
                    assert payload not in blob
                    plaintexts += 1
    assert plaintexts > 100
    assert len(generations) >= 2  # the media crossed at least one rekey
