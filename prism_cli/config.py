"""Run configurations: YAML files in ``configs/`` that commands accept with ``--config``.

A file holds shared keys at the top level (``model``, ``data``, ``seed`` ...) and one optional
section per command (``profile:``, ``partition:``, ``export:``, ``bench:`` ...). Keys are option
names with ``-`` or ``_``. A command uses its own section over the shared keys as the defaults of its
options, so anything given on the command line wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from prism_cli.errors import PrismError

COMMAND_SECTIONS = ("profile", "partition", "export", "bench", "eval", "tables", "compare", "run", "offload-bench")


def load_run_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise PrismError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PrismError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PrismError(f"config file {path} must hold a mapping of option names to values")
    return data


def defaults_for(config: dict[str, Any], command: str, params: list[click.Parameter]) -> dict[str, Any]:
    """The option defaults ``command`` takes from ``config``; unknown keys are an error."""
    shared = {k: v for k, v in config.items() if k not in COMMAND_SECTIONS and not isinstance(v, dict)}
    section = config.get(command) or {}
    if not isinstance(section, dict):
        raise PrismError(f"config section {command!r} must be a mapping")
    by_name = {p.name: p for p in params if p.name}
    merged: dict[str, Any] = {}
    for key, value in {**shared, **section}.items():
        name = key.replace("-", "_")
        if name in by_name:
            # A repeatable option (``-O``) takes a list; any other option takes a list as it is typed on
            # the command line (``layers: [0, 1]`` -> "0,1").
            multiple = getattr(by_name[name], "multiple", False)
            if multiple and not isinstance(value, list):
                value = [value]
            elif isinstance(value, list) and not multiple:
                value = ",".join(map(str, value))
            merged[name] = value
        elif key in section:
            raise PrismError(f"config section {command!r} has unknown option {key!r}; known: {', '.join(sorted(by_name))}")
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
