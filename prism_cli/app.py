"""The ``prism`` command: one typer app, one module per subcommand in ``prism_cli/commands``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import click
import typer
from rich.markup import escape

from prism_cli import __version__
from prism_cli.commands import (
    bench,
    export,
    kernels,
    offload_bench,
    partition,
    plan,
    profile,
    rank_layers,
    schedule,
    select_routers,
    serve,
    tables,
    tune_gate,
)
from prism_cli.commands import eval as eval_cmd
from prism_cli.console import err_console
from prism_cli.errors import Interrupted, PrismError, Terminated
from prism_cli.io import WRITTEN

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130
#: Exit code after SIGTERM (128 + SIGTERM).
TERMINATED_EXIT_CODE = 143

# Recent typer versions run on their own copy of click and raise its exceptions, not click's: catch
# both kinds, or a mistyped option would be reported as an internal error.
_EXIT = tuple({click.exceptions.Exit, typer.Exit})
_ABORT = tuple({click.exceptions.Abort, typer.Abort})
_USAGE = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})

app = typer.Typer(
    name="prism",
    help="Turn a Mixture-of-Experts model into an elastic one: profile -> partition -> export -> bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"prism {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """prism: elastic Mixture-of-Experts (MoE-Prism)."""


app.command("profile")(profile.profile)
app.add_typer(partition.app, name="partition")
app.add_typer(plan.app, name="plan")
app.command("export")(export.export)
app.command("tune-gate")(tune_gate.tune_gate)
app.command("select-routers")(select_routers.select_routers)
app.command("rank-layers")(rank_layers.rank_layers)
app.command("bench")(bench.bench)
app.command("eval")(eval_cmd.evaluate)
app.command("tables")(tables.tables)
app.add_typer(schedule.app, name="schedule")
app.command("serve")(serve.serve)
app.command("offload-bench")(offload_bench.offload_bench)
app.add_typer(kernels.app, name="kernels")
app.command("doctor")(kernels.doctor)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and a non-zero exit code, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # prism draws its own progress: keep transformers' weight-loading bars and info logs out of it.
    # Set through the environment (read when transformers is first imported, by the commands that
    # need it) so that `prism --help` does not pay for importing transformers; a user's own setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (prism run from Python): set it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    command = typer.main.get_command(app)
    WRITTEN.clear()  # main() runs more than once in one process under the tests
    with _sigterm_raises() as sigterm:
        _run(command, sigterm)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[list[int]]:
    """While the command runs, SIGTERM raises ``Terminated`` (a KeyboardInterrupt): every cleanup that Ctrl-C
    runs runs. Yields a list that holds the signal once received (the exit code is 128 + it). Outside the
    main thread (prism run from Python in a thread) signals cannot be handled: nothing is installed."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(command: click.Command, sigterm: list[int]) -> None:
    try:
        _refuse_empty_paths(command, sys.argv[1:])
        result = command.main(prog_name="prism", standalone_mode=False)
    except Interrupted as exc:  # an interruption the command kept resumable state for
        err_console.print(f"[bold red]interrupted:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(TERMINATED_EXIT_CODE if sigterm else exc.exit_code)
    except PrismError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *_ABORT):
        _interrupted(terminated=bool(sigterm))
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except _USAGE as exc:
        _usage_error(exc)
    except MemoryError:
        err_console.print("[bold red]error:[/] out of memory; use a smaller --batch-size / --tokens / --max-rows", soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # last resort: one line, traceback only on request
        if os.environ.get("PRISM_DEBUG"):
            raise
        # One line whatever the message: its first line, unwrapped, with any [brackets] printed as text.
        first = (str(exc).strip().splitlines() or [""])[0]
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first)} "
            "(a bug in prism: rerun with PRISM_DEBUG=1 for the traceback and report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if result == INTERRUPTED_EXIT_CODE:
        # Recent typer versions catch Ctrl-C themselves and, outside standalone mode, return 130
        # instead of raising: without this the run would stop without a word.
        _interrupted(terminated=bool(sigterm))
    sys.exit(result if isinstance(result, int) else 0)


def _refuse_empty_paths(root: click.Command, argv: list[str]) -> None:
    """An explicitly empty path (``--out ''``, ``rank-layers ''``: an unset shell variable) in one line: typer
    turns '' into ``Path('.')``, so without this ``--out ''`` wrote into the current folder, indistinguishable
    from ``--out .`` once parsed. Options and arguments are matched as click will parse them (an option's
    value follows it unless it is a flag; arguments fill in order, a variadic one takes the rest)."""
    command, i = root, 0
    while i < len(argv) and argv[i] in getattr(command, "commands", {}):
        command, i = command.commands[argv[i]], i + 1
    default = getattr(command, "default_command", None)  # `prism partition PROFILE` runs `partition run`
    if default is not None and default in command.commands:
        command = command.commands[default]
    try:
        hints = typing.get_type_hints(command.callback) if command.callback is not None else {}
    except (NameError, TypeError):  # an annotation this module cannot resolve: nothing to check
        return
    is_path = {p.name: hints.get(p.name or "") in (Path, Path | None, list[Path]) for p in command.params}
    # By kind, not class: typer's parameters subclass its own vendored click.
    options = {opt: p for p in command.params if p.param_type_name == "option" for opt in p.opts}
    positional = [p for p in command.params if p.param_type_name == "argument"]
    j = i
    while j < len(argv):
        name, sep, value = argv[j].partition("=")
        option = options.get(name)
        if option is not None:
            takes_value = not option.is_flag and not option.count
            given = value if sep else argv[j + 1] if takes_value and j + 1 < len(argv) else None
            if is_path[option.name] and given is not None and not given.strip():
                raise PrismError(f"{name} is empty: give a path ('.' for the current folder)")
            j += 2 if takes_value and not sep else 1
            continue
        if positional and not argv[j].startswith("-"):
            argument = positional[0] if positional[0].nargs == -1 else positional.pop(0)
            if is_path[argument.name] and not argv[j].strip():
                raise PrismError(f"{(argument.name or 'PATH').upper()} is empty: give a path ('.' for the current folder)")
        j += 1


def _usage_error(exc: click.ClickException) -> None:
    """Click's own errors (a mistyped option, a value of the wrong type) in one line, like prism's:
    click prints usage, a hint and the error on four. ``prism`` or a group without arguments still
    shows its help."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()
        sys.exit(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = " ".join(exc.format_message().split())
    err_console.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", highlight=False, soft_wrap=True)
    sys.exit(exc.exit_code)


def _interrupted(terminated: bool = False) -> None:
    # Outputs written inside a temporary folder that was then dropped no longer exist: not named.
    kept = [path for path in dict.fromkeys(WRITTEN) if os.path.lexists(path)]
    if not kept:
        # Not "no partial output": a --resume run stopped before its work began leaves the progress it
        # was given (a profile's or a partition's .partial folder) where it was.
        said = "this run left no output, nothing half-written"
    elif len(kept) == 1:
        said = f"{kept[0]} was written before; nothing half-written was kept"
    else:
        said = f"{len(kept)} outputs were written before (the last {kept[-1]}); nothing half-written was kept"
    by = "SIGTERM" if terminated else "the user"
    err_console.print(f"[bold red]interrupted:[/] stopped by {by}; {escape(said)}", highlight=False, soft_wrap=True)
    sys.exit(TERMINATED_EXIT_CODE if terminated else INTERRUPTED_EXIT_CODE)
