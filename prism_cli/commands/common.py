"""Options and helpers shared by several commands."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import click
import typer
from typer.core import TyperGroup

from prism_cli.config import config_callback
from prism_cli.console import progress_bar
from prism_cli.errors import PrismError
from prism_cli.layers import MAX_LAYERS

ConfigOption = typer.Option(
    None,
    "--config",
    is_eager=True,
    callback=config_callback,
    help="YAML run configuration (see configs/); command-line options override it.",
)


#: Offloading (prism_cli.offload) on every command that runs a model; ``offload_config`` turns the two
#: values into an ``OffloadConfig`` (None without a budget).
DeviceMemoryOption = typer.Option(
    None, "--device-memory",
    help="Offload the routed experts to host memory behind a device cache of this size: 4GB, 4GiB, 45% (of the experts "
         "cached), 16GB@deepseek-v2-lite. Without CUDA the device and its link (25 GB/s PCIe 4.0 x16) are simulated.",
)
CachePolicyOption = typer.Option(None, "--cache-policy", help="Expert cache policy with --device-memory: lru (default), "
                                 "lfu, prefetch.")


@contextlib.contextmanager
def deferred_progress(
    description: str, unit: str, status: bool = False
) -> Iterator[tuple[Callable[[int], None], Callable[..., None]]]:
    """``(start, advance)`` for a progress bar that opens only at ``start(total)``.

    Library calls check their input before they call ``start``: an input they refuse is then reported
    as one line, with no half-drawn bar above it (``export`` does the same with its own callback).
    ``advance`` takes what ``console.progress_bar``'s does (``status=`` where ``status`` is set).
    """
    with contextlib.ExitStack() as stack:
        bar: list[Callable[..., None]] = []

        def start(total: int) -> None:
            bar.append(stack.enter_context(progress_bar(description, total=total, unit=unit, status=status)))

        def advance(n: int = 1, **kwargs: object) -> None:
            if bar:
                bar[-1](n, **kwargs)

        yield start, advance


#: Seeds go to numpy's and torch's generators and into HDF5 and JSON metadata, which take 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


def check_seed(value: int) -> int:
    """``--seed``'s callback: the seed, or one line where the generators or the metadata could not take it."""
    if not 0 <= value <= MAX_SEED:
        raise PrismError(f"--seed must be between 0 and {MAX_SEED}, got {value}")
    return value


def parse_int_list(value: str | None, option: str) -> list[int] | None:
    """``"1,8,32"`` -> ``[1, 8, 32]``; None stays None."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return [int(v) for v in str(value).split(",")]
    except ValueError:
        raise PrismError(f"{option} must be a comma-separated list of integers, got {value!r}") from None


def parse_layers(value: str | None, option: str = "--layers") -> list[int] | None:
    """``"0-7,12"`` -> ``[0, 1, ..., 7, 12]`` (ranges include both ends, a layer named twice is one); None
    stays None."""
    if value is None:
        return None
    if not str(value).strip():  # an unset shell variable, not "every layer"
        raise PrismError(f"{option} is empty: give MoE layers such as 0-7,12, or leave {option} out for all")
    out: list[int] = []
    for part in (p.strip() for p in str(value).split(",")):
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise PrismError(f"{option} must list layers and ranges such as 0-7,12, got {value!r}") from None
        if hi < lo:
            raise PrismError(f"{option} range {part} is empty (the end comes before the start)")
        if hi >= MAX_LAYERS:
            raise PrismError(f"{option} {part}: layers are numbered from 0 and prism handles models of up to "
                             f"{MAX_LAYERS:,} decoder layers")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


class DefaultCommandGroup(TyperGroup):
    """A group that runs its ``run`` subcommand when the first argument is not a subcommand name.

    This lets ``prism partition PROFILE`` and ``prism partition compare PROFILE`` coexist.
    """

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class StageBars:
    """One progress bar per bench stage, each closed when the next one starts (and all on exit)."""

    def __init__(self) -> None:
        self._open: list = []

    def __call__(self, name: str, total: int):
        self.close()
        unit = {"quality": "tokens", "profile": "tokens", "partition": "experts", "rank": "runs"}.get(name.split()[0], "points")
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
