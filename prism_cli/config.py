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

#: Options that take a list on the command line, by section, with the separator they are typed with
#: (``--points`` lists join with ';': a pattern point such as ``pattern:4,3`` holds commas): a YAML list is
#: joined with it. A list for any other (single-valued) option is refused, even of one element (``tokens:
#: [512]`` is a mistake, not 512). Repeatable options and variadic arguments take lists as well.
LIST_OPTIONS: dict[str, dict[str, str]] = {
    "profile": {"layers": ","},
    "partition": {"layers": ","},
    "compare": {"layers": ",", "solvers": ","},
    "plan": {"layers": ","},
    "calibrate": {"solvers": ",", "widths": ","},
    "bench": {"batch": ",", "points": ";"},
    "offload-bench": {"device_memory": ",", "points": ";", "policy": ",", "pin": ","},
    "schedule": {"floors": ","},
    "sweep": {"floors": ",", "loads": ",", "rates": ","},
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (where the last would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping below says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where (``expected ',' or ']', but got ':' at line 2, column 2``): PyYAML's first
    line of text is often only the construct it was in (``while parsing a flow sequence``)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return str(exc).splitlines()[0]
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def load_run_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML run configuration, checked against the schema."""
    path = Path(path)
    if not path.exists():
        raise PrismError(f"config file {path} does not exist")
    if path.is_dir():
        raise PrismError(f"config file {path} is a folder; give a YAML file such as configs/builtin.yaml")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.constructor.ConstructorError as exc:
        raise PrismError(f"config file {path}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise PrismError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise PrismError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise PrismError(f"cannot read config file {path}: {exc.strerror}") from None
    if data is None or data == {}:  # a run on nothing but defaults, which --config was not given for
        raise PrismError(f"config file {path} is empty: give options such as model: and data: (configs/builtin.yaml), "
                         "or leave --config out")
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
def _commands() -> dict[str, click.Command]:
    """Section name -> the command it configures, for every command that takes ``--config``."""
    import typer

    from prism_cli.app import app  # imported here: the commands import this module

    root = typer.main.get_command(app)
    commands: dict[str, click.Command] = {}

    def walk(command: click.Command, name: str, parent: str | None) -> None:
        if hasattr(command, "commands"):  # a group (typer may run on its own copy of click: no isinstance)
            for sub_name, sub in command.commands.items():
                walk(sub, sub_name, name)
            return
        # typer wraps callbacks (functools.wraps): compare the function it wraps.
        if any(p.name == "config" and getattr(p.callback, "__wrapped__", p.callback) is config_callback for p in command.params):
            section = parent if name == "run" and parent else name  # `partition PROFILE` is `partition run`
            commands[section] = command

    walk(root, "prism", None)
    return commands


@cache
def schema() -> dict[str, frozenset[str]]:
    """Section name -> the option names it accepts, for every command that takes ``--config``."""
    return {section: frozenset(p.name for p in command.params if p.name and p.name != "config")
            for section, command in _commands().items()}


def _takes_list(section: str, param: click.Parameter) -> bool:
    """Whether ``param`` of ``section``'s command takes a list (repeatable, variadic or comma-separated)."""
    return (bool(getattr(param, "multiple", False)) or getattr(param, "nargs", 1) != 1
            or param.name in LIST_OPTIONS.get(section, {}))


def _list_refused(path: str | Path, key: Any, where: str) -> PrismError:
    return PrismError(f"config file {path}: {key!r} {where} takes a single value, not a list; write {_norm(key)}: VALUE")


def _check_not_list(path: str | Path, section: str, key: Any, value: Any) -> None:
    """Refuse a YAML list for an option of ``section`` that takes a single value."""
    if not isinstance(value, list):
        return
    params = {p.name: p for p in _commands()[section].params}
    if not _takes_list(section, params[_norm(key)]):
        raise _list_refused(path, key, f"in section {section!r}")


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def check_run_config(config: dict[str, Any], path: str | Path) -> None:
    """Refuse unknown sections, unknown keys in a section and unknown shared keys, in one line."""
    sections = schema()
    shared = set().union(*sections.values()) | set(TABLE_KEYS)
    for where, mapping in [("", config), *((f" section {k!r}", v) for k, v in config.items() if isinstance(v, dict))]:
        spelled: dict[str, Any] = {}
        for key in mapping:  # `max-batch` and `max_batch` are one option: given both, one would silently win
            if _norm(key) in spelled:
                raise PrismError(f"config file {path}:{where} {spelled[_norm(key)]!r} and {key!r} are the same option; "
                                 "give it once")
            spelled[_norm(key)] = key
    for key, value in config.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise PrismError(f"config file {path}: section {key!r} must be a mapping of option names to values")
            for option, option_value in value.items():
                if _norm(option) not in sections[key]:
                    raise unknown_key(f"config file {path}: section {key!r}", "option", option, sections[key])
                if isinstance(option_value, dict):
                    raise PrismError(f"config file {path}: {option!r} in section {key!r} takes a value, not a mapping "
                                     "(a list of several is written as a YAML list or a comma-separated string)")
                _check_not_list(path, key, option, option_value)
        elif isinstance(value, dict):
            raise unknown_key(f"config file {path}", "section", key, set(sections))
        elif _norm(key) not in shared:
            raise unknown_key(f"config file {path}", "key", key, shared | set(sections))
        elif isinstance(value, list) and not any(
                _takes_list(section, p) for section, command in _commands().items() for p in command.params
                if p.name == _norm(key)):
            raise _list_refused(path, key, "(a shared key at the top level)")


def defaults_for(config: dict[str, Any], command: str, params: list[click.Parameter],
                 path: str | Path = "") -> dict[str, Any]:
    """The option defaults ``command`` takes from ``config`` (shared keys, then its own section).

    A list is refused for an option that takes one value (a shared key's list may suit another command).
    """
    shared = {k: v for k, v in config.items() if not isinstance(v, dict) and k not in schema()}
    section = config.get(command) or {}
    by_name = {p.name: p for p in params if p.name}
    merged: dict[str, Any] = {}
    for key, value in {**shared, **section}.items():
        name = _norm(key)
        if name in by_name:
            if value is None:  # YAML's null (``steps:`` with nothing after it): the default ran, silently
                where = f"in section {command!r}" if key in section else "(a shared key)"
                raise PrismError(f"config file {path}: {key!r} {where} has no value; give one or leave the key out")
            kind = by_name[name].bare_type() if hasattr(by_name[name], "bare_type") else None
            if isinstance(value, bool) and kind not in ("bool", None):
                # YAML's true/false would reach click as 1/0 (``tokens: true`` ran with --tokens 1)
                raise PrismError(f"config file {path}: {key!r} takes {kind}, not {str(value).lower()}")
            if not isinstance(value, list) and not _fits(kind, value):
                # typer's own message names the option, not the file the value came from
                raise PrismError(f"config file {path}: {key!r} takes {'an integer' if kind == 'int' else 'a number'}, "
                                 f"not {value!r}")
            # A repeatable option (``-O``) takes a list; a comma-separated one takes a list as it is typed
            # on the command line (``layers: [0, 1]`` -> "0,1").
            multiple = getattr(by_name[name], "multiple", False)
            if multiple and not isinstance(value, list):
                value = [value]
            elif isinstance(value, list) and not multiple:
                if not _takes_list(command, by_name[name]):
                    where = f"in section {command!r}" if key in section else f"(a shared key) for {command!r}"
                    raise _list_refused(path, key, where)
                value = LIST_OPTIONS.get(command, {}).get(name, ",").join(map(str, value))
            merged[name] = value
    return merged


def _fits(kind: str | None, value: Any) -> bool:
    """Whether a YAML scalar can be an ``int`` / ``float`` option's value, as typed on the command line."""
    if kind not in ("int", "float") or isinstance(value, bool):
        return True
    if isinstance(value, int) or (isinstance(value, float) and (kind == "float" or value.is_integer())):
        return True
    if not isinstance(value, str):
        return False
    try:
        (int if kind == "int" else float)(value)
    except ValueError:
        return False
    return True


def config_callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: install the file's values as this command's option defaults."""
    if value is not None and not value.strip():
        raise PrismError("--config is empty: give a YAML file such as configs/builtin.yaml, or leave it out")
    if value:
        command = ctx.info_name or ""
        if command == "run" and ctx.parent is not None:
            command = ctx.parent.info_name or command
        defaults = defaults_for(load_run_config(value), command, ctx.command.params, value)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
