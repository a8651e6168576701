"""The event simulation of ``prism schedule --sim``: the real engine and policies, with forward passes
replaced by the cost model's latencies on a virtual clock.

Everything but the forward passes is the code that serves (the same ``Engine``, queues, policies and
floor checks), so the simulator differs from the real engine only where the cost model differs from
the machine. With the engine's own costs in the cost model (``CostModel.engine``), it tracks each
batch's cache width as the real executor does (left-padded, trimmed when rows leave) and charges
prefills, decode steps and KV joins and trims by width; without them, decode steps cost what ``prism bench``
measured at one cache length and the copies are free; with them, every forward pass is also charged the
engine's own time around it (``EngineCosts.step_overhead_ms``: sampling, scheduling, bookkeeping), which
the real engine spends outside the forward passes it times (about 7 % of a busy run here). Left out
either way: the price of a batch whose rows run at different points (estimated, see
``CostModel.decode_mixed``). A
decode step whose rows run at different linear points of an export whose copies tie (``block``: its N)
computes each row's blocks whole (``runtime/grouped_mm.py``, ``prefix-padded``): a row at ``linear:K`` is
charged as ``linear:N*ceil(K/N)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.costmodel import CostModel
from prism_cli.serving.engine import Batch, Executor, ExecutorTimes
from prism_cli.serving.requests import Request


@dataclass
class SimKV:
    """What the simulator tracks of a batch's KV cache: its width (columns, padding included) and each
    row's real tokens, which decide the width after rows leave (the real executor trims padding)."""

    width: int
    seen: list[int]


class SimExecutor(Executor):
    def __init__(self, cost_model: CostModel, block: int | None = None) -> None:
        self.cost_model = cost_model
        self.block = block
        self.engine = cost_model.engine
        self.clock = 0.0
        self.times = ExecutorTimes()

    def _charge(self, ms: float, kind: str) -> None:
        self.clock += ms / 1e3
        if kind == "kv":
            self.times.kv_s += ms / 1e3
        else:
            self.times.forward_s += ms / 1e3

    def _forward(self, ms: float) -> None:
        """A forward pass of ``ms``, and the engine's own time around it (not counted as the pass's)."""
        self._charge(ms, "forward")
        if self.engine is not None:
            self.clock += self.engine.step_overhead_ms / 1e3

    def now(self) -> float:
        return self.clock

    def prefill(self, requests: list[Request], points: list[OperatingPoint]) -> tuple[Any, list[int], float]:
        tokens = [r.prompt_len for r in requests]
        width = max(tokens)
        # The engine left-pads the prompts to the longest and runs them as one batch.
        per_point = {p: self.engine.prefill(p, len(points), width) for p in set(points)} if self.engine else {}
        if per_point and all(v is not None for v in per_point.values()):
            ms = sum(per_point[p] for p in points) / len(points)
        elif len(set(points)) == 1:
            ms = self.cost_model.prefill(points[0], sum(tokens))
        else:
            ms = self.cost_model.prefill_mixed(points, tokens)  # type: ignore[arg-type]
        self._forward(ms)
        return SimKV(width, [r.prompt_len for r in requests]), [0] * len(requests), ms

    def join(self, batch: Batch, kv: Any) -> None:
        if batch.kv is None:
            batch.kv = kv
            return
        merged = SimKV(max(batch.kv.width, kv.width), batch.kv.seen + kv.seen)
        if self.engine is not None:
            self._charge(self.engine.join(len(merged.seen), merged.width), "kv")
        batch.kv = merged

    def decode(self, batch: Batch, points: list[OperatingPoint]) -> tuple[list[int], float]:
        kv: SimKV = batch.kv
        points = self._computed(points)
        per_point = {p: self.engine.decode(p, len(points), kv.width) for p in set(points)} if self.engine else {}
        if per_point and all(v is not None for v in per_point.values()):
            ms = sum(per_point[p] for p in points) / len(points)  # a mixed batch: as CostModel.decode_mixed
        elif len(set(points)) == 1:
            ms = self.cost_model.decode(points[0], len(points))
        else:
            ms = self.cost_model.decode_mixed(points)  # type: ignore[arg-type]
        self._forward(ms)
        batch.kv = SimKV(kv.width + 1, [n + 1 for n in kv.seen])
        return [0] * len(batch.rows), ms

    def _computed(self, points: list[OperatingPoint]) -> list[OperatingPoint]:
        """The points a decode step computes its rows at (see the module docstring: whole blocks where rows at
        different linear points share the step)."""
        n = self.block
        if n is None or len(set(points)) < 2 or any(p.policy != "linear" for p in points):
            return points
        whole = [OperatingPoint("linear", n * -(-int(p.value) // n)) for p in points]
        return whole if all(self.cost_model.has(p) for p in whole) else points

    def keep(self, batch: Batch, rows: list[int]) -> None:
        kv: SimKV = batch.kv
        if self.engine is not None:
            self._charge(self.engine.keep(len(kv.seen), kv.width), "kv")
        seen = [kv.seen[i] for i in rows]
        batch.kv = SimKV(max(seen), seen)

    def idle(self, until: float | None, wake: threading.Event) -> None:
        if until is not None:
            self.clock = max(self.clock, until)
