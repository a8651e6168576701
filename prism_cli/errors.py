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


def nonempty_items(items: list[str], text: str, option: str, what: str = "value") -> list[str]:
    """The ``items`` of a list option typed as ``text``, stripped. An empty item beside others (``a,,b``, a
    trailing separator) is refused, not skipped: it is most often a value lost to a typo or an unset shell
    variable. Text with no item at all (``""``, ``" , "``) gives [], which the caller refuses as naming nothing."""
    items = [item.strip() for item in items]
    if not any(items):
        return []
    if "" in items:
        raise PrismError(f"{option} {text!r} has an empty item (two separators, or one at an end): give each {what} once")
    return items


def split_items(text: str, option: str) -> list[str]:
    """The items of a comma-separated option (``nonempty_items``)."""
    return nonempty_items(str(text).split(","), text, option)
