"""The balanced assignment (negative-cycle cancelling) against scipy's linear assignment on slot matrices."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from prism_cli.solvers.assignment import balanced_assignment


def _reference(cost: np.ndarray, size: int) -> np.ndarray:
    rows, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
    labels = np.empty(cost.shape[0], dtype=np.int64)
    labels[rows] = slots // size
    return labels


def _total(cost: np.ndarray, labels: np.ndarray) -> float:
    return float(cost[np.arange(cost.shape[0]), labels].sum())


@pytest.mark.parametrize("n_groups", [2, 3, 4, 8, 16])
def test_matches_linear_assignment(n_groups: int) -> None:
    rng = np.random.default_rng(n_groups)
    for trial in range(12):
        size = int(rng.integers(1, 24))
        shape = (n_groups * size, n_groups)
        # continuous costs, and heavily tied integer costs (degenerate optima)
        cost = rng.normal(size=shape) if trial % 2 else rng.integers(0, 3, size=shape).astype(float)
        labels = balanced_assignment(cost, size)
        assert np.all(np.bincount(labels, minlength=n_groups) == size)
        assert _total(cost, labels) == pytest.approx(_total(cost, _reference(cost, size)), abs=1e-9)


def test_warm_start_reaches_the_same_optimum() -> None:
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(64, 4))
    init = rng.permutation(np.repeat(np.arange(4), 16))
    assert _total(cost, balanced_assignment(cost, 16, init)) == pytest.approx(_total(cost, _reference(cost, 16)))


def test_refuses_unbalanced_input() -> None:
    with pytest.raises(ValueError, match="4 groups of 3 do not hold 10 neurons"):
        balanced_assignment(np.zeros((10, 4)), 3)
    with pytest.raises(ValueError, match="initial labels are not a balanced partition"):
        balanced_assignment(np.zeros((8, 2)), 4, init=np.zeros(8, dtype=np.int64))
