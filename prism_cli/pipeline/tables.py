"""Operating-point tables regenerated from a YAML config (``prism tables``, ``make tables``, CI jobs).

A table config names the model and the settings of every stage; ``regenerate`` runs
profile -> partition -> export (-> rank-layers, with a ``layers`` section) -> bench in a work folder and writes into ``<out>/<name>/``:

* ``operating_points.{md,csv,json}``: every point, quality columns (reproducible under the seed) and
  latency columns labelled with the machine they were measured on;
* ``summary.md``: distinct stable points, equal-compute cells, MoE-layer elasticity;
* ``frontier.png``; ``partition.h5`` (so quality can be re-derived without re-running the solver);
* ``config.yaml``: the config used.

``quality_only`` skips timing; ``partition`` reuses a committed partition instead of re-solving.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prism_cli.config import load_run_config, unknown_key
from prism_cli.data import load_text
from prism_cli.errors import Interrupted, PrismError
from prism_cli.evaluation.bench import BenchReport, BenchSettings, report_json, run_bench
from prism_cli.evaluation.bench_tables import QUALITY_COLUMNS, points_table, quality_table, summary_tables
from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.io import write_text
from prism_cli.models.loading import load_model
from prism_cli.profiling.profiler import ProfileSettings, profile_model
from prism_cli.solvers.format import read_partition, write_partition
from prism_cli.solvers.runner import PartitionSettings, partition_profile
from prism_cli.tuning.layers import rank_export

__all__ = ["QUALITY_COLUMNS", "TableConfig", "quality_table", "regenerate"]


@dataclass
class TableConfig:
    name: str
    model: str = "builtin"
    seed: int = 0
    device: str = "cpu"
    profile: dict[str, Any] = field(default_factory=dict)
    partition: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    #: ``prism rank-layers`` settings (``data``, ``tokens``; the ``rank-layers`` section of the file);
    #: present: the export offers layered points.
    layers: dict[str, Any] | None = None
    bench: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> TableConfig:
        data = load_run_config(path)
        known = {"name", "model", "seed", "device", "profile", "partition", "export", "rank-layers", "bench", "data"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise unknown_key(f"table config {path}", "key", unknown[0], known)
        data.pop("data", None)
        if "rank-layers" in data:
            data["layers"] = data.pop("rank-layers") or {}
        data.setdefault("name", Path(path).stem)
        return cls(**data)


    def as_file(self) -> dict[str, Any]:
        """The config as a file that ``load`` reads back (sections under their command names)."""
        data = {k: v for k, v in vars(self).items() if k != "layers"}
        if self.layers is not None:
            data = {**{k: v for k, v in data.items() if k != "bench"}, "rank-layers": self.layers, "bench": self.bench}
        return data


def _pick(section: dict[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    bad = sorted(set(section) - allowed)
    if bad:
        raise unknown_key(f"table config section {where!r}", "key", bad[0], allowed)
    return section


def bench_settings(config: TableConfig, *, quality_only: bool = False,
                   points: list[str] | None = None) -> tuple[BenchSettings, str]:
    """The bench settings and quality text of a table config (``points`` overrides its points)."""
    bench_cfg = dict(_pick(config.bench, {"data", "tokens", "batch", "seq_len", "mode", "points", "repeats", "max_repeats",
                                           "precision", "warmup", "settle", "dtype"}, "bench"))
    text, _ = load_text(bench_cfg.pop("data", None), "eval")
    batches = [int(b) for b in str(bench_cfg.pop("batch", "32")).split(",")]
    configured = bench_cfg.pop("points", None)
    points = points or configured
    settings = BenchSettings(batches=batches, seed=config.seed, quality_only=quality_only, device=config.device,
                             points=points.split(";") if isinstance(points, str) else points, **bench_cfg)
    return settings, text


def table_export(config: TableConfig, partition: Path, out: Path,
                 on_stage: Callable[[str, int], Callable[..., None]] | None = None) -> None:
    """Export ``partition`` as the config says, then rank its layers where the config has a ``rank-layers`` section."""
    exp = _pick(config.export, {"gate", "operating_point"}, "export")
    export_model(config.model, partition, out, ExportSettings(**exp), force=True)
    if config.layers is not None:
        advance = on_stage("rank layers", 0) if on_stage else None
        rank_export(out, **_pick(config.layers, {"data", "tokens", "seq_len"}, "rank-layers"),
                    on_start=(lambda total: advance(0, total=total)) if advance else None,
                    on_step=(lambda: advance(1)) if advance else None)


def partition_settings(config: TableConfig) -> tuple[PartitionSettings, int | None]:
    """The solver settings of the config's partition section, and its worker count."""
    part = dict(_pick(config.partition, {"solver", "sub_experts", "keep", "gate_neurons", "gate_selection", "workers"}, "partition"))
    workers = part.pop("workers", None)
    return PartitionSettings(seed=config.seed, **part), workers


