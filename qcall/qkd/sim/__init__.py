"""Simulated QKD links: decoy-state BB84 with real post-processing.

The object the rest of qcall uses is :class:`SimulatedLink`::

    from qcall.qkd.sim import LinkParams, SimulatedLink

    link = SimulatedLink("beijing-n1", LinkParams(length_km=60), seed=1)
    block = link.run_block()          # raises LinkAlarmError under attack
    key_a, key_b = block.alice_key, block.bob_key   # equal, derived separately
    link.expected_secret_key_rate()   # analytic bit/s (GLLP + decoy, Ma et al. 2005)

Modules: :mod:`.model` (physics, analytic rate), :mod:`.bb84` (optical layer),
:mod:`.channel` (authenticated classical channel), :mod:`.messages`,
:mod:`.cascade`, :mod:`.verify`, :mod:`.privacy` (Toeplitz), :mod:`.link`;
:mod:`.modellink` is the cheap *model*-fidelity stand-in (:class:`ModelLink`).
See docs/qkd-simulation.md.
"""

from __future__ import annotations

from .link import BlockResult, LinkStats, SimulatedLink
from .model import LinkParams
from .modellink import ModelLink

__all__ = ["BlockResult", "LinkParams", "LinkStats", "ModelLink", "SimulatedLink"]
