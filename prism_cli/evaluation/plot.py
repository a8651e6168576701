"""The quality-against-latency plot of a bench run (PNG), with the original and elastic frontiers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from prism_cli.evaluation.bench import BenchReport
from prism_cli.io import atomic_path

_STYLE = {"original": ("tab:red", "s"), "linear": ("tab:gray", "^"), "topk": ("tab:blue", "o"),
          "pattern": ("tab:purple", "D"), "threshold": ("tab:green", "v")}


def plot_frontiers(report: BenchReport, batch: int, path: Path) -> None:
    """Scatter every point by policy; draw the elastic and original frontiers; mark distinct stable points."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    by_name = {p.point: p for p in report.points}
    for policy, (color, marker) in _STYLE.items():
        pts = [p for p in report.points if p.point.split(":")[0] == policy]
        if pts:
            ax.scatter([p.latency[batch].median_ms for p in pts], [p.quality.perplexity for p in pts],
                       c=color, marker=marker, label=policy, zorder=3, s=30)
    for kind, style in (("elastic", "-"), ("original", "--")):
        front = [by_name[n] for n in report.frontier[batch][kind]]
        ax.plot([p.latency[batch].median_ms for p in front], [p.quality.perplexity for p in front], style,
                color="black" if kind == "elastic" else "tab:red", lw=1, label=f"{kind} frontier")
        stable = [by_name[n] for n in report.distinct[batch][kind]]
        ax.scatter([p.latency[batch].median_ms for p in stable], [p.quality.perplexity for p in stable],
                   facecolors="none", edgecolors="black", s=110, zorder=4,
                   label="distinct stable" if kind == "elastic" else None)
    ax.axhline(1.5 * report.full_perplexity, color="gray", lw=0.8, ls=":", label="1.5 x full perplexity")
    ax.set_xlabel(f"latency per {report.settings.mode} step, batch {batch} (ms, median)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{Path(report.target).name}: {len(report.distinct[batch]['elastic'])} vs "
                 f"{len(report.distinct[batch]['original'])} distinct stable operating points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
