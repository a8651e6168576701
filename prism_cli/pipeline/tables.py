"""Operating-point tables regenerated from a YAML config (``prism tables``, ``make tables``, CI jobs).

A table config names the model and the settings of every stage; ``regenerate`` runs
profile -> partition -> export (-> rank-layers, with a ``layers`` section) -> bench in a work folder and writes into ``<out>/<name>/``:

* ``operating_points.{md,csv,json}``: every point, quality columns (reproducible under the seed) and
  latency columns labelled with the machine they were measured on;
* ``summary.md``: distinct stable points, equal-compute cells, MoE-layer elasticity;
* ``frontier.png``; ``partition.h5`` (so quality can be re-derived without re-running the solver);
* ``config.yaml``: the config used.

``quality_only`` skips timing; ``partition`` reuses a committed partition instead of re-solving.

``TableConfig.load`` checks the whole config before any stage runs: every key's type, the table's name
(one folder name under ``<out>``), and every stage's settings, built as the stages take them with their
own checks (and the model's config: the expert width, top-k, positions). The work folder is the table's
own: it keeps ``profile.h5`` (a rerun continues an interrupted profile), ``partition.h5`` and ``export/``,
which a rerun replaces; an ``export/`` there that is not a prism export is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prism_cli.config import load_run_config, unknown_key
from prism_cli.data import load_selection_text, load_text
from prism_cli.errors import Interrupted, PrismError
from prism_cli.evaluation.bench import BenchReport, BenchSettings, report_json, run_bench
from prism_cli.evaluation.bench_tables import QUALITY_COLUMNS, points_table, quality_table, summary_tables
from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.export.format import EXPORT_OUTPUT
from prism_cli.io import atomic_path, is_prism_h5, new_folder, write_text
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.loading import check_context_length, load_config, load_model, parse_device
from prism_cli.operating_points import parse_operating_point, require_points
from prism_cli.profiling.format import FORMAT as PROFILE_FORMAT
from prism_cli.profiling.profiler import ProfileSettings, profile_model
from prism_cli.solvers.format import FORMAT as PARTITION_FORMAT
from prism_cli.solvers.format import read_partition, write_partition
from prism_cli.solvers.runner import PartitionSettings, check_workers, partition_profile
from prism_cli.tuning.layers import SEQ_LEN as RANK_SEQ_LEN
from prism_cli.tuning.layers import TOKENS as RANK_TOKENS
from prism_cli.tuning.layers import check_windows, rank_export

__all__ = ["QUALITY_COLUMNS", "TableConfig", "check_work_folder", "quality_table", "regenerate"]

#: The keys of each section of a table config and the type each takes: the settings of the stage it
#: configures, under the names of that command's options. ``list`` keys take a YAML list, one value or a
#: string with the command line's separator (``batch: "8,32"``, ``points: "topk:1;linear:4"``).
SECTIONS: dict[str, dict[str, type]] = {
    "profile": {"data": str, "tokens": int, "max_rows": int, "holdout": float, "seq_len": int, "batch_size": int},
    "partition": {"solver": str, "sub_experts": int, "keep": int, "gate_neurons": int, "gate_selection": str,
                  "workers": int},
    "export": {"gate": str, "operating_point": str},
    "rank-layers": {"data": str, "tokens": int, "seq_len": int},
    "bench": {"data": str, "tokens": int, "batch": list, "seq_len": int, "mode": str, "points": list, "repeats": int,
              "max_repeats": int, "precision": float, "warmup": int, "settle": int, "dtype": str},
}
#: The top-level keys and their types (``data``, shared as in every command's config, is the text of each
#: stage whose section names none).
TOP_KEYS: dict[str, type] = {"name": str, "model": str, "seed": int, "device": str}

#: Seeds go to numpy's and torch's generators and into HDF5 metadata (the bound of every command's --seed).
MAX_SEED = 2**63 - 1

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _scalar(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or one line naming ``key``. An integer or a number may be written as a string,
    as on the command line; a string key takes a string, never a number YAML read (``name: 1.10`` is 1.1)."""
    if value is None:
        raise PrismError(f"{key!r} has no value; give one or leave the key out")
    if kind is str:
        if isinstance(value, str):
            return value
    elif not isinstance(value, (bool, list, dict)):
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return kind(value.strip())
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    hint = f'; quote it: {key}: "{value}"' if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    raise PrismError(f"{key!r} takes {_KIND_NAMES[kind]}, not {shown}{hint}")


