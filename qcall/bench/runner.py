"""Run the harness's calls: N per mode, interleaved, through real signaling and real KMEs.

The lab (:class:`Lab`):

* the simulated ``beijing-hefei`` QKD network with its ETSI GS QKD 014 KMEs,
  in a child process (:mod:`qcall.bench.kmes`), holding enough relayed keys
  for the whole run (:func:`qkd_keys_needed`), its links paused meanwhile;
* a :class:`~signaling.server.SignalingServer` on loopback in a child
  process of its own (:mod:`qcall.bench.sigserver`), with the delay proxies of
  the signaling legs: as on a host of its own, no caller's CPU work delays the
  relaying of the callee's messages;
* two :class:`~qcall.call.phone.Phone` objects: ``alice`` (SAE at the Beijing
  KME) in this process calls ``bob`` (SAE at the Hefei KME), who runs in his own
  process (:mod:`qcall.bench.callee`), as on two hosts: neither side's CPU work
  waits for the other's on a shared event loop. Alice sends a tone with a marker
  chirp every ``chirp_every`` seconds; bob records what he decodes.

Both processes read the same ``CLOCK_MONOTONIC``, so the chirps' send and
receive times compare directly. Each call gets the network profile on both
peers' outgoing media datagrams (:mod:`qcall.call.netem`, seed = call number).

Modes run round-robin — ``plain, fast-plain, pqc, hybrid, fast-plain, …`` with
the starting mode rotating each round — so that slow drifts of a loaded
machine hit every mode alike. ``warmup`` extra rounds run first and are not
counted (first-call costs: codec set-up, the KME's TLS session, imports).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcall.call.netem import NetworkProfile
from qcall.children import log_tail, module_argv
from qcall.exceptions import CallError, QCallError
from qcall.qkd.reservoir import ReservoirConfig

__all__ = [
    "MODES",
    "PLAIN_MODES",
    "BenchConfig",
    "CallResult",
    "Lab",
    "qkd_keys_needed",
    "run_bench",
    "schedule",
]

logger = logging.getLogger(__name__)

MODES = ("plain", "fast-plain", "pqc", "hybrid")

#: The modes whose call is bare DTLS-SRTP (no handshake, no QKD, no ML-KEM):
#: ``plain`` with stock aiortc/aioice timing (the baseline users know),
#: ``fast-plain`` with :mod:`qcall.call.fast_transport`, like ``pqc`` and ``hybrid``.
PLAIN_MODES = ("plain", "fast-plain")
CALLER, CALLEE = "alice", "bob"
TONE_HZ = 440.0

#: Caller-side milestones (``CallStatus.timings_ms``) in call order, and the
#: phase each one ends. "first_audio" is the callee's first decoded frame. Each
#: side's SDP rides the invite and the accept (docs/calls.md).
PHASES = (
    ("sdp_sent", "invite out with our SDP (peer connection, ICE gathering)"),
    ("accepted", "invite → accept with the callee's SDP (round trip, its peer connection)"),
    ("answer_received", "callee's SDP applied"),
    ("ice_connected", "ICE connectivity checks"),
    ("dtls_done", "DTLS handshake"),
    ("media", "key schedule, outbound SRTP armed"),
    ("first_audio", "first decoded audio at the callee"),
)

#: Caller milestones off that critical path (ms since dial), shown beside it: the
#: authenticated exchange runs while the phone rings and during ICE (docs/calls.md).
OVERLAPPING = (
    ("offer_key_wait", "offer: SDP made, key + signature started, ms since dial"),
    ("offer_key", "offer: QKD key in hand, ms since dial"),
    ("offer_signed", "offer: ML-KEM keygen + ML-DSA sign done, ms since dial"),
    ("offer_sent", "signed offer sent (QKD key, ML-KEM keygen, ML-DSA sign), ms since dial"),
    ("confirmed", "peer's key confirmation received, ms since dial"),
)

#: Callee spans (its own clock): from one milestone to the next, in ms.
CALLEE_SPANS = (
    ("offer_received", "offer_verified", "callee: offer verified (ML-DSA verify, ML-KEM encaps)"),
    ("offer_verified", "answer_sdp_ready", "callee: its SDP ready for the answer"),
    ("answer_sdp_ready", "answer_sent", "callee: answer signed and sent"),
)

Progress = Callable[[str, int], None]


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        calls: counted calls per mode.
        profile: network profile (each direction).
        modes: the modes to compare (``plain`` is the baseline).
        seconds: audio per call after setup.
        rekey_interval: seconds between rekeys (``pqc``/``hybrid``).
        chirp_every: seconds between marker chirps (more than any latency).
        warmup: uncounted rounds first.
        seed: base seed of the network emulation.
        out: directory for recordings and results.
        keep_audio: keep each call's WAV recording.
        signaling_delay: delay the signaling path too: half the profile's
            one-way delay on each user's leg to the server.
        timers: the processes' event loop (:func:`qcall.call.netem.run`):
            ``precise`` or ``epoll``.
    """

    calls: int = 10
    profile: NetworkProfile = field(default_factory=lambda: NetworkProfile("loopback"))
    modes: tuple[str, ...] = MODES
    seconds: float = 2.0
    rekey_interval: float = 0.9
    chirp_every: float = 0.4
    warmup: int = 1
    seed: int = 0
    out: Path = field(default_factory=lambda: Path("bench-out"))
    keep_audio: bool = False
    signaling_delay: bool = True
    timers: str = "precise"


