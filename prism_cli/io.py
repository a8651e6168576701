"""Atomic output: every file or folder prism writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prism_cli.errors import PrismError


def check_writable(path: Path) -> None:
    """Fail early, before long work, if ``path`` cannot be created."""
    parent = path.resolve().parent
    if not parent.exists():
        raise PrismError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PrismError(f"cannot write {path}: folder {parent} is not writable")
    if path.is_dir():
        raise PrismError(f"cannot write {path}: it is a folder")


def _default_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open`` or ``mkdir`` would have given the output."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary file is removed and nothing is left behind.
    """
    path = Path(path)
    check_writable(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); the output should get the usual permissions.
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it to ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``force``; then it is replaced only after success.
    """
    path = Path(path)
    if path.exists() and not force:
        raise PrismError(f"output {path} already exists; pass --force to replace it")
    parent = path.resolve().parent
    if not parent.exists():
        raise PrismError(f"cannot write {path}: folder {parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes the folder private (0700)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def h5_attr(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes -> str, numpy -> lists and scalars)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [h5_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def open_work_dir(folder: Path, kind: str, identity: dict[str, Any], *, resume: bool, what: str) -> bool:
    """Create the work folder of a resumable run, or check the one an interrupted run left.

    ``identity`` is what must match to continue (model, data, settings ...); with ``resume`` a
    folder made with other values is refused naming the first difference, without it any existing
    folder is refused (it holds work that a fresh run would throw away). Returns True when resuming.
    """
    manifest = folder / "manifest.json"
    if not folder.exists():
        folder.mkdir()
        write_json(manifest, {"format": kind, "identity": identity})
        return False
    if not resume:
        raise PrismError(f"{folder} holds an interrupted {what} run: pass --resume to continue it, or delete the folder to start over")
    try:
        saved = json.loads(manifest.read_text())
        if saved.get("format") != kind:
            raise ValueError
        old = saved["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PrismError(f"{folder} is not a prism {what} work folder (or is damaged); delete it to start over") from None
    for key, value in identity.items():
        if old.get(key) != value:
            raise PrismError(
                f"--resume: {folder} was started with {key} = {old.get(key)!r}, this run has {value!r}; "
                "rerun with the same input and settings, or delete the folder to start over"
            )
    return True
