"""``prism bench``: measure every operating point, emit Pareto tables and plots, pick a point for a budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.panel import Panel

from prism_cli.commands.common import CachePolicyOption, ConfigOption, DeviceMemoryOption, StageBars, check_seed, parse_int_list
from prism_cli.console import console
from prism_cli.data import data_file, load_text
from prism_cli.errors import BudgetNotMet, PrismError
from prism_cli.operating_points import require_points

if TYPE_CHECKING:
    from prism_cli.evaluation.bench import BenchReport, PointResult


def bench(
    model: str = typer.Argument(..., help="A prism export folder (or a plain MoE model: only its top-k range)."),
    budget: str = typer.Option(None, help="Latency budget per step (50ms, 0.05s, or 50 = ms): pick the best point within it."),
    min_quality: float = typer.Option(None, "--min-quality", help="Perplexity ceiling: pick the cheapest point within it."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    batch: str = typer.Option("1,8,32", help="Batch sizes to time (comma-separated); the first is the budget batch."),
    seq_len: int = typer.Option(256, "--seq-len", help="Context length: KV cache for decode, prompt length for prefill."),
    mode: str = typer.Option("decode", help="decode (one token per sequence over the cache) or prefill."),
    data: str = typer.Option(None, help="Quality text file or builtin:<split> (default builtin:eval, held out)."),
    tokens: int = typer.Option(32_768, help="Held-out tokens for the quality columns (windows of 256 tokens, whatever --seq-len is)."),
    points: str = typer.Option(
        None, help="Operating points to sweep, separated by ';' or ',' (topk:4,pattern:4,3; default: all the export lists)."),
    repeats: int = typer.Option(
        20, help="Timed repeats per point and batch, at least (one sample has no spread: --precision then repeats on)."),
    max_repeats: int = typer.Option(60, "--max-repeats", help="... and at most, while a median is less precise than --precision."),
    precision: float = typer.Option(0.02, help="Repeat until every median is known within this fraction (95% interval)."),
    warmup: int = typer.Option(3, help="Untimed warm-up steps."),
    settle: int = typer.Option(
        None, help="Untimed steps of a point right before each of its timed steps (default: 10 decode, 1 prefill)."),
    dtype: str = typer.Option(None, help="Model dtype (default: float32 on CPU, bfloat16 on CUDA, what the kernels take)."),
    experts_impl: str = typer.Option("prism", "--experts-impl", help="Experts implementation of the export: prism, grouped_mm or eager."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed for the timing inputs."),
    cpu_allocator: str = typer.Option(
        "reuse", "--cpu-allocator", help="On the CPU: reuse (freed activations stay in the heap for the next step) or system (glibc's)."),
    out: Path = typer.Option(Path("results"), help="Output folder: bench.md, bench.csv, bench.json, bench.png, bench_summary.md."),
    device_memory: str = DeviceMemoryOption,
    cache_policy: str = CachePolicyOption,
    config: str = ConfigOption,
) -> None:
    """Benchmark every operating point: quality, latency, memory; Pareto frontiers; the point for a budget."""
    # Imported here, not at the top: torch and transformers would slow every `prism` call (--help too).
    from prism_cli.evaluation.bench import BenchSettings, parse_budget, run_bench
    from prism_cli.models.loading import check_context_length, load_config, parse_device, resolve_model

    budget_ms = parse_budget(budget) if budget is not None else None
    if min_quality is not None and not 0 < min_quality < math.inf:
        raise PrismError(f"--min-quality must be a positive, finite perplexity, got {min_quality}")
    point_list = require_points(points, "--points") if points is not None else None
    from prism_cli.offload.config import offload_config

    parse_device(device)
    target = Path(resolve_model(model))
    # Before the sweep: a results folder that cannot be written, or would be written over the model or
    # someone's own files, fails now, not after it.
    check_bench_out(out, {**({"model": target} if target.is_dir() else {}), **data_file(data)})
    offload = offload_config(device_memory, cache_policy, device=device)
    settings = BenchSettings(
        device=device, dtype=dtype, batches=parse_int_list(batch, "--batch") or [], seq_len=seq_len, mode=mode,
        tokens=tokens, repeats=repeats, max_repeats=max_repeats, precision=precision, warmup=warmup, settle=settle,
        points=point_list, experts_impl=experts_impl, seed=seed,
        offload=offload, cpu_allocator=cpu_allocator,
    )
    settings.validate()
    check_context_length(load_config(model), seq_len)
    text, _ = load_text(data, "eval")

    with StageBars() as stages:
        report = run_bench(model, text, settings, on_stage=stages)
    _emit(report, out, budget_ms, min_quality)


#: What ``_emit`` writes into ``--out``; ``bench.json`` says whether they are an earlier bench's.
BENCH_FILES = ("bench.md", "bench.csv", "bench.json", "bench_summary.md", "bench.png")


def check_bench_out(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse, before any work, an ``--out`` that ``_emit`` could not write whole: one that is, holds or lies
    inside one of ``inputs``, cannot be written, has a folder where one of ``BENCH_FILES`` goes, or holds
    ``bench.*`` files that are not an earlier ``prism bench`` result (a user's own ``bench.md``)."""
    from prism_cli.io import check_not_input, check_output_folder

    check_not_input(out, inputs, inside=True)  # results inside an export would be read as part of it
    check_output_folder(out)
    paths = [out / name for name in BENCH_FILES]
    for path in paths:
        if path.is_dir():
            raise PrismError(f"cannot write {path}: it is a folder; move it or choose another --out")
        check_not_input(path, inputs)
    existing = next((p for p in paths if p.exists() or p.is_symlink()), None)
    if existing is not None and not is_bench_result(out / "bench.json"):
        raise PrismError(f"--out {out} would replace {existing}, which is not an earlier result of prism bench "
                         "(bench.json is not a prism bench result); move it or choose another --out")


