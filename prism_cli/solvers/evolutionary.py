"""pymoo NSGA-II (``nsga2``, multi-objective) and GA (``ga``, single objective) with partition-aware operators.

Generic permutation operators lose badly to annealing on this problem (SPEC 7), so every operator
here knows what a partition is:

* ``SeededSampling``: the initial population holds the alternating-assignment optimum of each
  objective (each ``R_m`` and their sum, or the paper cost), the CMoE rate chunking and the paper's
  greedy start, filled up with lightly swapped copies of those seeds.
* ``GroupCrossover``: aligns the second parent's group numbers to the first (an assignment on group
  overlaps), keeps every neuron both parents agree on and takes the rest from either parent.
* ``BalanceRepair``: moves neurons out of over-full groups into under-full ones, so every child is a
  valid equal split.
* ``PairReassignMutation``: the local-search step inside the evolutionary loop: a few alternating
  rank-assignment steps (``alternating.py``) restricted to random pairs of groups, on a scalarisation
  drawn at random from the objectives, so different children are pushed towards different parts of
  the Pareto front (the full all-groups step would pull every child to the same optimum).
* ``CanonicalDuplicates``: two label vectors that differ only by renaming groups are one partition.

``Problem._evaluate`` scores the whole population in one matrix product (``group_loads`` on
``labels[P, I]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2, binary_tournament
from pymoo.algorithms.soo.nonconvex.ga import GA, comp_by_cv_and_fitness
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import DuplicateElimination
from pymoo.core.mating import Mating
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling
from pymoo.operators.selection.tournament import TournamentSelection
from pymoo.optimize import minimize
from scipy.optimize import linear_sum_assignment

from prism_cli.solvers.alternating import group_weights, improve, pair_step, token_scale
from prism_cli.solvers.base import PartitionProblem, Solution, Solver, register_solver
from prism_cli.solvers.heuristics import RateChunkSolver, greedy_labels
from prism_cli.solvers.objectives import group_loads, paper_cost, rank_weights, retained_mass


def canonical(labels: np.ndarray) -> np.ndarray:
    """Rename groups in order of first appearance, so equal partitions have equal label vectors."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rename = np.argsort(np.argsort(first))  # rank of each label's first appearance
    return rename[inverse]


def swap_neurons(labels: np.ndarray, n_swaps: int, rng: np.random.Generator) -> np.ndarray:
    """Copy of ``labels`` with ``n_swaps`` random swaps of two neurons (sizes stay equal)."""
    out = labels.copy()
    for _ in range(n_swaps):
        i, j = rng.integers(out.size, size=2)
        out[i], out[j] = out[j], out[i]
    return out


class PartitionObjectives(Problem):
    """Objectives to minimise: the paper cost, then ``1 - R_m`` for m = 1..N-1 (``kind="retained"``);
    or the paper cost alone (``kind="cost"``).

    With ``kind="retained"`` the paper cost is an objective too, so the partition that is best at
    the paper's keep-``keep`` operating point is never dropped from the front.
    """

    def __init__(self, partition: PartitionProblem, kind: str) -> None:
        self.partition = partition
        self.kind = kind
        n_obj = partition.n_groups if kind == "retained" else 1
        super().__init__(n_var=partition.width, n_obj=n_obj, xl=0, xu=partition.n_groups - 1, vtype=int)

    def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        loads = group_loads(self.partition.rows, x.astype(np.int64), self.partition.n_groups)
        cost = np.asarray(paper_cost(loads, self.partition.keep)).reshape(-1, 1)
        out["F"] = np.hstack([cost, 1.0 - retained_mass(loads)]) if self.kind == "retained" else cost


class SeededSampling(Sampling):
    """Initial population: the given seeds, then swapped copies of them."""

    def __init__(self, seeds: list[np.ndarray], swap_fraction: float = 0.02) -> None:
        super().__init__()
        self.seeds = seeds
        self.swap_fraction = swap_fraction

    def _do(self, problem: Problem, n_samples: int, *args: Any, random_state: np.random.Generator, **kwargs: Any) -> np.ndarray:
        out = [s.copy() for s in self.seeds[:n_samples]]
        n_swaps = max(1, int(self.swap_fraction * problem.n_var))
        while len(out) < n_samples:
            out.append(swap_neurons(self.seeds[len(out) % len(self.seeds)], n_swaps, random_state))
        return np.stack(out)


