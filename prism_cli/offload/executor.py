"""The offloaded experts executor: route, find the needed pieces, copy the misses in, compute on slots.

``attach_offload(model, OffloadConfig(...))`` keeps every non-expert weight on the device and every
routed expert in host memory (pinned, on CUDA), sizes a cache of pieces (sub-experts of an export, whole
experts of a plain model) to fill the rest of the budget, and attaches an ``OffloadedLayer`` to each MoE
block's experts module. prism's experts implementation (``runtime/experts.py``) then resolves the
``"offload"`` executor for those modules, and each call (one MoE layer of one step):

1. plans the routed batch with the runtime's planner (``plan_experts``): the pieces the step needs are
   the union of its rows' sub-expert masks, in plan order (expert by expert, sub-expert ascending);
2. acquires them in the cache: hits stay where they are, misses get slots (evicting by the policy);
3. issues the misses' copies on the link; with the ``prefetch`` policy, also runs the next MoE layer's
   router on this layer's hidden state and fetches the pieces it predicts (behind this step's misses);
4. computes the hits first, then each miss as soon as its copy has landed (overlap of copy and compute);
5. adds the pieces up per expert in sub-expert order, and the experts in plan order, whatever order
   they were computed in: the result does not depend on the cache's state, and with whole experts it
   is computed exactly as the grouped executor does.

A demand larger than the cache (a long prefill into a small budget) runs in plan order, in chunks that
fit. Each piece is computed on its own slot (slots of one expert need not be adjacent).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from prism_cli import cuda
from prism_cli.errors import PrismError
from prism_cli.offload.cache import CACHE_POLICIES, PieceCache
from prism_cli.offload.config import Budget, OffloadConfig, Reserve, format_size, format_size_up
from prism_cli.offload.link import CudaLink, Link, SimulatedLink, SlotPool, StallClock
from prism_cli.runtime.experts import EXECUTORS
from prism_cli.runtime.plan import ExpertPlan, plan_experts

#: Prefetch only for steps of a few tokens (decode): a prefill needs most pieces anyway.
PREFETCH_MAX_TOKENS = 64


def run_pieces(
    cache: PieceCache,
    link: Link,
    keys: list[int],
    copy_in: Callable[[int, int], None],
    compute: Callable[[list[int], list[int]], None],
    prefetch: Callable[[], None] | None = None,
    batch_misses: bool = False,
) -> None:
    """One layer step's schedule over its needed ``keys`` (plan order); shared by the live executor and
    the trace replay. ``copy_in(key, slot)`` queues a copy on ``link``; ``compute(pieces, slots)``
    computes a group of pieces; ``prefetch()`` may fetch the next step's pieces once this step's copies
    are queued. The hits are one group; the misses follow one by one as their copies land, or as one
    group once all have landed (``batch_misses``: a backend with one fused call per group)."""
    pinned = cache.pinned
    unpinned = len(keys) if not pinned else sum(1 for k in keys if k not in pinned)
    if unpinned <= cache.evictable_capacity:
        slots, misses = cache.acquire(keys)
        if misses:
            link.begin()
            for i in misses:
                copy_in(keys[i], slots[i])
        if prefetch is not None:
            prefetch()
        missed = set(misses)
        hits = [i for i in range(len(keys)) if i not in missed]
        for i in hits:  # a hit may still be in flight (a prefetch)
            link.wait(slots[i])
        if hits:
            compute(hits, [slots[i] for i in hits])
        if batch_misses and misses:
            for i in misses:
                link.wait(slots[i])
            compute(misses, [slots[i] for i in misses])
        else:
            for i in misses:  # in the order their copies were queued
                link.wait(slots[i])
                compute([i], [slots[i]])
        cache.release(keys)
        return
    for chunk in _chunks(keys, pinned, cache.evictable_capacity):  # bigger than the cache: plan order
        slots, misses = cache.acquire([keys[i] for i in chunk])
        if misses:
            link.begin()
            for j in misses:
                copy_in(keys[chunk[j]], slots[j])
        for slot in slots:
            link.wait(slot)
        compute(chunk, slots)
        cache.release([keys[i] for i in chunk])


def _chunks(keys: list[int], pinned: frozenset[int], room: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    used = 0
    for i, key in enumerate(keys):
        cost = 0 if key in pinned else 1
        if used + cost > room:
            yield chunk
            chunk, used = [], 0
        chunk.append(i)
        used += cost
    if chunk:
        yield chunk


@dataclass
class OffloadedLayer:
    """What the ``offload`` executor needs for one MoE block (attached as ``experts.prism_offload``)."""

    controller: OffloadController
    position: int  # among the model's MoE layers
    module: torch.nn.Module
    n_sub: int
    groups: int

    def sources(self, g: int) -> tuple[torch.Tensor, ...]:
        m = self.module
        return m.gate_up_proj.detach()[g], m.down_proj.detach()[g]


@dataclass
class _Pieces:
    """A plan's pieces in plan order: for each, its expert work, sub-expert, and rows within the expert."""

    work: list[int] = field(default_factory=list)
    sub: list[int] = field(default_factory=list)
    rows: list[np.ndarray | None] = field(default_factory=list)  # None: every row of the expert
    last_of_expert: list[bool] = field(default_factory=list)


