"""Load test of a running simulated network: offer calls, admit them by capacity, draw their key.

:func:`run_load` checks the capacity planner (:mod:`qcall.qkd.capacity`)
against a live :class:`~qcall.qkd.network.SimulatedNetwork`: it offers
``offered`` calls between two SAEs to a :class:`CallAdmission` built from the
network's own link rates (model rate × speed-up), and every admitted call
then draws its key through the real ETSI GS QKD 014 clients exactly as a
call would: the caller ``enc_keys`` (tagged ``call-setup``, then ``rekey`` or
``otp``), the callee ``dec_keys`` by key_ID. A call whose KME answers 503 (no
key) is *starved*: it stops, as a call must, instead of running on any key
twice. The report counts admitted, downgraded and refused calls (with their
messages), starved calls, the key drawn, and checks that no key_ID and no
key was ever handed out twice.

``admission=False`` offers every call without admission control, to show
what the planner protects against: above capacity, calls starve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from qcall.exceptions import KMEUnavailableError
from qcall.qkd.capacity import CallAdmission, CallMode, CapacityPlanner
from qcall.qkd.client import open_key_source

__all__ = ["LoadReport", "network_planner", "run_load"]

#: Largest key one request asks for (a KME's default ``max_key_size``), bits.
MAX_REQUEST_BITS = 4096


@dataclass
class LoadReport:
    """What a load run found.

    Attributes:
        capacity: calls the planner said the route sustains in the offered mode.
        admitted, downgraded, refused: calls by admission outcome.
        messages: the refusal and downgrade messages.
        starved: admitted calls that met an empty KME pool and stopped.
        completed: admitted calls that drew all their key.
        keys, bits: key drawn by all calls (each key counted once).
        reused: key_IDs or keys seen twice (must be 0).
        mismatched: keys the callee got different from the caller's (must be 0).
    """

    capacity: int = 0
    admitted: int = 0
    downgraded: int = 0
    refused: int = 0
    messages: list[str] = field(default_factory=list)
    starved: int = 0
    completed: int = 0
    keys: int = 0
    bits: int = 0
    reused: int = 0
    mismatched: int = 0
    _ids: set[str] = field(default_factory=set, repr=False)
    _digests: set[bytes] = field(default_factory=set, repr=False)

    def record(self, key_id: str, key: bytes, peer_key: bytes) -> None:
        """Count a key drawn by both ends; a repeated key_ID or key counts as reuse."""
        if peer_key != key:
            self.mismatched += 1
        digest = hashlib.sha256(key).digest()
        if key_id in self._ids or digest in self._digests:
            self.reused += 1
        self._ids.add(key_id)
        self._digests.add(digest)
        self.keys += 1
        self.bits += 8 * len(key)


def network_planner(net: Any, utilisation: float = 0.9, blocks: int = 40) -> CapacityPlanner:
    """A planner over the running network's simulated link rates (× its speed-up).

    Each active link's parameters run ``blocks`` model-fidelity blocks
    (:class:`~qcall.qkd.sim.ModelLink`, seeded); the rate is the key they
    delivered per simulated second, times the network's speed-up.
    """
    from qcall.qkd.sim import ModelLink

    rates: dict[str, float] = {}
    for index, runtime in enumerate(net.links_view()):
        params = getattr(runtime.sim, "params", None)
        if params is None:
            continue
        sim = ModelLink(runtime.link.name, params.replace(eve_fraction=0.0), seed=index)
        results = [sim.run_block() for _ in range(blocks)]
        seconds = sum(r.duration_s for r in results)
        rates[runtime.link.name] = sum(r.final_bits for r in results) / seconds * net.speedup
    return CapacityPlanner(net.topology, rates, utilisation)


async def _call(
    net: Any, caller: str, callee: str, mode: CallMode, seconds: float, report: LoadReport
) -> None:
    """One call: set-up key, then its mode's key every period, until ``seconds`` pass."""
    if mode.kind == "aes":
        period, bits, application = mode.setup_bits / mode.bits_per_second, mode.setup_bits, "rekey"
    else:
        # An OTP call draws its pad in blocks of at most MAX_REQUEST_BITS.
        period = MAX_REQUEST_BITS / mode.bits_per_second
        bits, application = MAX_REQUEST_BITS, "otp"
    async with (
        open_key_source(net.sae_credentials(caller).as_config()) as at_caller,
        open_key_source(net.sae_credentials(callee).as_config()) as at_callee,
    ):
        start = time.monotonic()
        draws = 0
        try:
            if mode.setup_bits:
                key = await at_caller.get_key(callee, mode.setup_bits, application="call-setup")
                peer = await at_callee.get_key_by_id(caller, key.key_id, application="call-setup")
                report.record(key.key_id, key.key, peer.key)
            while (due := start + draws * period) < start + seconds:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                key = await at_caller.get_key(callee, bits, application=application)
                peer = await at_callee.get_key_by_id(caller, key.key_id, application=application)
                report.record(key.key_id, key.key, peer.key)
                draws += 1
        except KMEUnavailableError:
            report.starved += 1  # the call ends: no key, and never a key twice
            return
    report.completed += 1


async def run_load(
    net: Any,
    caller: str,
    callee: str,
    mode: CallMode,
    offered: int,
    seconds: float,
    *,
    fallback: CallMode | None = None,
    admission: bool = True,
    utilisation: float = 0.9,
) -> LoadReport:
    """Offer ``offered`` calls from ``caller`` to ``callee`` and run the admitted ones.

    Args:
        net: a running :class:`~qcall.qkd.network.SimulatedNetwork` (``wait_ready`` done).
        caller, callee: SAE IDs.
        mode: the mode every call asks for.
        offered: calls offered, all at once.
        seconds: how long each admitted call runs.
        fallback: the policy's fallback mode (``None``: refuse above capacity).
        admission: ``False`` admits every call (to show starvation above capacity).
        utilisation: share of the route's key rate calls may spend.
    """
    planner = network_planner(net, utilisation)
    source = net.topology.sae_node(caller)
    target = net.topology.sae_node(callee)
    control = CallAdmission(planner)
    report = LoadReport(capacity=planner.capacity(source, target, mode).calls)
    running: list[tuple[CallMode, str]] = []
    for index in range(offered):
        call_id = f"load-{index}"
        if not admission:
            running.append((mode, call_id))
            continue
        answer = control.offer(call_id, source, target, mode, fallback=fallback)
        if not answer.admitted or answer.mode is None:
            report.refused += 1
            report.messages.append(answer.message)
            continue
        if answer.downgraded:
            report.downgraded += 1
            report.messages.append(answer.message)
        running.append((answer.mode, call_id))
    report.admitted = len(running)
    tasks = [
        asyncio.create_task(_call(net, caller, callee, m, seconds, report)) for m, _ in running
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for _, call_id in running:
        control.release(call_id)
    return report