def check_partition_matches(config: TableConfig, partition: Path) -> None:
    """A reused partition must be one the config's partition section would make: a partition of another
    N (or gate) would fill the table's rows with points the config does not describe."""
    meta = read_partition(partition).meta
    wanted = asdict(partition_settings(config)[0])
    differ = [f"{key} {meta[key]} (config: {wanted[key]})" for key in ("sub_experts", "keep", "gate_neurons", "gate_selection")
              if key in meta and meta[key] != wanted[key]]
    if differ:
        raise PrismError(f"partition {partition} does not match config {config.name}: it has " + ", ".join(differ)
                         + "; give a partition made with the config's settings, or leave --partition out")


def regenerate(
    config: TableConfig,
    out_root: Path,
    work: Path,
    *,
    partition: Path | None = None,
    quality_only: bool = False,
    points: list[str] | None = None,
    on_stage: Callable[[str, int], Callable[[int], None]] | None = None,
) -> tuple[Path, BenchReport]:
    """Run the pipeline for ``config``; returns the table folder and the bench report.

    ``points`` overrides the config's operating points (a quick check of a few rows of a table).
    """
    if partition is not None:
        check_partition_matches(config, partition)
    work.mkdir(parents=True, exist_ok=True)
    table_dir = out_root / config.name
    seed = config.seed
    if partition is None:
        prof = dict(_pick(config.profile, {"data", "tokens", "max_rows", "holdout", "seq_len", "batch_size"}, "profile"))
        text, data_name = load_text(prof.pop("data", None), "calibration", forbid=("eval",), what="profile")
        if "holdout" in prof:
            prof["holdout_fraction"] = prof.pop("holdout")
        loaded = load_model(config.model, device=config.device)
        advance = on_stage("profile", 0) if on_stage else None
        try:  # the work folder is the table's own: a rerun continues what an interruption left there
            profile_model(loaded, text, data_name, ProfileSettings(seed=seed, **prof), work / "profile.h5", resume=True,
                          on_batch=advance, on_start=(lambda plan: advance(0, total=plan.total_tokens)) if advance else None)
        except Interrupted:
            raise Interrupted(f"profiling progress is kept in {work}; rerun the same command to continue") from None
        del loaded
        settings, workers = partition_settings(config)
        advance = on_stage("partition", 0) if on_stage else None
        result = partition_profile(work / "profile.h5", settings, workers=workers,
                                   on_start=(lambda total: advance(0, total=total)) if advance else None,
                                   on_done=(lambda *_: advance(1)) if advance else None)
        partition = work / "partition.h5"
        write_partition(partition, result)
    table_export(config, partition, work / "export", on_stage)
    settings, text = bench_settings(config, quality_only=quality_only, points=points)
    report = run_bench(str(work / "export"), text, settings, on_stage=on_stage)
    if quality_only:
        return table_dir, report
    table_dir.mkdir(parents=True, exist_ok=True)
    points_table(report).save(table_dir / "operating_points", extra=report_json(report))
    write_text(table_dir / "summary.md", "\n".join(t.markdown() for t in summary_tables(report)))
    from prism_cli.evaluation.plot import plot_frontiers

    plot_frontiers(report, settings.batches[0], table_dir / "frontier.png")
    if partition.resolve() != (table_dir / "partition.h5").resolve():
        shutil.copyfile(partition, table_dir / "partition.h5")
    write_text(table_dir / "config.yaml", yaml.safe_dump(config.as_file(), sort_keys=False))
    return table_dir, report
