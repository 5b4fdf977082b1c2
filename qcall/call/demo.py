"""The Beijing–Hefei call on one machine: what ``qcall demo`` runs.

1. The simulated ``beijing-hefei`` QKD network starts: 16 decoy-state BB84
   links (965 km, trusted relays) and ETSI GS QKD 014 KMEs at Beijing and Hefei,
   with mutual TLS (:class:`~qcall.qkd.network.SimulatedNetwork`).
2. A signaling server starts on loopback.
3. Two users, each a separate ``qcall`` process with its own home directory
   and ML-DSA-65 identity: bob (SAE at the Hefei KME) listens; alice (SAE at
   the Beijing KME) calls him, sending a test tone with marker chirps.
4. The call runs for ``seconds`` with a rekey every ``rekey_interval``.
5. Bob's recording is analysed: the tone's frequency, how much audio arrived,
   and the one-way latency (chirps found by cross-correlation; both processes
   share this machine's monotonic clock).

:func:`run_demo` returns the report as plain data; ``qcall demo`` prints it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcall.children import log_tail, module_argv
from qcall.exceptions import CallError

__all__ = ["DemoError", "run_demo"]

logger = logging.getLogger(__name__)

TOPOLOGY = "beijing-hefei"
CALLER, CALLEE = "alice", "bob"
CHIRP_EVERY = 1.0  # seconds between marker chirps (more than any plausible latency)

Progress = Callable[[str], None]


class DemoError(CallError):
    """The demo could not run or its checks failed (the message says which)."""


async def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _user(home: Path, *argv: str, log: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("QCALL_HOME", None)
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *module_argv("qcall", "--home", str(home), *argv),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
        )  # fmt: skip


def _tail(path: Path, lines: int = 8) -> str:
    return log_tail(path, lines)


async def run_demo(
    *,
    seconds: float = 8.0,
    rekey_interval: float = 2.5,
    tone_hz: float = 440.0,
    state_dir: str | os.PathLike[str] | None = None,
    speedup: float = 1.0,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """Run the whole demo and return its report (see docs/demo.md for the fields).

    Raises:
        DemoError: a part failed to start, or the call did not happen.
    """
    from qcall.identity import Identity
    from qcall.qkd.network import SimulatedNetwork
    from signaling.server import SignalingServer

    if seconds <= 0 or rekey_interval <= 0:
        raise DemoError("seconds and rekey interval must be positive")
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="qcall-demo-")
        state_dir = tmp.name
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        progress(f"starting the simulated {TOPOLOGY} QKD network (BB84 links, trusted relays)")
        async with SimulatedNetwork.start(TOPOLOGY, state / "network", speedup=speedup) as net:
            topo = net.topology
            route = net.route(CALLER, CALLEE)
            km = sum(link.length_km for link in topo.links.values())
            progress(
                f"  {len(topo.nodes)} nodes, {len(topo.links)} links, {km:.0f} km; "
                f"waiting for the first keys relayed Beijing → Hefei"
            )
            await net.wait_ready(timeout=120)
            timings["network_ready"] = round((time.monotonic() - t0) * 1000)
            from signaling.store import SQLiteMessageStore

            sig = SignalingServer(mailbox=SQLiteMessageStore(state / "signaling-messages.db"))
            await sig.start("127.0.0.1", 0)
            try:
                url = f"ws://127.0.0.1:{sig.port}"
                progress(f"signaling server on {url}")
                homes = {}
                for name in (CALLER, CALLEE):
                    homes[name] = state / name
                    homes[name].mkdir(mode=0o700, exist_ok=True)
                    Identity.generate(name).save(homes[name], overwrite=True)
                common = [
                    "--network", str(net.network_file), "--signaling", url,
                    "--rekey-interval", str(rekey_interval), "--quiet",
                ]  # fmt: skip
                progress("bob (Hefei) is listening; alice (Beijing) calls him")
                bob = await _user(
                    homes[CALLEE], "listen", "--auto-answer", "--once", *common,
                    "--output", str(state / "bob.wav"), "--report", str(state / "bob.json"),
                    log=state / "bob.log",
                )  # fmt: skip
                await _wait_until(lambda: sig.protocol.registered >= 1, 30, "bob to register")
                alice = await _user(
                    homes[CALLER], "call", CALLEE, *common, "--tone", f"{tone_hz:g}",
                    "--chirp-every", str(CHIRP_EVERY), "--seconds", str(seconds),
                    "--report", str(state / "alice.json"),
                    log=state / "alice.log",
                )  # fmt: skip
                limit = seconds + 60
                try:
                    codes = await asyncio.wait_for(
                        asyncio.gather(alice.wait(), bob.wait()), limit
                    )
                except TimeoutError:
                    for proc in (alice, bob):
                        if proc.returncode is None:
                            proc.kill()
                    raise DemoError(f"the call did not finish within {limit:g} s") from None
                # --- Quantum Secret (qcall/messaging/demo.py): a message and a file ---
                from qcall.messaging.demo import run_messaging_demo

                progress("Quantum Secret: alice and bob exchange a message and a file")
                messaging = await run_messaging_demo(
                    url, homes, net.network_file, state / "messaging"
                )
                # --- end of the messaging part ---
                network_status = net.status()
            finally:
                await sig.close()
        report = _analyse(state, route, tone_hz, network_status, codes)
        report.update(messaging)
        # --- Quantum Cloud Seal (qcall/seal/demo.py): a document approved by bob ---
        from qcall.seal.demo import run_seal_demo

        progress("Quantum Cloud Seal: alice seals a document, bob approves, an auditor verifies")
        report["seal"] = await run_seal_demo(state / "seal")
        # --- end of the seal part ---
        report["timings_ms"] = timings
        report["state_dir"] = None if tmp is not None else str(state)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def _load(path: Path, log: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DemoError(f"no report from {path.stem}; its log ends with:\n{_tail(log)}") from None
    if not isinstance(data, dict):
        raise DemoError(f"{path} is not a report")
    return data


def _analyse(
    state: Path,
    route: list[str],
    tone_hz: float,
    network_status: dict[str, Any],
    codes: tuple[int, int] | list[int],
) -> dict[str, Any]:
    from qcall.call.audio_analysis import FrameArrival, received_audio_summary
    from qcall.call.media import read_wav

    alice = _load(state / "alice.json", state / "alice.log")
    bob = _load(state / "bob.json", state / "bob.log")
    if not alice.get("connected"):
        raise DemoError(
            f"the call did not connect: {alice.get('error')}\n{_tail(state / 'alice.log')}"
        )
    samples, rate = read_wav(state / "bob.wav")
    arrivals = [FrameArrival(*row) for row in bob.get("arrivals", [])]
    audio = received_audio_summary(
        samples, rate, arrivals, alice.get("chirp_send_times", []), tone_hz,
        alice.get("sent_seconds"),
    )  # fmt: skip
    links = network_status.get("links", {})
    return {
        "call": {
            "connected": bool(alice.get("connected")) and bool(bob.get("connected")),
            "setup_ms": alice.get("setup_ms"),
            "setup_breakdown_ms": alice.get("timings_ms", {}),
            "ended": alice.get("ended"),
            "exit_codes": {"alice": codes[0], "bob": codes[1]},
        },
        "security": {
            "mode": alice.get("policy"),
            "kem": alice.get("kem"),
            "signature": alice.get("signature"),
            "srtp_profile": alice.get("srtp_profile"),
            "sas": alice.get("sas"),
            "sas_match": alice.get("sas") is not None and alice.get("sas") == bob.get("sas"),
            "notice": alice.get("notice") or None,
        },
        "qkd": {
            "key_ids": alice.get("all_key_ids", []),
            "key_ids_match": alice.get("all_key_ids") == bob.get("all_key_ids"),
            "route": route,
            "hops": len(route) - 1,
            "route_km": round(
                sum(v.get("length_km", 0.0) for v in links.values() if v.get("active", True)), 1
            ),
            "links_up": sum(1 for v in links.values() if v.get("state") == "LINK_UP"),
            "mean_qber": _mean([v.get("qber") for v in links.values()]),
        },
        "rekeys": alice.get("rekeys", 0),
        "decrypt_failures": {
            "alice": alice.get("decrypt_failures"),
            "bob": bob.get("decrypt_failures"),
        },
        "rtcp": {"rtt_ms": alice.get("rtt_ms"), "packets_lost": alice.get("packets_lost")},
        "audio": audio,
    }


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float)]
    return round(sum(nums) / len(nums), 4) if nums else None


def check_report(report: dict[str, Any]) -> list[str]:
    """What a successful demo must show; returns the failed checks (empty: all good)."""
    problems = []
    if not report["call"]["connected"]:
        problems.append("the call did not connect")
    if report["security"]["mode"] != "hybrid":
        problems.append(f"security mode is {report['security']['mode']}, not hybrid")
    if not report["security"]["sas_match"]:
        problems.append("the two SAS differ")
    if not report["qkd"]["key_ids"] or not report["qkd"]["key_ids_match"]:
        problems.append("the two sides did not use the same QKD key_IDs")
    if report["rekeys"] < 1:
        problems.append("no rekey happened")
    audio = report["audio"]
    if abs(audio["peak_hz"] - audio["tone_hz"]) > 5:
        problems.append(f"bob heard {audio['peak_hz']} Hz, not the {audio['tone_hz']} Hz tone")
    if audio["received_seconds"] < 1:
        problems.append(f"bob received only {audio['received_seconds']} s of audio")
    failures = report["decrypt_failures"]
    if any(failures.values()):
        problems.append(f"SRTP decrypt failures: {failures}")
    messages, files = report.get("messages"), report.get("files")  # qcall/messaging/demo.py
    if messages is not None and (messages["received"] != messages["sent"] or not messages["sent"]):
        problems.append(f"messages: {messages['sent']} sent, {messages['received']} received")
    if messages is not None and messages["mode"] != "hybrid":
        problems.append(f"messaging mode is {messages['mode']}, not hybrid")
    if files is not None and not files["sha256_match"]:
        problems.append("the file bob received does not match alice's SHA-256")
    seal = report.get("seal")  # Quantum Cloud Seal (qcall/seal/demo.py)
    if seal is not None and not (seal["verified"] and seal["inclusion_verified"]):
        problems.append(f"the sealed document did not verify: {seal['failures']}")
    return problems
