"""Two peers behind separate NATs with no direct path: ICE succeeds only through coturn.

Network namespaces (root), addresses only inside them::

    alice 10.78.1.2 ── nat1 (MASQUERADE) 10.78.10.2 ──┐
                                                      inet 10.78.10.1 / 10.78.20.1: coturn
    bob   10.78.2.2 ── nat2 (MASQUERADE) 10.78.20.2 ──┘   (no forwarding: no direct path)

Each NAT drops new inbound connections, and ``inet`` forwards nothing, so the
peers cannot reach each other directly (checked with ping). The TURN
credentials are the ones the signaling server issues (``qcall.signaling.turn``).
The ICE agents are aioice's (the library under aiortc), with relay candidates
only on the remote side (as ``iceTransportPolicy: "relay"``); a capture on
coturn's namespace (tcpdump) shows both NATs talking to the relay. Not yet a
full hybrid call (issue 13): the datagrams here are test strings, not SRTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcall.signaling.turn import rest_credentials
from signaling.local_services import LocalTurn

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
def network():
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


async def test_peers_behind_separate_nats_connect_through_coturn(network, tmp_path):
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
    for target in ("10.78.2.2", "10.78.20.2"):  # no direct path from alice to bob
        blocked = subprocess.run(
            ["ip", "netns", "exec", names["alice"], "ping", "-c1", "-W1", target],
            capture_output=True, check=False,
        )  # fmt: skip
        assert blocked.returncode != 0, f"alice reaches {target} directly"
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
