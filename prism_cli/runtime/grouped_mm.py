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
  experts when ``m = N`` (whole experts read ``down_proj`` in the source's ``[E, H, N*w]`` layout, so
  the products are the original's, not only the arithmetic). The activation is applied per sub-expert
  (``_apply_gate`` on each ``2w`` slice), then scaled by the sub-expert's routing weight before the down
  projection, or, where every block's sub-experts carry one weight (``PrefixRouting.uniform``: the linear
  gate's copies, whole experts) and the block is wider than the hidden size, the block's output after it
  (as transformers scales an expert's output): the product over the smaller of the two. Rows are put
  back in token order by an inverse permutation and each token's blocks summed, as transformers'
  ``grouped_mm`` does: a decode step pays per op, so the path runs no more ops than
  that one. Where blocks differ in length (``linear:6`` at N = 4 is a block of 4 and one of 2) a small
  call computes every block whole with zero weights on the sub-experts it does not take
  (``prefix-padded``): one grouped product per projection instead of one per length, more arithmetic
  for half the calls. The same path serves a batch whose rows run at different linear points (the
  ``mixed`` policy: ``PrefixRouting.token_k``): each token computes the blocks its own K reaches, and
  only those. A single token (``prefix-one``: a decode step of one sequence) needs no grouping at all:
  one product per projection and block over the contiguous weight slice.
* **flat** (the training-free gate's arbitrary subsets): rows are (token, sub-expert) pairs grouped by
  flat sub-expert, one grouped product per projection over the E*N sub-experts (``flat-mm``); on the
  CPU, past ``max_pairs`` pairs, one plain product per sub-expert over its own gathered rows
  (``flat-loop``), which keeps each product's rows in cache where one call over every pair does not.

Where each path stops paying depends on the machine: ``runtime/bounds.py`` holds the size bounds,
measured per machine by ``make bench-executors``.

Only the standard layouts are taken (not transposed, no biases); anything else stays with the plan
executor, and so do calls where grouped products do not pay (``choose_path``). Outputs are reduced per
token in a fixed order (a sum over a token's blocks; ``index_add_``, serial on the CPU, for the flat
paths), so results are deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prism_cli.runtime.bounds import ExecutorBounds, current_bounds
from prism_cli.runtime.grouped import _down_transposed, cached_on, grouped_experts_forward

#: What ``grouped_mm`` computes in (float64 models, e.g. reference checks, stay with the plan executor).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm() -> Callable[..., torch.Tensor] | None:
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


#: Resolved once: the lookup costs a decode step more than it should.
GROUPED_MM = _grouped_mm()


def takes(module: torch.nn.Module) -> bool:
    """Whether ``module``'s layout is one this executor computes (else the plan executor must)."""
    return (
        GROUPED_MM is not None
        and module.gate_up_proj.dtype in GROUPED_MM_DTYPES
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_bias", False)
    )


@dataclass(frozen=True)
class PrefixRouting:
    """Routing where every token's slots are blocks: block ``j`` is sub-experts ``0 .. lengths[j]-1`` of
    expert ``expert[:, j]`` (in slots ``sum(lengths[:j]) ..``, in that order, or in any order where the
    block's slots weigh the same), the same lengths in every token."""

    expert: torch.Tensor  # [T, B]: the source model's expert of each block
    lengths: tuple[int, ...]
    #: Rows at different points (``[T]``, else None): token t takes only the first ``token_k[t]`` sub-experts
    #: of its blocks (whole blocks here); its weights past them are zero and its ids there the sentinel.
    token_k: torch.Tensor | None = None
    #: Whether the slots of each block carry one routing weight (the linear gate's tied copies; blocks of one
    #: sub-expert), so that a block's output may be scaled instead of each sub-expert's activation.
    uniform: bool = False


#: The attribute under which a router hands the experts the ``PrefixRouting`` of its indices, known by
#: construction (``LinearGateRouter``). Indices without it are checked.
PREFIX_ATTR = "prism_prefix"


def choose_path(indices: torch.Tensor, n_sub: int, groups: int, width: int | None = None) -> tuple[str, PrefixRouting | None]:
    """The path the runtime takes for a call routed as ``indices [T, P]``, with its prefix routing if it
    has one, under this machine's bounds (``current_bounds()``): ``"prefix-one"`` for a single token with
    prefix routing (a decode step of one sequence), else ``"grouped"`` (the plan executor) for fewer than
    ``min_tokens`` tokens. Prefix routing takes ``"prefix-mm"``, on the CPU up to
    ``max_prefix_rows`` rows of its products, the plan executor beyond, except blocks of different
    lengths in at most ``max_padded_rows`` rows (on the CPU), which take ``"prefix-padded"``; so do rows
    at different points (``PrefixRouting.token_k``), on any device, past that bound on the CPU the flat
    paths; arbitrary subsets take
    ``"flat-mm"``, or ``"flat-loop"`` past ``max_pairs`` pairs on the CPU. ``width``: the sub-experts'
    width, whose bounds apply where this machine has them."""
    tokens = indices.shape[0]
    attached: PrefixRouting | None = getattr(indices, PREFIX_ATTR, None)
    if attached is not None and attached.token_k is not None:
        return _ragged_path(indices, attached, width)
    if tokens == 1:
        found = attached if attached is not None or n_sub > 1 else prefix_routing(indices, 1, groups)
        return ("prefix-one", found) if found is not None else ("grouped", None)
    bounds = current_bounds(width)
    if tokens < bounds.min_tokens:
        return "grouped", None
    cpu = indices.device.type == "cpu"
    found = prefix_routing(indices, n_sub, groups)
    if found is not None:
        rows = tokens * len(found.lengths)
        if cpu and len(set(found.lengths)) > 1 and rows <= bounds.max_padded_rows:
            return "prefix-padded", found
        return ("grouped" if cpu and rows > bounds.max_prefix_rows else "prefix-mm"), found
    return _flat_path(indices, bounds)


def _flat_path(indices: torch.Tensor, bounds: ExecutorBounds) -> tuple[str, None]:
    cpu = indices.device.type == "cpu"
    return ("flat-loop" if cpu and indices.numel() > bounds.max_pairs else "flat-mm"), None


def _ragged_path(indices: torch.Tensor, routing: PrefixRouting, width: int | None) -> tuple[str, PrefixRouting | None]:
    """Rows at different points: whole blocks padded (``prefix-padded``), on the CPU up to ``max_padded_rows``
    rows; beyond, the ids with their sentinels as arbitrary subsets (the flat paths)."""
    bounds = current_bounds(width)
    if indices.device.type != "cpu" or indices.shape[0] * len(routing.lengths) <= bounds.max_padded_rows:
        return "prefix-padded", routing
    return _flat_path(indices, bounds)


def grouped_mm_forward(
    module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n_sub: int,
    path: str | None = None,
) -> tuple[torch.Tensor, str]:
    """``out[t] = sum_p weights[t, p] * SubExpert_{indices[t, p]}(x[t])`` and which path ran;
    ``indices == E*N`` marks an unused slot. ``path=None`` takes the runtime's (``choose_path``);
    ``"mm"`` forces grouped products (``prefix-mm`` or ``flat-mm``), ``"flat-loop"`` the per-sub-expert
    loop, which takes any routing, ``"prefix-one"`` the single-token path (benchmarks and tests)."""
    groups = module.gate_up_proj.shape[0]
    found = None
    if path is None:
        path, found = choose_path(indices, n_sub, groups, module.gate_up_proj.shape[1] // 2)
        if path == "grouped":
            blocks = None if found is None else (found.expert, found.lengths)
            return grouped_experts_forward(module, x, indices, weights, n_sub, blocks), path
    elif path == "mm":
        found = prefix_routing(indices, n_sub, groups)
        path = "prefix-mm" if found is not None else "flat-mm"
    elif path == "prefix-padded":
        found = getattr(indices, PREFIX_ATTR, None) or prefix_routing(indices, n_sub, groups)
        if found is None:
            raise ValueError("prefix-padded takes prefix routing")
    elif path == "prefix-one":
        found = prefix_routing(indices, n_sub, groups)
        if found is None or indices.shape[0] != 1:
            raise ValueError("prefix-one takes one token with prefix routing")
    if path == "prefix-mm":
        return _prefix_blocks(module, x, found, weights.float(), n_sub).to(x.dtype), path
    if path == "prefix-padded":
        return _padded_blocks(module, x, found, weights.float(), n_sub).to(x.dtype), path
    if path == "prefix-one":
        return _prefix_one(module, x, found, weights.float(), n_sub).to(x.dtype), path
    out = torch.zeros(indices.shape[0], module.down_proj.shape[1], dtype=torch.float32, device=x.device)
    if path == "flat-mm":
        _flat_pairs(module, x, out, indices, weights.float())
    else:
        _flat_loop(module, x, out, indices, weights.float())
    return out.to(x.dtype), path


def prefix_routing(indices: torch.Tensor, n_sub: int, groups: int) -> PrefixRouting | None:
    """The prefix shape of ``indices`` (see ``PrefixRouting``): as its router attached it (``PREFIX_ATTR``),
    else checked here in a few elementwise operations; None when the routing is not of
    that shape (arbitrary subsets, unused slots, another order, per-token different ranges).

    The linear gate's router emits this shape (``K // N`` whole experts, best first, then the first
    ``K % N`` sub-experts of the next)."""
    attached: PrefixRouting | None = getattr(indices, PREFIX_ATTR, None)
    if attached is not None and attached.token_k is None:
        return attached
    if int(indices.max()) >= groups:
        return None
    if n_sub == 1:  # whole experts (a plain model): every slot is a block of its own, in any order
        return PrefixRouting(indices, (1,) * indices.shape[1], uniform=True)
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


def _prefix_blocks(module: torch.nn.Module, x: torch.Tensor, routing: PrefixRouting, weights: torch.Tensor,
                   n_sub: int) -> torch.Tensor:
    """Blocks of equal length ``m`` are one grouped product per projection over the experts' first
    ``m`` sub-experts (a strided view of the weights, no copy); the result is ``[T, H]`` in float32."""
    lengths = routing.lengths
    slot = [sum(lengths[:j]) for j in range(len(lengths))]
    out: torch.Tensor | None = None
    for m in sorted(set(lengths)):
        blocks = [j for j, length in enumerate(lengths) if length == m]
        if len(blocks) == len(lengths):  # linear:N*k and the original: every block whole, no regrouping
            expert, block_w = routing.expert, weights
        else:
            expert = routing.expert[:, blocks]
            block_w = torch.cat([weights[:, slot[j] : slot[j] + m] for j in blocks], dim=1)
        y = _blocks_of_length(module, x, expert, block_w, *_prefix_weights(module, n_sub, m), uniform=routing.uniform)
        out = y if out is None else out.add_(y)
    assert out is not None
    return out


def _padded_blocks(module: torch.nn.Module, x: torch.Tensor, routing: PrefixRouting, weights: torch.Tensor,
                   n_sub: int) -> torch.Tensor:
    """Every block computed whole, the sub-experts a token does not take at weight zero: one grouped product
    per projection over whole experts (``_blocks_of_length`` at ``m = N``). Rows at different points
    (``routing.token_k``) compute only the blocks their own K reaches: those rows are gathered, and the
    others' results are zero."""
    tokens, blocks = routing.expert.shape
    if routing.token_k is None:
        slot, parts = 0, []
        for m in routing.lengths:
            parts.append(weights[:, slot : slot + m])
            if m < n_sub:
                parts.append(weights.new_zeros(tokens, n_sub - m))
            slot += m
        return _blocks_of_length(module, x, routing.expert, torch.cat(parts, dim=1), *_prefix_weights(module, n_sub, n_sub))
    up_t, down = _prefix_weights(module, n_sub, n_sub)
    starts = torch.arange(0, blocks * n_sub, n_sub, device=x.device)
    rows = (routing.token_k.unsqueeze(1) > starts).view(-1).nonzero().squeeze(1)  # (token, block) in use
    by_expert, order = torch.sort(routing.expert.reshape(-1).index_select(0, rows), stable=True)
    rows = rows.index_select(0, order)
    offs = torch.searchsorted(by_expert, group_ends(up_t.shape[0], x.device), out_int32=True)
    h = GROUPED_MM(x.index_select(0, torch.div(rows, blocks, rounding_mode="floor")).to(up_t.dtype), up_t, offs=offs)
    count = rows.shape[0]
    act = module._apply_gate(h.view(count * n_sub, -1)).view(count, n_sub, -1)
    act = act * weights.reshape(-1, n_sub).index_select(0, rows).unsqueeze(-1)
    y = GROUPED_MM(act.view(count, -1).to(down.dtype), down, offs=offs)
    # Each used row to its own place (indices unique: deterministic on any device), then a fixed-order sum.
    out = y.new_zeros(tokens * blocks, y.shape[1]).index_copy_(0, rows, y)
    return out.view(tokens, blocks, -1).sum(dim=1).float()


def _prefix_weights(module: torch.nn.Module, n_sub: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped products' weights for blocks of ``m`` sub-experts: ``[E, H, m*2w]`` (the up projection,
    transposed) and ``[E, m*w, H]``, views kept while the module's weights are unchanged (a decode step
    pays for every view it makes). Whole experts (``m = N``) read the down projection in the source
    model's layout, so ``linear:N*k`` runs exactly the products the original runs at top-k (on the CPU,
    BLAS is up to 1.9x faster on that layout for a few rows per expert, and slower on it for a part of
    an expert); partial blocks read ``[E*N, w, H]`` (``_down_transposed``)."""
    gate_up, down = module.gate_up_proj, module.down_proj
    by_length = cached_on(module, "_prism_prefix_weights",
                          (gate_up.data_ptr(), gate_up._version, down.data_ptr(), down._version, n_sub), dict)
    views = by_length.get(m)
    if views is None:
        groups, two_w, hidden = gate_up.shape
        experts, width = groups // n_sub, two_w // 2
        up = gate_up.view(experts, n_sub * two_w, hidden)[:, : m * two_w].transpose(-2, -1)
        if m == n_sub:
            down_m = _down_by_expert(module, n_sub).transpose(-2, -1)
        else:
            down_m = _down_transposed(module).view(experts, n_sub * width, hidden)[:, : m * width]
        views = by_length[m] = (up, down_m)
    return views


def _down_by_expert(module: torch.nn.Module, n_sub: int) -> torch.Tensor:
    """``down_proj`` in the source model's layout ``[E, H, N*w]`` (itself for a plain model; for an export,
    a copy built on first use from ``[E*N, w, H]``, whose expert ``e`` is the transposed ``[N*w, H]``
    matrix: 1/3 more expert memory on the device that runs this path)."""
    if n_sub == 1:
        return module.down_proj
    by_piece = _down_transposed(module)
    groups, width, hidden = by_piece.shape
    return cached_on(module, "_prism_down_e", (by_piece.data_ptr(), by_piece._version, n_sub), lambda: by_piece.view(
        groups // n_sub, n_sub * width, hidden).transpose(1, 2).contiguous())


def _prefix_one(module: torch.nn.Module, x: torch.Tensor, routing: PrefixRouting, weights: torch.Tensor,
                n_sub: int) -> torch.Tensor:
    """One token: per block, one product per projection over its expert's first ``m`` sub-experts (contiguous
    weight slices), and nothing else: no grouping, sorting or plan, which cost more than the products here."""
    views = {m: _prefix_weights(module, n_sub, m) for m in set(routing.lengths)}
    xw = x.to(module.gate_up_proj.dtype)
    out: torch.Tensor | None = None
    slot = 0
    for expert, m in zip(routing.expert[0].tolist(), routing.lengths, strict=True):
        up_t, down = (w[expert] for w in views[m])  # [H, m*2w], [m*w, H]
        h = xw @ up_t
        act = (module._apply_gate(h.view(m, -1)) * weights[0, slot : slot + m, None]).to(down.dtype)
        y = act.view(1, -1) @ down
        out = y if out is None else out.add_(y)
        slot += m
    assert out is not None
    return out.float()


def _blocks_of_length(module: torch.nn.Module, x: torch.Tensor, expert: torch.Tensor, block_w: torch.Tensor,
                      up_t: torch.Tensor, down: torch.Tensor, uniform: bool = False) -> torch.Tensor:
    """``sum_j sum_i block_w[t, j*m + i] * piece_i(expert[t, j])(x[t])`` for blocks of ``m`` pieces: rows are
    (token, block) pairs sorted by expert (as transformers' ``grouped_mm`` sorts (token, expert) pairs), two
    grouped products, then the rows are put back in token order and each token's blocks summed in a
    fixed order (deterministic, and fewer calls than an ``index_add_`` into a zeroed output). ``uniform``:
    a block's pieces carry one weight, which then scales the block's output where that is the smaller
    product (``m*w`` wider than the hidden size)."""
    tokens, blocks = expert.shape
    rows = tokens * blocks
    m = block_w.shape[1] // blocks
    after = uniform and down.shape[1] > down.shape[2]
    by_expert, order = torch.sort(expert.reshape(-1), stable=True)
    offs = torch.searchsorted(by_expert, group_ends(up_t.shape[0], by_expert.device), out_int32=True)
    h = GROUPED_MM(x.index_select(0, order // blocks if blocks > 1 else order).to(up_t.dtype), up_t, offs=offs)
    act = module._apply_gate(h.view(rows * m, -1)).view(rows, m, -1)
    if not after:
        act = act * block_w.reshape(rows, m).index_select(0, order).unsqueeze(-1)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(rows, device=order.device))  # order's inverse
    y = GROUPED_MM(act.view(rows, -1).to(down.dtype), down, offs=offs).index_select(0, back).view(tokens, blocks, -1)
    if after:
        y = y.float().mul_(block_w[:, ::m].unsqueeze(-1))
    return (y.sum(dim=1) if blocks > 1 else y.view(tokens, -1)).float()


@functools.cache
def group_ends(groups: int, device: torch.device) -> torch.Tensor:
    """``1 .. groups``: where each group's rows end in rows sorted by group is ``searchsorted`` of these."""
    return torch.arange(1, groups + 1, device=device)


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
    assert GROUPED_MM is not None  # takes() checked it
    return GROUPED_MM(rows.to(weight.dtype), weight, offs=offs)

