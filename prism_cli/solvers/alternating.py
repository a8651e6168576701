"""Alternating rank assignment: an exact large-neighbourhood step for any rank-weighted objective.

Every objective prism optimises is linear in each token's *sorted* group loads:
``f(P) = sum_b sum_r w_r L_(r)[b] / s_b`` with non-increasing rank weights ``w`` (``rank_weights``)
and ``s_b = 1`` (mass-weighted: the paper cost) or ``s_b = total_b`` (per-token: the ``R_m``).
Fixing which rank each group holds for each token makes ``f`` linear in the neuron assignment, so one
step is: rank the groups of every token under the current partition, then re-assign all neurons at
once by an exact balanced assignment (``balanced_assignment``) of their rank-weighted mass. By the
rearrangement inequality the step never lowers ``f``; it stops when ``f`` stops rising. For keep-one
this is SPEC 7's "assign each token to its largest sub-expert, then solve the balanced assignment".
"""

from __future__ import annotations

import numpy as np

from prism_cli.solvers.assignment import balanced_assignment
from prism_cli.solvers.base import PartitionProblem, Solution, Solver, register_solver
from prism_cli.solvers.heuristics import RateChunkSolver, equal_labels
from prism_cli.solvers.objectives import group_loads, rank_weights, sorted_loads


def token_scale(rows: np.ndarray, per_token: bool) -> np.ndarray:
    """``1 / s_b`` for every row: 1 (mass-weighted) or 1 / total mass (per-token; 0 for empty rows)."""
    if not per_token:
        return np.ones(rows.shape[0], dtype=rows.dtype)
    total = rows.sum(axis=1)
    return np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)


def scalarised(loads: np.ndarray, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``f`` for loads ``[..., B, N]`` -> ``[...]``."""
    return ((sorted_loads(loads) @ weights) * scale).sum(axis=-1)


def group_weights(rows: np.ndarray, labels: np.ndarray, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``[B, N]``: the weight each token gives each group, from the group's rank for that token."""
    loads = group_loads(rows, labels, weights.size)
    order = np.argsort(-loads, axis=1, kind="stable")
    per_group = np.empty_like(loads)
    np.put_along_axis(per_group, order, np.broadcast_to(weights.astype(loads.dtype), loads.shape), axis=1)
    return per_group * scale[:, None]


def alternating_step(rows: np.ndarray, labels: np.ndarray, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """One step: rank groups per token, then exactly re-assign every neuron (warm-started at ``labels``)."""
    profit = rows.T @ group_weights(rows, labels, weights, scale)
    return balanced_assignment(-profit, labels.size // weights.size, init=labels)


def pair_step(labels: np.ndarray, profit: np.ndarray, a: int, b: int) -> np.ndarray:
    """The same step restricted to the neurons of groups ``a`` and ``b``, for a fixed ``profit [I, N]``.

    ``profit = rows.T @ group_weights(...)`` is each neuron's rank-weighted mass in each group. With
    two groups the balanced assignment is a sort: the half of the pooled neurons that gains most
    from being in ``a`` rather than ``b`` goes to ``a``. Cheap, and different pairs move a partition
    in different directions, which keeps an evolving population diverse. Several pair steps may
    share one ``profit`` computed before the first: the rank-weighted linear value they raise is a
    lower bound of ``f`` that is tight at the partition the ranks came from, so ``f`` never falls.
    """
    members = np.nonzero((labels == a) | (labels == b))[0]
    gain = profit[members, a] - profit[members, b]
    out = labels.copy()
    out[members] = b
    out[members[np.argsort(-gain, kind="stable")[: members.size // 2]]] = a
    return out


def improve(
    rows: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    scale: np.ndarray,
    max_steps: int,
) -> tuple[np.ndarray, float]:
    """Alternate from ``labels`` until ``f`` stops rising (or ``max_steps``); returns labels and ``f``."""
    n_groups = weights.size
    value = float(scalarised(group_loads(rows, labels, n_groups), weights, scale))
    for _ in range(max_steps):
        new = alternating_step(rows, labels, weights, scale)
        new_value = float(scalarised(group_loads(rows, new, n_groups), weights, scale))
        if new_value <= value * (1 + 1e-9):
            break
        labels, value = new, new_value
    return labels, value


@register_solver
class AlternatingSolver(Solver):
    """Alternating rank assignment from the CMoE rate chunking and ``restarts`` random splits; keeps the best.

    ``objective="cost"`` maximises the mass kept by each token's ``keep`` largest groups (the paper
    cost); ``objective="retained"`` maximises ``sum_m R_m`` (every operating point at once).
    """

    name = "alternating"

    def __init__(self, *, objective: str = "cost", restarts: int = 2, max_steps: int = 50) -> None:
        if objective not in ("cost", "retained"):
            raise ValueError(f"objective must be 'cost' or 'retained', got {objective!r}")
        self.objective = objective
        self.restarts = restarts
        self.max_steps = max_steps

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        per_token = self.objective == "retained"
        weights = rank_weights(problem.n_groups, None if per_token else problem.keep)
        scale = token_scale(problem.rows, per_token)
        starts = [RateChunkSolver().solve(problem, rng).labels]
        starts += [rng.permutation(equal_labels(problem.width, problem.n_groups)) for _ in range(self.restarts)]
        results = [improve(problem.rows, s, weights, scale, self.max_steps) for s in starts]
        best = max(range(len(results)), key=lambda i: results[i][1])
        return Solution(labels=results[best][0], info={"start": best, "value": results[best][1]})
