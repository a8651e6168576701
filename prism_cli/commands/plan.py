"""``prism plan MODEL``: time, memory and disk of each stage from the config alone; ``prism plan calibrate``."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, DefaultCommandGroup, parse_int_list, parse_layers
from prism_cli.console import console, err_console
from prism_cli.errors import PrismError, check_distinct
from prism_cli.report import ResultTable

app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True,
                  help="Plan a model's profile, partition and export on this machine, from its config alone.")


@app.command("run")
def run(
    model: str = typer.Argument(..., help="A config.json, a checkpoint folder, a hub id, or builtin (no weights are read)."),
    tokens: int = typer.Option(131_072, help="Calibration tokens (as `prism profile --tokens`)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    max_rows: int = typer.Option(5_120, "--max-rows", help="Rows kept per expert."),
    holdout: float = typer.Option(0.2, help="Held-out share of the calibration sequences."),
    dtype: str = typer.Option("float32", help="Model dtype while profiling: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device that would profile (the unit costs are measured on it)."),
    max_memory: str = typer.Option(None, "--max-memory", help="Profiler budget, e.g. 8G (default: half the memory left after the model)."),
    layers: str = typer.Option(None, help="MoE layers to plan for, e.g. 0-7 (default: all)."),
    solver: str = typer.Option("nsga2", help="Partition solver."),
    sub_experts: int = typer.Option(4, "--sub-experts", "-N", help="Sub-experts per expert."),
    workers: int = typer.Option(None, help="Partition worker processes (default: all cores)."),
    costs: Path = typer.Option(None, help="Per-unit costs from `prism plan calibrate` (default: this machine's, "
                                          "else those measured where prism was built)."),
    out: Path = typer.Option(None, help="Also save the plan as OUT.md, OUT.csv and OUT.json."),
    config: str = ConfigOption,
) -> None:
    """Time, memory and disk of profile, partition and export for MODEL on this machine (no weights needed)."""
    from prism_cli.models.adapters import adapter_for_config
    from prism_cli.models.loading import check_context_length, parse_device, parse_dtype
    from prism_cli.planner import (
        MachineCosts,
        PlanSettings,
        check_plan,
        default_costs_path,
        defaulted_fields,
        make_plan,
        measure_profile_costs,
        model_shape,
        packaged_costs_path,
        read_config,
    )
    from prism_cli.profiling.budget import parse_size
    from prism_cli.profiling.profiler import ProfileSettings
    from prism_cli.solvers import SOLVERS

    ProfileSettings(tokens=tokens, seq_len=seq_len, batch_size=batch_size, max_rows=max_rows, holdout_fraction=holdout).validate()
    if out is not None:  # before the cost measurements, not after them; never into the checkpoint planned
        ResultTable.check_writable(out, {"model": Path(model)} if Path(model).is_dir() else {})
    parse_dtype(dtype)
    parse_device(device)
    SOLVERS.get(solver)
    if workers is not None and workers < 1:
        raise PrismError(f"--workers must be at least 1, got {workers}")
    settings = PlanSettings(tokens=tokens, seq_len=seq_len, batch_size=batch_size, max_rows=max_rows, holdout_fraction=holdout,
                            dtype=dtype, device=device, max_memory=parse_size(max_memory) if max_memory else None,
                            solver=solver, sub_experts=sub_experts, workers=workers, layers=parse_layers(layers))
    if costs is None:
        costs = default_costs_path() if default_costs_path().exists() else packaged_costs_path()
    machine = MachineCosts.load(costs)
    model_config, name = read_config(model)
    shape = model_shape(model_config, name)  # checks the config's own fields first
    adapter = adapter_for_config(model_config, quantized=True)
    defaulted = defaulted_fields(model, adapter)
    if defaulted:  # planned all the same, as transformers builds the model, but not silently
        console.print(f"note: {name}'s config.json gives no " + ", ".join(
            f"{key!r} (transformers' default {getattr(adapter.text_config, key)!r} is used)" for key in defaulted)
            + "; give the model's own values if they differ", highlight=False)
    check_context_length(model_config.get_text_config(), seq_len)
    check_plan(shape, settings, machine)
    console.print(f"measuring profiling costs at {name}'s shapes on this machine ...", highlight=False)
    unit = measure_profile_costs(shape, model_config, dtype=dtype, device=device, batch_size=batch_size, seq_len=seq_len,
                                 max_rows=max_rows, holdout_fraction=holdout)
    plan = make_plan(shape, settings, unit, machine)
    table = plan_table(plan, machine)
    console.print(table.rich())
    if out is not None:
        paths = table.save(out, extra={"shape": vars(shape), "settings": vars(settings), "unit_costs": {
            "dense_token_s": vars(unit.dense_token), "expert_call_s": vars(unit.expert_call),
            "tokens_per_call": unit.tokens_per_call}, "machine_costs": str(costs),
            "partition_core_seconds": plan.partition_core_seconds, "cores_for_an_hour": plan.cores_for_an_hour})
        console.print("written " + ", ".join(map(str, paths)))


def plan_table(plan, machine) -> ResultTable:
    """The plan as a table: one row per stage, with what fits this machine."""
    from prism_cli.planner import format_count, format_duration, machine_summary
    from prism_cli.profiling.budget import format_size

    s = plan.shape
    table = ResultTable(
        f"plan: {s.name} ({s.model_type}, {format_count(s.params)} parameters, {len(s.moe_layers)} MoE layers x "
        f"{s.num_experts} experts of width {s.width:,}, top-{s.top_k})",
        ["stage", "time here", "CPU time", "memory", "disk", "fits here"],
    )
    for stage in plan.stages:
        fits = "yes" if stage.memory_bytes <= plan.memory_here and stage.disk_bytes <= plan.disk_free_here else (
            "no: memory" if stage.memory_bytes > plan.memory_here else "no: disk")
        table.add(stage.name, format_duration(stage.seconds), format_duration(stage.cpu_seconds),
                  format_size(stage.memory_bytes), format_size(stage.disk_bytes), fits)
        table.notes.append(f"{stage.name}: " + "; ".join(stage.notes))
    table.notes += [
        f"partitioning within an hour: {plan.cores_for_an_hour} cores or Ray workers (one CPU each); "
        f"{format_duration(plan.partition_core_seconds)} on one core; this machine has {plan.cores_here}",
        f"profiling costs measured now on this machine; partition, export, loading and disk costs from {plan.costs_source} "
        f"({machine_summary(machine.machine)})",
        "time here: wall clock at this machine's load while the costs were measured; CPU time: the same work "
        "in CPU seconds of the process (what a machine that runs nothing else takes, per thread)",
    ]
    return table


@app.command("calibrate")
def calibrate(
    out: Path = typer.Option(None, help="Where to write the costs (default: ~/.cache/prism/plan_costs.json, which `prism plan` reads)."),
    solvers: str = typer.Option("nsga2,alternating,anneal", help="Solvers to time."),
    widths: str = typer.Option("256,512,1024,2048", help="Expert widths to time each solver at."),
    rows: int = typer.Option(4_096, help="Fit rows per synthetic expert (the default --max-rows keeps 4,096)."),
    config: str = ConfigOption,
) -> None:
    """Measure this machine's per-unit costs that take minutes: partition seconds per expert by solver and
    width, export and loading throughput, disk writes (a few minutes; `prism plan` then uses them)."""
    import psutil

    from prism_cli.io import check_output_folder, check_writable
    from prism_cli.planner import CALIBRATION_SUB_EXPERTS, calibration_bytes, default_costs_path, is_costs_file
    from prism_cli.planner import calibrate as run_calibration
    from prism_cli.solvers import SOLVERS

    names = [x.strip() for x in solvers.split(",") if x.strip()]
    if not names:
        raise PrismError(f"--solvers names no solver; choose among {', '.join(SOLVERS.names())} (comma-separated)")
    check_distinct(names, "--solvers")
    for name in names:
        SOLVERS.get(name)
    sizes = parse_int_list(widths, "--widths")
    check_distinct(sizes, "--widths")
    n = CALIBRATION_SUB_EXPERTS
    for width in sizes:
        if width < 4 * n or width % n:
            raise PrismError(f"--widths {width}: each width must be a multiple of {n} (the sub-experts a synthetic expert "
                             f"is cut into) and at least {4 * n}")
    if rows < 8:
        raise PrismError(f"--rows must be at least 8, got {rows}")
    need, free = calibration_bytes(max(sizes), rows), psutil.virtual_memory().available
    if need > free:
        raise PrismError(f"--widths {max(sizes)} with --rows {rows} needs about {need / 2**30:.1f} GiB and "
                         f"{free / 2**30:.1f} GiB is free: give smaller --widths or fewer --rows")
    if out is None:  # the cache folder is made once the costs are measured: nothing is left if the run stops
        out, named = default_costs_path(), str(default_costs_path())
        check_output_folder(out.parent)
    elif out.is_dir():
        raise PrismError(f"--out {out} is a folder; give a file such as {out / 'plan_costs.json'}")
    else:
        named = f"--out {out}"
        check_writable(out)  # its folder must exist, as every command's --out
    if out.exists() and not is_costs_file(out):  # replaced only by another costs file: anything else is the user's
        raise PrismError(f"{named} exists and is not a plan costs file: refusing to replace it")
    work = next(folder for folder in (out.parent, *out.parent.parents) if folder.is_dir())
    costs = run_calibration(solvers=names, widths=sizes, rows=rows, work=work,
                            on_step=lambda what: err_console.print(f"calibrating {what} ...", highlight=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    costs.save(out)
    table = ResultTable(f"per-unit costs of this machine ({costs.machine['processor']}, {costs.machine['cores']} cores)",
                        ["cost", "value"])
    for solver, points in costs.partition.items():
        for width, wall, cpu in points:
            table.add(f"partition {solver}, width {width}, {rows} rows: s / expert (wall, CPU)", f"{wall:.2f}, {cpu:.2f}")
    table.add("export: bytes read + written per second", f"{costs.export_bytes_per_s / 2**20:.0f} MiB/s")
    table.add("loading for profiling: checkpoint bytes per second", f"{costs.load_bytes_per_s / 2**20:.0f} MiB/s")
    table.add("disk writes per second", f"{costs.disk_write_bytes_per_s / 2**20:.0f} MiB/s")
    table.add("runtime memory of a prism process", f"{costs.runtime_bytes / 2**20:.0f} MiB")
    table.add("start of a prism process (imports)", f"{costs.startup_seconds:.1f} s")
    console.print(table.rich())
    console.print(f"written {out}")
