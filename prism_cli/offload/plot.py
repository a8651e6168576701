"""The offloading plot (PNG): per-token decode latency against the device-memory budget, one panel per policy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from prism_cli.io import atomic_path
from prism_cli.offload.bench import OffloadReport


def plot_latency(report: OffloadReport, path: Path) -> None:
    policies = list(dict.fromkeys(r.key.policy for r in report.runs))
    fig, axes = plt.subplots(1, len(policies), figsize=(5.5 * len(policies), 4.5), dpi=110, sharey=True, squeeze=False)
    baselines = {p.baseline for p in report.pairs}
    middles = {p.middle for p in report.pairs} - {p.elastic for p in report.pairs}
    for ax, policy in zip(axes[0], policies, strict=True):
        lines = dict.fromkeys((r.key.point, r.key.pin) for r in report.runs if r.key.policy == policy)
        for point, pin in lines:
            runs = sorted((r for r in report.runs if (r.key.policy, r.key.point, r.key.pin) == (policy, point, pin)),
                          key=lambda r: r.budget_bytes)
            style = "--" if point in baselines else (":" if point in middles else "-")
            marker = "s" if point in baselines else ("x" if point in middles else "o")
            label = point + (f", pin {pin:.0%}" if pin else "") + (" (whole experts)" if point in baselines else "")
            ax.plot([r.budget_bytes / 1e9 for r in runs], [r.median * 1e3 for r in runs], style, marker=marker, label=label)
        ax.set_title(f"policy {policy}")
        ax.set_xlabel("device memory budget (GB)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode latency per token (ms, median)")
    axes[0][-1].legend(fontsize=7)
    link = "simulated link" if not report.settings.device.startswith("cuda") else "CUDA copies"
    fig.suptitle(f"offloaded decode ({report.mode}, {link}): sub-experts (solid) against whole experts (dashed)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
