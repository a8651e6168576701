"""Atomic output: every file or folder prism writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_cli.errors import PrismError

#: Errors of a write that are the user's environment, not a bug: reported in one line.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

#: Outputs this process has put in place, in order: a Ctrl-C that lands after a command wrote its
#: output must not say that nothing was kept (``prism_cli.app`` reads and clears it).
WRITTEN: list[Path] = []


def _probe(folder: Path, target: Path) -> None:
    """Create and remove a file in ``folder``: the one test that a read-only mount, a full disk or a
    permission fails as the real write will (``os.access`` says yes to root everywhere)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".prism-probe.", dir=folder)
    except OSError as exc:
        raise PrismError(f"cannot write {target}: folder {folder} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(name)


def check_writable(path: Path) -> None:
    """Fail early, before long work, if the file ``path`` cannot be written."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.exists():
        raise PrismError(f"cannot write {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise PrismError(f"cannot write {path}: {parent} is a file, not a folder")
    if path.is_dir():
        raise PrismError(f"cannot write {path}: it is a folder; give a file name")
    _probe(parent, path)


def check_output_folder(path: Path) -> None:
    """Fail early if the folder ``path`` (created with its parents when missing) cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrismError(f"output {path} is a file, not a folder: give a folder")
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PrismError(f"cannot create {path}: {existing} is a file, not a folder")
    _probe(existing, path)


@dataclass(frozen=True)
class Replaceable:
    """What ``--force`` may replace: an empty folder, or one that ``holds`` says is ``what`` (an earlier
    output of the same kind); any other folder is someone's data."""

    what: str
    holds: Callable[[Path], bool]

    def permits(self, folder: Path) -> bool:
        """Whether ``--force`` may replace the existing ``folder``."""
        return _empty(folder) or self.holds(folder)


def check_new_folder(path: Path, force: bool, replaceable: Replaceable | None = None) -> None:
    """Fail early if ``atomic_dir(path, force, replaceable)`` would: ``path`` exists without ``force``
    (or, with ``replaceable``, is neither empty nor what it names), would take the current folder with
    it, or its parent is missing or not writable."""
    path = Path(path)
    target = path.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise PrismError(f"output {path} is or holds the current folder; give a new folder to write into")
    if path.exists() and not path.is_dir():  # --force replaces an earlier output folder, never a file
        raise PrismError(f"output {path} is a file, not a folder: give a folder to write into")
    if path.exists() and not force:
        raise PrismError(f"output {path} already exists; pass --force to replace it")
    if path.exists() and replaceable is not None and not replaceable.permits(path):
        raise PrismError(f"output {path} exists and is not {replaceable.what}; --force replaces only {replaceable.what} "
                         "or an empty folder: give a new folder")
    parent = target.parent
    if not parent.exists():
        raise PrismError(f"cannot write {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise PrismError(f"cannot write {path}: {parent} is a file, not a folder")
    _probe(parent, path)


def _empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:  # unreadable: nothing says it may go
        return False


def check_not_input(out: Path, inputs: dict[str, Path], *, inside: bool = False) -> None:
    """Refuse an output that is or holds one of ``inputs`` (``{"partition": path}``), or with ``inside``
    lies in one: writing it would replace what the run reads."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        source = Path(path).resolve()
        if target == source:
            raise PrismError(f"--out {out} is the {what}; writing there would destroy it: choose another --out")
        if target in source.parents:
            raise PrismError(f"--out {out} holds the {what} ({path}); replacing it would destroy it: choose another --out")
        if inside and source in target.parents:
            raise PrismError(f"--out {out} lies inside the {what} ({path}): choose an --out outside it")


def _default_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open`` or ``mkdir`` would have given the output."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _environment_error(path: Path, exc: BaseException) -> PrismError | None:
    """One line for a write that failed on the environment (a full disk, a read-only mount ...), else None.

    safetensors reports its I/O errors as a ``SafetensorError`` (not an ``OSError``) ending in ``(os error N)``."""
    if isinstance(exc, OSError):
        return PrismError(f"cannot write {path}: {exc.strerror}") if exc.errno in _ENVIRONMENT_ERRNOS else None
    if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM
        return None
    from safetensors import SafetensorError

    found = re.search(r"\(os error (\d+)\)", str(exc)) if isinstance(exc, SafetensorError) else None
    if found and int(found[1]) in _ENVIRONMENT_ERRNOS:
        return PrismError(f"cannot write {path}: {os.strerror(int(found[1]))}")
    return None


def check_free_space(path: Path, needed: int) -> None:
    """Refuse, before any work, an output of about ``needed`` bytes that the disk holding ``path``'s
    folder has no room for (the write would fail at the end, after the long part)."""
    folder = Path(path).resolve().parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise PrismError(f"cannot write {path}: it needs about {format_size(needed)} and {folder} has {format_size(free)} free; "
                         "free some space or choose another --out")


def format_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit it reaches, to two decimals (``1.50 GiB``)."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def save_tensors(tensors: Mapping[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the usual permissions: it makes the file private (0600)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=metadata)
    os.chmod(path, _default_mode(0o666))


@contextlib.contextmanager
def new_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` (with its missing parents) for the block; a block that fails or is interrupted
    leaves none of them behind empty (what it wrote there stays, as the interruption line names)."""
    folder = Path(folder)
    missing = [f for f in (folder, *folder.parents) if not f.exists()]  # the deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for f in missing:
            try:
                f.rmdir()
            except OSError:  # not empty
                break
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary file is removed and nothing is left behind.
    """
    path = Path(path)
    check_writable(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    except OSError as exc:
        raise PrismError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); the output should get the usual permissions.
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
        WRITTEN.append(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if (error := _environment_error(path, exc)) is not None:
            raise error from None
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False, replaceable: Replaceable | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it to ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``force`` (and, with ``replaceable``, unless it is empty or
    what that names); then it is replaced only after success (and put back if the final rename fails).
    No temporary outlives the block, whatever happens.
    """
    path = Path(path)
    check_new_folder(path, force, replaceable)
    target = path.resolve()  # `--out .` and `--out dir/` name the folder itself
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise PrismError(f"cannot write {path}: {exc.strerror}") from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes the folder private (0700)
        _move_into_place(tmp, target)
        WRITTEN.append(path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (error := _environment_error(path, exc)) is not None:
            raise error from None
        raise


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an old ``target`` only once the new one is in place."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, old / "x")
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "x", target)  # the old output goes back where it was
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, what: str, missing: str) -> Any:
    """A JSON file as data, or one line: ``missing`` when it does not exist, else why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PrismError(missing) from None
    except json.JSONDecodeError as exc:
        raise PrismError(f"cannot read {what} {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise PrismError(f"cannot read {what} {path}: not UTF-8 text") from None
    except OSError as exc:  # strerror alone: str(exc) repeats the path with an errno
        raise PrismError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


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


def open_prism_h5(path: Path, kind: str, fmt: str, version: int, remake: str) -> tuple[Any, dict[str, Any]]:
    """Open a prism HDF5 file (``kind``: "profile", "partition") and check what every reader checks
    first: that it exists, is HDF5, has the ``format`` attribute ``fmt`` and this prism's ``version``
    (else one line naming ``remake``, the command that makes it again). Returns the open file, which
    the caller closes, and its attributes as plain values."""
    import h5py  # here: most commands never read HDF5

    if not path.exists():
        raise PrismError(f"{kind} {path} does not exist")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise PrismError(f"{path} is not a readable HDF5 file (corrupt, truncated or another format)") from None
    meta = {k: h5_attr(v) for k, v in h5.attrs.items()}
    problem = None
    if meta.get("format") != fmt:
        problem = f"{path} is not a prism {kind} (format attribute is {meta.get('format')!r})"
    elif not _is_integer(meta.get("format_version", -1)):
        problem = f"{path} is corrupt: attribute format_version is {meta['format_version']!r}, not an integer"
    elif int(meta.get("format_version", -1)) != version:
        problem = f"{path} has {kind} format version {meta.get('format_version')}; this prism reads {version}: {remake}"
    if problem is not None:
        h5.close()
        raise PrismError(problem)
    return h5, meta


def is_prism_h5(path: Path, fmt: str) -> bool:
    """Whether ``path`` is an HDF5 file whose ``format`` attribute is ``fmt`` (a prism profile or partition of
    any version): one that a run may replace with a newer one, unlike a file of the user's of that name."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return h5_attr(h5.attrs.get("format")) == fmt
    except OSError:
        return False


def check_replaceable(path: Path, fmt: str, what: str, *, json_file: bool = False, label: str = "--out") -> None:
    """Refuse an output (``label``) that names an existing file other than a prism ``what``: an HDF5 file, or
    with ``json_file`` a JSON object, whose ``format`` is ``fmt``. A run replaces an earlier result of its
    own, never a user's file of that name (``prism profile ... --out README.md`` replaced it)."""
    path = Path(path)
    ours = _is_prism_json(path, fmt) if json_file else is_prism_h5(path, fmt)
    if path.is_file() and not ours:
        raise PrismError(f"{label} {path} exists and is not a prism {what}: writing would replace it; move it or choose "
                         "another --out")


#: The largest JSON file read to see whether it is a prism one (a cost model is a few KiB; a user's file
#: of gigabytes is not read whole only to refuse it).
_MAX_OWN_JSON = 16 * 2**20


def _is_prism_json(path: Path, fmt: str) -> bool:
    try:
        if Path(path).stat().st_size > _MAX_OWN_JSON:
            return False
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == fmt


def integer_attrs(meta: dict[str, Any], keys: tuple[str, ...], path: Path, minimum: int = 0) -> None:
    """Replace the attributes ``keys`` of an opened prism HDF5 file by ints, each at least ``minimum``
    (``layers``: a list of them), or raise one line naming the first that is missing or is not one."""
    for key in keys:
        value = meta.get(key)
        items = value if key == "layers" and isinstance(value, list) else [value]
        if value is None or not all(_is_integer(v) and int(v) >= minimum for v in items):
            raise PrismError(f"{path} is corrupt: attribute {key} is {value!r}, not "
                             f"{'a list of integers' if key == 'layers' else 'an integer'} >= {minimum}")
        meta[key] = [int(v) for v in items] if key == "layers" else int(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (a parsed JSON document) holds a lone surrogate (U+D800-U+DFFF):
    JSON's ``\\u`` escapes can spell one, UTF-8 text cannot, and tokenizers and encoders fail on it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return False