class GroupCrossover(Crossover):
    """Child keeps the neurons both parents (after aligning group numbers) agree on; the rest at random."""

    def __init__(self, n_groups: int, prob: float = 0.9) -> None:
        super().__init__(n_parents=2, n_offsprings=1, prob=prob)
        self.n_groups = n_groups

    def _do(self, problem: Problem, x: np.ndarray, *args: Any, random_state: np.random.Generator, **kwargs: Any) -> np.ndarray:
        _, n_matings, n_var = x.shape
        children = np.empty((1, n_matings, n_var), dtype=x.dtype)
        for k in range(n_matings):
            a, b = x[0, k].astype(np.int64), x[1, k].astype(np.int64)
            overlap = np.zeros((self.n_groups, self.n_groups))
            np.add.at(overlap, (b, a), 1.0)
            rows, cols = linear_sum_assignment(-overlap)
            b_aligned = cols[np.argsort(rows)][b]
            pick_a = random_state.random(n_var) < 0.5
            children[0, k] = np.where((a == b_aligned) | pick_a, a, b_aligned)
        return children


class BalanceRepair(Repair):
    """Make every group exactly ``I/N`` neurons by moving random neurons out of over-full groups."""

    def _do(self, problem: Problem, x: np.ndarray, random_state: np.random.Generator | None = None, **kwargs: Any) -> np.ndarray:
        rng = random_state if random_state is not None else np.random.default_rng(0)
        n_groups = int(problem.xu[0]) + 1
        size = problem.n_var // n_groups
        x = x.astype(np.int64)
        for row in x:
            counts = np.bincount(row, minlength=n_groups)
            if np.all(counts == size):
                continue
            surplus = [j for g in np.nonzero(counts > size)[0] for j in rng.permutation(np.nonzero(row == g)[0])[: counts[g] - size]]
            needs = np.repeat(np.arange(n_groups), np.maximum(size - counts, 0))
            row[np.array(surplus, dtype=np.int64)] = rng.permutation(needs)
        return x


