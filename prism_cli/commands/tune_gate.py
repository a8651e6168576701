"""``prism tune-gate``: router-only fine-tuning of a flat export with a K schedule (SPEC 3.4b)."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, check_seed, deferred_progress
from prism_cli.console import console
from prism_cli.tuning.schedules import SCHEDULES


def tune_gate(
    export: Path = typer.Argument(..., help="A prism export folder (from `prism export`, either gate)."),
    out: Path = typer.Option(..., help="Output folder for the tuned export (must not exist unless --force)."),
    data: str = typer.Option(None, help="Training text file or builtin:train (the default); never calibration or eval text."),
    steps: int = typer.Option(300, help="Optimizer steps."),
    lr: float = typer.Option(3e-5, help="Peak learning rate (AdamW; linear warm-up, cosine decay to a tenth). The default, "
                             "--init probe and --init-alpha 0.5 are make tune-gate's winner on validation text "
                             "(results/tune_gate.md)."),
    warmup: int = typer.Option(10, help="Warm-up steps."),
    k_start: int = typer.Option(None, "--k-start", help="Sub-experts per token at the start (default 1)."),
    k_end: int = typer.Option(None, "--k-end", help="Sub-experts per token at the end (default N*k, all of the original top-k)."),
    schedule: str = typer.Option("uniform", help=f"How K moves from --k-start to --k-end: {', '.join(SCHEDULES.names())}."),
    init: str = typer.Option("probe", help="Start from the export's tied router copies ('copies'), or from copies that "
                             "rank each expert's sub-experts by a mass probe on the training text ('probe')."),
    init_alpha: float = typer.Option(0.5, "--init-alpha", help="probe: weight of the predicted log-mass share in the copies' logits."),
    init_tokens: int = typer.Option(32_768, "--init-tokens", help="probe: training tokens it fits on (capped by the text)."),
    batch: int = typer.Option(8, help="Windows per step (split over processes under `accelerate launch`)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per window."),
    distill: float = typer.Option(0.0, help="Weight of the KL divergence from the original model's next-token distribution (0: off)."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed of the batches and of the K draws."),
    checkpoint_minutes: float = typer.Option(5.0, "--checkpoint-minutes", help="Minutes between checkpoints (also written on Ctrl-C)."),
    resume: bool = typer.Option(False, help="Continue the interrupted run of this --out from its checkpoint."),
    experts_impl: str = typer.Option("grouped_mm", "--experts-impl", help="Experts implementation for training: grouped_mm or eager."),
    device: str = typer.Option("cpu", help="cpu, or cuda (accelerate places each process on its device)."),
    dtype: str = typer.Option("float32", help="Training dtype: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, help="Replace an existing --out (and a checkpoint left by an earlier run)."),
    config: str = ConfigOption,
) -> None:
    """Fine-tune only the flat router of an export, K sub-experts per token drawn (or rising) over training; writes a new export."""
    from prism_cli.models.loading import parse_device, parse_dtype
    from prism_cli.tuning.trainer import TuneSettings
    from prism_cli.tuning.trainer import tune_gate as run

    parse_device(device)
    parse_dtype(dtype)
    settings = TuneSettings(
        data=data, steps=steps, lr=lr, warmup=warmup, k_start=k_start, k_end=k_end, batch=batch, seq_len=seq_len,
        schedule=schedule, init=init, init_alpha=init_alpha, init_tokens=init_tokens, distill=distill, seed=seed,
        checkpoint_minutes=checkpoint_minutes, experts_impl=experts_impl, device=device, dtype=dtype,
    )
    # The bar opens only once the library's checks have passed: refused input is one line, no bar above it.
    with deferred_progress("tuning the router", unit="tokens", status=True) as (start, advance):
        def on_start(first: int, total: int, per_step: int) -> None:
            start(total * per_step)
            advance(first * per_step, status=f"step {first}/{total}")

        def on_step(rec) -> None:
            kl = "" if rec.kl is None else f" KL {rec.kl:.3f}"
            advance(rec.tokens, status=f"step {rec.step}/{steps} K={rec.k} loss {rec.loss:.3f}{kl}")

        result = run(export, out, settings, force=force, resume=resume, on_start=on_start, on_step=on_step)
    resumed = f", resumed at step {result.resumed_at}" if result.resumed_at is not None else ""
    console.print(
        f"tuned [bold]{result.out}[/]: {result.steps} steps, {result.tokens:,} tokens, K {result.k_range[0]}..{result.k_range[1]} "
        f"({result.schedule}), final cross-entropy {result.final_ce:.3f}{resumed}"
    )
    console.print(
        f"trained {result.trainable:,} of {result.total:,} parameters ({100 * result.trainable_share:.3f} %: the flat router only); "
        f"{result.wall_s / 60:.1f} min wall, {result.cpu_s / 60:.1f} min CPU"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.tied_copies:
        console.print(f"[yellow]note:[/] {result.tied_copies} experts still have identical router copies (never told apart "
                      "by training); linear:K takes those lowest index first, as vLLM does")
    console.print("linear:K is now the tuned router's own top-K; topk:K and threshold points keep the original router")
    dropped_ranking_note(export, out)


def dropped_ranking_note(source: Path, out: Path) -> None:
    """Say that a source's layer ranking was not copied into a new router's export (it ranks the old router)."""
    from prism_cli.runtime.layers import RANKING_FILE

    if (source / RANKING_FILE).exists():
        console.print(f"[yellow]note:[/] {source / RANKING_FILE} ranks the layers under the old router and was not copied: "
                      f"`prism rank-layers {out}` ranks them under the new one (for layered:K+j points)")
