"""Pareto frontiers of latency against perplexity, and the count of distinct stable operating points.

A point is **distinct and stable** when it is

1. on the Pareto frontier of its own set (no point of the set is both faster and better),
2. usable: perplexity at most ``quality_ratio`` (1.5) times the full model's,
3. steady: its p90 latency at most ``max_spread`` (1.15) times its median, and
4. distinct: walking the usable frontier from the fastest point, at least ``min_gap`` (3 %) slower
   than the previous point counted.

The ratio of the elastic model's count to the original model's is the paper's "operating points" claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CostQuality:
    latency: float
    p90: float
    perplexity: float


def pareto_front(points: Sequence[CostQuality]) -> list[int]:
    """Indices of the points no other point beats on both latency and perplexity, fastest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i].latency, points[i].perplexity))
    front, best = [], float("inf")
    for i in order:
        if points[i].perplexity < best:
            front.append(i)
            best = points[i].perplexity
    return front


def distinct_stable(
    points: Sequence[CostQuality],
    full_perplexity: float,
    quality_ratio: float = 1.5,
    min_gap: float = 0.03,
    max_spread: float = 1.15,
) -> list[int]:
    """Indices of the distinct stable operating points (definition in the module docstring)."""
    kept: list[int] = []
    for i in pareto_front(points):
        p = points[i]
        if p.perplexity > quality_ratio * full_perplexity or p.p90 > max_spread * p.latency:
            continue
        if kept and p.latency < (1 + min_gap) * points[kept[-1]].latency:
            continue
        kept.append(i)
    return kept