@dataclass
class CallResult:
    """One call's measurements (times in ms; no key material)."""

    mode: str
    index: int
    warmup: bool
    ok: bool = False
    error: str | None = None
    setup_ms: float | None = None
    first_audio_ms: float | None = None
    caller_ms: dict[str, float] = field(default_factory=dict)
    callee_ms: dict[str, float] = field(default_factory=dict)
    one_way_ms: list[float] = field(default_factory=list)
    chirps_sent: int = 0
    jitter_ms: float | None = None
    packets_received: int | None = None
    packets_lost: int | None = None
    decrypt_failures: int = 0
    rekeys: int = 0
    netem: dict[str, Any] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    call_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def qkd_keys_needed(config: BenchConfig) -> int:
    """Keys the alice → bob pool must hold: 1 per hybrid call + its rekeys, with margin.

    Plus the keys alice's reservoir holds after the last call (docs/qkd-keys.md).
    """
    if "hybrid" not in config.modes:
        return 0
    per_call = 1 + math.ceil(config.seconds / config.rekey_interval)
    held = ReservoirConfig().keys_per_peer
    return math.ceil(1.25 * per_call * (config.calls + config.warmup)) + 4 + held


def schedule(modes: tuple[str, ...], calls: int, warmup: int) -> list[tuple[str, int, bool]]:
    """The interleaved call order: ``(mode, index, is_warmup)``, rotating the first mode."""
    order = []
    for round_ in range(warmup + calls):
        shift = round_ % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            order.append((mode, round_, round_ < warmup))
    return order


# --- the lab ----------------------------------------------------------------------------


