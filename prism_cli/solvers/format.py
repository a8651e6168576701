"""The partition file (``partition.h5``): what ``prism partition`` writes and ``prism export`` reads.

Layout (HDF5)::

    /                 attrs: format="prism-partition", format_version, prism_version, created,
                             solver, solver_settings (JSON), sub_experts (N), keep, gate_neurons (s), gate_selection,
                             seed, profile (path), profile_hash, and the profile's model metadata:
                             model, model_type, config_hash, weights_hash, data_hash, tokens,
                             num_experts, expert_width, hidden_size, top_k, layers
    /layers/<L>/
        permutation       [E, I] int32  neurons of each expert grouped by sub-expert: sub-expert n of
                                        expert e is ``permutation[e, n*I/N:(n+1)*I/N]`` (ascending);
                                        sub-expert 0 carries the most activation mass on the fit rows
        gate_positions    [E, N, s] int32  each sub-expert's gate neurons (SPEC 3.4a), as positions
                                        inside that sub-expert's slice of ``permutation``
        fit_cost, heldout_cost          [E] float64  normalised paper cost (SPEC 3.2, keep)
        fit_retained, heldout_retained  [E, N-1] float64  R_1..R_{N-1}
        seconds           [E] float64   solver wall time per expert
        front/<e>         [F, N]        the Pareto front on the fit rows (multi-objective solvers only):
                                        paper cost, then R_1..R_{N-1}, by increasing cost
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from prism_cli import __version__
from prism_cli.errors import PrismError
from prism_cli.io import atomic_path, integer_attrs, open_prism_h5

FORMAT = "prism-partition"
#: 2: ``weights_hash`` fingerprints every tensor (``prism_cli.models.checkpoint_files``); 1 hashed one router.
FORMAT_VERSION = 2

#: Profile metadata copied into the partition so that export can check the model it is given.
MODEL_KEYS = (
    "model",
    "model_type",
    "config_hash",
    "weights_hash",
    "data_hash",
    "tokens",
    "num_experts",
    "expert_width",
    "hidden_size",
    "top_k",
)


@dataclass
class ExpertPartition:
    """One expert's split, scored on its fit and held-out rows."""

    permutation: np.ndarray
    gate_positions: np.ndarray
    fit_cost: float
    heldout_cost: float
    fit_retained: np.ndarray
    heldout_retained: np.ndarray
    seconds: float
    front: np.ndarray | None = None


@dataclass
class Partition:
    """A whole model's partition: ``experts[layer][expert]`` plus metadata (the root attributes)."""

    meta: dict[str, Any]
    experts: dict[int, list[ExpertPartition]] = field(default_factory=dict)

    @property
    def n_sub(self) -> int:
        return int(self.meta["sub_experts"])

    @property
    def layers(self) -> list[int]:
        return sorted(self.experts)


@dataclass(frozen=True)
class MeanScores:
    """The mean scores of a group of solved experts (a layer, a whole run)."""

    fit_cost: float
    heldout_cost: float
    heldout_retained: np.ndarray  # R_1..R_{N-1}
    seconds: float


def mean_scores(experts: list[ExpertPartition]) -> MeanScores:
    return MeanScores(
        float(np.mean([x.fit_cost for x in experts])),
        float(np.mean([x.heldout_cost for x in experts])),
        np.mean([x.heldout_retained for x in experts], axis=0),
        float(np.mean([x.seconds for x in experts])),
    )


def file_hash(path: str | Path) -> str:
    """Content hash of a file (recorded so later steps can tell which partition or profile they got)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def write_partition(path: str | Path, partition: Partition) -> None:
    """Write atomically, in the layout documented above."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prism_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **partition.meta,
        "layers": partition.layers,
    }
    with atomic_path(Path(path)) as tmp, h5py.File(tmp, "w") as h5:
        for key, value in meta.items():
            h5.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
        for layer, experts in partition.experts.items():
            g = h5.create_group(f"layers/{layer}")
            g["permutation"] = np.stack([x.permutation for x in experts]).astype(np.int32)
            g["gate_positions"] = np.stack([x.gate_positions for x in experts]).astype(np.int32)
            g["fit_cost"] = np.array([x.fit_cost for x in experts])
            g["heldout_cost"] = np.array([x.heldout_cost for x in experts])
            g["fit_retained"] = np.stack([x.fit_retained for x in experts])
            g["heldout_retained"] = np.stack([x.heldout_retained for x in experts])
            g["seconds"] = np.array([x.seconds for x in experts])
            for e, x in enumerate(experts):
                if x.front is not None:
                    g[f"front/{e}"] = x.front


def gate_positions_problem(gates: np.ndarray, size: int) -> str | None:
    """Why ``gates`` (``[..., s]``: each sub-expert's gate neurons, as positions among its ``size``
    neurons) are not gate neurons, or None. Shared with the export's gate file (``export/validate.py``)."""
    if gates.dtype.kind not in "iu":  # floats would be truncated to other neurons
        return f"are stored as {gates.dtype}, not integers"
    if not 1 <= gates.shape[-1] <= size:
        return f"are {gates.shape[-1]} per sub-expert, not 1..{size} (the neurons of one sub-expert)"
    if gates.min() < 0 or gates.max() >= size:
        return f"lie outside 0..{size - 1}, the neurons of one sub-expert"
    if (np.diff(np.sort(gates, axis=-1), axis=-1) == 0).any():
        return "repeat a neuron within one sub-expert"
    return None


