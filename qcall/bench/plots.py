"""The harness's PNG plots (matplotlib, Agg backend: no display needed).

* ``setup_breakdown.png`` — per mode, the median of each setup phase, stacked
  along the caller's timeline, up to the callee's first decoded audio;
* ``latency_distributions.png`` — per mode, the distributions of call setup
  time and of one-way audio latency (box plots with every sample overlaid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_plots"]

_COLOURS = {"plain": "#7f7f7f", "fast-plain": "#2ca02c", "pqc": "#1f77b4", "hybrid": "#d62728"}


def _setup_breakdown(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    phases = list(report["phases"].items())
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(modes)))
    cmap = plt.get_cmap("tab10")
    for row, mode in enumerate(modes):
        left = 0.0
        for i, (key, label) in enumerate(phases):
            width = report["modes"][mode]["breakdown_ms"][key]["p50"] or 0.0
            ax.barh(row, width, left=left, color=cmap(i % 10), edgecolor="white",
                    label=label if row == 0 else None)  # fmt: skip
            left += width
        setup = report["modes"][mode]["setup_ms"]["p50"]
        if setup is not None:
            ax.plot([setup, setup], [row - 0.4, row + 0.4], color="black", linewidth=1.5)
    ax.set_yticks(range(len(modes)), modes)
    ax.invert_yaxis()
    ax.set_xlabel("ms since dial (medians per phase; black tick: median setup time)")
    prof = report["config"]["profile"]["name"]
    ax.set_title(f"Call setup breakdown — profile {prof}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _distributions(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    calls = [c for c in report["calls"] if c["ok"] and not c["warmup"]]
    series = {
        "call setup (ms)": {m: [c["setup_ms"] for c in calls if c["mode"] == m] for m in modes},
        "one-way audio latency (ms)": {
            m: [v for c in calls if c["mode"] == m for v in c["one_way_ms"]] for m in modes
        },
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, data) in zip(axes, series.items(), strict=True):
        values = [data[m] or [float("nan")] for m in modes]
        ax.boxplot(values, showfliers=False)
        ax.set_xticks(range(1, len(modes) + 1), modes)
        for i, (mode, points) in enumerate(zip(modes, values, strict=True), start=1):
            xs = [i + 0.12 * ((k % 7) - 3) / 3 for k in range(len(points))]
            ax.scatter(xs, points, s=9, alpha=0.6, color=_COLOURS.get(mode, "black"))
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    prof = report["config"]["profile"]["name"]
    fig.suptitle(f"qcall latency distributions — profile {prof}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write the PNG plots into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "setup_breakdown.png", out / "latency_distributions.png"]
    _setup_breakdown(report, paths[0])
    _distributions(report, paths[1])
    return paths
