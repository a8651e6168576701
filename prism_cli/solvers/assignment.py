"""Exact balanced assignment: neurons to N groups of equal size, minimising a per-(neuron, group) cost.

This is a transportation problem with N sinks. With few groups it is solved exactly and fast by
negative-cycle cancelling on the N-node *group graph*: the edge a -> b weighs the cheapest move of
one neuron from group a to group b, ``min_{j in a} cost[j, b] - cost[j, a]``. Moving one neuron
along every edge of a cycle keeps all group sizes, so a negative cycle is an improving exchange; an
assignment is optimal exactly when the group graph has none (the residual-network optimality
condition of min-cost flow, with the neuron nodes contracted away). Cycles are found by Bellman-Ford
on N nodes. A warm start (the previous partition, in alternating solvers) makes this a handful of
cycles; the cost is O(I * N) per cycle, so wide experts (Mixtral's 14,336) are no harder than narrow.

(A linear assignment over ``I x I`` slot matrices gives the same optimum but is cubic in I and very
slow on the degenerate costs that repeated group columns make.)
"""

from __future__ import annotations

import numpy as np


def _negative_cycle(weights: np.ndarray, tol: float) -> list[int] | None:
    """A negative cycle of the complete digraph ``weights[a, b]`` (diagonal ignored), or None."""
    n = weights.shape[0]
    w = weights.copy()
    np.fill_diagonal(w, np.inf)
    dist = np.zeros(n)
    pred = np.full(n, -1)
    last = -1
    for _ in range(n):
        cand = dist[:, None] + w
        best_from = cand.argmin(axis=0)
        best = cand[best_from, np.arange(n)]
        better = best < dist - tol
        if not better.any():
            return None
        dist[better] = best[better]
        pred[better] = best_from[better]
        last = int(np.nonzero(better)[0][0])
    node = last
    for _ in range(n):  # walk back n steps: we are now on the cycle
        node = int(pred[node])
    cycle = [node]
    while (node := int(pred[node])) != cycle[0]:
        cycle.append(node)
    cycle.reverse()  # pred points backwards: reverse to follow the edges a -> b
    return cycle


def balanced_assignment(cost: np.ndarray, group_size: int, init: np.ndarray | None = None) -> np.ndarray:
    """Labels minimising ``sum_j cost[j, label_j]`` with every group holding exactly ``group_size`` neurons.

    ``init`` (a balanced labelling) warm-starts the search; by default neurons start in index order.
    """
    cost = np.asarray(cost, dtype=np.float64)
    width, n_groups = cost.shape
    if width != n_groups * group_size:
        raise ValueError(f"{n_groups} groups of {group_size} do not hold {width} neurons")
    labels = (np.repeat(np.arange(n_groups), group_size) if init is None else np.asarray(init, dtype=np.int64)).copy()
    if np.any(np.bincount(labels, minlength=n_groups) != group_size):
        raise ValueError("the initial labels are not a balanced partition")
    tol = 1e-12 * max(1.0, float(np.abs(cost).max()))
    rows = np.arange(width)
    for _ in range(100 * width):  # each cycle lowers the cost; this bound is never reached in practice
        move = cost - cost[rows, labels][:, None]  # [I, N]: cost of moving neuron j to group b
        weights = np.empty((n_groups, n_groups))
        argbest = np.empty((n_groups, n_groups), dtype=np.int64)
        for a in range(n_groups):
            members = np.nonzero(labels == a)[0]
            pick = move[members].argmin(axis=0)
            argbest[a] = members[pick]
            weights[a] = move[members, :][pick, np.arange(n_groups)]
        cycle = _negative_cycle(weights, tol)
        if cycle is None:
            return labels
        moves = [(argbest[a, b], b) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
        for j, b in moves:
            labels[j] = b
    raise RuntimeError("balanced assignment did not converge")
