"""``prism kernels build`` and ``prism doctor``: the CUDA kernels and the machine they run on."""

from __future__ import annotations

import typer

from prism_cli.console import console
from prism_cli.errors import PrismError
from prism_cli.report import ResultTable

app = typer.Typer(no_args_is_help=True, help="prism's compiled CUDA kernels.")


@app.command("build")
def build(
    force: bool = typer.Option(False, help="Rebuild even when a cached build exists."),
    verbose: bool = typer.Option(False, help="Show the compiler's output."),
) -> None:
    """Compile the kernels for this machine's GPU (cached; also done on first use)."""
    import torch

    from prism_cli import cuda

    if not torch.cuda.is_available():
        raise PrismError("no CUDA device here: the kernels need an NVIDIA GPU (compute capability 8.0+); "
                         "without one prism runs the torch reference path")
    try:
        cuda.build(verbose=verbose, force=force)
    except (RuntimeError, OSError) as exc:
        raise PrismError(f"building the kernels failed: {str(exc).splitlines()[0]}") from None
    report = cuda.self_check("cuda")
    console.print(f"kernels built in {cuda.cache_dir()}; self-check {'passed' if report.get('passed') else 'FAILED'}")
    if not report.get("passed"):
        raise PrismError(f"kernel self-check failed: {report}")


def doctor() -> None:
    """Report the device, the CUDA toolkit and whether the kernels are built and pass a self-check."""
    from prism_cli import cuda

    info = cuda.toolkit_info()
    table = ResultTable("prism doctor", ["item", "value"])
    for key, value in info.items():
        table.add(key, str(value))
    if cuda.available():
        report = cuda.self_check("cuda")
        table.add("kernel self-check", "passed" if report.get("passed") else f"FAILED: {report}")
    else:
        table.add("kernel self-check", "skipped: no supported CUDA device (the torch reference path is used)")
    console.print(table.rich())
