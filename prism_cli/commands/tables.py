"""``prism tables``: regenerate operating-point tables from a config (what CI jobs run)."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import StageBars
from prism_cli.console import console
from prism_cli.errors import PrismError
from prism_cli.io import check_output_folder


def tables(
    config: Path = typer.Option(..., "--config", help="Table config (configs/NAME.yaml): model, stages, points, data."),
    out: Path = typer.Option(Path("tables"), help="Tables root: writes <out>/<name>/."),
    work: Path = typer.Option(
        None, help="Work folder for profile, partition and export (default runs/<name>): the table's own, a rerun "
                   "replaces them; an export/ there that is not a prism export is refused."),
    partition: Path = typer.Option(None, help="Reuse this partition instead of profiling and solving again."),
    quality_only: bool = typer.Option(False, "--quality-only", help="Skip timing; print the quality columns only."),
) -> None:
    """Run profile -> partition -> export (-> rank-layers) -> bench for a config and write its operating-point tables."""
    from prism_cli.evaluation.bench_tables import summary_tables
    from prism_cli.pipeline.tables import TableConfig, quality_table, regenerate

    cfg = TableConfig.load(config, profiles=partition is None)
    if partition is not None and not partition.exists():
        raise PrismError(f"partition {partition} does not exist")
    work = work or Path("runs") / cfg.name
    for folder in (out / cfg.name, work):
        check_output_folder(folder)
    with StageBars() as stages:
        table_dir, report = regenerate(cfg, out, work, partition=partition,
                                       quality_only=quality_only, on_stage=stages)
    console.print(quality_table(report).rich())
    if not quality_only:
        for table in summary_tables(report):
            console.print(table.rich())
        console.print(f"written {table_dir}/operating_points.md, .csv, .json, summary.md, frontier.png, partition.h5")
