"""Exact balanced assignment: neurons to N groups of equal size, maximising a per-(neuron, group) score.

This is a transportation problem. Up to ``LSA_LIMIT`` neurons it is solved as a linear assignment of
neurons to ``N * G`` slots (each group's column repeated ``G`` times); above that the ``I x I`` matrix
gets too large, and it is solved as a linear program with HiGHS, whose vertex solutions are integral
because the constraint matrix of a transportation problem is totally unimodular.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment, linprog

LSA_LIMIT = 2048


def balanced_assignment(cost: np.ndarray, group_size: int) -> np.ndarray:
    """Labels minimising ``sum_j cost[j, label_j]`` with every group holding exactly ``group_size`` neurons."""
    width, n_groups = cost.shape
    if width != n_groups * group_size:
        raise ValueError(f"{n_groups} groups of {group_size} do not hold {width} neurons")
    if width <= LSA_LIMIT:
        rows, slots = linear_sum_assignment(np.repeat(cost, group_size, axis=1))
        labels = np.empty(width, dtype=np.int64)
        labels[rows] = slots // group_size
        return labels
    return _transport_lp(cost, group_size)


def _transport_lp(cost: np.ndarray, group_size: int) -> np.ndarray:
    width, n_groups = cost.shape
    var = np.arange(width * n_groups).reshape(width, n_groups)
    # each neuron in exactly one group; each group exactly group_size neurons
    rows = np.concatenate([np.repeat(np.arange(width), n_groups), width + np.tile(np.arange(n_groups), width)])
    cols = np.concatenate([var.ravel(), var.ravel()])
    a_eq = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(width + n_groups, width * n_groups))
    b_eq = np.concatenate([np.ones(width), np.full(n_groups, group_size)])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"balanced assignment LP failed: {res.message}")
    x = res.x.reshape(width, n_groups)
    labels = x.argmax(axis=1)
    if not np.all(np.bincount(labels, minlength=n_groups) == group_size):
        raise RuntimeError("balanced assignment LP returned a fractional solution")
    return labels