def is_bench_result(path: Path) -> bool:
    """Whether ``path`` is the ``bench.json`` of a ``prism bench`` run: a result table with its points."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and "title" in data and isinstance(data.get("rows"), list)
            and isinstance(data.get("points"), list) and isinstance(data.get("counts"), dict))


def _pick_record(pick: PointResult | None, batch: int) -> dict[str, object] | None:
    """A pick as bench.json keeps it: which point, elastic or original, and the numbers it was chosen on."""
    if pick is None:
        return None
    return {"point": pick.point, "kind": pick.kind, "perplexity": pick.quality.perplexity,
            "median_ms": pick.latency[batch].median_ms}


def _picks(report: BenchReport, budget_ms: float | None, max_ppl: float | None) -> tuple[dict[str, object], list[str], list[str]]:
    """The ``--budget``/``--min-quality`` picks over every point: bench.json's ``selection``, one line per
    pick (printed and written into bench.md), and what could not be met (exit 3)."""
    from prism_cli.evaluation.bench import best_under_budget

    b0 = report.settings.batches[0]
    picks = best_under_budget(report, b0, budget_ms, max_ppl)
    selection: dict[str, object] = {"batch": b0, "budget_ms": budget_ms, "max_perplexity": max_ppl,
                                    **{k: _pick_record(v, b0) for k, v in picks.items()}}
    lines: list[str] = []
    failures: list[str] = []
    step = f"per {report.settings.mode} step at batch {b0}"
    if budget_ms is not None:
        pick = picks["budget"]
        if pick is None:
            fastest = picks["fastest"]
            failures.append(f"no operating point meets {budget_ms:g} ms at batch {b0}; the fastest is {fastest.point} "
                            f"at {fastest.latency[b0].median_ms:.3g} ms (perplexity {fastest.quality.perplexity:.2f})")
        else:
            lines.append(f"best point within the budget of {budget_ms:g} ms {step}: {pick.point} ({pick.kind}), "
                         f"perplexity {pick.quality.perplexity:.2f}, {pick.latency[b0].median_ms:.3g} ms")
    if max_ppl is not None:
        pick = picks["quality"]
        if pick is None:
            best = picks["best_quality"]
            failures.append(f"no operating point reaches perplexity {max_ppl:g}; the best is {best.point} at {best.quality.perplexity:.2f}")
        else:
            lines.append(f"cheapest point with perplexity <= {max_ppl:g}: {pick.point} ({pick.kind}), "
                         f"perplexity {pick.quality.perplexity:.2f}, {pick.latency[b0].median_ms:.3g} ms {step}")
    return selection, lines, failures


def _emit(report: BenchReport, out: Path, budget_ms: float | None, max_ppl: float | None) -> None:
    from prism_cli.evaluation.bench import report_json
    from prism_cli.evaluation.bench_tables import points_table, screen_table, summary_tables
    from prism_cli.evaluation.plot import plot_frontiers
    from prism_cli.io import new_folder, write_text

    table = points_table(report)
    if report.note:
        # The report's caveat (a plain model's original-only range, skipped points) must be seen on
        # screen, not only in the files: otherwise missing points look like a broken export.
        console.print(f"[yellow]note:[/] {report.note}")
    console.print(screen_table(report).rich())
    b0 = report.settings.batches[0]
    summaries = summary_tables(report)
    for summary in summaries:
        console.print(summary.rich())
    data = report_json(report)
    data["selection"], picked, failures = _picks(report, budget_ms, max_ppl)
    table.notes += picked + [f"not met: {failure}" for failure in failures]
    with new_folder(out):  # only now: a failed or interrupted run leaves no empty output folder
        for name in BENCH_FILES:  # an earlier bench result (check_bench_out): never left half old, half new
            (out / name).unlink(missing_ok=True)
        table.save(out / "bench", extra=data)
        write_text(out / "bench_summary.md", "\n".join(t.markdown() for t in summaries))
        plot_frontiers(report, b0, out / "bench.png")
    console.print(f"written {out}/bench.md, bench.csv, bench.json, bench_summary.md, bench.png")
    for line in picked:
        title, _, body = line.partition(": ")
        console.print(Panel(body, title=title, border_style="green"))
    if failures:
        raise BudgetNotMet("; ".join(failures))
