"""``prism export``: write the partition's sub-experts as a checkpoint stock transformers loads."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, deferred_progress
from prism_cli.console import console
from prism_cli.errors import PrismError
from prism_cli.operating_points import GATES


def export(
    model: str = typer.Argument(..., help="Source checkpoint folder or hub id ('builtin': the shipped model)."),
    partition: Path = typer.Argument(..., help="Partition written by `prism partition`."),
    out: Path = typer.Option(..., help="Output folder (must not exist unless --force)."),
    gate: str = typer.Option("neurons", help=f"Gate: {' or '.join(GATES)} (SPEC 3.4)."),
    operating_point: str = typer.Option(
        None, "--operating-point", "-K",
        help="Default operating point: K (1..N*k), or topk:K, pattern:4,3, threshold:0.9, linear:K. Default: all sub-experts.",
    ),
    allow_inexact: bool = typer.Option(
        False, "--allow-inexact", help="Export even where a gate is not exact (the measured difference is recorded)."
    ),
    down_bias: str = typer.Option(
        "first", "--down-bias", help="How sub-experts carry a down_proj bias: first (sub-expert 0) or uniform (1/N each)."
    ),
    max_shard_gb: float = typer.Option(4.0, "--max-shard-gb", help="Largest output shard, in GiB."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    config: str = ConfigOption,
) -> None:
    """Export sub-expert checkpoints: the flat layout (linear gate) plus, for --gate neurons, gate neurons."""
    from prism_cli.export.builder import ExportSettings, export_model

    if not 0 < max_shard_gb < math.inf:  # NaN too
        raise PrismError(f"--max-shard-gb must be positive and finite (GiB), got {max_shard_gb}")
    settings = ExportSettings(
        gate=gate, operating_point=operating_point, allow_inexact=allow_inexact, max_shard_bytes=int(max_shard_gb * 2**30),
        down_bias=down_bias,
    )
    # export_model reports (0, total) only once its checks have passed: a refused export prints its
    # one-line error with no progress bar above it.
    with deferred_progress("exporting", unit="layers") as (start, advance):
        result = export_model(model, partition, out, settings, force=force,
                              on_progress=lambda done, total: advance(1) if done else start(total),
                              inputs={"config file": Path(config)} if config else None)
    console.print(
        f"exported [bold]{result.out}[/]: {result.num_experts} experts x {result.n_sub} sub-experts of width "
        f"{result.width // result.n_sub} ({result.num_experts * result.n_sub} experts, top-{result.top_k * result.n_sub} = full), "
        f"gate {result.gate}, default operating point {result.default_point}; files: {', '.join(result.files)}"
    )
    serving = result.serving
    refused = "".join(f"; not {tp}: {why}" for tp, why in serving["tensor_parallel_refused"].items())
    console.print(
        f"vLLM / SGLang serve it as {serving['architecture']} ({serving['experts']} experts of width "
        f"{serving['expert_width']}): tensor-parallel {', '.join(map(str, serving['tensor_parallel']))}{refused}; "
        f"expert-parallel {', '.join(map(str, serving['expert_parallel']))}"
    )
    for gate, check in (result.exactness or {}).items():
        if gate in ("linear", "neurons"):
            console.print(f"exactness, {gate} gate at {check['point']}: max relative difference {check['max_rel_diff']:.2g} "
                          f"({'exact' if check['exact'] else 'NOT exact'}, tolerance {check['tolerance']:.0e})")
    if result.inexact_reason:
        console.print(f"[yellow]warning:[/] the linear gate is not exact for this model: {result.inexact_reason}")
    if result.linear_gate_difference:
        diff = result.linear_gate_difference
        console.print(f"measured: the linear gate routes {diff['routing_mismatch']:.2%} of {diff['pairs']:,} (token, layer) "
                      f"pairs differently from the source model (recorded as prism.linear_gate_difference)")
    console.print(
        "load it with prism_cli.load_elastic(DIR)"
        + ("" if result.gate == "neurons" else " or plain AutoModelForCausalLM.from_pretrained(DIR)")
    )