def _batches(value: Any) -> list[int]:
    """``bench.batch``: one size, a list, or the command line's comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    batches = [_scalar("batch", item, int) for item in items]
    if not batches:
        raise PrismError("'batch' names no batch size; give sizes such as \"8,32\"")
    return batches


def _points(value: Any) -> list[str]:
    """``bench.points``: one point, a list, or the command line's ';'- or ','-separated string."""
    if isinstance(value, str):
        return require_points(value, "'points'")
    items = value if isinstance(value, list) else [value]
    named = [str(item) if isinstance(item, int) and not isinstance(item, bool) else _scalar("points", item, str)
             for item in items]  # a bare integer is the gate's default policy (as on the command line)
    points = [p.strip() for p in named if p.strip()]
    if not points:
        raise PrismError(f"'points' {value!r} names no operating point; give a list such as [linear:2, linear:8]")
    return points


def _check_name(name: Any) -> str:
    """The table's folder under ``--out``: one plain folder name, so that nothing is written outside it."""
    name = _scalar("name", name, str)
    if name in ("", ".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise PrismError(f"'name' must be one folder name (the table is written to <out>/<name>/), not {name!r}")
    return name


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """Prefix a refusal inside the block with ``where`` (the config file and its section)."""
    try:
        yield
    except PrismError as exc:
        raise PrismError(f"{where}: {exc}") from None


@dataclass
class TableConfig:
    """A table config as read from its file (sections as written, keys with '_'); ``load`` checks it whole."""

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
    #: The file it was read from (named in refusals); not part of the config.
    source: Path | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, path: str | Path, *, profiles: bool = True) -> TableConfig:
        """Read and check a table config: every key's type and every stage's settings, built with the
        checks the stages make, so that a bad value is refused in one line before any stage runs.
        ``profiles``: whether the run profiles (not where a partition is reused: the profile section's
        text is then not read, and need not exist)."""
        data = load_run_config(path)
        known = {*TOP_KEYS, *SECTIONS, "data"}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise unknown_key(f"table config {path}", "key", unknown[0], known)
        shared_data = data.pop("data", None)
        sections: dict[str, dict[str, Any]] = {}
        for section in SECTIONS:
            if section in data:  # `max-rows` and `max_rows` are one key (config.py refuses both at once)
                sections[section] = {str(k).replace("-", "_"): v for k, v in (data.pop(section) or {}).items()}
        if shared_data is not None:  # as every command reads the shared key: the text of each stage without its own
            for section in ("profile", "bench", *(("rank-layers",) if "rank-layers" in sections else ())):
                sections.setdefault(section, {}).setdefault("data", shared_data)
        data.setdefault("name", Path(path).stem)
        config = cls(**data, **{k: v for k, v in sections.items() if k != "rank-layers"},
                     layers=sections.get("rank-layers"), source=Path(path))
        config.check(profiles=profiles)
        return config

    def where(self, section: str | None = None) -> str:
        """How refusals name this config (and ``section`` of it)."""
        origin = f"config file {self.source}" if self.source is not None else f"table config {self.name!r}"
        return origin + (f": section {section!r}" if section else "")

    def check(self, profiles: bool = True) -> None:
        """Refuse, in one line naming the file and the key, any value a stage would refuse: the stages'
        settings objects are built and validated here, and the model's config read (the expert width that
        N must divide, top-k for the operating points, the positions that bound every seq_len)."""
        with _naming(self.where()):
            _check_name(self.name)
            self.seed = _scalar("seed", self.seed, int)  # "7" is 7, as on the command line: the stages take the int
            if not 0 <= self.seed <= MAX_SEED:
                raise PrismError(f"'seed' must be between 0 and {MAX_SEED}, got {self.seed}")
        with _naming(f"{self.where()}: device {self.device!r}"):
            parse_device(_scalar("device", self.device, str))
        with _naming(f"{self.where()}: model {self.model!r}"):
            model_config = load_config(_scalar("model", self.model, str))
            adapter = adapter_for_config(model_config)
        with _naming(self.where("profile")):
            profile, data = profile_settings(self)
            if profiles:
                load_text(data, "calibration", forbid=("eval",), what="profile")
                check_context_length(model_config, profile.seq_len)
        with _naming(self.where("partition")):
            solver, _ = partition_settings(self)
            solver.validate(adapter.width)
        with _naming(self.where("export")):
            export = export_settings(self)
            if export.operating_point is not None:
                parse_operating_point(export.operating_point, export.gate, solver.sub_experts, adapter.top_k)
        if self.layers is not None:
            with _naming(self.where("rank-layers")):
                ranking = rank_settings(self)
                load_selection_text(ranking.get("data"), "rank layers")
                check_context_length(model_config, ranking.get("seq_len", RANK_SEQ_LEN))
        with _naming(self.where("bench")):
            bench, _ = bench_settings(self)  # its text read: a missing file is refused now
            for point in bench.points or []:
                parse_operating_point(point, export.gate, solver.sub_experts, adapter.top_k)
            check_context_length(model_config, bench.seq_len)

    def as_file(self) -> dict[str, Any]:
        """The config as a file that ``load`` reads back (sections under their command names)."""
        data: dict[str, Any] = {"name": self.name, "model": self.model, "seed": self.seed, "device": self.device,
                                "profile": self.profile, "partition": self.partition, "export": self.export}
        if self.layers is not None:
            data["rank-layers"] = self.layers
        data["bench"] = self.bench
        return data


