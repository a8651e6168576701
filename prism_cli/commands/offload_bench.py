"""``prism offload-bench``: sub-expert against whole-expert offloading at the same budget and quality (SPEC 4.3)."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, StageBars, check_seed
from prism_cli.console import console
from prism_cli.errors import PrismError
from prism_cli.io import check_not_input, check_output_folder, new_folder
from prism_cli.operating_points import require_points


def offload_bench(
    model: str = typer.Argument(..., help="A prism export (the source model is loaded as the baseline)."),
    device_memory: str = typer.Option(..., "--device-memory", help="Budgets, comma-separated: 4GB, 4GiB, 45% (of the "
                                      "experts cached), 16GB@deepseek-v2-lite (that model's cached share)."),
    points: str = typer.Option(..., help="Elastic operating points, separated by ',' or ';' (topk:4,linear:4;pattern:4,3); baselines "
                               "at equal compute and at the same quality floor are added."),
    policy: str = typer.Option("lru", help="Cache policies, comma-separated (lru, lfu, prefetch)."),
    pin: str = typer.Option("0", help="Shares of the cache pinned to the highest-mass sub-experts, comma-separated (0,0.25)."),
    link: str = typer.Option(None, help="Simulated link BANDWIDTH[,LATENCY per copy] (default 25GB/s,2us: PCIe 4.0 x16)."),
    reserve: str = typer.Option("5%", help="Device memory kept for the KV cache and activations (share of the budget or a size)."),
    device: str = typer.Option("cpu", help="cpu (simulated device and link) or cuda (real copies)."),
    dtype: str = typer.Option("float32", help="Model dtype (live runs)."),
    context: int = typer.Option(128, help="Prompt tokens prefilled before the timed decode steps."),
    warmup: int = typer.Option(32, help="Decode steps before timing (the cache warms up)."),
    tokens: int = typer.Option(128, help="Timed decode steps per configuration."),
    quality_tokens: int = typer.Option(8192, "--quality-tokens", help="Tokens per split for the perplexity columns."),
    shape: str = typer.Option(None, help="Replay at a real model's shape: deepseek-v2-lite, olmoe-1b-7b, mixtral-8x7b, "
                              "or 'source' (the export's own source shape)."),
    trace: str = typer.Option(None, help="Routing trace file for the replay (default: recorded from MODEL)."),
    routing: str = typer.Option("trace", help="Replay routing: 'trace' (recorded, mapped to the shape) or 'balanced' "
                                "(load-balanced, calibrated on the trace)."),
    compute: str = typer.Option("gpu", help="Replay compute model: gpu (modelled) or cpu (measured here)."),
    trace_tokens: int = typer.Option(4096, "--trace-tokens", help="Tokens replayed (the first 512 warm the cache)."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed (timing order, trace mapping)."),
    out: Path = typer.Option(Path("results/offload"), help="Output folder: offload.md/csv/json, offload_pairs.*, offload.png."),
    config: str = ConfigOption,
) -> None:
    """Per-token decode latency, hit rate and bytes moved of offloaded sub-experts against whole experts."""
    from prism_cli.models.loading import parse_device, resolve_model
    from prism_cli.offload.bench import OffloadBenchSettings
    from prism_cli.offload.config import parse_budgets, parse_link, parse_list, parse_reserve

    parse_device(device)
    resolve_model(model)
    try:
        pins = [float(p) for p in parse_list(pin, "--pin", "0,0.25")]
    except ValueError:
        raise PrismError(f"--pin takes fractions like 0,0.25, got {pin!r}") from None
    settings = OffloadBenchSettings(
        budgets=parse_budgets(device_memory, parse_reserve(reserve)), points=require_points(points, "--points"),
        policies=parse_list(policy, "--policy", "lru,prefetch"), pins=pins, link=parse_link(link),
        reserve=reserve, device=device, dtype=dtype, context=context, warmup=warmup, tokens=tokens,
        quality_tokens=quality_tokens, seed=seed, shape=shape, trace=trace, routing=routing, compute=compute,
        trace_tokens=trace_tokens,
    )
    settings.validate()
    inputs = {what: Path(path) for what, path in (("model", model), ("trace", trace)) if path and Path(path).exists()}
    check_not_input(out, inputs, inside=True)  # results inside an export would be read as part of it
    check_output_folder(out)  # before the runs: a results folder that cannot be written fails now, not after them
    from prism_cli.offload.bench import run_offload_bench

    with StageBars() as stages:
        report = run_offload_bench(model, settings, on_stage=stages)
    _emit(report, out)


def _emit(report, out: Path) -> None:
    from prism_cli.offload.bench import check_budgets, pairs_table, report_json, runs_table
    from prism_cli.offload.plot import plot_latency

    runs, pairs = runs_table(report), pairs_table(report)
    console.print(runs.rich())
    console.print(pairs.rich())
    data = report_json(report)
    with new_folder(out):  # an interruption before the first file leaves no empty folder
        runs.save(out / "offload", extra=data)
        pairs.save(out / "offload_pairs", extra={"mode": report.mode, "environment": report.environment})
        plot_latency(report, out / "offload.png")
    console.print(f"written {out}/offload.md, .csv, .json, offload_pairs.md, .csv, .json, offload.png")
    check_budgets(report)
