"""``prism partition``: split every expert into sub-experts; ``prism partition compare``: rank solvers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from prism_cli.commands.common import ConfigOption, DefaultCommandGroup, check_seed, deferred_progress, parse_layers
from prism_cli.console import console
from prism_cli.errors import PrismError
from prism_cli.io import check_not_input, check_replaceable, check_writable
from prism_cli.report import ResultTable
from prism_cli.solvers import SOLVERS
from prism_cli.solvers.format import FORMAT as PARTITION_FORMAT
from prism_cli.solvers.format import Partition, mean_scores, merge_partitions, write_partition
from prism_cli.solvers.runner import PartitionSettings, partition_profile, run_partition

app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True, help="Split experts into sub-experts (SPEC 3.2-3.4).")

SolverOptions = typer.Option(None, "--solver-option", "-O", help="Solver setting NAME=VALUE (repeatable), e.g. -O generations=40.")


def parse_solver_options(items: list[str] | None) -> tuple[tuple[str, Any], ...]:
    out = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PrismError(f"--solver-option must look like NAME=VALUE, got {item!r}")
        out.append((name.replace("-", "_"), yaml.safe_load(value)))
    return tuple(out)


@app.command("run")
def run(
    profile: Path = typer.Argument(..., help="Profile written by `prism profile`."),
    sub_experts: int = typer.Option(4, "--sub-experts", "-N", help="Sub-experts per expert (must divide the expert width)."),
    solver: str = typer.Option("nsga2", help=f"Solver: {', '.join(SOLVERS.names())}."),
    keep: int = typer.Option(1, help="Sub-experts kept per token in the paper cost (SPEC 3.2: keep one)."),
    gate_neurons: int = typer.Option(4, "--gate-neurons", help="Gate neurons per sub-expert (SPEC 3.4a)."),
    gate_selection: str = typer.Option(
        "coact", "--gate-selection", help="How gate neurons are chosen: coact (the paper's rule) or mass."
    ),
    seed: int = typer.Option(0, callback=check_seed, help="Seed; each expert derives its own from (seed, layer, expert)."),
    workers: int = typer.Option(None, help="Parallel worker processes (default: all cores)."),
    executor: str = typer.Option("local", help="local (processes on this machine) or ray (a Ray cluster; RAY_ADDRESS)."),
    layers: str = typer.Option(None, help="Layers to partition, e.g. 0-7 (default: all profiled); join parts with `merge`."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run an interruption left in OUT.partial/."),
    solver_option: list[str] = SolverOptions,
    out: Path = typer.Option(Path("partition.h5"), help="Output HDF5 file."),
    config: str = ConfigOption,
) -> None:
    """Partition every profiled expert into N equal sub-experts and write partition.h5.

    Each expert is saved as it finishes (OUT.partial/): after a kill or Ctrl-C, --resume solves only
    the rest. Split a large model over machines with --layers and join the files with `merge`.
    """
    settings = PartitionSettings(
        solver=solver, sub_experts=sub_experts, keep=keep, gate_neurons=gate_neurons, gate_selection=gate_selection, seed=seed,
        solver_options=parse_solver_options(solver_option),
    )
    check_not_input(out, {"profile": profile, **({"config file": Path(config)} if config else {})})
    check_writable(out)
    with deferred_progress(f"partitioning ({solver})", unit="experts") as (start, advance):
        result = run_partition(profile, settings, out, resume=resume, layers=parse_layers(layers), workers=workers,
                               executor=executor, on_start=start, on_done=lambda *_: advance())
    console.print(summary_table(result).rich())
    console.print(f"written {out}")


@app.command("merge")
def merge(
    parts: list[Path] = typer.Argument(..., help="Partition files of disjoint layer ranges of one run (same profile and settings)."),
    out: Path = typer.Option(..., help="Output HDF5 file."),
    config: str = ConfigOption,
) -> None:
    """Join partitions made by layer range (`prism partition PROFILE --layers A-B`) into one file."""
    check_writable(out)
    check_not_input(out, {f"part {path}": path for path in parts})
    result = merge_partitions(parts)
    if result.meta.get("profile"):  # as recorded where the parts were made (relative to that folder)
        check_not_input(out, {"profile the parts were made from": Path(result.meta["profile"])})
    check_replaceable(out, PARTITION_FORMAT, "partition")
    write_partition(out, result)
    console.print(summary_table(result).rich())
    console.print(f"written {out}: layers {', '.join(map(str, result.layers))} from {len(parts)} parts")


def summary_table(partition: Partition) -> ResultTable:
    n = partition.n_sub
    table = ResultTable(
        f"partition: solver {partition.meta['solver']}, N = {n}, keep = {partition.meta['keep']}",
        ["layer", "fit cost", "held-out cost", *[f"held-out R_{m}" for m in range(1, n)], "s / expert"],
    )
    for layer, experts in sorted(partition.experts.items()):
        m = mean_scores(experts)
        table.add(layer, m.fit_cost, m.heldout_cost, *map(float, m.heldout_retained), m.seconds)
    table.notes.append("cost: normalised paper cost (SPEC 3.2), lower is better; "
                       "R_m: retained-mass fraction with m sub-experts, higher is better")
    return table


@app.command("compare")
def compare(
    profile: Path = typer.Argument(..., help="Profile written by `prism profile`."),
    solvers: str = typer.Option(",".join(SOLVERS.names()), help="Comma-separated solvers to compare."),
    sub_experts: int = typer.Option(4, "--sub-experts", "-N", help="Sub-experts per expert."),
    keep: int = typer.Option(1, help="Sub-experts kept per token in the paper cost."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed (the same for every solver)."),
    workers: int = typer.Option(None, help="Parallel worker processes (default: all cores)."),
    layers: str = typer.Option(None, help="Layers, e.g. 0-3 (default: all profiled)."),
    out: Path = typer.Option(Path("partition_compare"), help="Output stem: writes .md, .csv and .json."),
    config: str = ConfigOption,
) -> None:
    """Run several solvers on the same experts and tabulate held-out cost, R_m and time per expert."""
    names = [s.strip() for s in solvers.split(",") if s.strip()]
    if not names:
        raise PrismError("--solvers is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # one row per solver: a second run of the same one would only cost time
        raise PrismError(f"--solvers names {', '.join(repeated)} more than once; give each solver once")
    for name in names:
        SOLVERS.get(name)
    ResultTable.check_writable(out, {"profile": profile, **({"config file": Path(config)} if config else {})})
    wanted = parse_layers(layers)
    table = ResultTable(
        f"partition solvers on {profile.name}: N = {sub_experts}, keep = {keep}, held-out rows",
        ["solver", "held-out cost", *[f"R_{m}" for m in range(1, sub_experts)], "mean R", "fit cost", "s / expert", "experts"],
    )
    per_solver: dict[str, Any] = {}
    for name in names:
        settings = PartitionSettings(solver=name, sub_experts=sub_experts, keep=keep, seed=seed)
        with deferred_progress(name, unit="experts") as (start, advance):
            result = partition_profile(
                profile, settings, layers=wanted, workers=workers, on_start=start, on_done=lambda *_: advance()
            )
        experts = [x for layer in result.layers for x in result.experts[layer]]
        m = mean_scores(experts)
        row = [name, m.heldout_cost, *map(float, m.heldout_retained), float(m.heldout_retained.mean()), m.fit_cost,
               m.seconds, len(experts)]
        table.add(*row)
        per_solver[name] = {"heldout_cost": [x.heldout_cost for x in experts], "seconds": [x.seconds for x in experts]}
    table.notes += [
        "cost: normalised paper cost (SPEC 3.2: activation mass lost when each token keeps its largest sub-expert), lower is better",
        "R_m: mean over held-out tokens of the mass fraction in their m largest sub-experts, higher is better",
        f"s / expert: solver wall time on one core per (layer, expert) problem; seed {seed}",
    ]
    baselines = [name for name in names if SOLVERS.get(name).baseline]
    if baselines:  # greedy scoring no better than random is the method's finding, not a broken solver
        table.notes.append(f"baselines, which do not optimise the cost: {', '.join(baselines)} (greedy is the paper's "
                           "annealing start: it balances mass across sub-experts, which the cost penalises; SPEC 7)")
    paths = table.save(out, extra={"profile": str(profile), "per_expert": per_solver})
    console.print(table.rich())
    console.print("written " + ", ".join(map(str, paths)))