def _pick(config: TableConfig, section: str) -> dict[str, Any]:
    """The keys of ``section``, each of the type it takes (unknown keys refused, naming the nearest)."""
    values = {"rank-layers": config.layers}.get(section, getattr(config, section, None)) or {}
    if not isinstance(values, dict):
        raise PrismError(f"section {section!r} must be a mapping of option names to values")
    kinds = SECTIONS[section]
    bad = sorted(set(values) - set(kinds), key=str)
    if bad:
        raise unknown_key("prism tables", "key", bad[0], set(kinds))  # an option of the command, not of the table run
    return {key: value if kinds[key] is list else _scalar(key, value, kinds[key]) for key, value in values.items()}


def profile_settings(config: TableConfig) -> tuple[ProfileSettings, str | None]:
    """The profiler's settings of the config (validated) and its calibration data."""
    prof = _pick(config, "profile")
    data = prof.pop("data", None)
    if "holdout" in prof:
        prof["holdout_fraction"] = prof.pop("holdout")
    settings = ProfileSettings(seed=config.seed, **prof)
    settings.validate()
    return settings, data


def partition_settings(config: TableConfig) -> tuple[PartitionSettings, int | None]:
    """The solver settings of the config's partition section, and its worker count (checked without the
    model: ``PartitionSettings.validate`` takes the expert width)."""
    part = _pick(config, "partition")
    workers = part.pop("workers", None)
    check_workers(workers)
    return PartitionSettings(seed=config.seed, **part), workers


def export_settings(config: TableConfig) -> ExportSettings:
    """The exporter's settings of the config (validated)."""
    settings = ExportSettings(**_pick(config, "export"))
    settings.validate()
    return settings


def rank_settings(config: TableConfig) -> dict[str, Any]:
    """``rank_export``'s keyword arguments from the config's rank-layers section, with its checks on them."""
    ranking = _pick(config, "rank-layers")
    check_windows(ranking.get("tokens", RANK_TOKENS), ranking.get("seq_len", RANK_SEQ_LEN))
    return ranking


def bench_settings(config: TableConfig, *, quality_only: bool = False,
                   points: list[str] | None = None) -> tuple[BenchSettings, str]:
    """The bench settings (validated) and quality text of a table config (``points`` overrides its points)."""
    bench_cfg = _pick(config, "bench")
    data = bench_cfg.pop("data", None)
    batches = _batches(bench_cfg.pop("batch", "32"))
    configured = bench_cfg.pop("points", None)
    settings = BenchSettings(batches=batches, seed=config.seed, quality_only=quality_only, device=config.device,
                             points=points or (_points(configured) if configured is not None else None), **bench_cfg)
    settings.validate()
    text, _ = load_text(data, "eval")
    return settings, text


