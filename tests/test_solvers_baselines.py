"""Baseline partition solvers (heuristics, anneal, clustering) and the shared objective functions."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from conftest import same_partition

from prism_cli.solvers import SOLVERS, PartitionProblem, Solver
from prism_cli.solvers.anneal import AnnealSolver, lost_mass_function, temperature
from prism_cli.solvers.assignment import balanced_assignment
from prism_cli.solvers.heuristics import equal_labels, greedy_labels
from prism_cli.solvers.objectives import group_loads, is_valid_partition, paper_cost, retained_mass
from prism_cli.solvers.synthetic import planted_rows, realistic_rows

BASELINES = ["random", "contiguous", "greedy", "rate-chunk", "anneal", "kmeans", "graph"]
#: Test-speed settings; everything else runs at its defaults.
FAST = {"anneal": {"proposals": 5_000}}


def make(name: str, **overrides: object) -> Solver:
    return SOLVERS.get(name)(**{**FAST.get(name, {}), **overrides})


def cost(problem: PartitionProblem, labels: np.ndarray) -> float:
    return paper_cost(group_loads(problem.rows, labels, problem.n_groups), problem.keep)


# --- the objective functions, against direct loops -------------------------------------------------


def loop_loads(rows: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    loads = np.zeros((rows.shape[0], n_groups))
    for b in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            loads[b, labels[j]] += rows[b, j]
    return loads


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_paper_cost_matches_loop(keep: int) -> None:
    rng = np.random.default_rng(0)
    rows = rng.lognormal(size=(12, 16)).astype(np.float32)
    labels = rng.permutation(equal_labels(16, 4))
    loads = loop_loads(rows, labels, 4)
    lost = sum(sum(sorted(loads[b])[: 4 - keep]) for b in range(12))
    np.testing.assert_allclose(group_loads(rows, labels, 4), loads, rtol=1e-5)
    assert paper_cost(group_loads(rows, labels, 4), keep) == pytest.approx(lost / loads.sum(), rel=1e-5)


def test_retained_mass_matches_loop() -> None:
    rng = np.random.default_rng(1)
    rows = rng.lognormal(size=(10, 16)).astype(np.float32)
    rows[3] = 0.0  # a token with no mass is ignored
    labels = rng.permutation(equal_labels(16, 4))
    loads = loop_loads(rows, labels, 4)
    live = [b for b in range(10) if loads[b].sum() > 0]
    expected = [
        np.mean([sum(sorted(loads[b], reverse=True)[:m]) / loads[b].sum() for b in live]) for m in (1, 2, 3)
    ]
    np.testing.assert_allclose(retained_mass(group_loads(rows, labels, 4)), expected, rtol=1e-5)


def test_population_form_matches_single() -> None:
    rng = np.random.default_rng(2)
    rows = rng.lognormal(size=(9, 16)).astype(np.float32)
    population = np.stack([rng.permutation(equal_labels(16, 4)) for _ in range(5)])
    batched = group_loads(rows, population, 4)
    assert batched.shape == (5, 9, 4)
    for p, labels in enumerate(population):
        np.testing.assert_allclose(batched[p], loop_loads(rows, labels, 4), rtol=1e-5)
        assert paper_cost(batched, 1)[p] == pytest.approx(paper_cost(batched[p], 1))
        np.testing.assert_allclose(retained_mass(batched)[p], retained_mass(batched[p]))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_anneal_incremental_cost_is_the_paper_cost(keep: int) -> None:
    rng = np.random.default_rng(3)
    rows = rng.lognormal(size=(20, 32)).astype(np.float32)
    labels = rng.permutation(equal_labels(32, 4))
    loads = group_loads(rows, labels, 4).astype(np.float64)
    lost = lost_mass_function(4, keep, float(loads.sum()))(np.ascontiguousarray(loads.T))
    assert lost / loads.sum() == pytest.approx(paper_cost(loads, keep), rel=1e-9)


# --- every solver returns a valid partition, deterministically -------------------------------------

SHAPES = [(64, 2), (64, 4), (64, 8), (96, 6)]


@pytest.mark.parametrize(("name", "shape", "kind"), list(product(BASELINES, SHAPES, ["random", "planted"])))
def test_valid_partition(name: str, shape: tuple[int, int], kind: str) -> None:
    width, n_groups = shape
    rng = np.random.default_rng(4)
    rows = rng.random((128, width)) if kind == "random" else planted_rows(128, width, n_groups, rng)[0]
    labels = make(name).solve(PartitionProblem(rows=rows, n_groups=n_groups), np.random.default_rng(5)).labels
    assert is_valid_partition(labels, n_groups)


@pytest.mark.parametrize("name", BASELINES)
def test_same_seed_same_labels(name: str) -> None:
    problem = PartitionProblem(rows=realistic_rows(256, 64, np.random.default_rng(6)), n_groups=4)
    first = make(name).solve(problem, np.random.default_rng(7)).labels
    again = make(name).solve(problem, np.random.default_rng(7)).labels
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", ["random", "anneal"])
def test_different_seed_different_labels(name: str) -> None:
    problem = PartitionProblem(rows=realistic_rows(256, 64, np.random.default_rng(6)), n_groups=4)
    first = make(name).solve(problem, np.random.default_rng(7)).labels
    other = make(name).solve(problem, np.random.default_rng(8)).labels
    assert not np.array_equal(first, other)


# --- planted structure ----------------------------------------------------------------------------
# kmeans and graph only see the binarised co-activation (top 3/4 of neurons per token, SPEC 3.1):
# at N = 8 a token's planted group is 1/8 of the neurons, drowned among the 5/8 noise neurons also
# marked active, and neither recovers it (on its own graph objective the planted split is often not
# even the best one). Given enough rows they recover N = 2, 4, 6 (checked over 10 seeds: N = 2 at
# 512 rows 10/10 both; N = 4 at 2048 rows 10/10 both, at 512 rows kmeans 10/10 but graph 6/10; N = 6
# at 4096 rows 9/10 both). anneal recovers N = 2, 4, 8 from 512 rows.


@pytest.mark.parametrize("n_groups", [2, 4, 8])
def test_anneal_recovers_planted_groups(n_groups: int) -> None:
    rows, planted = planted_rows(512, 64, n_groups, np.random.default_rng(n_groups))
    problem = PartitionProblem(rows=rows, n_groups=n_groups)
    labels = make("anneal", proposals=20_000).solve(problem, np.random.default_rng(0)).labels
    assert same_partition(labels, planted)


@pytest.mark.parametrize(
    ("name", "width", "n_groups", "n_rows"),
    [(name, *case) for name in ["kmeans", "graph"] for case in [(64, 2, 512), (64, 4, 2048), (96, 6, 4096)]],
)
def test_clustering_recovers_planted_groups(name: str, width: int, n_groups: int, n_rows: int) -> None:
    rows, planted = planted_rows(n_rows, width, n_groups, np.random.default_rng(n_groups))
    labels = make(name).solve(PartitionProblem(rows=rows, n_groups=n_groups), np.random.default_rng(0)).labels
    assert same_partition(labels, planted)


# --- the paper's annealer ---------------------------------------------------------------------------


def test_anneal_schedule_is_the_papers() -> None:
    solver = AnnealSolver()
    assert (solver.t0, solver.cooling, solver.proposals) == (100.0, 0.995, 100_000)
    assert temperature(0) == 100.0
    for step in (1, 10, 1_000, 99_999):
        assert temperature(step) == pytest.approx(100.0 * 0.995**step, rel=1e-12)
    assert temperature(1_838) < 0.01 < temperature(1_837)  # SPEC 3.3: T < 0.01 after ~2,000 proposals


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_anneal_never_worse_than_greedy_start(keep: int) -> None:
    problem = PartitionProblem(rows=realistic_rows(256, 64, np.random.default_rng(9)), n_groups=4, keep=keep)
    solution = make("anneal").solve(problem, np.random.default_rng(10))
    start = cost(problem, greedy_labels(problem.l1_mass, 4))
    assert solution.info["start_cost"] == pytest.approx(start)
    assert solution.info["best_cost"] == pytest.approx(cost(problem, solution.labels))
    assert solution.info["best_cost"] <= start
    assert solution.info["accepted"] > 0


def test_anneal_beats_random_and_contiguous_on_realistic_rows() -> None:
    problem = PartitionProblem(rows=realistic_rows(1024, 256, np.random.default_rng(11)), n_groups=4)
    annealed = cost(problem, make("anneal", proposals=20_000).solve(problem, np.random.default_rng(0)).labels)
    for name in ("random", "contiguous"):
        assert annealed < cost(problem, make(name).solve(problem, np.random.default_rng(0)).labels) - 0.1


@pytest.mark.slow
def test_anneal_at_olmoe_shape_beats_rate_chunk() -> None:
    """Default settings (100,000 proposals) at OLMoE's expert width and 4,096 rows (timed by `make bench-partition`)."""
    problem = PartitionProblem(rows=realistic_rows(4096, 1024, np.random.default_rng(12)), n_groups=4)
    solution = AnnealSolver().solve(problem, np.random.default_rng(0))
    chunked = make("rate-chunk").solve(problem, np.random.default_rng(0)).labels
    assert solution.info["best_cost"] < cost(problem, chunked)


# --- the simple heuristics ------------------------------------------------------------------------


def test_greedy_balances_mass() -> None:
    mass = np.array([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    labels = greedy_labels(mass, 2)
    assert is_valid_partition(labels, 2)
    assert mass[labels == 0].sum() == mass[labels == 1].sum() == 18.0


def test_contiguous_and_rate_chunk_order() -> None:
    rows = np.random.default_rng(13).random((64, 16))
    rate = np.linspace(0.0, 1.0, 16)  # neuron 15 is the hottest
    problem = PartitionProblem(rows=rows, n_groups=4, rate=rate)
    contiguous = make("contiguous").solve(problem, np.random.default_rng(0)).labels
    np.testing.assert_array_equal(contiguous, equal_labels(16, 4))
    chunked = make("rate-chunk").solve(problem, np.random.default_rng(0)).labels
    np.testing.assert_array_equal(chunked, equal_labels(16, 4)[::-1])


def test_balanced_assignment_is_exact() -> None:
    dist = np.array([[0.0, 5.0], [1.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    np.testing.assert_array_equal(balanced_assignment(dist, 2), [0, 1, 0, 1])
