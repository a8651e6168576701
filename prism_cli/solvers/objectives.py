"""The partition objectives of SPEC 3.2, shared by every solver and by every comparison.

A partition of an expert's ``I`` neurons into ``N`` equal groups is a label vector ``labels[I]`` with
values ``0..N-1``, each used ``I/N`` times. For activation rows ``A[B, I]`` (absolute values), the group
loads are ``L[b, n] = sum_{j: labels[j] = n} A[b, j]``: the L1 mass of sub-expert ``n`` for token ``b``.

* ``paper_cost``: the paper's objective, the mass lost per token when only its ``keep`` largest groups
  run (``sum`` of the ``N - keep`` smallest loads), summed over tokens and normalised by the total mass,
  so 0 is perfect and ``1 - keep/N`` is what a perfectly even split gives.
* ``retained_mass``: ``R_m = mean_b (sum of the m largest L[b]) / (sum_n L[b, n])`` for ``m = 1..N-1``,
  one value per operating point; higher is better. Tokens with zero mass are ignored.

Both accept a batch of partitions (``labels[P, I]``) and then return one value per partition, so
evolutionary solvers evaluate whole populations in one matrix product.
"""

from __future__ import annotations

import numpy as np


def one_hot(labels: np.ndarray, n_groups: int, dtype: type = np.float32) -> np.ndarray:
    """``[..., I] -> [..., I, N]`` indicator of each neuron's group."""
    return (labels[..., None] == np.arange(n_groups)).astype(dtype)


def group_loads(rows: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Loads ``L[b, n]`` for ``labels[I]`` (-> ``[B, N]``) or a population ``labels[P, I]`` (-> ``[P, B, N]``)."""
    return rows @ one_hot(labels, n_groups, rows.dtype)


def sorted_loads(loads: np.ndarray) -> np.ndarray:
    """Loads sorted in descending order along the last axis."""
    return -np.sort(-loads, axis=-1)


def paper_cost(loads: np.ndarray, keep: int) -> np.ndarray | float:
    """Normalised paper cost (SPEC 3.2) from loads ``[..., B, N]``: lower is better."""
    n_groups = loads.shape[-1]
    if not 1 <= keep < n_groups:
        raise ValueError(f"keep must be in 1..{n_groups - 1}, got {keep}")
    desc = sorted_loads(loads)
    lost = desc[..., keep:].sum(axis=(-1, -2), dtype=np.float64)
    total = loads.sum(axis=(-1, -2), dtype=np.float64)
    out = np.divide(lost, total, out=np.zeros_like(lost), where=total > 0)
    return float(out) if np.ndim(out) == 0 else out


def retained_mass(loads: np.ndarray) -> np.ndarray:
    """``R_1..R_{N-1}`` from loads ``[..., B, N]`` -> ``[..., N-1]``: higher is better."""
    desc = sorted_loads(loads).astype(np.float64)
    total = desc.sum(axis=-1, keepdims=True)
    live = total[..., 0] > 0
    frac = np.cumsum(desc, axis=-1)[..., :-1] / np.where(total > 0, total, 1.0)
    count = np.maximum(live.sum(axis=-1), 1)[..., None]
    return (frac * live[..., None]).sum(axis=-2) / count


def rank_weights(n_groups: int, keep: int | None) -> np.ndarray:
    """Weight of the r-th largest load (r = 0..N-1) in a linear form of the sorted loads.

    ``keep=k`` gives the paper cost's complement (1 for the k largest groups, 0 otherwise);
    ``keep=None`` gives ``sum_m R_m`` (the r-th largest group counts in ``N-1-r`` of the ``R_m``).
    Alternating solvers maximise ``sum_r w_r * L_(r)`` with these weights.
    """
    if keep is None:
        return np.arange(n_groups - 1, -1, -1, dtype=np.float64)
    w = np.zeros(n_groups)
    w[:keep] = 1.0
    return w


def is_valid_partition(labels: np.ndarray, n_groups: int) -> bool:
    """True when ``labels`` splits its neurons into ``n_groups`` groups of equal size."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size % n_groups or labels.min(initial=0) < 0 or labels.max(initial=0) >= n_groups:
        return False
    return bool(np.all(np.bincount(labels, minlength=n_groups) == labels.size // n_groups))