def table_export(config: TableConfig, partition: Path, out: Path,
                 on_stage: Callable[[str, int], Callable[..., None]] | None = None) -> None:
    """Export ``partition`` as the config says, then rank its layers where the config has a ``rank-layers`` section.

    An export already at ``out`` is replaced (once the new one is complete): ``check_work_folder`` has made
    sure that it is a prism export, the one an earlier run of the table left there.
    """
    export_model(config.model, partition, out, export_settings(config), force=True)
    if config.layers is not None:
        advance = on_stage("rank layers", 0) if on_stage else None
        rank_export(out, **rank_settings(config),
                    on_start=(lambda total: advance(0, total=total)) if advance else None,
                    on_step=(lambda: advance(1)) if advance else None)


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


def keep_partition(partition: Path, table_dir: Path) -> None:
    """Copy ``partition`` into the table (unless it is the table's own): through a temporary file, so that
    a run stopped mid-copy leaves the committed partition whole."""
    kept = table_dir / "partition.h5"
    if partition.resolve() != kept.resolve():
        with atomic_path(kept) as tmp:
            shutil.copyfile(partition, tmp)


#: What a table run writes into its work folder, beside ``export/``: name, its HDF5 format, what it is.
WORK_FILES = (("profile.h5", PROFILE_FORMAT, "profile"), ("partition.h5", PARTITION_FORMAT, "partition"))


def check_work_folder(work: Path) -> None:
    """Refuse a work folder whose ``export/``, ``profile.h5`` or ``partition.h5`` is not a prism export,
    profile or partition (or an empty export folder): the run replaces them, which must be what an earlier
    run left (a rerun continues), never files of the user's."""
    export = Path(work) / "export"
    if (export.exists() or export.is_symlink()) and (
            export.is_symlink() or not export.is_dir() or not EXPORT_OUTPUT.permits(export)):  # what export --force keeps
        raise PrismError(f"work folder {work} holds {export}, which is not a prism export; prism tables writes its "
                         "export there: move it away or give another --work")
    for name, fmt, kind in WORK_FILES:
        path = Path(work) / name
        if (path.exists() or path.is_symlink()) and (path.is_symlink() or not path.is_file() or not is_prism_h5(path, fmt)):
            raise PrismError(f"work folder {work} holds {path}, which is not a prism {kind}; prism tables writes its "
                             f"{kind} there: move it away or give another --work")


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

    ``points`` overrides the config's operating points (a quick check of a few rows of a table). Everything
    that can refuse the run is checked before any stage runs: the config whole, the reused partition, and
    ``work``'s ``export/``, which is replaced only where it is a prism export (a rerun's). A run refused or
    failed leaves no work folder it created empty behind.
    """
    config.check(profiles=partition is None)
    if partition is not None:
        check_partition_matches(config, partition)
    check_work_folder(work)
    with new_folder(work):
        return _run(config, out_root / config.name, work, partition, quality_only, points, on_stage)


def _run(config: TableConfig, table_dir: Path, work: Path, partition: Path | None, quality_only: bool,
         points: list[str] | None, on_stage: Callable[[str, int], Callable[[int], None]] | None,
         ) -> tuple[Path, BenchReport]:
    """``regenerate``'s stages, once its checks have passed and the work folder exists."""
    if partition is None:
        settings, data = profile_settings(config)
        text, data_name = load_text(data, "calibration", forbid=("eval",), what="profile")
        loaded = load_model(config.model, device=config.device)
        advance = on_stage("profile", 0) if on_stage else None
        try:  # the work folder is the table's own: a rerun continues what an interruption left there
            profile_model(loaded, text, data_name, settings, work / "profile.h5", resume=True,
                          on_batch=advance, on_start=(lambda plan: advance(0, total=plan.total_tokens)) if advance else None)
        except Interrupted:
            raise Interrupted(f"profiling progress is kept in {work}; rerun the same command to continue") from None
        del loaded
        solver, workers = partition_settings(config)
        advance = on_stage("partition", 0) if on_stage else None
        result = partition_profile(work / "profile.h5", solver, workers=workers,
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
    keep_partition(partition, table_dir)
    write_text(table_dir / "config.yaml", yaml.safe_dump(config.as_file(), sort_keys=False))
    return table_dir, report
