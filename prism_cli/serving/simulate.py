"""The event simulation of ``prism schedule --sim``: the real engine and policies, with forward passes
replaced by the cost model's latencies on a virtual clock.

Everything but the forward passes is the code that serves (the same ``Engine``, queues, policies and
floor checks), so the simulator differs from the real engine only where the cost model differs from
the machine: context-length effects (the model is timed at one cache length), the price of a batch
whose rows run at different points (estimated, see ``CostModel.decode_mixed``), and the engine's own
work between forwards (KV joins and trims, sampling, scheduling), which the simulator leaves out.
"""

from __future__ import annotations

import threading
from typing import Any

from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.costmodel import CostModel
from prism_cli.serving.engine import Batch, Executor
from prism_cli.serving.requests import Request


class SimExecutor(Executor):
    def __init__(self, cost_model: CostModel) -> None:
        self.cost_model = cost_model
        self.clock = 0.0

    def now(self) -> float:
        return self.clock

    def prefill(self, requests: list[Request], points: list[OperatingPoint]) -> tuple[Any, list[int], float]:
        tokens = [r.prompt_len for r in requests]
        if len(set(points)) == 1:
            ms = self.cost_model.prefill(points[0], sum(tokens))
        else:
            ms = self.cost_model.prefill_mixed(points, tokens)  # type: ignore[arg-type]
        self.clock += ms / 1e3
        return None, [0] * len(requests), ms

    def join(self, batch: Batch, kv: Any) -> None:
        pass

    def decode(self, batch: Batch, points: list[OperatingPoint]) -> tuple[list[int], float]:
        if len(set(points)) == 1:
            ms = self.cost_model.decode(points[0], len(points))
        else:
            ms = self.cost_model.decode_mixed(points)  # type: ignore[arg-type]
        self.clock += ms / 1e3
        return [0] * len(batch.rows), ms

    def keep(self, batch: Batch, rows: list[int]) -> None:
        pass

    def idle(self, until: float | None, wake: threading.Event) -> None:
        if until is not None:
            self.clock = max(self.clock, until)
