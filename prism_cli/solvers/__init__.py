"""Partition solvers. Importing this package registers every solver in ``SOLVERS``.

Each module below registers its solvers on import; add new solver modules to the import list.
"""

from __future__ import annotations

from prism_cli.solvers import (  # noqa: F401  (imported for their @register_solver side effect)
    alternating,
    anneal,
    clustering,
    evolutionary,
    heuristics,
)
from prism_cli.solvers.base import SOLVERS, PartitionProblem, Solution, Solver, register_solver

__all__ = ["SOLVERS", "PartitionProblem", "Solution", "Solver", "register_solver"]
