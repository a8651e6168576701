"""``prism schedule``: run a workload under a scheduling policy (real engine or ``--sim``);
``prism schedule sweep``: every policy at three loads; ``prism schedule cost-model``: build the cost model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from prism_cli.commands.common import (
    CachePolicyOption,
    ConfigOption,
    DefaultCommandGroup,
    DeviceMemoryOption,
    check_seed,
    deferred_progress,
    parse_int_list,
)
from prism_cli.console import console, err_console
from prism_cli.errors import PrismError, check_distinct, split_items
from prism_cli.report import ResultTable

if TYPE_CHECKING:
    from prism_cli.serving.costmodel import CostModel
    from prism_cli.serving.engine import Limits

app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True,
                  help="Serve a workload with quality floors under a scheduling policy (SPEC 4.1-4.2).")

Directory = typer.Argument(..., help="A prism export folder.")
#: The engine calibration's grid by default (`schedule cost-model`, and a sweep's re-calibration without one).
CALIBRATION_ROWS, CALIBRATION_WIDTHS = "1,8,16,32", "64,256"
CostModelOption = typer.Option(None, "--cost-model", help="Cost model JSON (default: DIR/prism/cost_model.json).")
#: What a sweep writes beside its table (OUT.md, .csv, .json): the plot, the targets, a re-calibrated cost model.
SWEEP_FILES = (".png", "_targets.json", "_cost_model.json")


def _settings(policy, rate, duration, floors, sim, original, point, trace, data, seed, max_batch, max_running, t_max,
              max_prompt, min_output, max_output, device_memory=None, cache_policy=None):
    from prism_cli.serving.engine import Limits
    from prism_cli.serving.runner import ScheduleSettings
    from prism_cli.serving.workload import LengthSettings

    settings = ScheduleSettings(policy=policy, rate=rate, duration=duration, floors=floors, sim=sim, original=original, point=point,
                                trace=str(trace) if trace else None, data=data, seed=seed,
                                device_memory=device_memory, cache_policy=cache_policy,
                                limits=Limits(max_batch, max_running, t_max), lengths=LengthSettings(max_prompt, min_output, max_output))
    settings.validate()
    return settings


def _floor_shares(directory: str, floors: str) -> dict[str, float]:
    """The floor mix's shares as the run uses them (rescaled to sum 1), checked against the export; a
    mix whose shares do not sum to 1 is said so in one line."""
    from prism_cli.runtime.elastic import read_export_meta
    from prism_cli.serving.floors import PointSpace, normalise_mix, parse_shares, rescale_note

    meta = read_export_meta(directory)
    shares = parse_shares(floors, PointSpace.of_export(meta))
    note = rescale_note(shares)
    if note:
        console.print(note, highlight=False)
    return {str(floor): share for floor, share in normalise_mix(shares)}  # parse_shares refuses a floor named twice


def _inputs(directory: str, cost_model: Path | None, trace: Path | None, data: str | None, config: str | None) -> dict[str, Path]:
    """What a run reads, which its outputs must not replace (``ResultTable.check_writable``)."""
    from prism_cli.data import data_file

    found = {"export": Path(directory), "cost model": cost_model, "trace": trace, **data_file(data),
             "config file": Path(config) if config else None}
    return {what: path for what, path in found.items() if path is not None}


def _check_out(out: Path, inputs: dict[str, Path], others: tuple[str, ...] = ()) -> None:
    """``ResultTable.check_writable``, and a folder of ``out`` that does not exist refused as ``schedule
    cost-model --out`` refuses it: a mistyped folder is not made (README: a missing location is refused)."""
    parent = ResultTable.stem(out).parent
    existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
    if existing != parent and existing.is_dir():  # a file on the way is ResultTable's to name
        raise PrismError(f"cannot write --out {out}: folder {parent} does not exist; create it first")
    ResultTable.check_writable(out, inputs, others)


#: ``schedule run`` options that shape a Poisson workload, which a --trace replaces.
TRACE_REPLACES = ("rate", "duration", "floors", "data", "max_prompt", "min_output", "max_output")


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not its default, nor a --config file's value)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _check_dir(directory: str) -> None:
    from prism_cli.runtime.elastic import export_meta

    path = Path(directory)
    if path.is_file():
        raise PrismError(f"{directory} is a file, not a prism export folder (`prism export` writes one)")
    if not path.is_dir():
        raise PrismError(f"export folder {directory} does not exist")
    if not (path / "config.json").is_file():
        raise PrismError(f"{directory} is not a prism export: it has no config.json")
    if export_meta(path) is None:
        raise PrismError(f"{directory} is not a prism export (its config.json has no 'prism' section)")


@app.command("run")
def run(
    ctx: typer.Context,
    directory: str = Directory,
    policy: str = typer.Option("prism", help="prism, fifo, fullbatch, static or mixed."),
    rate: float = typer.Option(4.0, help="Poisson arrival rate, requests per second."),
    duration: float = typer.Option(60.0, help="Seconds of arrivals (every request is then served to the end)."),
    floors: str = typer.Option("linear:2=0.5,linear:6=0.3,linear:8=0.2", help="Floor mix POINT=SHARE,... (or ppl:CEILING=SHARE)."),
    sim: bool = typer.Option(False, "--sim", help="Simulate on the cost model instead of running the model."),
    original: bool = typer.Option(False, "--original", help="Serve the export's source model (points original:1..k)."),
    point: str = typer.Option(None, help="The static policy's point (default: the cheapest meeting every floor)."),
    trace: Path = typer.Option(None, help="JSON Lines trace (arrival, prompt, max_tokens, floor) instead of Poisson arrivals."),
    data: str = typer.Option(None, help="Text the prompt/output lengths come from (default builtin:eval)."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed of arrivals, lengths and floors."),
    max_batch: int = typer.Option(16, "--max-batch", help="Rows of one forward pass."),
    max_running: int = typer.Option(32, "--max-running", help="Requests holding a KV cache at once."),
    t_max: float = typer.Option(10.0, "--t-max", help="Seconds a request may wait before it forces a launch."),
    max_prompt: int = typer.Option(128, "--max-prompt", help="Prompt tokens at most."),
    min_output: int = typer.Option(4, "--min-output", help="Output tokens at least."),
    max_output: int = typer.Option(128, "--max-output", help="Output tokens at most."),
    device_memory: str = DeviceMemoryOption,
    cache_policy: str = CachePolicyOption,
    cost_model: Path = CostModelOption,
    out: Path = typer.Option(None, help="Write the metrics and per-request records to OUT.json / OUT.md / OUT.csv."),
    config: str = ConfigOption,
) -> None:
    """Run one workload and report throughput, latency percentiles, floor violations and scheduler time."""
    from prism_cli.environment import this_cpu_label
    from prism_cli.serving.costmodel import find_cost_model
    from prism_cli.serving.policies import SCHEDULING_POLICIES
    from prism_cli.serving.runner import run_schedule

    _check_dir(directory)
    if point is not None and policy != "static" and not _typed(ctx, "point"):
        point = None  # a --config file's point, for the runs that use the static policy
    if trace is not None:  # its lines give the arrivals, prompts, lengths and floors: options for them would be ignored
        ignored = [name for name in TRACE_REPLACES if _typed(ctx, name)]
        if ignored:
            raise PrismError(f"--{ignored[0].replace('_', '-')} does not apply with --trace: the trace gives every request's "
                             "arrival, prompt, max_tokens and floor")
    settings = _settings(policy, rate, duration, floors, sim, original, point, trace, data, seed, max_batch, max_running, t_max,
                         max_prompt, min_output, max_output, device_memory, cache_policy)
    if out is not None:  # before the run, not after it
        _check_out(out, _inputs(directory, cost_model, trace, data, config))
    shares = None if trace is not None else _floor_shares(directory, floors)
    model = find_cost_model(directory, cost_model)
    with deferred_progress("requests served", "requests") as (start, advance):
        done = [-1]

        def progress(finished: int, total: int) -> None:
            if done[0] < 0:  # the first call: the input has been checked, the run begins
                start(total)
                done[0] = 0
            advance(finished - done[0])
            done[0] = finished

        result = run_schedule(directory, settings, model, on_progress=progress)
    if shares is not None:
        result.settings["floor_shares"] = shares  # the mix as the run drew from it (rescaled to sum 1)
    table = metrics_table(result)
    if model is not None and (sim or SCHEDULING_POLICIES.get(policy).plans_with_costs):
        table.notes.append(f"{'simulated on' if sim else 'planned with'} the cost model measured on {model.machine}")
        if sim and model.machine != (here := this_cpu_label()) and "threads" in model.machine:
            err_console.print(f"note: the cost model was measured on {model.machine}, not on this machine ({here}): "
                              "these are that machine's times; `prism schedule cost-model` measures this one's",
                              highlight=False, soft_wrap=True)
    console.print(table.rich())
    if out is not None:
        table.save(out, extra={"settings": result.settings, "metrics": result.metrics, "requests": result.requests})
        console.print(f"written {ResultTable.stem(out)}.md, .csv, .json")


def metrics_table(result) -> ResultTable:
    m = result.metrics
    s = result.settings
    table = ResultTable(f"{s['policy']} on the {result.model} model ({result.mode}), {m['requests']} requests", ["metric", "value"])
    rows = [
        ("requests/s", m["requests_per_s"]), ("output tokens/s", m["output_tokens_per_s"]),
        ("TTFT p50 / p90 / p99 s", _trio(m["ttft_s"])), ("TPOT p50 / p90 / p99 ms", _trio(m["tpot_s"], 1e3)),
        ("end-to-end p50 / p90 / p99 s", _trio(m["e2e_s"])), ("floor violations (requests)", m["floor_violations"]),
        ("scheduler us per decision (mean / p99)", f"{m['scheduler_us_per_decision']:.1f} / {m['scheduler_us_per_decision_p99']:.1f}"),
        ("scheduler / median decode step", m["scheduler_share_of_decode_step"]),
        ("decode steps, mean rows", f"{m['decode_steps']}, {m['mean_decode_batch']:.2f}"),
        ("decode rows by point", ", ".join(f"{k} {v}" for k, v in m["decode_rows_by_point"].items())),
    ]
    if "engine_time_s" in m:
        t = m["engine_time_s"]
        rows.append(("engine s: forward / KV copies / sampling / scheduler",
                     f"{t['forward']:.2f} / {t['kv_cache_copies']:.3f} / {t['sampling']:.3f} / {t['scheduler']:.3f}"))
    for name, value in rows:
        table.add(name, value)
    workload = (f"trace {s['trace']}" if s.get("trace")  # the trace's arrivals, lengths and floors replace these
                else f"rate {s['rate']} req/s for {s['duration']} s, floors {s['floors']}")
    table.notes.append(f"{workload}, seed {s['seed']}, max batch {s['max_batch']}, max running {s['max_running']}, "
                       f"t_max {s['t_max']} s")
    return table


def _trio(p: dict, scale: float = 1.0) -> str:
    if p["p50"] is None:
        return "-"
    return " / ".join(f"{p[k] * scale:.3g}" for k in ("p50", "p90", "p99"))


@app.command("sweep")
def sweep(
    ctx: typer.Context,
    directory: str = Directory,
    floors: str = typer.Option("linear:2=0.5,linear:6=0.3,linear:8=0.2", help="Floor mix POINT=SHARE,..."),
    duration: float = typer.Option(60.0, help="Seconds of arrivals per run."),
    loads: str = typer.Option("low,medium,high", help="Loads to run (fractions 0.3 / 0.7 / 1.3 of the baseline's capacity)."),
    rates: str = typer.Option(None, help="Explicit arrival rates (comma-separated) instead of --loads."),
    sim: bool = typer.Option(False, "--sim", help="Simulate on the cost model instead of running the model."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed of arrivals, lengths and floors."),
    max_batch: int = typer.Option(16, "--max-batch"),
    max_running: int = typer.Option(32, "--max-running"),
    t_max: float = typer.Option(10.0, "--t-max"),
    max_prompt: int = typer.Option(128, "--max-prompt"),
    min_output: int = typer.Option(4, "--min-output"),
    max_output: int = typer.Option(128, "--max-output"),
    device_memory: str = DeviceMemoryOption,
    cache_policy: str = CachePolicyOption,
    cost_model: Path = CostModelOption,
    calibrate: bool = typer.Option(
        True, "--calibrate/--no-calibrate",
        help="Real runs: measure the engine's costs again right before them (on the cost model's grid), so that "
             "the simulator is compared with the real engine on this machine as it is now; saved as OUT_cost_model.json."),
    rounds: int = typer.Option(
        1, "--rounds", help="Real runs: run every policy this many times, in rounds of alternating order (forward, then "
                            "backward), and report each round's gain and the median: the machine's speed drifts over a sweep."),
    out: Path = typer.Option(Path("results/schedule_sweep"), help="Output stem: .md, .csv, .json and .png."),
    config: str = ConfigOption,
) -> None:
    """Every policy at low, medium and high load (and FIFO on the original model): tables and a plot."""
    from prism_cli.io import write_json
    from prism_cli.serving.costmodel import find_cost_model
    from prism_cli.serving.executor import load_served_model
    from prism_cli.serving.runner import check_load
    from prism_cli.serving.sweep import check_rounds, parse_loads, plot_sweep, run_sweep, sweep_table, targets

    _check_dir(directory)
    check_rounds(rounds, sim)
    rate_list = None
    names: list[str] = []
    if rates is not None:
        if _typed(ctx, "loads"):
            raise PrismError("give --rates or --loads, not both: --rates replaces the loads with explicit arrival rates")
        try:
            rate_list = [float(r) for r in split_items(rates, "--rates")]
        except ValueError:
            raise PrismError(f"--rates must be comma-separated numbers, got {rates!r}") from None
        if not rate_list:
            raise PrismError(f"--rates {rates!r} names no arrival rate; give comma-separated requests per second, e.g. 1,2.5")
        check_distinct(rate_list, "--rates")
        for r in rate_list:
            check_load(r, duration, "--rates")
    else:
        names = parse_loads(loads)
    settings = _settings("prism", 1.0, duration, floors, sim, False, None, None, None, seed, max_batch, max_running, t_max,
                         max_prompt, min_output, max_output, device_memory, cache_policy)
    shares = _floor_shares(directory, floors)
    model = find_cost_model(directory, cost_model)
    if model is None:
        raise PrismError(f"{directory} has no cost model: build one with `prism schedule cost-model` or pass --cost-model")
    _check_out(out, _inputs(directory, cost_model, None, None, config), SWEEP_FILES)
    stem = ResultTable.stem(out)
    offload = settings.offload()
    served = None if sim else {False: load_served_model(directory, offload=offload),
                               True: load_served_model(directory, original=True, offload=offload)}
    recalibrated = None
    if served is not None and calibrate:
        recalibrated = _recalibrate(directory, model, served, seed, settings.limits)
        model.save(stem.with_name(stem.name + "_cost_model.json"))
    total = (len(rate_list) if rate_list else len(names)) * 6 * rounds
    with deferred_progress("sweep runs", "runs") as (start, advance):
        started = [False]

        def on_run(_what: str) -> None:
            if started[0]:
                advance(1)
            else:
                start(total)
                started[0] = True

        runs, capacity = run_sweep(directory, settings, model, names, rate_list, served, on_run, rounds)
        advance(1)
    mode = "sim" if sim else "real"
    table = sweep_table(runs, mode, model.machine)
    goal = targets(runs, bound=_gain_bound(directory, model, floors, max_batch))
    if recalibrated is not None:
        table.notes.append(f"engine costs measured again right before the runs ({recalibrated:.0f} s; {stem.name}_cost_model.json): "
                           "the simulator and the scheduler use them")
    if model.engine is not None:
        table.notes.append(f"engine time around each forward pass, charged by the simulator: {model.engine.step_overhead_ms:.3g} ms "
                           "(sampling, scheduling, bookkeeping; 0: not measured)")
    if capacity is not None:
        table.notes.append(f"baseline capacity (FIFO on the original, simulated burst): {capacity:.3f} req/s; loads 0.3x / 0.7x / 1.3x")
    if goal:
        table.notes.append(
            f"high load: prism {goal['prism_requests_per_s']:.3f} req/s vs FIFO on the original {goal['fifo_original_requests_per_s']:.3f} "
            f"({goal['gain']:+.1%}, target +20%); e2e p90 {goal['prism_e2e_p90_s']:.2f} s vs {goal['fifo_original_e2e_p90_s']:.2f} s"
            + (f"; medians of {rounds} rounds, gain per round " + " / ".join(f"{g:+.1%}" for g in goal["gains"]) if rounds > 1 else "")
            + (f"; mixed vs prism {goal['mixed_over_prism']:+.1%}" if "mixed_over_prism" in goal else ""))
        if "decode_gain_bound" in goal:
            table.notes.append(
                f"decode bound (every request decoding at its own floor in batches of {max_batch}, against the original at "
                "full top-k, by the cost model): " + ", ".join(f"{v:+.1%} ({k})" for k, v in goal["decode_gain_bound"].items()))
    console.print(table.rich())
    load = os.getloadavg()
    table.notes.append(f"machine load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                       f"on {os.cpu_count()} CPUs")
    table.save(out, extra={"mode": mode, "capacity": capacity, "targets": goal, "floor_shares": shares, "load_average": load,
                           "command": " ".join(sys.argv),
                           "runs": [{"load": n, "rate": r, "settings": res.settings, "model": res.model, "metrics": res.metrics}
                                    for n, r, res in runs]})
    plot_sweep(runs, stem.with_name(stem.name + ".png"), f"{directory}: {floors} ({mode})")
    write_json(stem.with_name(stem.name + "_targets.json"), goal)
    console.print(f"written {stem}.md, .csv, .json, .png, _targets.json")


def _recalibrate(directory: str, model: CostModel, served: dict[bool, Any], seed: int, limits: Limits) -> float:
    """Measure the engine's costs of ``model``'s points again with the models already loaded, on the grid of
    its engine section (or the cost-model command's default grid), and its time around each pass within the
    sweep's ``limits``, and put them in ``model``; returns seconds.

    The simulator is only worth what its costs are: on a shared machine the speed drifts by 10-25 % within an
    hour, and a calibration made then against runs made now showed as a 1.1-1.3x gap between them."""
    from prism_cli.serving.calibrate import calibrate_engine

    rows, widths = parse_int_list(CALIBRATION_ROWS, "rows") or [], parse_int_list(CALIBRATION_WIDTHS, "widths") or []
    if model.engine is not None and model.engine.decode_ms:
        grid = next(iter(model.engine.decode_ms.values()))
        widths, rows = sorted(grid), sorted(next(iter(grid.values())))
    started = time.perf_counter()
    with deferred_progress("engine calibration", unit="measurements") as (start, advance):
        model.engine = calibrate_engine(directory, {p.point: p.kind for p in model.points.values()}, rows, widths,
                                        seed=seed, on_start=start, on_step=advance,
                                        served={"elastic": served[False], "original": served[True]}, limits=limits)
    return time.perf_counter() - started


def _gain_bound(directory: str, model: CostModel, floors: str, rows: int) -> dict[str, float]:
    """``decode_gain_bound`` of the sweep's floor mix (empty where a floor is a perplexity ceiling)."""
    from prism_cli.runtime.elastic import read_export_meta
    from prism_cli.serving.floors import PointSpace, parse_mix
    from prism_cli.serving.sweep import decode_gain_bound

    meta = read_export_meta(directory)
    top_k = int(meta["source"]["top_k"])
    mix = parse_mix(floors, PointSpace(meta["gate"], int(meta["sub_experts"]), top_k))
    if any(f.point is None for f, _ in mix):
        return {}
    return decode_gain_bound(model, [(str(f.point), share) for f, share in mix], f"original:{top_k}", rows)


@app.command("cost-model")
def cost_model_cmd(
    directory: str = Directory,
    decode: Path = typer.Option(..., help="bench.json (or its folder) of `prism bench DIR --mode decode`."),
    prefill: Path = typer.Option(..., help="bench.json (or its folder) of `prism bench DIR --mode prefill`."),
    out: Path = typer.Option(None, help="Where to write it (default: DIR/prism/cost_model.json, saved with the export)."),
    engine: bool = typer.Option(True, "--engine/--no-engine",
                                help="Also time the serving executor itself (padded decode steps by cache width, KV "
                                     "copies), which the simulator then charges."),
    rows: str = typer.Option(CALIBRATION_ROWS, help="Engine calibration: decode batch sizes."),
    widths: str = typer.Option(CALIBRATION_WIDTHS, help="Engine calibration: KV cache widths (columns, padding included)."),
    repeats: int = typer.Option(6, help="Engine calibration: timed decode steps (and copies) per measurement."),
) -> None:
    """Build the cost model C(mode, batch, point) from a decode and a prefill bench of the export."""
    from prism_cli.io import check_not_input, check_replaceable, check_writable
    from prism_cli.serving.calibrate import calibrate_engine
    from prism_cli.serving.costmodel import COST_MODEL_FILE, CostModel
    from prism_cli.serving.costmodel import FORMAT as COST_MODEL_FORMAT

    _check_dir(directory)
    if repeats < 1:
        raise PrismError(f"--repeats must be at least 1, got {repeats}")
    target = out or Path(directory) / COST_MODEL_FILE
    check_writable(target)  # before the engine calibration, not after it
    check_not_input(target, {f"{mode} bench": path / "bench.json" if path.is_dir() else path
                             for mode, path in (("decode", decode), ("prefill", prefill))})
    check_replaceable(target, COST_MODEL_FORMAT, "cost model", json_file=True,
                      label="--out" if out is not None else "the export's cost model")
    model = CostModel.from_bench(decode, prefill, directory)
    if engine:
        with deferred_progress("engine calibration", unit="measurements") as (start, advance):
            model.engine = calibrate_engine(directory, {p.point: p.kind for p in model.points.values()},
                                            parse_int_list(rows, "--rows") or [], parse_int_list(widths, "--widths") or [],
                                            repeats=repeats, on_start=start, on_step=advance)
    model.save(target)
    table = ResultTable(f"cost model ({model.machine})", ["point", "kind", "perplexity", "decode ms by batch",
                                                          "prefill ms by tokens", "engine decode ms by width: batch"])
    for p in model.points.values():
        by_width = model.engine.decode_ms.get(p.point, {}) if model.engine else {}
        table.add(p.point, p.kind, p.perplexity, ", ".join(f"{b}: {v:.3g}" for b, v in sorted(p.decode_ms.items())),
                  ", ".join(f"{t}: {v:.3g}" for t, v in sorted(p.prefill_ms.items())),
                  "; ".join(f"{w}: " + ", ".join(f"{v:.3g}" for _, v in sorted(by.items())) for w, by in sorted(by_width.items()))
                  or "-")
    console.print(table.rich())
    if model.engine:
        for name, t in (("KV join (one new row)", model.engine.join_ms), ("KV trim (one row leaves)", model.engine.keep_ms)):
            console.print(f"{name}, ms by width: " + "; ".join(
                f"{w}: " + ", ".join(f"{r} rows {v:.3g}" for r, v in sorted(by.items())) for w, by in sorted(t.items())))
        console.print(f"engine time around each forward pass (sampling, scheduling, bookkeeping): "
                      f"{model.engine.step_overhead_ms:.3g} ms")
    console.print(f"written {target}")
