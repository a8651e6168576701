"""What every partition solver receives and returns, and the registry that names them.

A solver sees one expert at a time (a ``PartitionProblem``) and returns a ``Solution`` whose labels
assign each neuron to one of ``N`` equal groups. Numbering groups by importance, choosing gate
neurons and scoring on held-out rows happen after the solver, in ``prism_cli.solvers.runner``, so
that no solver repeats them and every solver is judged the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from prism_cli.registry import Registry

#: Fraction of an expert's neurons counted as active for a token when binarising co-activation
#: (the paper's k_a = 3/4 of I).
COACT_ACTIVE_FRACTION = 0.75


@dataclass
class PartitionProblem:
    """One expert to split: absolute activation rows of its fit tokens and per-neuron statistics.

    ``l1_mass`` and ``rate`` come from the profile (all routed calibration tokens), falling back to
    the rows when not given. ``rate[j]`` is the fraction of tokens for which neuron j is among the
    top quarter of the expert's neurons by ``|a|`` (its "hot" rate, used by CMoE-style chunking).
    """

    rows: np.ndarray
    n_groups: int
    keep: int = 1
    l1_mass: np.ndarray | None = None
    rate: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.rows = np.ascontiguousarray(np.abs(self.rows), dtype=np.float32)
        n_rows, width = self.rows.shape
        if self.n_groups < 2 or width % self.n_groups:
            raise ValueError(f"{self.n_groups} groups do not divide an expert of width {width}")
        if not 1 <= self.keep < self.n_groups:
            raise ValueError(f"keep must be in 1..{self.n_groups - 1}, got {self.keep}")
        if n_rows == 0:
            raise ValueError("no activation rows to partition")
        if self.l1_mass is None:
            self.l1_mass = self.rows.sum(axis=0, dtype=np.float64)
        if self.rate is None:
            self.rate = hot_rate(self.rows)

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    @property
    def group_size(self) -> int:
        return self.width // self.n_groups

    @cached_property
    def columns(self) -> np.ndarray:
        """``rows.T`` stored contiguously: one row of activations per neuron."""
        return np.ascontiguousarray(self.rows.T)

    @cached_property
    def coactivation(self) -> np.ndarray:
        """Binarised co-activation counts ``C = B^T B`` (SPEC 3.1), ``[I, I]`` float32."""
        b = top_fraction_mask(self.rows, COACT_ACTIVE_FRACTION).astype(np.float32)
        return b.T @ b


def top_fraction_mask(rows: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean ``[B, I]``: True where ``rows[b, j]`` is among the ``ceil(fraction * I)`` largest of row b."""
    k = max(1, int(np.ceil(fraction * rows.shape[1])))
    if k >= rows.shape[1]:
        return np.ones(rows.shape, dtype=bool)
    thresh = np.partition(rows, rows.shape[1] - k, axis=1)[:, rows.shape[1] - k][:, None]
    return rows >= thresh


def hot_rate(rows: np.ndarray) -> np.ndarray:
    """Per-neuron fraction of rows in which it is among the top quarter by magnitude."""
    return top_fraction_mask(np.abs(rows), 0.25).mean(axis=0)


@dataclass
class Solution:
    """A solver's answer: group labels, plus a Pareto front's objective values for multi-objective solvers."""

    labels: np.ndarray
    front: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Solver(ABC):
    """Base class: subclasses set ``name``, take their settings as keyword arguments, implement ``solve``."""

    name: ClassVar[str]
    #: A reference split that does not optimise the cost (random, contiguous, the paper's greedy start):
    #: a floor for the optimisers in ``partition compare``, named as such there.
    baseline: ClassVar[bool] = False

    def settings(self) -> dict[str, Any]:
        """The solver's settings, recorded in the partition file."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @abstractmethod
    def solve(self, problem: PartitionProblem, rng: np.random.Generator) -> Solution:
        """Split ``problem`` into equal groups; all randomness comes from ``rng``."""


SOLVERS: Registry[type[Solver]] = Registry("solver")


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: add a solver to the registry under its ``name``."""
    return SOLVERS.register(cls.name)(cls)
