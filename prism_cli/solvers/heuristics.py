"""One-shot baseline partitions: random, contiguous, the paper's greedy start, and CMoE rate chunking.

None of these optimises the objective; they are the floor every real solver must beat and the seeds
that the annealer and the evolutionary solvers start from.
"""

from __future__ import annotations

import numpy as np

from prism_cli.solvers.base import PartitionProblem, Solution, Solver, register_solver


def equal_labels(width: int, n_groups: int) -> np.ndarray:
    """``[0]*G + [1]*G + ... + [N-1]*G`` with ``G = width / n_groups``: the contiguous split."""
    return np.repeat(np.arange(n_groups), width // n_groups)


def chunk_labels(order: np.ndarray, n_groups: int) -> np.ndarray:
    """Labels that cut neurons, taken in ``order``, into ``n_groups`` consecutive chunks."""
    labels = np.empty(order.size, dtype=np.int64)
    labels[order] = equal_labels(order.size, n_groups)
    return labels


def greedy_labels(l1_mass: np.ndarray, n_groups: int) -> np.ndarray:
    """The paper's greedy start (SPEC 3.3 step 1): heaviest neuron first, into the lightest non-full group.

    This balances mass across groups, which is the opposite of what the objective rewards (SPEC 7: it
    scores no better than random); it is kept because the paper's annealer starts from it.
    Ties (equal mass, equal running totals) go to the lower index, so the result is deterministic.
    """
    l1_mass = np.asarray(l1_mass, dtype=np.float64)
    if l1_mass.size % n_groups:
        raise ValueError(f"{n_groups} groups do not divide {l1_mass.size} neurons")
    capacity = l1_mass.size // n_groups
    running = np.zeros(n_groups)
    counts = np.zeros(n_groups, dtype=np.int64)
    labels = np.empty(l1_mass.size, dtype=np.int64)
    for j in np.argsort(-l1_mass, kind="stable"):
        g = int(np.argmin(np.where(counts < capacity, running, np.inf)))
        labels[j] = g
        running[g] += l1_mass[j]
        counts[g] += 1
    return labels


@register_solver
class RandomSolver(Solver):
    """Uniformly random equal split."""

    name = "random"
    baseline = True

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        return Solution(labels=rng.permutation(equal_labels(problem.width, problem.n_groups)))


@register_solver
class ContiguousSolver(Solver):
    """Neurons in index order, cut into N consecutive chunks (the zero-effort published baseline)."""

    name = "contiguous"
    baseline = True

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        return Solution(labels=equal_labels(problem.width, problem.n_groups))


@register_solver
class GreedySolver(Solver):
    """The paper's greedy start on its own (see ``greedy_labels``)."""

    name = "greedy"
    baseline = True

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        return Solution(labels=greedy_labels(problem.l1_mass, problem.n_groups))


@register_solver
class RateChunkSolver(Solver):
    """CMoE's split: neurons ranked by hot rate, hottest first, cut into N contiguous chunks.

    Neurons that are often hot together land in the first groups, so a token's mass concentrates
    there; ties in rate fall back to L1 mass, then to index, so the split is deterministic.
    """

    name = "rate-chunk"

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        index = np.arange(problem.width)
        order = np.lexsort((index, -np.asarray(problem.l1_mass), -np.asarray(problem.rate)))
        return Solution(labels=chunk_labels(order, problem.n_groups))
