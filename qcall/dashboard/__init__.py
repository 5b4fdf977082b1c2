"""The live operations view of a simulated QKD network (``qcall network --dashboard``).

* :mod:`qcall.dashboard.view` — pure: node layout and the JSON snapshot the page draws.
* :mod:`qcall.dashboard.server` — a small HTTP server: the page, its script, a
  Server-Sent Events stream of snapshots, and the eavesdropper switch.

The page itself (HTML + SVG + a small script, no CDN) is ``qcall/data/dashboard/``.
"""
