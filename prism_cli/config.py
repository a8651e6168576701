"""Run configurations: YAML files in ``configs/`` that commands accept with ``--config``.

A file holds shared keys at the top level (``model``, ``data``, ``seed`` ...) and one optional
section per command (``profile:``, ``partition:``, ``compare:`` for ``partition compare``,
``export:``, ``bench:``, ``eval:``). Keys are option names with ``-`` or ``_``. A command uses its own
section over the shared keys as the defaults of its options, so anything given on the command line wins.

This module is the one schema of those files, and it is derived from the commands themselves: a
section is a command that takes ``--config``, its keys are that command's options, and a shared key
is an option of any of them (or ``name``, the table name of ``prism tables``). Every section and key
of a file is checked whichever command reads it: a mistyped one is refused in one line naming the
nearest valid one, never silently ignored.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path
from typing import Any

import click
import yaml

from prism_cli.errors import PrismError

#: Top-level keys read by ``prism tables`` only (besides the shared option names).
TABLE_KEYS = ("name",)


def load_run_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML run configuration, checked against the schema."""
    path = Path(path)
    if not path.exists():
        raise PrismError(f"config file {path} does not exist")
    if path.is_dir():
        raise PrismError(f"config file {path} is a folder; give a YAML file such as configs/builtin.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PrismError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise PrismError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise PrismError(f"cannot read config file {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise PrismError(f"config file {path} must hold a mapping of option names to values")
    check_run_config(data, path)
    return data


def unknown_key(where: str, noun: str, key: Any, known: list[str] | set[str] | frozenset[str]) -> PrismError:
    """``where`` has an unknown ``noun`` ``key``: one line naming the nearest of ``known`` (or listing them)."""
    close = difflib.get_close_matches(_norm(key), sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(sorted(known))}"
    return PrismError(f"{where} has unknown {noun} {key!r}; {hint}")


@cache
def schema() -> dict[str, frozenset[str]]:
    """Section name -> the option names it accepts, for every command that takes ``--config``."""
    import typer

    from prism_cli.app import app  # imported here: the commands import this module

    root = typer.main.get_command(app)
    sections: dict[str, frozenset[str]] = {}

    def walk(command: click.Command, name: str, parent: str | None) -> None:
        if hasattr(command, "commands"):  # a group (typer may run on its own copy of click: no isinstance)
            for sub_name, sub in command.commands.items():
                walk(sub, sub_name, name)
            return
        # typer wraps callbacks (functools.wraps): compare the function it wraps.
        if any(p.name == "config" and getattr(p.callback, "__wrapped__", p.callback) is config_callback for p in command.params):
            section = parent if name == "run" and parent else name  # `partition PROFILE` is `partition run`
            sections[section] = frozenset(p.name for p in command.params if p.name and p.name != "config")

    walk(root, "prism", None)
    return sections


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def check_run_config(config: dict[str, Any], path: str | Path) -> None:
    """Refuse unknown sections, unknown keys in a section and unknown shared keys, in one line."""
    sections = schema()
    shared = set().union(*sections.values()) | set(TABLE_KEYS)
    for key, value in config.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise PrismError(f"config file {path}: section {key!r} must be a mapping of option names to values")
            for option in value:
                if _norm(option) not in sections[key]:
                    raise unknown_key(f"config file {path}: section {key!r}", "option", option, sections[key])
        elif isinstance(value, dict):
            raise unknown_key(f"config file {path}", "section", key, set(sections))
        elif _norm(key) not in shared:
            raise unknown_key(f"config file {path}", "key", key, shared | set(sections))


def defaults_for(config: dict[str, Any], command: str, params: list[click.Parameter]) -> dict[str, Any]:
    """The option defaults ``command`` takes from ``config`` (shared keys, then its own section)."""
    shared = {k: v for k, v in config.items() if not isinstance(v, dict) and k not in schema()}
    section = config.get(command) or {}
    by_name = {p.name: p for p in params if p.name}
    merged: dict[str, Any] = {}
    for key, value in {**shared, **section}.items():
        name = _norm(key)
        if name in by_name:
            # A repeatable option (``-O``) takes a list; any other option takes a list as it is typed on
            # the command line (``layers: [0, 1]`` -> "0,1").
            multiple = getattr(by_name[name], "multiple", False)
            if multiple and not isinstance(value, list):
                value = [value]
            elif isinstance(value, list) and not multiple:
                value = ",".join(map(str, value))
            merged[name] = value
    return merged


def config_callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: install the file's values as this command's option defaults."""
    if value:
        command = ctx.info_name or ""
        if command == "run" and ctx.parent is not None:
            command = ctx.parent.info_name or command
        defaults = defaults_for(load_run_config(value), command, ctx.command.params)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