class PairReassignMutation(Mutation):
    """Local search: ``steps`` pairwise rank-assignment steps on a random scalarisation of the objectives."""

    def __init__(self, partition: PartitionProblem, kind: str, steps: int) -> None:
        super().__init__(prob=1.0)
        self.partition = partition
        self.kind = kind
        self.steps = steps
        self._mass_scale = token_scale(partition.rows, per_token=False)
        self._token_scale = token_scale(partition.rows, per_token=True)
        n = partition.n_groups
        # R_m counts the m largest groups: its rank weights are the first m ones.
        self._basis = np.tril(np.ones((n - 1, n)), k=0)[:, :n]

    def scalarisation(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Rank weights and token scale of one objective direction: the paper cost (mass-weighted) or,
        for ``kind="retained"`` and with probability ``(N-1)/N``, a random mix of the ``R_m`` (per token)."""
        n = self.partition.n_groups
        if self.kind == "cost" or rng.random() < 1.0 / n:
            return rank_weights(n, self.partition.keep), self._mass_scale
        return rng.dirichlet(np.ones(n - 1)) @ self._basis, self._token_scale

    def _do(self, problem: Problem, x: np.ndarray, *args: Any, random_state: np.random.Generator, **kwargs: Any) -> np.ndarray:
        x = x.astype(np.int64)
        n = self.partition.n_groups
        for k in range(x.shape[0]):
            per_group = group_weights(self.partition.rows, x[k], *self.scalarisation(random_state))
            profit = self.partition.columns @ per_group
            for _ in range(self.steps):
                a, b = random_state.choice(n, size=2, replace=False)
                x[k] = pair_step(x[k], profit, int(a), int(b))
        return x


class CanonicalDuplicates(DuplicateElimination):
    """Duplicates are partitions equal up to renaming groups."""

    def _do(self, pop: Any, other: Any, is_duplicate: np.ndarray) -> np.ndarray:
        seen = {canonical(ind.X.astype(np.int64)).tobytes() for ind in (other if other is not None else [])}
        for i, ind in enumerate(pop):
            key = canonical(ind.X.astype(np.int64)).tobytes()
            if key in seen:
                is_duplicate[i] = True
            seen.add(key)
        return is_duplicate


def seed_partitions(partition: PartitionProblem, kind: str, rng: np.random.Generator, max_steps: int) -> list[np.ndarray]:
    """Strong starts: the alternating optimum of every objective from the rate chunking, plus rate chunking and greedy."""
    chunked = RateChunkSolver().solve(partition, rng).labels
    n = partition.n_groups
    targets = [(rank_weights(n, partition.keep), False)]
    if kind == "retained":
        targets += [(rank_weights(n, m), True) for m in range(1, n)] + [(rank_weights(n, None), True)]
    seeds = [improve(partition.rows, chunked, w, token_scale(partition.rows, per_token), max_steps)[0] for w, per_token in targets]
    return seeds + [chunked, greedy_labels(partition.l1_mass, n)]


class _EvolutionarySolver(Solver):
    kind: str

    def __init__(
        self,
        *,
        pop_size: int = 24,
        generations: int = 30,
        mutation_steps: int = 12,
        seed_steps: int = 30,
        cost_tolerance: float = 0.002,
    ) -> None:
        if pop_size < 2 or generations < 1 or mutation_steps < 0 or seed_steps < 1:
            raise ValueError("pop_size must be at least 2, generations and seed_steps at least 1, mutation_steps at least 0")
        if not 0.0 <= cost_tolerance < 1.0:
            raise ValueError("cost_tolerance must be in [0, 1)")
        self.cost_tolerance = cost_tolerance
        self.pop_size = pop_size
        self.generations = generations
        self.mutation_steps = mutation_steps
        self.seed_steps = seed_steps

    def _run(self, partition: PartitionProblem, rng: np.random.Generator, algorithm_cls: type, comparison: Any) -> Any:
        objectives = PartitionObjectives(partition, self.kind)
        duplicates = CanonicalDuplicates()
        algorithm = algorithm_cls(
            pop_size=self.pop_size,
            sampling=SeededSampling(seed_partitions(partition, self.kind, rng, self.seed_steps)),
            eliminate_duplicates=duplicates,
            # pymoo re-mates until it has pop_size unique children; local search makes duplicates
            # common, so give up after a few rounds instead of 100.
            mating=Mating(
                selection=TournamentSelection(func_comp=comparison),
                crossover=GroupCrossover(partition.n_groups),
                mutation=PairReassignMutation(partition, self.kind, self.mutation_steps),
                repair=BalanceRepair(),
                eliminate_duplicates=duplicates,
                n_max_iterations=2,
            ),
        )
        seed = int(rng.integers(2**31 - 1))
        return minimize(objectives, algorithm, ("n_gen", self.generations), seed=seed, verbose=False)


@register_solver
class NSGA2Solver(_EvolutionarySolver):
    """NSGA-II over the paper cost and ``1 - R_1 .. 1 - R_{N-1}``.

    Kept from the front: the member with the highest mean ``R_m`` among those whose paper cost is
    within ``cost_tolerance`` (relative) of the front's best. The paper cost is the quality at the
    paper's own operating point; the mean of the ``R_m`` is the average retained mass over every
    point between one and N-1 sub-experts per expert, which is what an elastic model is run at. The
    whole front (paper cost, ``R_1..R_{N-1}`` on the fit rows) is returned as well.
    """

    name = "nsga2"
    kind = "retained"

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        res = self._run(problem, rng, NSGA2, binary_tournament)
        front_x = np.atleast_2d(res.X).astype(np.int64)
        front = np.atleast_2d(res.F).copy()
        front[:, 1:] = 1.0 - front[:, 1:]  # -> paper cost, R_1..R_{N-1}
        best = pick_near_best(front, self.cost_tolerance)
        order = np.argsort(front[:, 0])
        return Solution(labels=front_x[best], front=front[order], info={"front_size": int(front_x.shape[0])})


def pick_near_best(scores: np.ndarray, cost_tolerance: float) -> int:
    """Row of ``scores [paper cost, R_1..R_{N-1}]`` with the highest mean R_m among those whose
    cost is within ``cost_tolerance`` (relative) of the lowest."""
    near_best = scores[:, 0] <= scores[:, 0].min() * (1.0 + cost_tolerance)
    return int(np.argmax(np.where(near_best, scores[:, 1:].mean(axis=1), -np.inf)))


@register_solver
class GASolver(_EvolutionarySolver):
    """Single-objective GA on the paper cost with the problem's ``keep``.

    The GA optimises the paper cost alone; among the final population's members within
    ``cost_tolerance`` of the best cost, the one with the highest mean ``R_m`` is kept (the same
    rule as ``nsga2``), so ties on the cost go to the partition that is better at other points.
    """

    name = "ga"
    kind = "cost"

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        res = self._run(problem, rng, GA, comp_by_cv_and_fitness)
        population = np.atleast_2d(res.pop.get("X")).astype(np.int64)
        table = np.atleast_2d(PartitionObjectives(problem, "retained").evaluate(population, return_values_of=["F"])).copy()
        table[:, 1:] = 1.0 - table[:, 1:]
        best = pick_near_best(table, self.cost_tolerance)
        return Solution(labels=population[best], info={"cost": float(table[best, 0])})