class Lab:
    """The QKD network and signaling server processes, and the two phones."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.recorder: Any = None
        self.tone: Any = None
        self.phones: dict[str, Any] = {}
        self._kmes: asyncio.subprocess.Process | None = None
        self.callee: asyncio.subprocess.Process | None = None
        self._callee_args: tuple[str, Path, dict[str, Any] | None] = ("", work, None)
        self._signaling: asyncio.subprocess.Process | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, work: Path, *, qkd_keys: int = 0, signaling_delay_ms: float = 0.0
    ) -> AsyncIterator[Lab]:
        """Start the lab.

        Args:
            work: a scratch directory.
            qkd_keys: > 0: start the QKD network holding that many keys.
            signaling_delay_ms: > 0: each phone reaches the signaling server
                through its own :class:`~qcall.call.netem.TCPDelayProxy` adding
                this one-way delay (the server sits half-way between the users);
                the proxies run in the signaling server's process.
        """
        lab = cls(work)
        try:
            await lab._open(qkd_keys, signaling_delay_ms)
            yield lab
        finally:
            await lab._close()

    async def _open(self, qkd_keys: int, signaling_delay_ms: float) -> None:
        from qcall.call.phone import Phone
        from qcall.contacts import ContactStore
        from qcall.identity import Identity
        from qcall.qkd.client import open_key_source

        saes: dict[str, Any] = {}
        if qkd_keys > 0:
            saes = await self._start_kmes(qkd_keys)
        urls = await self._start_signaling(signaling_delay_ms)
        for name, url in zip((CALLER, CALLEE), urls, strict=True):
            home = self.work / name
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            if name == CALLEE:
                await self._start_callee(url, home, saes.get(name))
                continue
            source = open_key_source(dict(saes[name], timeout=5.0)) if saes else None
            phone = Phone(
                url,
                Identity.generate(name).signing_key,
                name,
                check_peer=ContactStore.in_home(home).check_peer,
                key_source=source,
                make_source=self._make_source,
            )
            await phone.start()
            self.phones[name] = phone

    async def restart_callee(self) -> None:
        """After a failed call: a fresh callee process, so the next call starts clean."""
        if self.callee is not None:
            with contextlib.suppress(ProcessLookupError):
                self.callee.kill()
            await self.callee.wait()
        await self._start_callee(*self._callee_args)

    async def _start_callee(self, url: str, home: Path, sae: dict[str, Any] | None) -> None:
        self._callee_args = (url, home, sae)
        with (self.work / "callee.log").open("ab") as log:
            self.callee = await asyncio.create_subprocess_exec(
                *module_argv("qcall.bench.callee"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, limit=1 << 24,
            )  # fmt: skip
        key_source = dict(sae, timeout=5.0) if sae else None
        try:
            await self.tell({"url": url, "home": str(home), "key_source": key_source})
            ready = await self.hear(60)
        except (CallError, OSError, ValueError, TimeoutError) as exc:
            raise CallError(
                f"the callee process did not start ({exc!r}); its stderr ends with:\n"
                + log_tail(self.work / "callee.log")
            ) from None
        if not ready.get("ready"):
            raise CallError(f"the callee process did not start: {ready}")

    async def tell(self, obj: dict[str, Any]) -> None:
        """Send one command line to the callee process."""
        assert self.callee is not None and self.callee.stdin is not None
        self.callee.stdin.write(json.dumps(obj).encode() + b"\n")
        await self.callee.stdin.drain()

    async def hear(self, timeout: float) -> dict[str, Any]:
        """Read the callee process's next answer line."""
        assert self.callee is not None and self.callee.stdout is not None
        line = await asyncio.wait_for(self.callee.stdout.readline(), timeout)
        if not line:
            raise CallError("the callee process exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def _start_signaling(self, delay_ms: float) -> list[str]:
        """The signaling server's process; return each user's URL (alice's, bob's)."""
        argv = module_argv("qcall.bench.sigserver", "--legs", "2", "--delay-ms", f"{delay_ms:g}")
        with (self.work / "signaling.log").open("ab") as log:
            self._signaling = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        assert self._signaling.stdout is not None
        try:
            line = await asyncio.wait_for(self._signaling.stdout.readline(), 60)
            urls: list[str] = json.loads(line)["urls"]
        except (TimeoutError, ValueError, KeyError, TypeError) as exc:
            raise CallError(
                f"the signaling server did not start ({exc!r}); its stderr ends with:\n"
                + log_tail(self.work / "signaling.log")
            ) from None
        return urls

    async def _start_kmes(self, pool: int) -> dict[str, Any]:
        state = self.work / "network"
        with (self.work / "kmes.log").open("ab") as log:
            self._kmes = await asyncio.create_subprocess_exec(
                *module_argv("qcall.bench.kmes", str(state), "--pool", str(pool)),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert self._kmes.stdout is not None
        try:
            line = await asyncio.wait_for(self._kmes.stdout.readline(), 600)
            ready = json.loads(line)
            doc = json.loads(Path(ready["network_file"]).read_text(encoding="utf-8"))
        except (TimeoutError, ValueError, KeyError, OSError) as exc:
            raise CallError(
                f"the simulated QKD network did not start ({exc!r}); its stderr ends with:\n"
                + log_tail(self.work / "kmes.log")
            ) from None
        saes: dict[str, Any] = {}
        for name in (CALLER, CALLEE):
            entry = doc["saes"][name]
            saes[name] = {k: entry[k] for k in ("url", "cert", "key", "ca")} | {"type": "etsi014"}
        return saes

    async def _close(self) -> None:
        for phone in self.phones.values():
            with contextlib.suppress(Exception):
                await phone.close()
        if self.callee is not None:
            with contextlib.suppress(Exception):
                await self.tell({"cmd": "quit"})
            try:
                await asyncio.wait_for(self.callee.wait(), 10)
            except TimeoutError:
                self.callee.kill()
                await self.callee.wait()
        for child in (self._signaling, self._kmes):
            if child is None:
                continue
            if child.stdin is not None:
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()

    def _make_source(self) -> Any:
        return self.tone


# --- one call ---------------------------------------------------------------------------


async def _receiver_stats(session: Any) -> tuple[float | None, int | None, int | None]:
    """RFC 3550 §6.4.1 interarrival jitter (ms), packets received and lost, at the receiver."""
    pc = session.pc
    if pc is None:
        return None, None, None
    with contextlib.suppress(Exception):
        for transceiver in pc.getTransceivers():
            receiver = transceiver.receiver
            for stats in (await receiver.getStats()).values():
                if type(stats).__name__ == "RTCInboundRtpStreamStats":
                    return (
                        round(float(stats.jitter) / 48.0, 2),  # 48 kHz RTP clock (Opus)
                        int(stats.packetsReceived),
                        max(0, int(stats.packetsLost)),
                    )
    return None, None, None


def _cpu_s() -> float:
    """This process's CPU time (user + system, s), from its own counters."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _decrypt_failures(session: Any) -> int:
    hook = getattr(session, "hook", None)
    return hook.stats.decrypt_failures if hook is not None else 0


def _netem_summary(caller: Any, callee: dict[str, Any]) -> dict[str, Any]:
    sent = int(callee.get("sent", 0))
    dropped = int(callee.get("dropped", 0))
    achieved: list[float] = list(callee.get("achieved_ms", []))
    emulation = getattr(caller, "emulation", None)
    if emulation is not None:
        sent += emulation.stats.sent
        dropped += emulation.stats.dropped
        achieved.extend(emulation.stats.achieved_ms)
    if not sent:
        return {}
    return {
        "datagrams": sent,
        "dropped": dropped,
        "achieved_delay_ms_median": round(statistics.median(achieved), 3) if achieved else None,
    }


async def run_call(
    lab: Lab, config: BenchConfig, mode: str, index: int, warmup: bool
) -> CallResult:
    """Place one call in ``mode``, hold it ``config.seconds``, hang up, and measure it."""
    from dataclasses import asdict

    from qcall.call.audio_analysis import (
        FrameArrival,
        chirp_template,
        find_chirps,
        one_way_latencies,
    )
    from qcall.call.media import ToneTrack, read_wav
    from qcall.call.session import CallOptions

    result = CallResult(mode, index, warmup)
    policy = "plain" if mode in PLAIN_MODES else mode
    options: dict[str, Any] = {
        "policy": policy,
        "fast_transport": mode != "plain",
        "rekey_interval": None if policy == "plain" else config.rekey_interval,
        "network": None if config.profile.is_null else asdict(config.profile),
        "network_seed": config.seed * 100_003 + index * len(MODES) + MODES.index(mode),
        "setup_timeout": 20.0,
        "ring_timeout": 20.0,
    }
    alice = lab.phones[CALLER]
    alice.options = CallOptions(
        **dict(options, network=None if config.profile.is_null else config.profile)
    )
    chirps = [config.chirp_every * (k + 1) for k in range(int(config.seconds / config.chirp_every))]
    lab.tone = ToneTrack(TONE_HZ, chirp_at=chirps)
    wav = config.out / "audio" / f"{mode}-{index:03d}.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    await lab.tell({"cmd": "answer", "options": options, "wav": str(wav)})
    caller = None
    ended: dict[str, Any] = {}
    cpu0 = _cpu_s()
    try:
        caller = await asyncio.wait_for(alice.call(CALLEE), 30)
        answered = await lab.hear(30)
        if not answered.get("answered"):
            raise CallError(f"bob: {answered.get('error')}")
        t0 = caller._t0
        await asyncio.sleep(config.seconds)
        result.caller_ms = dict(caller.status.timings_ms)
        result.setup_ms = result.caller_ms.get("media")
        if policy == "plain" and result.setup_ms is not None:
            # plain: the media path opens when DTLS-SRTP is connected.
            result.caller_ms.setdefault("dtls_done", result.setup_ms)
        await lab.tell({"cmd": "stats"})
        stats = (await lab.hear(10))["stats"]
        result.jitter_ms = stats["jitter_ms"]
        result.packets_received = stats["packets_received"]
        result.packets_lost = stats["packets_lost"]
        result.rekeys = caller.status.rekeys
        with contextlib.suppress(QCallError):
            await caller.hangup()
        ended = (await lab.hear(30))["ended"]
        result.call_s = round(time.monotonic() - t0, 3)
        result.cpu_ms = {"caller": round((_cpu_s() - cpu0) * 1000, 1)}
        if ended.get("cpu_ms") is not None:
            result.cpu_ms["callee"] = float(ended["cpu_ms"])
        result.callee_ms = ended["callee_ms"]
        arrivals = [FrameArrival(*row) for row in ended["arrivals"]]
        if arrivals:
            result.first_audio_ms = round((arrivals[0].arrival_time - t0) * 1000, 2)
            result.caller_ms["first_audio"] = result.first_audio_ms
        result.decrypt_failures = _decrypt_failures(caller) + int(ended["decrypt_failures"])
        result.netem = _netem_summary(caller, ended.get("emulation") or {})
        result.ok = True
    except (QCallError, TimeoutError, KeyError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if caller is not None:
            with contextlib.suppress(QCallError):
                await caller.hangup()
    if not result.ok:
        await lab.restart_callee()
    if result.ok:
        samples, rate = read_wav(wav)
        offsets = find_chirps(samples, rate, chirp_template(rate)) if len(samples) else []
        latencies = one_way_latencies(lab.tone.chirp_send_times, arrivals, offsets, rate)
        result.one_way_ms = [round(s * 1000, 2) for s in latencies]
        result.chirps_sent = len(lab.tone.chirp_send_times)
    if not config.keep_audio:
        with contextlib.suppress(OSError):
            os.unlink(wav)
    await asyncio.sleep(0.2)  # let both phones forget the call before the next invite
    return result


async def run_bench(config: BenchConfig, progress: Progress | None = None) -> list[CallResult]:
    """Run every call of ``config`` and return their results (warm-up calls flagged).

    Args:
        config: what to run.
        progress: called with a description and the number of calls done.

    Raises:
        CallError: the lab could not start.
    """
    if config.calls < 1:
        raise CallError("--calls must be at least 1")
    for mode in config.modes:
        if mode not in MODES:
            raise CallError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    config.out.mkdir(parents=True, exist_ok=True)
    order = schedule(config.modes, config.calls, config.warmup)
    results: list[CallResult] = []
    with tempfile.TemporaryDirectory(prefix="qcall-bench-") as work:
        signaling_delay = config.profile.delay_ms / 2 if config.signaling_delay else 0.0
        lab_start = Lab.start(
            Path(work), qkd_keys=qkd_keys_needed(config), signaling_delay_ms=signaling_delay
        )
        async with lab_start as lab:
            for done, (mode, index, warmup) in enumerate(order):
                if progress is not None:
                    progress(f"{mode} call {index + 1 - config.warmup}" if not warmup
                             else f"{mode} warm-up", done)  # fmt: skip
                started = time.monotonic()
                result = await run_call(lab, config, mode, index, warmup)
                logger.info(
                    "= %s %d: %.0f ms wall", mode, index, (time.monotonic() - started) * 1000
                )
                results.append(result)
            if progress is not None:
                progress("done", len(order))
    return results
