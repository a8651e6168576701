"""The shared rich console and progress bars (the library never prints; commands do)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# No emoji codes: a path or an operating point may hold ":x:" (printed as it is, not as a symbol).
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


class RateColumn(ProgressColumn):
    """Throughput in the task's unit (tokens/s, experts/s ...)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s" if speed >= 10 else f"{speed:.2f} {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None = None, unit: str = "tokens", status: bool = False
) -> Iterator[Callable[..., None]]:
    """A progress bar; yields ``advance(n=1, total=None, status=None)`` (``total`` may be set once it is
    known; with ``status=True`` the bar shows a text that each ``advance`` may replace, e.g. a loss)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    progress = Progress(
        *columns,
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, total: int | None = None, status: str | None = None) -> None:
            if total is not None:
                progress.update(task, total=total)
            if status is not None:
                progress.update(task, status=status)
            if n:
                progress.advance(task, n)

        try:
            yield advance
        except BaseException:
            # A run refused (or interrupted) after its bar opened ends with its one-line error alone.
            progress.live.transient = True
            raise
