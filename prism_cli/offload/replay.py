"""Offloading at a real model's shape without its weights: routing traces through the same cache code.

A replay runs, token after token and MoE layer after MoE layer, exactly the live executor's schedule
(``executor.run_pieces``: the same ``PieceCache``, policies, pinning and prefetch, the same
``SimulatedLink`` charging each copy at the stated bandwidth and latency), on a ``VirtualClock``. Only
the compute is not run: a ``ComputeModel`` says how long each part of a decode step takes:

* ``gpu`` (modelled, stated): a device whose decode steps are bound by memory bandwidth and kernel
  launches. Each MoE layer's non-expert part reads its weights once (attention, norms, router, shared
  experts; the embedding table is one row) plus a fixed number of launches; each group of pieces is one
  fused call (prism's CUDA kernels over the slot pool) reading those pieces' bytes. Defaults: 1000 GB/s
  achieved (a 24 GB RTX 4090 has 1008 GB/s peak; an A100's 1.5-2 TB/s at about half efficiency for
  GEMV-sized work), 10 us per launch group.
* ``cpu`` (measured here): the same parts timed on this machine at the real dimensions with random
  weights: one piece's SwiGLU (the live executor's per-piece math) over rotating buffers so weights
  come from memory, and a decode step of the real config cut to two depths (its experts skipped),
  whose difference is one MoE layer and whose intercept is embedding, dense layers and head.

Quality is not measured in a replay; routing comes from a trace (``trace.py``), whose mapping to the
target shape is a model too. Every number a replay writes says "simulated link" and names its
compute model.
"""

from __future__ import annotations

import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prism_cli.errors import PrismError
from prism_cli.offload.cache import CACHE_POLICIES, PieceCache
from prism_cli.offload.config import Budget, LinkSpec, format_size, format_size_up
from prism_cli.offload.executor import pinned_keys, run_pieces
from prism_cli.offload.link import SimulatedLink, VirtualClock
from prism_cli.offload.shapes import ModelShape
from prism_cli.offload.trace import TraceMapping, allocate
from prism_cli.operating_points import OperatingPoint
from prism_cli.registry import Registry


class ComputeModel(ABC):
    """Seconds for the parts of one decode step (batch 1) at a shape."""

    name: str
    measured: bool
    #: The fused backend computes each group of pieces in one call (misses wait for each other).
    batched: bool

    def __init__(self, shape: ModelShape) -> None:
        self.shape = shape

    @abstractmethod
    def token_fixed(self) -> float:
        """Embedding, dense layers, final norm and head: the step's cost outside the MoE layers."""

    @abstractmethod
    def layer_fixed(self) -> float:
        """One MoE layer without its routed experts (attention, norms, router, shared experts)."""

    @abstractmethod
    def pieces(self, count: int, n_sub: int) -> float:
        """One group of ``count`` pieces of width ``1/n_sub`` of an expert."""

    def predictor(self) -> float:
        """Running the next layer's router (and gate neurons) early, for prefetching."""
        return 0.0

    @abstractmethod
    def describe(self) -> str: ...


COMPUTE_MODELS: Registry[Callable[..., ComputeModel]] = Registry("compute model")


@COMPUTE_MODELS.register("gpu")
class GpuRoofline(ComputeModel):
    name = "gpu"
    measured = False
    batched = True

    def __init__(self, shape: ModelShape, bandwidth: float = 1000e9, launch: float = 10e-6,
                 layer_launches: int = 12) -> None:
        super().__init__(shape)
        self.bandwidth, self.launch, self.layer_launches = bandwidth, launch, layer_launches
        cfg = shape.config
        head = cfg["vocab_size"] * shape.hidden * shape.dtype_bytes
        self._head_bytes = head
        self._layer_bytes = (shape.non_expert_bytes_read_per_token() - head) / shape.layers

    def token_fixed(self) -> float:
        dense = (self.shape.layers - self.shape.moe_layers) * (self._layer_bytes / self.bandwidth + self.layer_launches * self.launch)
        return dense + self._head_bytes / self.bandwidth + 3 * self.launch

    def layer_fixed(self) -> float:
        return self._layer_bytes / self.bandwidth + self.layer_launches * self.launch

    def pieces(self, count: int, n_sub: int) -> float:
        return self.launch + count * self.shape.expert_unit_bytes(n_sub) / self.bandwidth

    def predictor(self) -> float:
        return 2 * self.launch

    def describe(self) -> str:
        return (f"modelled GPU compute: {self.bandwidth / 1e9:g} GB/s achieved memory bandwidth, "
                f"{self.launch * 1e6:g} us per kernel launch group, {self.layer_launches} launches per layer")


