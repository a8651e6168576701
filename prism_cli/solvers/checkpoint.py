"""Per-expert results of a ``prism partition`` run that is still going (or was interrupted).

Each finished expert is written at once to ``<out>.partial/layer<L>-expert<e>.npz`` (temporary name,
then rename), so a killed run loses only the experts that were being solved. ``--resume`` reloads the
finished ones and solves the rest; since every expert draws from its own ``(seed, layer, expert)``
stream, what it gets does not depend on which experts ran before, in which order, or in which run.
The folder's ``manifest.json`` records what must match to continue it (the profile's content hash
and every partition setting).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from prism_cli.errors import PrismError
from prism_cli.io import open_work_dir
from prism_cli.solvers.format import ExpertPartition

_FORMAT = "prism-partition-partial"
_NAME = re.compile(r"layer(\d+)-expert(\d+)\.npz")
_FIELDS = ("permutation", "gate_positions", "fit_cost", "heldout_cost", "fit_retained", "heldout_retained", "seconds")


def work_dir_for(out: Path) -> Path:
    """The folder where a run writing ``out`` keeps its finished experts until the end."""
    return out.with_name(out.name + ".partial")


class ResultStore:
    """Finished experts of one partition run, one small file each."""

    def __init__(self, folder: Path, identity: dict[str, Any], *, resume: bool) -> None:
        self.folder = folder
        self.resumed = open_work_dir(folder, _FORMAT, identity, resume=resume, what="partition")

    def count(self) -> int:
        """How many experts have been saved (their files not read: a damaged one counts); 0 where the folder
        is gone (an error about that must not hide the one being handled)."""
        try:
            return sum(1 for path in self.folder.iterdir() if _NAME.fullmatch(path.name))
        except OSError:
            return 0

    def finished(self) -> dict[tuple[int, int], ExpertPartition]:
        """Every expert saved so far."""
        out: dict[tuple[int, int], ExpertPartition] = {}
        for path in self.folder.iterdir():
            match = _NAME.fullmatch(path.name)
            if not match:
                continue
            try:
                with np.load(path) as npz:
                    values = {k: npz[k] for k in npz.files}
                result = ExpertPartition(
                    permutation=values["permutation"],
                    gate_positions=values["gate_positions"],
                    fit_cost=float(values["fit_cost"]),
                    heldout_cost=float(values["heldout_cost"]),
                    fit_retained=values["fit_retained"],
                    heldout_retained=values["heldout_retained"],
                    seconds=float(values["seconds"]),
                    front=values.get("front"),
                )
            except (OSError, ValueError, KeyError):
                raise PrismError(f"{path} is damaged; delete it (that expert is solved again) and rerun with --resume") from None
            out[int(match.group(1)), int(match.group(2))] = result
        return out

    def save(self, layer: int, expert: int, result: ExpertPartition) -> None:
        """Write one expert's result (atomically: a kill leaves the old state or the new one)."""
        path = self.folder / f"layer{layer}-expert{expert}.npz"
        tmp = path.with_suffix(".tmp")
        values = {name: np.asarray(getattr(result, name)) for name in _FIELDS}
        if result.front is not None:
            values["front"] = np.asarray(result.front)
        with open(tmp, "wb") as fh:
            np.savez(fh, **values)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.folder)
