"""``prism rank-layers``: rank an export's MoE layers on calibration text, for its ``layered:K+j`` points."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, deferred_progress
from prism_cli.console import console


def rank_layers(
    export: Path = typer.Argument(..., help="A prism export (written by `prism export`); the ranking is saved in it."),
    data: str = typer.Option(None, help="Calibration text: a file or builtin:calibration (the default); never the evaluation split."),
    tokens: int = typer.Option(16_384, help="Calibration tokens per perplexity run."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration window."),
    config: str = ConfigOption,
) -> None:
    """Rank the MoE layers at every K by how much one more sub-expert helps; layered:K+j points use the first j."""
    from prism_cli.runtime.layers import RANKING_FILE
    from prism_cli.tuning.layers import rank_export, ranking_table

    with deferred_progress("ranking layers", unit="runs") as (start, advance):
        ranking = rank_export(export, data=data, tokens=tokens, seq_len=seq_len, on_start=start, on_step=advance)
    console.print(ranking_table(ranking).rich())
    half = len(next(iter(ranking.order.values()))) // 2
    console.print(f"wrote [bold]{export / RANKING_FILE}[/]: `prism bench {export}` now also measures layered:K+{half} "
                  f"(any layered:K+j can be asked for with --points)")