@COMPUTE_MODELS.register("cpu")
class MeasuredCpu(ComputeModel):
    name = "cpu"
    measured = True
    batched = False

    def __init__(self, shape: ModelShape, repeats: int = 15, context: int = 64) -> None:
        super().__init__(shape)
        self.repeats, self.context = repeats, context
        self._piece: dict[int, float] = {}
        self._fixed: tuple[float, float] | None = None

    def pieces(self, count: int, n_sub: int) -> float:
        if n_sub not in self._piece:
            self._piece[n_sub] = _time_piece(self.shape.hidden, self.shape.width // n_sub, self.repeats)
        return count * self._piece[n_sub]

    def _fit(self) -> tuple[float, float]:
        if self._fixed is None:
            self._fixed = _time_layers(self.shape, self.repeats, self.context)
        return self._fixed

    def token_fixed(self) -> float:
        return self._fit()[0]

    def layer_fixed(self) -> float:
        return self._fit()[1]

    def describe(self) -> str:
        return (f"compute measured on this CPU ({torch.get_num_threads()} threads, float32, random weights at the real "
                "dimensions): a MoE layer and the rest of the step from two depths of the model, a piece's SwiGLU alone")


def _time_piece(hidden: int, width: int, repeats: int) -> float:
    """Median seconds of one piece's SwiGLU for one token, as the live executor computes it."""
    import torch.nn.functional as F

    buffers = max(2, int(math.ceil(256e6 / (3 * hidden * width * 4))))  # more than any cache level holds
    gen = torch.Generator().manual_seed(0)
    gate_up = [torch.randn(2 * width, hidden, generator=gen) * hidden**-0.5 for _ in range(buffers)]
    down = [torch.randn(hidden, width, generator=gen) * width**-0.5 for _ in range(buffers)]
    x = torch.randn(1, hidden, generator=gen)
    w = torch.ones(1, 1)
    times = []
    for r in range(repeats * buffers):
        i = r % buffers
        t0 = time.perf_counter()
        h = F.linear(x, gate_up[i])
        g, u = h.chunk(2, dim=-1)
        _ = (F.silu(g) * u * w) @ down[i].t()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[buffers:])


