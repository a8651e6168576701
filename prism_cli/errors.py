"""Errors that the CLI turns into one line on stderr and a non-zero exit code (never a traceback)."""

from __future__ import annotations


class PrismError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


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
