"""The paper's solver (SPEC 3.3): greedy start, then simulated annealing over pairwise swaps.

Followed literally: costs are the raw (un-normalised) lost mass ``sum_b (sum of the N-keep smallest
L[b, n])`` in float64, so ``delta`` in ``exp(-delta / T)`` is in absolute activation-mass units and
``T0 = 100`` means whatever 100 units of mass mean for the expert at hand. With ``T <- 0.995 T`` per
proposal, T is below 0.01 after ~1,840 proposals, so the rest of the run is greedy local search
(SPEC 3.3). Only the normalised cost from ``objectives.paper_cost`` is reported.

Speed: the loads are kept as ``L[N, B]`` float64 (one contiguous row per group) next to the neuron
columns ``A^T[I, B]``; a swap changes two rows of ``L`` by ``+-(A^T[j] - A^T[i])``, and the lost mass
of the candidate is one reduction over ``[N, B]`` (``total - sum max`` for keep = 1, ``sum min`` for
keep = N-1, a sort otherwise). All random draws are made up front, so the Python loop only indexes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from prism_cli.solvers.base import PartitionProblem, Solution, Solver, register_solver
from prism_cli.solvers.heuristics import greedy_labels
from prism_cli.solvers.objectives import group_loads, paper_cost


def temperature(step: int, t0: float = 100.0, cooling: float = 0.995) -> float:
    """Temperature for proposal ``step`` (0-based): ``t0 * cooling**step``, i.e. cooled once per proposal."""
    return t0 * cooling**step


def lost_mass_function(n_groups: int, keep: int, total: float) -> Callable[[np.ndarray], float]:
    """``f(L[N, B]) -> sum_b (sum of the N-keep smallest L[:, b])``: the raw paper cost of SPEC 3.2.

    This is the un-normalised numerator of ``objectives.paper_cost`` laid out for incremental use
    (groups on the first axis); the tests check the two agree. ``total`` is the fixed total mass
    ``L.sum()`` (swaps move mass between groups, never change it), used by the keep = 1 shortcut.
    """
    buf = np.empty(0)

    def reduce(loads: np.ndarray, op: np.ufunc) -> np.ndarray:
        nonlocal buf
        if buf.shape != loads.shape[1:]:
            buf = np.empty(loads.shape[1:])
        return op.reduce(loads, axis=0, out=buf)

    if keep == 1:
        return lambda loads: total - float(reduce(loads, np.maximum).sum())
    if keep == n_groups - 1:
        return lambda loads: float(reduce(loads, np.minimum).sum())
    return lambda loads: float(np.sort(loads, axis=0)[: n_groups - keep].sum())


@register_solver
class AnnealSolver(Solver):
    """Simulated annealing of SPEC 3.3, seeded by ``greedy_labels``; returns the best partition seen."""

    name = "anneal"

    def __init__(self, *, t0: float = 100.0, cooling: float = 0.995, proposals: int = 100_000) -> None:
        self.t0 = t0
        self.cooling = cooling
        self.proposals = proposals

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        n, size = problem.n_groups, problem.group_size
        start = greedy_labels(problem.l1_mass, n)
        # members[g, p]: the neuron in slot p of group g; a swap exchanges two slots.
        members = np.argsort(start, kind="stable").reshape(n, size)
        cols = np.ascontiguousarray(problem.rows.T, dtype=np.float64)
        loads = np.stack([cols[m].sum(axis=0) for m in members])
        lost = lost_mass_function(n, problem.keep, float(loads.sum()))

        # Uniform pair in different groups: a uniform neuron (g1, p1), then a uniform neuron among
        # the (N-1)*G neurons of the other groups.
        g1 = rng.integers(n, size=self.proposals)
        p1 = rng.integers(size, size=self.proposals)
        other = rng.integers((n - 1) * size, size=self.proposals)
        g2 = ((g1 + 1 + other // size) % n).tolist()
        p2 = (other % size).tolist()
        g1, p1 = g1.tolist(), p1.tolist()
        uniform = rng.random(self.proposals).tolist()

        cur = best = lost(loads)
        best_members = members.copy()
        cand = loads.copy()
        accepted = 0
        for step in range(self.proposals):
            a, b, pa, pb = g1[step], g2[step], p1[step], p2[step]
            i, j = members[a, pa], members[b, pb]
            diff = cols[j] - cols[i]
            np.add(loads[a], diff, out=cand[a])
            np.subtract(loads[b], diff, out=cand[b])
            new = lost(cand)
            delta = new - cur
            temp = temperature(step, self.t0, self.cooling)
            if delta < 0 or (temp > 0 and uniform[step] < math.exp(-delta / temp)):
                loads[a], loads[b] = cand[a], cand[b]
                members[a, pa], members[b, pb] = j, i
                cur = new
                accepted += 1
                if cur < best:
                    best = cur
                    best_members = members.copy()
            else:
                cand[a], cand[b] = loads[a], loads[b]

        labels = np.empty(problem.width, dtype=np.int64)
        for g, m in enumerate(best_members):
            labels[m] = g
        return Solution(
            labels=labels,
            info={
                "accepted": accepted,
                "best_cost": paper_cost(group_loads(problem.rows, labels, n), problem.keep),
                "start_cost": paper_cost(group_loads(problem.rows, start, n), problem.keep),
            },
        )
