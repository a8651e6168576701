"""``prism bench``: measure every operating point, emit Pareto tables and plots, pick a point for a budget."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.panel import Panel

from prism_cli.commands.common import ConfigOption, parse_int_list
from prism_cli.console import console, progress_bar
from prism_cli.data import load_text
from prism_cli.errors import BudgetNotMet, PrismError
from prism_cli.report import ResultTable

if TYPE_CHECKING:
    from prism_cli.evaluation.bench import BenchReport


def bench(
    model: str = typer.Argument(..., help="A prism export folder (or a plain MoE model: only its top-k range)."),
    budget: str = typer.Option(None, help="Latency budget per step (50ms, 0.05s, or 50 = ms): pick the best point within it."),
    min_quality: float = typer.Option(None, "--min-quality", help="Perplexity ceiling: pick the cheapest point within it."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    batch: str = typer.Option("1,8,32", help="Batch sizes to time (comma-separated); the first is the budget batch."),
    seq_len: int = typer.Option(256, "--seq-len", help="Context length: KV cache for decode, prompt length for prefill."),
    mode: str = typer.Option("decode", help="decode (one token per sequence over the cache) or prefill."),
    data: str = typer.Option(None, help="Quality text file or builtin:<split> (default builtin:eval, held out)."),
    tokens: int = typer.Option(32_768, help="Held-out tokens for the quality columns."),
    points: str = typer.Option(None, help="Operating points to sweep, comma-separated by ';' (default: all the export lists)."),
    repeats: int = typer.Option(20, help="Timed repeats per point and batch."),
    warmup: int = typer.Option(3, help="Untimed warm-up steps."),
    experts_impl: str = typer.Option("prism", "--experts-impl", help="prism (kernels on GPU, torch elsewhere), grouped_mm or eager."),
    seed: int = typer.Option(0, help="Seed for the timing inputs."),
    out: Path = typer.Option(Path("results"), help="Output folder: bench.md, bench.csv, bench.json, bench.png."),
    config: str = ConfigOption,
) -> None:
    """Benchmark every operating point: quality, latency, memory; Pareto frontiers; the point for a budget."""
    # Imported here, not at the top: torch and transformers would slow every `prism` call (--help too).
    from prism_cli.evaluation.bench import BenchSettings, parse_budget, run_bench
    from prism_cli.io import check_output_folder
    from prism_cli.models.loading import check_context_length, load_config, parse_device, resolve_model

    check_output_folder(out)  # before the sweep: a results folder that cannot be written fails now, not after it
    budget_ms = parse_budget(budget) if budget is not None else None
    if min_quality is not None and min_quality <= 0:
        raise PrismError(f"--min-quality must be a positive perplexity, got {min_quality}")
    parse_device(device)
    resolve_model(model)
    settings = BenchSettings(
        device=device, batches=parse_int_list(batch, "--batch") or [], seq_len=seq_len, mode=mode, tokens=tokens,
        repeats=repeats, warmup=warmup, points=[p for p in points.split(";") if p.strip()] if points else None,
        experts_impl=experts_impl, seed=seed,
    )
    settings.validate()
    check_context_length(load_config(model), seq_len)
    text, _ = load_text(data, "eval")

    with StageBars() as stages:
        report = run_bench(model, text, settings, on_stage=stages)
    _emit(report, out, budget_ms, min_quality)


class StageBars:
    """One progress bar per bench stage, each closed when the next one starts (and all on exit)."""

    def __init__(self) -> None:
        self._open: list = []

    def __call__(self, name: str, total: int):
        self.close()
        unit = {"quality": "tokens", "profile": "tokens", "partition": "experts"}.get(name, "points")
        bar = progress_bar(name, total=total, unit=unit)
        advance = bar.__enter__()
        self._open.append(bar)
        return advance

    def close(self) -> None:
        while self._open:
            self._open.pop().__exit__(None, None, None)

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def screen_table(report: BenchReport) -> ResultTable:
    """The columns that fit a terminal; the files carry every column."""
    b0 = report.settings.batches[0]
    table = ResultTable(
        f"operating points ({report.settings.mode}, batch {b0}, seq-len {report.settings.seq_len})",
        ["point", "active", "perplexity", "KL", "top-1", "ms", "stable"],
    )
    for p in report.points:
        table.add(p.point, p.quality.active, p.quality.perplexity, p.quality.kl, p.quality.top1_agreement,
                  p.latency[b0].median_ms, p.point in report.distinct[b0][p.kind])
    return table


def points_table(report: BenchReport) -> ResultTable:
    from prism_cli.evaluation.bench import machine_label

    batches = report.settings.batches
    label = machine_label(report.environment)
    table = ResultTable(
        f"operating points of {report.target} ({report.settings.mode}, seq-len {report.settings.seq_len})",
        ["point", "kind", "active sub-experts", "perplexity", "KL", "top-1 agree",
         *[f"ms b={b}" for b in batches], f"p90 ms b={batches[0]}", f"tokens/s b={batches[-1]}",
         "peak MiB", "active params", "GFLOPs/token", "frontier", "distinct stable"],
    )
    b0 = batches[0]
    for p in report.points:
        table.add(
            p.point, p.kind, p.quality.active, p.quality.perplexity, p.quality.kl, p.quality.top1_agreement,
            *[p.latency[b].median_ms for b in batches], p.latency[b0].p90_ms, p.latency[batches[-1]].tokens_per_second,
            max(lat.peak_memory_mib for lat in p.latency.values()), p.active_params, p.flops_per_token / 1e9,
            p.point in report.frontier[b0][p.kind], p.point in report.distinct[b0][p.kind],
        )
    table.notes += [
        f"latency measured on {label}, experts implementation: {report.implementation}",
        f"quality on {report.points[0].quality.tokens:,} held-out tokens against the source model at its full top-k "
        f"(perplexity {report.full_perplexity:.3f}); KL in nats per token",
        "active sub-experts: per token and MoE layer, in units of 1/N expert (the original at top-k' counts N*k')",
        "distinct stable: Pareto-optimal in its set, perplexity <= 1.5x full, p90 <= 1.15x median, "
        "latency >= 3% above the previous such point (frontier and distinct columns at batch "
        f"{b0})",
    ]
    if report.note:
        table.notes.append(report.note)
    return table


def _emit(report: BenchReport, out: Path, budget_ms: float | None, max_ppl: float | None) -> None:
    from prism_cli.evaluation.bench import best_under_budget, report_json, summary_tables
    from prism_cli.evaluation.plot import plot_frontiers
    from prism_cli.io import write_text

    out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty output folder
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
    picks = best_under_budget(report, b0, budget_ms, max_ppl)
    data["selection"] = {k: (v.point if v is not None else None) for k, v in picks.items()}
    table.save(out / "bench", extra=data)
    write_text(out / "bench_summary.md", "\n".join(t.markdown() for t in summaries))
    plot_frontiers(report, b0, out / "bench.png")
    console.print(f"written {out}/bench.md, bench.csv, bench.json, bench_summary.md, bench.png")
    failures = []
    if budget_ms is not None:
        pick = picks["budget"]
        if pick is None:
            fastest = picks["fastest"]
            failures.append(f"no operating point meets {budget_ms:g} ms at batch {b0}; the fastest is {fastest.point} "
                            f"at {fastest.latency[b0].median_ms:.3g} ms (perplexity {fastest.quality.perplexity:.2f})")
        else:
            console.print(Panel(f"[bold]{pick.point}[/]: perplexity {pick.quality.perplexity:.2f}, "
                                f"{pick.latency[b0].median_ms:.3g} ms per {report.settings.mode} step at batch {b0} "
                                f"(budget {budget_ms:g} ms)", title="best point within the budget", border_style="green"))
    if max_ppl is not None:
        pick = picks["quality"]
        if pick is None:
            best = picks["best_quality"]
            failures.append(f"no operating point reaches perplexity {max_ppl:g}; the best is {best.point} at {best.quality.perplexity:.2f}")
        else:
            console.print(Panel(f"[bold]{pick.point}[/]: perplexity {pick.quality.perplexity:.2f}, "
                                f"{pick.latency[b0].median_ms:.3g} ms at batch {b0}",
                                title=f"cheapest point with perplexity <= {max_ppl:g}", border_style="green"))
    if failures:
        raise BudgetNotMet("; ".join(failures))
