"""The latency harness: call setup time, one-way audio latency, jitter, loss, decrypt failures.

* :mod:`qcall.bench.kmes` — the simulated Beijing–Hefei QKD network in its own
  process (``python -m qcall.bench.kmes``), so its BB84 threads never hold the
  harness's GIL;
* :mod:`qcall.bench.runner` — runs N calls per mode (``plain``, ``pqc``,
  ``hybrid``), interleaved, between two in-process phones through the real
  signaling server, over a user-space network profile (:mod:`qcall.call.netem`);
* :mod:`qcall.bench.report` — medians, p90, maxima and ratios, ``latency.json``
  and the Markdown table;
* :mod:`qcall.bench.plots` — the PNG plots.

Entry points: ``scripts/latency.py`` and ``qcall bench`` (docs/performance.md).
"""