def _pieces_of(plan: ExpertPlan) -> _Pieces:
    out = _Pieces()
    for wi, work in enumerate(plan.experts):
        masks = plan.masks[work.start : work.stop]
        union = int(np.bitwise_or.reduce(masks)) if masks.size > 1 else int(masks[0])
        same = work.all_tokens or masks.size == 1 or bool((masks == masks[0]).all())
        for n in range(plan.n_sub):
            if union >> n & 1:
                out.work.append(wi)
                out.sub.append(n)
                if same:
                    out.rows.append(None)
                else:
                    rows = np.flatnonzero((masks >> n) & 1)
                    out.rows.append(None if rows.size == masks.size else rows)
                out.last_of_expert.append(False)
        out.last_of_expert[-1] = True
    return out


class OffloadController:
    """The cache, link and slot pool of one offloaded model, and the per-layer executor (see the module docstring)."""

    def __init__(self, model: Any, config: OffloadConfig) -> None:
        from prism_cli.models.loading import parse_device
        from prism_cli.runtime.elastic import attach_elastic_state

        self.config = config
        self.device = parse_device(config.device or "cpu")
        state = getattr(model, "prism_state", None) or attach_elastic_state(model, None)
        self.state = state
        self.model = model
        layers = state.layers
        sizes = budget_sizes(model, config)
        sizes.check(config)
        self.n_sub, self.groups, self.piece_shapes = state.n_sub, sizes.groups, sizes.piece_shapes
        dtype = layers[0].experts.gate_up_proj.dtype
        self.piece_bytes, self.expert_bytes, self.non_expert_bytes = sizes.piece_bytes, sizes.expert_bytes, sizes.non_expert_bytes
        self.budget_bytes, self.reserve_bytes = sizes.budget_bytes, sizes.reserve_bytes
        self.capacity = sizes.slots
        pinned = pinned_keys(len(layers), self.groups, self.n_sub, int(self.capacity * config.pin)) if config.pin else []
        if config.pin and len(pinned) >= self.capacity:
            pinned = pinned[: self.capacity - 1]
        self.cache = PieceCache(self.capacity, config.policy, pinned)
        self.prefetching = CACHE_POLICIES.get(config.policy).prefetch
        _place(model, sizes.expert_ids, self.device)
        #: prism's CUDA kernels, run over the slot pool with slot ids as expert ids (one call per group).
        self._kernels = cuda.get_ops(self.device) if self.device.type == "cuda" and cuda.available() else None
        self.routers = list(state.elastic_routers or state.flat_routers)
        self.layers = [OffloadedLayer(self, i, layer.experts, self.n_sub, self.groups) for i, layer in enumerate(layers)]
        # Slots laid out as the sources, except where the kernels read them (contiguous).
        self.pool = SlotPool(self.capacity, self.piece_shapes, dtype, self.device, config.materialize or not config.simulated,
                             None if self._kernels is not None else list(self.layers[0].sources(0)))
        self.link: Link = SimulatedLink(config.link_spec, StallClock() if config.stall_clock else None) \
            if config.simulated else CudaLink(self.device)
        self._prediction: dict[int, list[int]] = {}
        self._compute_dtype = torch.float32 if self.device.type == "cpu" else dtype
        for key in sorted(pinned):  # pinned pieces are loaded once, at attach: not per-token traffic
            layer, g = divmod(key, self.groups)
            self.link.copy(self.pool, self.cache.slot_of[key], self.layers[layer].sources(g))
            self.link.wait(self.cache.slot_of[key])
        self.link.reset_stats()
        self.activate()

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Device memory held by weights: the non-expert weights and the cache's slots."""
        return self.non_expert_bytes + self.capacity * self.piece_bytes

    def describe(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes, "reserve_bytes": self.reserve_bytes,
            "non_expert_bytes": self.non_expert_bytes, "expert_bytes": self.expert_bytes,
            "piece_bytes": self.piece_bytes, "slots": self.capacity, "pinned": len(self.cache.pinned),
            "cached_fraction": self.capacity * self.piece_bytes / self.expert_bytes,
            "policy": self.config.policy, "link": str(self.config.link_spec) if self.config.simulated else "cuda",
            "simulated_link": self.config.simulated,
        }

    # ---- switching between models timed together ---------------------------------------------------
    def activate(self) -> None:
        """Make this controller the one the model's experts run with (several may share a model)."""
        for layer in self.layers:
            layer.module.prism_offload = layer
            layer.module._prism_executor = None  # resolved again: "offload"
        self.link.resume()

    def deactivate(self) -> None:
        self.link.pause()

    # ---- one MoE layer of one step --------------------------------------------------------------
    def forward_layer(self, layer: OffloadedLayer, x: torch.Tensor, indices: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
        plan = plan_experts(indices, weights, self.n_sub, self.groups)
        if not plan.experts:
            return torch.zeros(x.shape[0], self.piece_shapes[1][0], dtype=x.dtype, device=x.device)
        pieces = _pieces_of(plan)
        base = layer.position * self.groups
        keys = [base + plan.experts[w].expert * self.n_sub + n for w, n in zip(pieces.work, pieces.sub, strict=True)]
        predicted = self._prediction.pop(layer.position, None)
        if predicted is not None:
            self.cache.note_prediction(predicted, keys)
        prefetch = None
        if self.prefetching and layer.position + 1 < len(self.layers) and x.shape[0] <= PREFETCH_MAX_TOKENS:
            def prefetch() -> None:
                self._prefetch(layer.position + 1, x)
        if self._kernels is not None and self._kernels.takes(x, *self.pool.tensors):
            groups = [k - base for k in keys]
            kernel_run = _KernelRun(self, x, indices, weights, groups)
            run_pieces(self.cache, self.link, keys, self._copy_in, kernel_run.compute, prefetch, batch_misses=True)
            return kernel_run.result()
        run = _LayerRun(self, layer, x, plan, pieces)
        run_pieces(self.cache, self.link, keys, self._copy_in, run.compute, prefetch)
        return run.result()

    def _copy_in(self, key: int, slot: int) -> None:
        layer, g = divmod(key, self.groups)
        self.link.copy(self.pool, slot, self.layers[layer].sources(g))

    def _prefetch(self, position: int, x: torch.Tensor) -> None:
        """Run the next MoE layer's router on this layer's hidden state; fetch what it picks."""
        ids = _route(self.routers[position], x)
        base = position * self.groups
        keys = list(dict.fromkeys(base + g for g in ids.reshape(-1).tolist() if g < self.groups))
        self._prediction[position] = keys
        for key, slot in self.cache.prefetch(keys):
            self._copy_in(key, slot)


def _route(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sub-expert (or expert) ids a router picks for ``x``, without running any hooks on it (a
    prediction must not count as a routed token)."""
    inner = getattr(router, "neurons", None) if getattr(router, "use_neurons", False) else getattr(router, "linear", None)
    return (inner or router).forward(x)[2]


class _LayerRun:
    """The compute of one layer step: pieces computed on their slots in any order, reduced in plan order."""

    def __init__(self, ctl: OffloadController, layer: OffloadedLayer, x: torch.Tensor, plan: ExpertPlan,
                 pieces: _Pieces) -> None:
        self.ctl, self.layer, self.plan, self.pieces = ctl, layer, plan, pieces
        self.dtype = ctl._compute_dtype
        self.x = x
        self.xf = x.to(self.dtype)
        self.tokens = torch.from_numpy(plan.tokens).to(x.device)
        self.row_w = torch.from_numpy(plan.weights).to(x.device, self.dtype)
        self.outputs: list[torch.Tensor | None] = [None] * len(pieces.work)
        self._xe: dict[int, torch.Tensor] = {}
        self._next = 0  # next piece to fold, in plan order
        self._ye: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def _rows_x(self, wi: int) -> torch.Tensor:
        work = self.plan.experts[wi]
        if work.all_tokens:
            return self.xf
        xe = self._xe.get(wi)
        if xe is None:
            xe = self._xe[wi] = self.xf.index_select(0, self.tokens[work.start : work.stop])
        return xe

    def compute(self, group: list[int], slots: list[int]) -> None:
        for i, slot in zip(group, slots, strict=True):
            self._piece(i, slot)

    def _piece(self, i: int, slot: int) -> None:
        wi, n, rows = self.pieces.work[i], self.pieces.sub[i], self.pieces.rows[i]
        work = self.plan.experts[wi]
        gate_up, down = self.ctl.pool.weights(slot)
        xe = self._rows_x(wi)
        w = self.row_w[work.start : work.stop, n : n + 1]
        if rows is not None:
            index = torch.from_numpy(rows).to(xe.device)
            xe, w = xe.index_select(0, index), w.index_select(0, index)
        # As the grouped executor computes a one-piece block: up-projection, the module's gate, the
        # routing weight, then the down-projection.
        h = F.linear(xe, gate_up.to(self.dtype))
        act = self.layer.module._apply_gate(h) * w
        self.outputs[i] = act @ down.to(self.dtype).t()
        self._fold()

    def _fold(self) -> None:
        pieces, plan = self.pieces, self.plan
        while self._next < len(self.outputs) and self.outputs[self._next] is not None:
            i = self._next
            y, rows = self.outputs[i], pieces.rows[i]
            self.outputs[i] = None
            first = i == 0 or pieces.last_of_expert[i - 1]
            if first and rows is None:
                self._ye = y
            else:
                if first:
                    work = plan.experts[pieces.work[i]]
                    self._ye = torch.zeros(work.stop - work.start, y.shape[1], dtype=y.dtype, device=y.device)
                if rows is None:
                    self._ye.add_(y)
                else:
                    self._ye.index_add_(0, torch.from_numpy(rows).to(y.device), y)
            if pieces.last_of_expert[i]:
                self._add_expert(pieces.work[i], self._ye)
                self._ye = None
            self._next += 1

    def _add_expert(self, wi: int, ye: torch.Tensor) -> None:
        work = self.plan.experts[wi]
        if work.all_tokens:
            self.out = ye if self.out is None else self.out.add_(ye)
            return
        if self.out is None:
            self.out = torch.zeros(self.x.shape[0], ye.shape[1], dtype=ye.dtype, device=ye.device)
        self.out.index_add_(0, self.tokens[work.start : work.stop], ye)

    def result(self) -> torch.Tensor:
        assert self.out is not None and self._next == len(self.outputs), "a needed piece was not computed"
        return self.out.to(self.x.dtype)


class _KernelRun:
    """The compute of one layer step with prism's CUDA kernels: the routed pairs whose pieces are in the
    group are mapped to their slots (the others to the sentinel), one fused call over the slot pool."""

    def __init__(self, ctl: OffloadController, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 groups: list[int]) -> None:
        self.ctl, self.x, self.weights, self.groups = ctl, x, weights, groups
        self.indices = indices.clamp(max=ctl.groups)  # the executor's sentinel is G: it maps to the pool's
        self.out: torch.Tensor | None = None

    def compute(self, group: list[int], slots: list[int]) -> None:
        ctl = self.ctl
        lut = torch.full((ctl.groups + 1,), ctl.capacity, dtype=torch.long)
        lut[[self.groups[i] for i in group]] = torch.tensor(slots, dtype=torch.long)
        slot_idx = lut.to(self.x.device, non_blocking=True)[self.indices]
        y = ctl._kernels.experts_forward(self.x, *ctl.pool.tensors, slot_idx, self.weights)
        self.out = y if self.out is None else self.out.add_(y)

    def result(self) -> torch.Tensor:
        assert self.out is not None
        return self.out


@EXECUTORS.register("offload")
def offload_experts_forward(module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    layer: OffloadedLayer = module.prism_offload
    return layer.controller.forward_layer(layer, x, indices, weights)


# ---- attaching ------------------------------------------------------------------------------------
def attach_offload(model: Any, config: OffloadConfig, default_device: str | None = None) -> OffloadController:
    """Offload ``model``'s routed experts (see the module docstring); returns the controller, also
    kept as ``model.prism_offload``. The model must run prism's experts implementation (``load_elastic``
    does this; for a plain model ``load_model(..., experts_implementation="prism")``). Place the model
    with ``attach_offload`` (``config.device``, else ``default_device``: where the caller would have
    loaded it), not with ``model.to()`` afterwards."""
    from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION

    if config.device is None and default_device is not None:
        config = copy.copy(config)
        config.device = default_device
    if getattr(model.config, "_experts_implementation", None) != EXPERTS_IMPLEMENTATION:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    controller = OffloadController(model, config)
    model.prism_offload = controller
    return controller


def detach_offload(model: Any, keep_placement: bool = False) -> None:
    """Run ``model``'s experts from their own weights again (on a simulated device nothing moved).

    On CUDA the experts stay in host memory and the rest on the device: only ``keep_placement=True``
    (free this cache's slots before attaching another configuration) is allowed there.
    """
    controller: OffloadController | None = getattr(model, "prism_offload", None)
    if controller is None:
        return
    if controller.device.type == "cuda" and not keep_placement:
        raise PrismError("an offloaded CUDA model cannot be detached in place: load it again")
    for layer in controller.layers:
        del layer.module.prism_offload
        layer.module._prism_executor = None
    del model.prism_offload


def pinned_keys(layers: int, groups: int, n_sub: int, count: int) -> list[int]:
    """The ``count`` pieces with the most activation mass: sub-expert 0 of every expert of every layer,
    then sub-expert 1, ... (the partition numbers an expert's sub-experts by mass). For whole experts
    (``n_sub`` = 1) this is every expert in layer order: a static pin with no ranking at all."""
    keys = [layer * groups + e * n_sub + n for n in range(n_sub) for layer in range(layers) for e in range(groups // n_sub)]
    return keys[:count]


@dataclass
class BudgetSizes:
    """What a budget leaves for the cache of one model: the bytes of its parts (``budget_sizes``)."""

    groups: int  # pieces per MoE layer
    piece_shapes: list[torch.Size]
    piece_bytes: int
    expert_bytes: int
    non_expert_bytes: int
    expert_ids: set[int]
    budget_bytes: int
    piece_name: str  # "sub-expert" or "expert"
    reserve: Reserve  # the reserve's rule (a share of the budget, or a size)
    pieces: int  # pieces of every MoE layer: what a cache holding them all needs no more slots than

    @property
    def slots(self) -> int:
        """Pieces the cache holds: as many as its bytes take, never more than there are."""
        return int(min(self.cache_bytes // self.piece_bytes, self.pieces))

    @property
    def reserve_bytes(self) -> int:
        return self.reserve.of(self.budget_bytes)

    @property
    def cache_bytes(self) -> int:
        return self.budget_bytes - self.non_expert_bytes - self.reserve_bytes

    @property
    def least_budget(self) -> int:
        """The smallest budget that runs: the non-expert weights, one cached piece and the reserve of *that*
        budget (a share of the budget shrinks with it: not the reserve of the budget that was asked for)."""
        return _budget_leaving(self.non_expert_bytes + self.piece_bytes, self.reserve)

    def check(self, config: OffloadConfig) -> None:
        """A budget that cannot hold one piece, or that is more than the device has, is an error."""
        if self.cache_bytes < self.piece_bytes:
            raise PrismError(
                f"device memory (--device-memory) {config.budget.label(self.budget_bytes)} is too small: the non-expert "
                f"weights take {format_size(self.non_expert_bytes)}, the reserve {format_size(self.reserve_bytes)} and "
                f"one cached {self.piece_name} {format_size(self.piece_bytes)}; give at least {format_size_up(self.least_budget)}")
        from prism_cli.models.loading import parse_device

        _check_device_memory(parse_device(config.device or "cpu"), self.budget_bytes, config)


def budget_sizes(model: Any, config: OffloadConfig) -> BudgetSizes:
    """The sizes of offloading ``model`` under ``config``, computed without moving anything (so that a
    benchmark can check its budgets before its quality stage: ``BudgetSizes.check``)."""
    from prism_cli.runtime.elastic import attach_elastic_state

    state = getattr(model, "prism_state", None) or attach_elastic_state(model, None)
    layers = state.layers
    first = layers[0].experts
    for layer in layers:
        _check_layout(layer.experts, first)
    piece_shapes = [first.gate_up_proj.shape[1:], first.down_proj.shape[1:]]
    piece_bytes = sum(math.prod(s) for s in piece_shapes) * first.gate_up_proj.dtype.itemsize
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
    expert_bytes = sum(p.numel() * p.element_size() for layer in layers for p in layer.experts.parameters())
    non_expert = _non_expert_bytes(model, expert_ids)
    return BudgetSizes(int(first.gate_up_proj.shape[0]), piece_shapes, piece_bytes, expert_bytes, non_expert, expert_ids,
                       _resolve_budget(config, non_expert, expert_bytes), "sub-expert" if state.n_sub > 1 else "expert",
                       config.reserve_spec, len(layers) * int(first.gate_up_proj.shape[0]))


def _check_layout(experts: torch.nn.Module, first: torch.nn.Module) -> None:
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) \
            or not getattr(experts, "is_concatenated", True):
        raise PrismError("offloading supports the standard fused expert layout (gate/up concatenated, not transposed, no biases)")
    if experts.gate_up_proj.shape != first.gate_up_proj.shape:
        raise PrismError("offloading needs MoE layers of one expert shape; this model's layers differ")


def _non_expert_bytes(model: Any, expert_ids: set[int]) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in expert_ids or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def absolute_budget(model: Any, budget: Budget, reserve: str = "5%", *others: Any) -> Budget:
    """``budget`` in bytes, so that models compared "at the same budget" get the same bytes. A relative
    budget depends on a model's sizes: it is resolved for ``model`` and each of ``others`` and the largest
    total is kept, so that every model caches at least the asked share of its experts (``100%``: all of
    them), exactly that share for the one with the most non-expert weights (an export's wider routers)."""
    if budget.nbytes is not None:
        return budget
    nbytes = max(budget_sizes(m, OffloadConfig(budget, reserve=reserve)).budget_bytes for m in (model, *others))
    return Budget(f"{budget.text} ({format_size(nbytes)})", nbytes=nbytes)


def _resolve_budget(config: OffloadConfig, non_expert: int, experts: int) -> int:
    """The budget in bytes; a relative budget is solved for the total it implies."""
    budget = config.budget
    if budget.nbytes is not None:
        return budget.nbytes
    return _budget_leaving(non_expert + int(math.ceil(budget.expert_fraction * experts)), config.reserve_spec)


def _budget_leaving(wanted: int, reserve: Reserve) -> int:
    """The smallest budget whose own reserve leaves ``wanted`` bytes (``total - reserve.of(total)`` never
    decreases as the total grows, so the first total that leaves them is the least)."""
    if reserve.nbytes is not None:
        return wanted + reserve.nbytes
    total = int(math.ceil(wanted / (1 - (reserve.fraction or 0.0))))
    while total - reserve.of(total) < wanted:  # the reserve is rounded up: never at the experts' expense
        total += 1
    while total > 0 and total - 1 - reserve.of(total - 1) >= wanted:  # nor a byte more (floating point)
        total -= 1
    return total


def _check_device_memory(device: torch.device, budget: int, config: OffloadConfig) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        where = f"{torch.cuda.get_device_name(device)} ({device})"
    else:
        total = psutil.virtual_memory().total
        where = "this machine's memory (the simulated device lives in host memory)"
    if budget > total:
        raise PrismError(f"device memory (--device-memory) {config.budget.label(budget)} is more than {where}: "
                         f"{format_size(total)}")


def _place(model: Any, expert_ids: set[int], device: torch.device) -> None:
    """Non-expert weights and buffers to ``device``; expert weights stay in host memory, pinned for CUDA."""
    if device.type != "cuda":
        return
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in expert_ids:
            if t.device.type != "cpu":
                t.data = t.data.cpu()
            if not t.data.is_pinned():  # in the stock layout (the CPU runtime may have re-laid it out): each
                t.data = t.data.contiguous().pin_memory()  # piece is then one contiguous host-to-device copy
        elif t.device != device:
            t.data = t.data.to(device)
