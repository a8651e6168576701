"""Executing a routed batch with grouped matrix products: a fixed number of calls, whatever the experts.

The plan executor (:mod:`prism_cli.runtime.grouped`) issues a gather, two matmuls and a scatter per
active expert; for a decode step of a few dozen tokens spread over every expert those per-call costs,
not the arithmetic, set the step time. ``torch.nn.functional.grouped_mm`` runs one product per group
of rows (rows sorted by group, ``offs`` = cumulative group sizes) in a single call, as transformers'
own ``grouped_mm`` implementation does for whole experts. Two shapes of routing are served here:

* **prefix** (``linear:K``, the original model, the threshold policy on linear points): every token
  computes the first ``m`` sub-experts of each expert it visits. Sub-expert ``n`` of expert ``e`` is
  flat expert ``e*N + n`` and the flat experts of one expert are adjacent, so the first ``m`` of them
  are one contiguous block: ``gate_up_proj [E*N, 2w, H]`` viewed as ``[E, N*2w, H]`` and sliced to
  ``[:, :m*2w]`` is exactly the weights of those ``m`` sub-experts, per expert. Rows are grouped by
  their ``m`` (at most N distinct values, one for ``linear:N*j``), and each group is one grouped
  product per projection over the E experts, the same products the source model runs with whole
  experts when ``m = N``. The activation is applied per sub-expert (``_apply_gate`` on each ``2w``
  slice), then scaled by the sub-expert's routing weight before the down projection.
* **flat** (the training-free gate's arbitrary subsets): rows are (token, sub-expert) pairs grouped by
  flat sub-expert, one grouped product per projection over the E*N sub-experts (``flat-mm``); on the
  CPU, past ``max_pairs`` pairs, one plain product per sub-expert over its own gathered rows
  (``flat-loop``), which keeps each product's rows in cache where one call over every pair does not.

Where each path stops paying depends on the machine: ``runtime/bounds.py`` holds the size bounds,
measured per machine by ``make bench-executors``.

Only the standard layouts are taken (not transposed, no biases); anything else stays with the plan
executor, and so do calls where grouped products do not pay (``choose_path``). Outputs are reduced per
token with ``index_add_`` in a fixed order (serial on the CPU), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prism_cli.runtime.bounds import current_bounds
from prism_cli.runtime.grouped import _down_transposed, grouped_experts_forward

#: What ``grouped_mm`` computes in (float64 models, e.g. reference checks, stay with the plan executor).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm() -> Callable[..., torch.Tensor] | None:
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def takes(module: torch.nn.Module) -> bool:
    """Whether ``module``'s layout is one this executor computes (else the plan executor must)."""
    return (
        _grouped_mm() is not None
        and module.gate_up_proj.dtype in GROUPED_MM_DTYPES
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_bias", False)
    )


@dataclass(frozen=True)
class PrefixRouting:
    """Routing where every token's slots are blocks: block ``j`` is sub-experts ``0 .. lengths[j]-1`` of
    expert ``expert[:, j]`` (in that order, in slots ``sum(lengths[:j]) ..``), the same lengths in every token."""

    expert: torch.Tensor  # [T, B]
    lengths: tuple[int, ...]


#: The attribute under which a router hands the experts the block lengths of its routing, known by
#: construction, on the indices they describe (``LinearGateRouter``). Indices without it are checked.
PREFIX_ATTR = "prism_prefix"


def choose_path(indices: torch.Tensor, n_sub: int, groups: int) -> tuple[str, PrefixRouting | None]:
    """The path the runtime takes for a call routed as ``indices [T, P]``, with its prefix routing if it
    has one, under this machine's bounds (``current_bounds()``): ``"grouped"`` (the plan executor) for
    fewer than ``min_tokens`` tokens. Prefix routing takes ``"prefix-mm"``, on the CPU up to
    ``max_prefix_rows`` rows of its products, the plan executor beyond; arbitrary subsets take
    ``"flat-mm"``, or ``"flat-loop"`` past ``max_pairs`` pairs on the CPU."""
    bounds = current_bounds()
    tokens = indices.shape[0]
    if tokens < bounds.min_tokens:
        return "grouped", None
    cpu = indices.device.type == "cpu"
    found = prefix_routing(indices, n_sub, groups)
    if found is not None:
        return ("grouped" if cpu and tokens * len(found.lengths) > bounds.max_prefix_rows else "prefix-mm"), found
    return ("flat-loop" if cpu and indices.numel() > bounds.max_pairs else "flat-mm"), None