def read_partition(path: str | Path) -> Partition:
    """Read and validate a partition file; every problem is a one-line ``PrismError``."""
    path = Path(path)
    h5, meta = open_prism_h5(path, "partition", FORMAT, FORMAT_VERSION, "make it again with prism profile and prism partition")
    with h5:
        if isinstance(meta.get("solver_settings"), str):
            try:
                meta["solver_settings"] = json.loads(meta["solver_settings"])
            except json.JSONDecodeError:
                raise PrismError(f"{path} is corrupt: attribute solver_settings is not JSON") from None
        integer_attrs(meta, ("sub_experts", "expert_width", "num_experts"), path, minimum=1)
        integer_attrs(meta, ("layers",), path)
        n_sub, width, n_experts = meta["sub_experts"], meta["expert_width"], meta["num_experts"]
        if width % n_sub:
            raise PrismError(f"{path} is corrupt: sub_experts {n_sub} does not divide expert_width {width}")
        missing = [layer for layer in meta["layers"] if f"layers/{layer}" not in h5]
        if missing:
            raise PrismError(f"{path} is incomplete: layers {missing} are listed but missing")
        partition = Partition(meta=meta)

        def read(group: Any, name: str) -> np.ndarray:
            where = f"{group.name.lstrip('/')}/{name}"
            try:
                item = group.get(name)
                if item is None:
                    raise PrismError(f"{path} is corrupt: dataset {where} is missing")
                value = item[()] if isinstance(item, h5py.Dataset) else None
            except (KeyError, OSError, RuntimeError, TypeError, ValueError) as exc:  # h5py's errors for damaged bytes
                raise PrismError(f"{path} is corrupt: cannot read {where} ({str(exc).splitlines()[0]})") from None
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
                raise PrismError(f"{path} is corrupt: {where} is not an array of numbers")
            return value

        for layer in meta["layers"]:
            try:
                g = h5[f"layers/{layer}"]
            except (KeyError, OSError, RuntimeError) as exc:
                raise PrismError(f"{path} is corrupt: cannot read layer {layer} ({str(exc).splitlines()[0]})") from None
            if not isinstance(g, h5py.Group):
                raise PrismError(f"{path} is corrupt: layers/{layer} is not a group")
            perm = read(g, "permutation")
            if perm.shape != (n_experts, width) or np.any(np.sort(perm, axis=1) != np.arange(width)):
                raise PrismError(f"{path} is corrupt: layer {layer} permutation is not a permutation of 0..{width - 1} per expert")
            gates = read(g, "gate_positions")
            if gates.ndim != 3 or gates.shape[:2] != (n_experts, n_sub):
                raise PrismError(f"{path} is corrupt: layer {layer} gate positions have shape {gates.shape}, not "
                                 f"({n_experts}, {n_sub}, gate neurons) for its num_experts and sub_experts")
            if (problem := gate_positions_problem(gates, width // n_sub)) is not None:
                raise PrismError(f"{path} is corrupt: layer {layer} gate positions {problem}")
            shapes = {"fit_cost": (n_experts,), "heldout_cost": (n_experts,), "seconds": (n_experts,),
                      "fit_retained": (n_experts, n_sub - 1), "heldout_retained": (n_experts, n_sub - 1)}
            costs = {name: read(g, name) for name in shapes}
            wrong = [name for name, values in costs.items() if np.shape(values) != shapes[name]]
            if wrong:
                raise PrismError(f"{path} is corrupt: layer {layer} {wrong[0]} has shape {np.shape(costs[wrong[0]])}, "
                                 f"not {shapes[wrong[0]]} (one entry per expert{', R_1..R_N-1' if 'retained' in wrong[0] else ''})")
            fronts = g.get("front")
            fronts = {e: read(fronts, str(e)) for e in range(n_experts) if str(e) in fronts} if isinstance(fronts, h5py.Group) else {}
            partition.experts[layer] = [
                ExpertPartition(
                    permutation=perm[e],
                    gate_positions=gates[e],
                    fit_cost=float(costs["fit_cost"][e]),
                    heldout_cost=float(costs["heldout_cost"][e]),
                    fit_retained=costs["fit_retained"][e],
                    heldout_retained=costs["heldout_retained"][e],
                    seconds=float(costs["seconds"][e]),
                    front=fronts.get(e),
                )
                for e in range(n_experts)
            ]
    return partition



#: Metadata that may differ between parts of one partition run split by layers (each part's own
#: creation time and layers; the profile's path, which differs between machines: its hash must not).
_PART_KEYS = {"created", "layers", "profile"}


def merge_partitions(paths: list[str | Path]) -> Partition:
    """Join partitions of disjoint layer ranges made from one profile with the same settings.

    Refuses parts whose metadata differ (naming the field) or whose layers overlap; the result is the
    partition one run over all their layers gives.
    """
    if len(paths) < 2:
        raise PrismError("merge needs at least two partition files")
    parts = [read_partition(path) for path in paths]
    first = parts[0]
    merged = Partition(meta={k: v for k, v in first.meta.items() if k != "created"})  # the merge gets its own time
    owner: dict[int, Path] = {}
    for path, part in zip(paths, parts, strict=True):
        for key in sorted((set(first.meta) | set(part.meta)) - _PART_KEYS):
            if first.meta.get(key) != part.meta.get(key):
                raise PrismError(
                    f"{path} does not belong with {paths[0]}: {key} is {part.meta.get(key)!r} there and "
                    f"{first.meta.get(key)!r} in {paths[0]}; merge parts of one run (same profile and settings)"
                )
        for layer, experts in part.experts.items():
            if layer in owner:
                raise PrismError(f"{path} and {owner[layer]} both hold layer {layer}: merge parts with disjoint --layers")
            owner[layer] = Path(path)
            merged.experts[layer] = experts
    merged.experts = dict(sorted(merged.experts.items()))
    merged.meta["layers"] = merged.layers
    return merged
