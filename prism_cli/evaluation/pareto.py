"""One frontier of latency against perplexity over every point, and the count of distinct stable points.

The elastic and the original points are judged together, as a user choosing among them would:

1. drop **unusable** points (perplexity above ``quality_ratio`` (1.5) times the full model's) and
   **unsteady** ones (p90 latency above ``max_spread`` (1.15) times the median);
2. take the **Pareto frontier** of what is left: no other point is at least as fast and at least as
   good, and better in one of the two;
3. walk it from the fastest point: a point is **distinct** (counted) when it is at least ``min_gap``
   (3 %) slower **and** at least ``min_gain`` (0.5 %) lower in perplexity than the last point counted;
   the fastest frontier point is always counted.

An elastic point that the original beats on both axes is not on the frontier and does not count.
The ratio reported is the count over all points divided by the count the same rule gives for the
original's points alone: how many more usable settings the elastic model offers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CountRule:
    """The thresholds of the distinct-stable count (one definition, used by bench, tables and README)."""

    quality_ratio: float = 1.5
    max_spread: float = 1.15
    min_gap: float = 0.03
    min_gain: float = 0.005

    def describe(self) -> str:
        return (f"one frontier over elastic and original points; dropped: perplexity > {self.quality_ratio:g}x full, "
                f"p90 > {self.max_spread:g}x median; counted walking from the fastest: >= {self.min_gap:.0%} slower "
                f"and >= {self.min_gain:.1%} lower perplexity than the last counted")


COUNT_RULE = CountRule()


@dataclass(frozen=True)
class CostQuality:
    latency: float
    p90: float
    perplexity: float


def pareto_front(points: Sequence[CostQuality]) -> list[int]:
    """Indices of the points no other point dominates (as fast and as good, better in one), fastest first.

    Of identical points only the first (by index) is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i].latency, points[i].perplexity, i))
    front, best = [], float("inf")
    for i in order:
        if points[i].perplexity < best:
            front.append(i)
            best = points[i].perplexity
    return front


def usable(point: CostQuality, full_perplexity: float, rule: CountRule = COUNT_RULE) -> bool:
    """Usable quality and steady latency (step 1 of the module docstring)."""
    return point.perplexity <= rule.quality_ratio * full_perplexity and point.p90 <= rule.max_spread * point.latency


def distinct_stable(points: Sequence[CostQuality], full_perplexity: float, rule: CountRule = COUNT_RULE) -> list[int]:
    """Indices of the distinct stable points of ``points`` (the module docstring's definition), fastest first."""
    kept = [i for i, p in enumerate(points) if usable(p, full_perplexity, rule)]
    counted: list[int] = []
    for j in pareto_front([points[i] for i in kept]):
        i = kept[j]
        if counted:
            last = points[counted[-1]]
            if points[i].latency < (1 + rule.min_gap) * last.latency:
                continue
            if points[i].perplexity > (1 - rule.min_gain) * last.perplexity:
                continue
        counted.append(i)
    return counted
