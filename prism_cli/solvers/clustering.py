"""Co-activation clustering baselines from the paper's research code: balanced k-means and graph cuts.

Both work on the binarised co-activation counts ``C`` of SPEC 3.1 (``problem.coactivation``) rather
than on the paper cost: neurons that are often active together should share a sub-expert. They are
proxies, so they can lose to solvers that optimise the cost directly.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from prism_cli.solvers.assignment import balanced_assignment
from prism_cli.solvers.base import PartitionProblem, Solution, Solver, register_solver

#: Above this many nodes the Fiedler vector comes from Lanczos (eigsh, two eigenpairs) instead of a
#: full dense eigh. Note kmeans and graph are sized for expert widths up to a few thousand (OLMoE
#: 1024, DeepSeek/Qwen ~1408): their assignment and swap steps are quadratic or worse in the width.
DENSE_EIGH_LIMIT = 2048


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``[n, k]`` squared Euclidean distances from each point to each centre."""
    sq = (points**2).sum(axis=1)[:, None] + (centres**2).sum(axis=1)[None, :] - 2.0 * points @ centres.T
    return np.maximum(sq, 0.0)


def kmeans_pp_centroids(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
    centres = [points[rng.integers(len(points))]]
    nearest = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
        centres.append(points[pick])
        nearest = np.minimum(nearest, ((points - points[pick]) ** 2).sum(axis=1))
    return np.stack(centres)


@register_solver
class KMeansSolver(Solver):
    """Balanced k-means on the rows of ``C``, each scaled to unit length.

    Unit rows make the distance a cosine one, so neurons are grouped by *whom* they fire with, not
    by how often they fire. Every assignment step is an exact equal-size linear assignment.
    """

    name = "kmeans"

    def __init__(self, *, max_iter: int = 30, restarts: int = 4) -> None:
        self.max_iter = max_iter
        self.restarts = restarts

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        feats = problem.coactivation.astype(np.float64)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
        runs = [self._run(feats, problem.n_groups, problem.group_size, rng) for _ in range(self.restarts)]
        labels, inertia = min(runs, key=lambda run: run[1])
        return Solution(labels=labels, info={"inertia": inertia})

    def _run(
        self, feats: np.ndarray, n_groups: int, group_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        """One Lloyd run from a k-means++ start -> (labels, sum of squared distances to the centres)."""
        centres = kmeans_pp_centroids(feats, n_groups, rng)
        labels = np.full(len(feats), -1)
        for _ in range(self.max_iter):
            new = balanced_assignment(squared_distances(feats, centres), group_size)
            if np.array_equal(new, labels):
                break
            labels = new
            centres = np.stack([feats[labels == g].mean(axis=0) for g in range(n_groups)])
        dist = squared_distances(feats, centres)
        return labels, float(dist[np.arange(len(feats)), labels].sum())


def fiedler_vector(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shi-Malik spectral embedding: ``D^-1/2 v`` for ``v`` the Fiedler vector of the normalised Laplacian.

    ``v`` is the eigenvector of the second-largest eigenvalue of ``D^-1/2 W D^-1/2`` (the same vector
    as the Laplacian's second-smallest). Isolated nodes get 0, i.e. the middle of the ordering.
    """
    degree = weights.sum(axis=1)
    inv_sqrt = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    norm_adj = inv_sqrt[:, None] * weights * inv_sqrt[None, :]
    n = len(weights)
    if n <= DENSE_EIGH_LIMIT:
        _, vecs = scipy.linalg.eigh(norm_adj, subset_by_index=[n - 2, n - 1])
    else:
        # Lanczos on the dense matrix: after thresholding at the median half the entries remain,
        # so a sparse copy would only cost memory.
        _, vecs = scipy.sparse.linalg.eigsh(norm_adj, k=2, which="LA", v0=rng.standard_normal(n))
    # eigh and eigsh both return eigenvalues in ascending order: column 0 is the second largest.
    return inv_sqrt * vecs[:, 0]


def kernighan_lin(weights: np.ndarray, in_a: np.ndarray, max_passes: int) -> np.ndarray:
    """Kernighan-Lin refinement of a bisection ``in_a`` (bool), swapping pairs so both sides keep their sizes.

    Each pass tentatively swaps the best pair of unlocked nodes ``min(|A|, |B|)`` times, locking
    them, even when the gain is negative (to climb out of local optima), then keeps the prefix of
    swaps with the largest total cut reduction. Stops when a pass gains nothing.
    """
    in_a = in_a.copy()
    tol = 1e-12 * max(weights.sum(), 1.0)
    for _ in range(max_passes):
        a_nodes, b_nodes = np.flatnonzero(in_a), np.flatnonzero(~in_a)
        w_aa = weights[np.ix_(a_nodes, a_nodes)]
        w_bb = weights[np.ix_(b_nodes, b_nodes)]
        w_ab = weights[np.ix_(a_nodes, b_nodes)]
        # D(v) = external - internal weight; swapping a, b cuts the cut by D(a) + D(b) - 2 w(a, b).
        d_a = w_ab.sum(axis=1) - w_aa.sum(axis=1)
        d_b = w_ab.sum(axis=0) - w_bb.sum(axis=1)
        gains, swaps = [], []
        for _ in range(min(len(a_nodes), len(b_nodes))):
            gain = d_a[:, None] + d_b[None, :] - 2.0 * w_ab
            ia, ib = np.unravel_index(int(np.argmax(gain)), gain.shape)
            gains.append(gain[ia, ib])
            swaps.append((ia, ib))
            d_a += 2.0 * (w_aa[:, ia] - w_ab[:, ib])
            d_b += 2.0 * (w_bb[:, ib] - w_ab[ia, :])
            d_a[ia] = d_b[ib] = -np.inf  # locked for the rest of the pass
        total = np.cumsum(gains)
        best = int(np.argmax(total))
        if total[best] <= tol:
            break
        for ia, ib in swaps[: best + 1]:
            in_a[a_nodes[ia]], in_a[b_nodes[ib]] = False, True
    return in_a


def kway_refine(weights: np.ndarray, labels: np.ndarray, n_groups: int, max_swaps: int) -> np.ndarray:
    """Greedy k-way refinement: repeatedly make the single swap that most raises within-group weight.

    Recursive bisection never revisits an early split; this pass across all groups at once does
    (METIS likewise ends with a k-way refinement). Swapping ``u`` (group p) with ``v`` (group q)
    gains ``E[u, q] - E[u, p] + E[v, p] - E[v, q] - 2 w(u, v)``, with ``E[x, g]`` the weight from x
    to group g; stops at the first swap that gains nothing.
    """
    labels = labels.copy()
    conn = weights @ (labels[:, None] == np.arange(n_groups))
    tol = 1e-12 * max(weights.sum(), 1.0)
    for _ in range(max_swaps):
        own = conn[np.arange(len(labels)), labels]
        ext = conn[:, labels] - own[:, None]  # ext[u, v]: u's gain from joining v's group
        gain = ext + ext.T - 2.0 * weights
        u, v = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[u, v] <= tol:
            break
        p, q = labels[u], labels[v]
        conn[:, p] += weights[:, v] - weights[:, u]
        conn[:, q] += weights[:, u] - weights[:, v]
        labels[u], labels[v] = q, p
    return labels


@register_solver
class GraphSolver(Solver):
    """METIS-style cut of the co-activation graph: recursive spectral bisection + Kernighan-Lin.

    Nodes are neurons, edge weights co-activation counts; edges under ``threshold`` (default: the
    median off-diagonal count) are dropped, as in the paper's code. Minimising the cut maximises
    within-group co-activation. METIS itself (multilevel coarsening, then k-way refinement) is
    replaced by spectral bisection, Kernighan-Lin at every split and a final greedy k-way swap
    pass: no pymetis dependency, and with equal sizes forced at every split no rebalancing step is
    needed. Groups are split ``k -> floor(k/2) + ceil(k/2)`` with sides
    sized in proportion, so any N dividing I works (N = 6: 3 + 3, then 3 -> 1 + 2, 2 -> 1 + 1).
    """

    name = "graph"

    def __init__(self, *, threshold: float | None = None, refine_passes: int = 10) -> None:
        self.threshold = threshold
        self.refine_passes = refine_passes

    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        weights = problem.coactivation.astype(np.float64)
        np.fill_diagonal(weights, 0.0)
        threshold = self.threshold
        if threshold is None:
            threshold = float(np.median(weights[np.triu_indices(problem.width, k=1)]))
        weights[weights < threshold] = 0.0
        labels = np.empty(problem.width, dtype=np.int64)
        self._split(weights, np.arange(problem.width), problem.n_groups, 0, problem.group_size, labels, rng)
        labels = kway_refine(weights, labels, problem.n_groups, max_swaps=problem.width)
        return Solution(labels=labels, info={"threshold": threshold})

    def _split(
        self,
        weights: np.ndarray,
        nodes: np.ndarray,
        n_groups: int,
        first_label: int,
        group_size: int,
        labels: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        """Write labels ``first_label .. first_label + n_groups - 1`` for ``nodes``, by recursive bisection."""
        if n_groups == 1:
            labels[nodes] = first_label
            return
        left = n_groups // 2
        sub = weights[np.ix_(nodes, nodes)]
        order = np.argsort(fiedler_vector(sub, rng), kind="stable")
        in_a = np.zeros(len(nodes), dtype=bool)
        in_a[order[: left * group_size]] = True
        in_a = kernighan_lin(sub, in_a, self.refine_passes)
        self._split(weights, nodes[in_a], left, first_label, group_size, labels, rng)
        self._split(weights, nodes[~in_a], n_groups - left, first_label + left, group_size, labels, rng)
