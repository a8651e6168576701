"""``prism eval``: held-out perplexity of any causal LM checkpoint (exported elastic models included)."""

from __future__ import annotations

import typer

from prism_cli.commands.common import CachePolicyOption, ConfigOption, DeviceMemoryOption
from prism_cli.console import console, progress_bar
from prism_cli.data import load_text
from prism_cli.errors import PrismError


def evaluate(
    model: str = typer.Argument("builtin", help="Checkpoint folder or hub id ('builtin': the shipped model)."),
    data: str = typer.Option(None, help="Text file, or builtin:<split> (default builtin:eval, the held-out split)."),
    tokens: int = typer.Option(None, help="Evaluate at most this many tokens (default: all of the data)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per evaluation window."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    operating_point: str = typer.Option(
        None, "--operating-point", "-K",
        help="For a prism export: the point to evaluate (topk:4, threshold:0.9, ...; default: the export's).",
    ),
    device_memory: str = DeviceMemoryOption,
    cache_policy: str = CachePolicyOption,
    config: str = ConfigOption,
) -> None:
    """Held-out perplexity and tokens/s of a causal LM (the evaluator every other command reuses)."""
    if tokens is not None and tokens <= 0:
        raise PrismError(f"--tokens must be positive, got {tokens}")
    if batch_size <= 0:
        raise PrismError(f"--batch-size must be positive, got {batch_size}")
    if operating_point is not None and not operating_point.strip():
        raise PrismError("-K needs an operating point, e.g. linear:4 or topk:2 (leave it out for the full model)")
    if seq_len < 2:  # a window predicts seq_len - 1 tokens
        raise PrismError(f"--seq-len must be at least 2, got {seq_len}")
    from prism_cli.data.windows import token_windows
    from prism_cli.evaluation.perplexity import perplexity
    from prism_cli.models.loading import check_context_length, parse_device, parse_dtype
    from prism_cli.offload.config import offload_config

    parse_dtype(dtype)  # the options a load would refuse, before the load (seconds to minutes)
    parse_device(device)
    _check_point(model, operating_point)
    offload = offload_config(device_memory, cache_policy, device=device)
    text, data_name = load_text(data, "eval")
    loaded = load_elastic_or_plain(model, dtype, device, operating_point, offload)
    check_context_length(loaded.model.config, seq_len)
    if offload is not None:
        console.print(f"offloaded: {offload.describe()}")
    _note_inexact(loaded.model)
    try:
        windows = token_windows(loaded.tokenizer, text, seq_len, tokens)
    except ValueError as exc:
        raise PrismError(str(exc)) from None
    with progress_bar("evaluating", total=windows.numel()) as advance:
        result = perplexity(loaded.model, windows, batch_size=batch_size, on_batch=advance)
    point = "" if operating_point is None else f" at {operating_point}"
    console.print(
        f"perplexity{point} [bold]{result.perplexity:.2f}[/] on {result.tokens:,} predicted tokens of {data_name} "
        f"({result.tokens_per_second:,.0f} tokens/s, seq-len {seq_len})"
    )


def _note_inexact(model) -> None:
    """Say where the point evaluated routes only approximately: a linear or layered point of an export
    written with --allow-inexact (its full point is then not the source model's)."""
    from prism_cli.export.format import inexact_linear_gate

    state = getattr(model, "prism_state", None)
    caveat = inexact_linear_gate(getattr(model.config, "prism", None))
    if caveat and state is not None and state.point is not None and state.point.policy in ("linear", "layered"):
        console.print(f"note: {caveat}: {state.point} routes only approximately like the source model", highlight=False)


def _check_point(model: str, operating_point: str | None) -> None:
    """Parse ``-K`` against the export's metadata (what the elastic load does after loading the weights)."""
    from prism_cli.operating_points import parse_operating_point
    from prism_cli.runtime.elastic import export_meta

    meta = export_meta(model) if operating_point is not None else None
    if meta is not None and isinstance(meta.get("source"), dict):
        try:
            n_sub, top_k = int(meta["sub_experts"]), int(meta["source"]["top_k"])
        except (KeyError, TypeError, ValueError):
            return  # a broken export: the load names what is wrong with it
        parse_operating_point(operating_point, meta.get("gate"), n_sub, top_k)


def load_elastic_or_plain(model: str, dtype: str, device: str, operating_point: str | None = None, offload=None):
    """A prism export loads through the elastic runtime (so its gate is used); anything else plainly.
    With ``offload`` (an ``OffloadConfig``) the routed experts are offloaded (whole experts for a plain model)."""
    from prism_cli.models.loading import load_model
    from prism_cli.runtime.elastic import is_prism_export, load_elastic_model
    from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION

    if is_prism_export(model):
        return load_elastic_model(model, dtype=dtype, device=device, operating_point=operating_point, offload=offload)
    if operating_point is not None:
        raise PrismError(f"--operating-point needs a prism export; {model} is a plain model")
    if offload is None:
        return load_model(model, dtype=dtype, device=device, require_moe=False)
    from prism_cli.offload.executor import attach_offload

    loaded = load_model(model, dtype=dtype, device="cpu", experts_implementation=EXPERTS_IMPLEMENTATION)
    attach_offload(loaded.model, offload)
    return loaded