def grouped_mm_forward(
    module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n_sub: int,
    path: str | None = None,
) -> tuple[torch.Tensor, str]:
    """``out[t] = sum_p weights[t, p] * SubExpert_{indices[t, p]}(x[t])`` and which path ran;
    ``indices == E*N`` marks an unused slot. ``path=None`` takes the runtime's (``choose_path``);
    ``"mm"`` forces grouped products (``prefix-mm`` or ``flat-mm``), ``"flat-loop"`` the per-sub-expert
    loop, which takes any routing (benchmarks and tests)."""
    groups = module.gate_up_proj.shape[0]
    found = None
    if path is None:
        path, found = choose_path(indices, n_sub, groups)
        if path == "grouped":
            return grouped_experts_forward(module, x, indices, weights, n_sub), path
    elif path == "mm":
        found = prefix_routing(indices, n_sub, groups)
        path = "prefix-mm" if found is not None else "flat-mm"
    out = torch.zeros(indices.shape[0], module.down_proj.shape[1], dtype=torch.float32, device=x.device)
    if path == "prefix-mm":
        _prefix_blocks(module, x, out, found, weights.float(), n_sub)
    elif path == "flat-mm":
        _flat_pairs(module, x, out, indices, weights.float())
    else:
        _flat_loop(module, x, out, indices, weights.float())
    return out.to(x.dtype), path


def prefix_routing(indices: torch.Tensor, n_sub: int, groups: int) -> PrefixRouting | None:
    """The prefix shape of ``indices`` (see ``PrefixRouting``): from the block lengths its router attached
    (``PREFIX_ATTR``), else checked here in a few elementwise operations; None when the routing is not of
    that shape (arbitrary subsets, unused slots, another order, per-token different ranges).

    The linear gate's router emits this shape (``K // N`` whole experts, best first, then the first
    ``K % N`` sub-experts of the next)."""
    lengths: tuple[int, ...] | None = getattr(indices, PREFIX_ATTR, None)
    if lengths is not None:
        starts = [sum(lengths[:j]) for j in range(len(lengths))]
        return PrefixRouting(torch.div(indices[:, starts], n_sub, rounding_mode="floor"), lengths)
    if int(indices.max()) >= groups:
        return None
    expert = torch.div(indices, n_sub, rounding_mode="floor")
    sub = indices - expert * n_sub
    first_sub, first_expert = sub[0].tolist(), expert[0].tolist()
    start_of_slot: list[int] = []  # the first slot of each slot's block
    for c, (n, e) in enumerate(zip(first_sub, first_expert, strict=True)):
        if n != 0 and (c == 0 or first_expert[c - 1] != e or first_sub[c - 1] != n - 1):
            return None
        start_of_slot.append(c if n == 0 else start_of_slot[-1])
    if indices.shape[0] > 1:
        starts_t = torch.tensor(start_of_slot, device=indices.device)
        if not bool((sub == sub[:1]).all()) or not bool((expert == expert[:, starts_t]).all()):
            return None
    starts = sorted(set(start_of_slot))
    lengths = tuple(b - a for a, b in zip(starts, [*starts[1:], indices.shape[1]], strict=True))
    return PrefixRouting(expert[:, starts], lengths)


