"""K schedules: the number of sub-experts per token that training step ``s`` of ``S`` routes to.

The paper raises K linearly from the original top-k to ``N * k`` over training (a curriculum);
``uniform`` instead draws K afresh at every step, so every operating point is trained throughout.
Both depend only on ``(seed, step)``, never on earlier draws, so a resumed run sees the same K
sequence as an uninterrupted one. A new schedule is one small class registered in ``SCHEDULES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from prism_cli.registry import Registry

#: Stream id of K draws in ``np.random.default_rng([seed, step, stream])`` (batches use another).
K_STREAM = 1


class KSchedule(ABC):
    """K for each step, between ``k_start`` and ``k_end`` inclusive."""

    name: ClassVar[str]

    def __init__(self, k_start: int, k_end: int, steps: int, seed: int) -> None:
        self.k_start = k_start
        self.k_end = k_end
        self.steps = steps
        self.seed = seed

    @abstractmethod
    def k_at(self, step: int) -> int:
        """K of step ``step`` (0-based)."""


SCHEDULES: Registry[type[KSchedule]] = Registry("K schedule")


def register_schedule(cls: type[KSchedule]) -> type[KSchedule]:
    return SCHEDULES.register(cls.name)(cls)


@register_schedule
class LinearSchedule(KSchedule):
    """The paper's curriculum: K rises from ``k_start`` to ``k_end`` in equal stretches of steps."""

    name = "linear"

    def k_at(self, step: int) -> int:
        levels = self.k_end - self.k_start + 1
        return min(self.k_end, self.k_start + step * levels // self.steps)


@register_schedule
class UniformSchedule(KSchedule):
    """K drawn uniformly from ``k_start..k_end`` at every step."""

    name = "uniform"

    def k_at(self, step: int) -> int:
        return int(np.random.default_rng([self.seed, step, K_STREAM]).integers(self.k_start, self.k_end + 1))