def _time_layers(shape: ModelShape, repeats: int, context: int) -> tuple[float, float]:
    """(seconds outside the MoE layers, seconds per MoE layer without routed experts) of a decode step,
    from the real config built at two depths with random weights, experts skipped."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(_SKIP_EXPERTS, lambda self, h, *_: torch.zeros_like(h))
    dense = shape.layers - shape.moe_layers
    timings = []
    for moe in (1, 2):
        cfg = AutoConfig.for_model(**{**shape.config, "num_hidden_layers": dense + moe})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, experts_implementation=_SKIP_EXPERTS).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, context + 1))
        with torch.inference_mode():
            cache = model(input_ids=ids[:, :context], use_cache=True).past_key_values
            samples = []
            for _ in range(repeats + 2):
                t0 = time.perf_counter()
                model(input_ids=ids[:, context:], **{cache_keyword(model): cache}, use_cache=True)
                samples.append(time.perf_counter() - t0)
                cache.crop(-1)
        timings.append(statistics.median(samples[2:]))
        del model
    per_layer = max(timings[1] - timings[0], 0.0)
    fixed = max(timings[0] - per_layer, 0.0)
    return fixed, per_layer


_SKIP_EXPERTS = "prism-skip-experts"


def cache_keyword(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; the name this version's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class ReplayGeometry:
    """What a replay needs of the target: MoE layers, experts, sub-experts and bytes."""

    shape: ModelShape
    n_sub: int

    def budget_bytes(self, budget: Budget, reserve_fraction: float) -> int:
        if budget.nbytes is not None:
            return budget.nbytes
        wanted = self.shape.non_expert_bytes() + budget.expert_fraction * self.shape.expert_bytes()
        return int(math.ceil(wanted / (1 - reserve_fraction)))


@dataclass
class ReplayResult:
    """Per-token latencies and cache behaviour of one (budget, policy, pin, point, cache kind)."""

    latencies: list[float]
    hit_rate: float
    bytes_per_token: float
    stall_per_token: float
    bookkeeping_fraction: float
    prediction_precision: float
    prediction_recall: float
    prefetched_per_token: float
    prefetch_used: float
    slots: int
    device_bytes: int
    budget_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


def replay(mapping: TraceMapping, geometry: ReplayGeometry, compute: ComputeModel, link: LinkSpec, budget: Budget,
           policy: str, point: OperatingPoint, whole: bool, pin: float = 0.0, reserve_fraction: float = 0.05,
           warmup: int = 256, tokens: int | None = None) -> ReplayResult:
    """Replay ``mapping``'s tokens through one configuration; latencies of the tokens after ``warmup``."""
    shape, n_sub = geometry.shape, geometry.n_sub
    experts = shape.num_experts
    unit_sub = 1 if whole else n_sub
    unit_bytes = shape.expert_unit_bytes(unit_sub)
    groups = experts * unit_sub
    budget_bytes = geometry.budget_bytes(budget, reserve_fraction)
    cache_bytes = budget_bytes * (1 - reserve_fraction) - shape.non_expert_bytes()
    if cache_bytes < unit_bytes:
        need = (shape.non_expert_bytes() + unit_bytes) / (1 - reserve_fraction)
        raise PrismError(f"--device-memory {budget} is too small for {shape.name}: its non-expert weights take "
                         f"{format_size(shape.non_expert_bytes())}; give at least {format_size_up(need)}")
    layers = shape.moe_layers
    capacity = int(min(cache_bytes // unit_bytes, layers * groups))
    pinned = pinned_keys(layers, groups, unit_sub, min(int(capacity * pin), capacity - 1)) if pin else []
    cache = PieceCache(capacity, policy, pinned, timer=time.thread_time)  # CPU time: the machine may be shared
    clock = VirtualClock()
    sim = SimulatedLink(link, clock)
    prefetching = CACHE_POLICIES.get(policy).prefetch
    demand = [allocate(mapping.routing(layer), point, n_sub, experts) for layer in range(layers)]
    predicted = [None] * layers
    if prefetching:
        predicted = [None if (r := mapping.prediction(layer)) is None else allocate(r, point, n_sub, experts)
                     for layer in range(layers)]
    if whole and point.policy != "original":
        raise PrismError("a whole-expert cache replays original:k points only")
    total = mapping.tokens if tokens is None else min(tokens + warmup, mapping.tokens)
    if total <= warmup:
        raise PrismError(f"the trace has {mapping.tokens} tokens: fewer than the warm-up ({warmup}) plus one")
    fixed, per_layer = compute.token_fixed(), compute.layer_fixed()
    latencies: list[float] = []

    def copy_in(_key: int, slot: int) -> None:
        sim.charge(slot, unit_bytes, 2)

    def run_group(group: list[int], _slots: list[int]) -> None:
        clock.advance(compute.pieces(len(group), unit_sub))

    for t in range(total):
        if t == warmup:
            cache.reset_stats()
            sim.reset_stats()
        start = clock.now()
        book = cache.stats.bookkeeping_s
        scored: list[int] | None = None  # the prediction of this layer, made at the previous one
        for layer in range(layers):
            clock.advance(per_layer)
            keys = [layer * groups + g for g in dict.fromkeys(demand[layer][t])]
            if scored is not None:
                cache.note_prediction(scored, keys)
                scored = None
            prefetch = None
            if prefetching and layer + 1 < layers and predicted[layer + 1] is not None:
                scored = [(layer + 1) * groups + g for g in dict.fromkeys(predicted[layer + 1][t])]

                def prefetch(nxt: list[int] = scored) -> None:
                    clock.advance(compute.predictor())
                    for _key, slot in cache.prefetch(nxt):
                        sim.charge(slot, unit_bytes, 2)

            run_pieces(cache, sim, keys, copy_in, run_group, prefetch, batch_misses=compute.batched)
        clock.advance(fixed)
        clock.advance(cache.stats.bookkeeping_s - book)  # host time on the critical path, measured (CPU time)
        if t >= warmup:
            latencies.append(clock.now() - start)
    measured_stats = cache.stats
    n = len(latencies)
    step = statistics.fmean(latencies)
    return ReplayResult(
        latencies=latencies,
        hit_rate=measured_stats.hit_rate,
        bytes_per_token=sim.stats.bytes / n,
        stall_per_token=sim.stats.stall_s / n,
        bookkeeping_fraction=measured_stats.bookkeeping_s / n / step if step > 0 else float("nan"),
        prediction_precision=measured_stats.prediction_precision,
        prediction_recall=measured_stats.prediction_recall,
        prefetched_per_token=measured_stats.prefetched / n,
        prefetch_used=measured_stats.prefetch_used / n,
        slots=capacity,
        device_bytes=int(shape.non_expert_bytes() + capacity * unit_bytes),
        budget_bytes=budget_bytes,
    )


def shape_from_model(name: str, config: Any, dtype_bytes: int = 2) -> ModelShape:
    """A ``ModelShape`` of a loaded model's *source* config (an export's original experts)."""
    data = config.to_dict()
    meta = data.pop("prism", None)
    keep = {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "transformers_version",
                                                                                 "dtype", "torch_dtype")}
    if meta is not None:
        from prism_cli.models.adapters import adapter_for_config

        adapter = adapter_for_config(config)
        n_sub = int(meta["sub_experts"])
        keep.update({adapter.experts_key: adapter.num_experts // n_sub, adapter.width_key: adapter.width * n_sub,
                     adapter.top_k_key: int(meta["source"]["top_k"])})
    return ModelShape(name, name, keep, dtype_bytes)