def _prefix_blocks(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, routing: PrefixRouting,
                   weights: torch.Tensor, n_sub: int) -> None:
    """Blocks of equal length ``m`` are one grouped product per projection over the experts' first
    ``m`` sub-experts (a strided view of the weights, no copy)."""
    gate_up = module.gate_up_proj
    groups, two_w, hidden = gate_up.shape
    experts, width, tokens = groups // n_sub, two_w // 2, routing.expert.shape[0]
    up_all = gate_up.view(experts, n_sub * two_w, hidden)
    down_all = _down_transposed(module).view(experts, n_sub * width, hidden)
    slot = [sum(routing.lengths[:j]) for j in range(len(routing.lengths))]
    for m in sorted(set(routing.lengths)):
        blocks = [j for j, length in enumerate(routing.lengths) if length == m]
        if len(blocks) == 1:
            row_expert, row_w = routing.expert[:, blocks[0]], weights[:, slot[blocks[0]] : slot[blocks[0]] + m]
        else:  # row i is token i % T of block i // T
            row_expert = routing.expert[:, blocks].t().reshape(-1)
            row_w = torch.cat([weights[:, slot[j] : slot[j] + m] for j in blocks])
        order = torch.argsort(row_expert, stable=True)
        _rows_into(module, x, out, order % tokens, _offsets(row_expert, experts), up_all[:, : m * two_w],
                   down_all[:, : m * width], row_w[order])


def _flat_pairs(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, indices: torch.Tensor,
                weights: torch.Tensor) -> None:
    """Rows are (token, sub-expert) pairs, one group per flat sub-expert; unused slots are dropped."""
    groups = module.gate_up_proj.shape[0]
    flat, w = indices.reshape(-1), weights.reshape(-1)
    tok = torch.arange(indices.shape[0], device=x.device).repeat_interleave(indices.shape[1])
    valid = flat < groups
    if not bool(valid.all()):
        flat, w, tok = flat[valid], w[valid], tok[valid]
    order = torch.argsort(flat, stable=True)
    _rows_into(module, x, out, tok[order], _offsets(flat, groups), module.gate_up_proj, _down_transposed(module),
               w[order, None])


def _flat_loop(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, indices: torch.Tensor,
               weights: torch.Tensor) -> None:
    """Pairs sorted by flat sub-expert as in ``_flat_pairs``, then per sub-expert: gather its rows, one
    product per projection, add into the output."""
    gate_up, down = module.gate_up_proj, _down_transposed(module)
    groups = gate_up.shape[0]
    flat, w = indices.reshape(-1), weights.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=groups + 1)[:groups].tolist()  # the sentinel's pairs sort last
    tok = torch.div(order, indices.shape[1], rounding_mode="floor")
    w = w[order]
    start = 0
    for g, count in enumerate(counts):
        if count == 0:
            continue
        rows = tok[start : start + count]
        h = torch.nn.functional.linear(x.index_select(0, rows).to(gate_up.dtype), gate_up[g])
        act = module._apply_gate(h) * w[start : start + count, None].to(h.dtype)
        out.index_add_(0, rows, (act @ down[g]).float())
        start += count


def _rows_into(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, tok: torch.Tensor, offs: torch.Tensor,
               up: torch.Tensor, down: torch.Tensor, row_w: torch.Tensor) -> None:
    """``out[tok[i]] += sum_j row_w[i, j] * piece_j(x[tok[i]])`` for rows sorted by group: each row computes
    ``m = row_w.shape[1]`` adjacent pieces of its group, ``up [G, m*2w, H]`` and ``down [G, m*w, H]``."""
    rows, m = row_w.shape
    two_w = up.shape[1] // m
    h = _mm(x.index_select(0, tok), up.transpose(-2, -1), offs)
    act = module._apply_gate(h.view(rows * m, two_w)).view(rows, m, two_w // 2) * row_w[:, :, None]
    y = _mm(act.reshape(rows, -1), down, offs)
    out.index_add_(0, tok, y.float())


def _offsets(group_of_row: torch.Tensor, groups: int) -> torch.Tensor:
    """Cumulative row counts per group (rows sorted by group): the ``offs`` of a grouped product."""
    return torch.bincount(group_of_row, minlength=groups).cumsum(0).to(torch.int32)


def _mm(rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped product ``rows [S, in] x weight [G, in, out]`` in the weight's dtype (float32 on the CPU)."""
    fn = _grouped_mm()
    assert fn is not None  # takes() checked it
    return fn(rows.to(weight.dtype), weight, offs=offs)
