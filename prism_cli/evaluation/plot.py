"""The quality-against-latency plot of a bench run (PNG): every point, the one frontier, the counted points."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from prism_cli.evaluation.bench import BenchReport
from prism_cli.evaluation.pareto import COUNT_RULE
from prism_cli.io import atomic_path

_STYLE = {"original": ("tab:red", "s"), "linear": ("tab:gray", "^"), "layered": ("tab:orange", ">"), "topk": ("tab:blue", "o"),
          "pattern": ("tab:purple", "D"), "threshold": ("tab:green", "v")}


def plot_frontiers(report: BenchReport, batch: int, path: Path) -> None:
    """Scatter every point by policy; draw the frontier over all usable points; ring the counted ones."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for policy, (color, marker) in _STYLE.items():
        pts = [p for p in report.points if p.point.split(":")[0] == policy]
        if pts:
            ax.scatter([p.latency[batch].median_ms for p in pts], [p.quality.perplexity for p in pts],
                       c=color, marker=marker, label=policy, zorder=3, s=30)
    count = report.counts[batch]
    front = [report.point(n) for n in count.frontier]
    ax.plot([p.latency[batch].median_ms for p in front], [p.quality.perplexity for p in front], "-", color="black", lw=1,
            label="frontier (elastic and original)")
    counted = [report.point(n) for n in count.counted]
    ax.scatter([p.latency[batch].median_ms for p in counted], [p.quality.perplexity for p in counted],
               facecolors="none", edgecolors="black", s=110, zorder=4, label="counted (distinct stable)")
    ax.axhline(COUNT_RULE.quality_ratio * report.full_perplexity, color="gray", lw=0.8, ls=":",
               label=f"{COUNT_RULE.quality_ratio:g} x full perplexity")
    ax.set_xlabel(f"latency per {report.settings.mode} step, batch {batch} (ms, median)")
    ax.set_ylabel("held-out perplexity")
    ratio = f"{count.ratio:.1f}x" if count.ratio else "n/a"
    ax.set_title(f"{Path(report.target).name}: {len(count.counted)} distinct stable points ({count.elastic} elastic), "
                 f"{ratio} the original's {len(count.original_alone)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
