"""``prism profile``: record expert activations on calibration text into an HDF5 profile."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, check_seed, deferred_progress, parse_layers
from prism_cli.console import console
from prism_cli.data import data_file, load_text
from prism_cli.io import check_not_input, check_replaceable, check_writable, peak_rss_bytes
from prism_cli.report import ResultTable


def moe_layer_note(moe: list[int], total: int | None) -> str:
    """Which decoder layers hold a sparse MoE block (a hybrid model's MoE layers are a subset)."""
    if not total or len(moe) == total:
        return f"MoE layers: all {len(moe)} decoder layers"
    dense = [i for i in range(total) if i not in set(moe)]
    return (f"MoE layers: {', '.join(map(str, moe))} of {total} decoder layers; the others "
            f"({', '.join(map(str, dense))}) have no routed experts and are not profiled")


def profile(
    model: str = typer.Argument("builtin", help="Checkpoint folder or hub id ('builtin': the shipped model)."),
    data: str = typer.Option(None, help="Calibration text file, or builtin:<split> (default builtin:calibration)."),
    tokens: int = typer.Option(131_072, help="Calibration tokens to run (capped by the data)."),
    max_rows: int = typer.Option(5_120, "--max-rows", help="Rows kept per expert (fit + held-out reservoirs)."),
    holdout: float = typer.Option(0.2, help="Share of calibration sequences kept apart for validating partitions."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    layers: str = typer.Option(None, help="MoE layers to profile, e.g. 0-7,12 (default: all)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device_map: str = typer.Option(None, "--device-map", help="accelerate device map (e.g. 'auto') for models larger than one device."),
    row_dtype: str = typer.Option("float16", "--row-dtype", help="Storage dtype of recorded rows."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed for the held-out split and the reservoir samples."),
    max_memory: str = typer.Option(
        None, "--max-memory", help="Host memory for profiling besides the model and the runtime (activations, counters, row buffer), "
        "e.g. 8G or 512MiB (default: half the available RAM)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run an interruption left in OUT.partial/."),
    checkpoint_every: float = typer.Option(
        120.0, "--checkpoint-every", help="Seconds between checkpoints of OUT.partial/ (what a kill can lose)."
    ),
    out: Path = typer.Option(Path("profile.h5"), help="Output HDF5 file."),
    config: str = ConfigOption,
) -> None:
    """Profile neuron activations of every expert on calibration text (SPEC 3.1)."""
    # Imported here, not at the top: torch and transformers would slow every `prism` call (--help too).
    from prism_cli.models.loading import check_context_length, load_config, load_model, resolve_model
    from prism_cli.profiling.budget import format_size, parse_size
    from prism_cli.profiling.format import FORMAT as PROFILE_FORMAT
    from prism_cli.profiling.profiler import ProfilePlan, ProfileSettings, profile_model

    settings = ProfileSettings(
        tokens=tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        max_rows=max_rows,
        holdout_fraction=holdout,
        seed=seed,
        layers=parse_layers(layers),
        row_dtype=row_dtype,
        max_memory=parse_size(max_memory) if max_memory is not None else None,
        checkpoint_seconds=checkpoint_every,
    )
    settings.validate()
    name = resolve_model(model)
    inputs = {"model folder": name, "config file": config}
    check_not_input(out, {**{what: Path(p) for what, p in inputs.items() if p and Path(p).exists()}, **data_file(data)}, inside=True)
    check_writable(out)
    check_replaceable(out, PROFILE_FORMAT, "profile")
    check_context_length(load_config(name), seq_len)
    text, data_name = load_text(data, "calibration", forbid=("eval",), what="profile")
    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map, bounded_memory=True)
    adapter = loaded.adapter
    assert adapter is not None
    moe = [layer.index for layer in adapter.moe_layers(loaded.model)]
    note = moe_layer_note(moe, getattr(loaded.model.config.get_text_config(), "num_hidden_layers", None))
    with deferred_progress("profiling", unit="tokens") as (start, advance):

        def started(plan: ProfilePlan) -> None:
            verb = "resuming" if plan.resumed else "profiling"
            console.print(
                f"{verb} [bold]{loaded.name}[/] ({adapter.model_type}: {len(plan.layers)} MoE layers x "
                f"{adapter.num_experts} experts, width {adapter.width}, top-{adapter.top_k}; {plan.tokens:,} tokens)"
            )
            chosen = list(plan.layers)
            console.print(note + (f"; --layers profiles only {', '.join(map(str, chosen))}" if chosen != moe else ""))
            for line in plan.describe():
                console.print(line, highlight=False)
            start(plan.total_tokens)

        summary = profile_model(loaded, text, data_name, settings, out, resume=resume, on_batch=advance, on_start=started)
    table = ResultTable(
        f"profile: {summary.tokens:,} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:,.0f} tokens/s)",
        ["layer", "tokens routed (min / max per expert)", "fit rows (min)", "held-out rows (min)", "experts with no rows"],
    )
    for layer in summary.layers:
        routed = summary.routed[layer]
        fit, held = summary.fit_rows[layer], summary.heldout_rows[layer]
        empty = [e for e, (f, h) in enumerate(zip(fit, held, strict=True)) if f == 0 or h == 0]
        table.add(layer, f"{min(routed):,} / {max(routed):,}", min(fit), min(held), ",".join(map(str, empty)) or "-")
    table.notes.append(
        f"measured: peak RSS {format_size(peak_rss_bytes())} (model {format_size(summary.plan.model_bytes)}), "
        f"profile {format_size(summary.profile_bytes)}, work folder peak {format_size(summary.work_peak_bytes)}, "
        f"{summary.checkpoints} checkpoints; written {out}"
    )
    console.print(table.rich())
