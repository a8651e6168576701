"""Errors that the CLI turns into one line on stderr and a non-zero exit code (never a traceback)."""

from __future__ import annotations

from typing import Any


class PrismError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def check_distinct(values: list[Any], option: str) -> None:
    """Refuse a value named twice in a list option (``--loads low,low``): every run of it would be made
    twice over and its rows repeated."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise PrismError(f"{option} names {', '.join(repeated)} more than once; give each once")


class BudgetNotMet(PrismError):
    """No operating point meets the requested latency budget or quality floor (``prism bench``)."""

    exit_code = 3


class Interrupted(PrismError):
    """The user pressed Ctrl-C (or the run got SIGTERM); any partial output has been removed."""

    exit_code = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (``app.main`` installs the handler): a run stopped
    by ``kill``, ``timeout`` or a job scheduler removes its partial output and keeps its resumable state,
    exactly as after Ctrl-C, instead of dying with temporary files and worker processes left behind."""
