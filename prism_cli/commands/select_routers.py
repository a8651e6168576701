"""``prism select-routers``: one export that routes each operating point with the best of several routers."""

from __future__ import annotations

from pathlib import Path

import typer

from prism_cli.commands.common import ConfigOption, deferred_progress
from prism_cli.commands.tune_gate import dropped_ranking_note
from prism_cli.console import console
from prism_cli.errors import PrismError


def _named(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> ``{name: dir}``, names unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if Path(path).is_file():
            raise PrismError(f"candidate {spec!r} is a file; give an export folder (DIR or NAME=DIR)")
        name = name or Path(path).name
        if not name or "." in name:
            raise PrismError(f"candidate {spec!r}: give it a name without dots, as NAME=DIR")
        if name in out:
            raise PrismError(f"two candidates are named {name!r}; name them NAME=DIR")
        out[name] = Path(path)
    return out


def select_routers(
    candidates: list[str] = typer.Argument(..., help="Exports of the same experts, as DIR or NAME=DIR: the untuned export "
                                           "first (ties go to it), then tuned runs of it (`prism tune-gate`)."),
    out: Path = typer.Option(..., help="Output folder for the bank export (must not exist unless --force)."),
    data: str = typer.Option(None, help="Validation text: a file or builtin:calibration (the default); never the evaluation split."),
    tokens: int = typer.Option(16_384, help="Validation tokens per candidate and K."),
    serve_k: int = typer.Option(None, "--serve-k", help="K whose router the checkpoint holds, and its num_experts_per_tok "
                                "(what a stock engine serves); default: the export's own."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
    config: str = ConfigOption,
) -> None:
    """At every linear:K, choose the router of lowest validation perplexity among exports; write one export switching with K."""
    from prism_cli.tuning.bank import choice_table
    from prism_cli.tuning.bank import select_routers as run

    named = _named(candidates)
    with deferred_progress("validating routers", unit="points", status=True) as (start, advance):
        choice, served = run(named, out, data=data, tokens=tokens, serve_k=serve_k, force=force, on_start=start,
                             on_point=lambda name, k: advance(status=f"{name} linear:{k}"))
    console.print(choice_table(choice, served, data or "builtin:calibration").rich())
    console.print(f"wrote [bold]{out}[/]: {len(choice.chosen)} routers ({', '.join(choice.chosen)}); the checkpoint serves "
                  f"K = {served}; `prism bench {out}` measures every K with its router")
    for directory in named.values():
        dropped_ranking_note(directory, out)
