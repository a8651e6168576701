"""Grouping a routed batch for execution: tokens once per expert, sub-experts in contiguous runs.

In the flat layout the N sub-experts of expert ``e`` are adjacent (ids ``e*N .. e*N+N-1``), so the
pieces of one expert that a token computes are a subset of one contiguous block of weights. The
planner turns the router's ``(indices [T, P], weights [T, P])`` into work per expert:

* **rows**: the tokens routed to the expert with at least one sub-expert, each once, with the set of
  sub-experts it computes (a bitmask) and a routing weight per sub-expert;
* **blocks**: rectangles (rows ``a:b`` x sub-experts ``n0:n1``) in which every row computes every
  sub-expert. Rows are ordered so that such rectangles are large: when all rows of an expert take the
  same subset (the original model, ``linear:N*k``, most decode steps) the whole expert is one
  rectangle per run of its subset, i.e. one matmul over a contiguous weight slice, exactly the work
  the original model does; ``linear:K`` takes a prefix of each expert's sub-experts, so ordering rows
  by prefix length makes every sub-expert's rows a prefix of the expert's rows;
* **scattered**: where a sub-expert's rows are not contiguous even after ordering (the training-free
  gate's arbitrary subsets), the rows are listed and gathered.

Sub-experts of one rectangle that have the same rows are merged into one wide matmul; nothing is
computed that the routing did not ask for. Planning is numpy on the host (a few dozen small array
operations per layer, whatever the batch); the execution in :mod:`prism_cli.runtime.cpu` is torch.
Unused slots (id ``G = E*N``, the threshold policy's sentinel) are dropped here. A sub-expert listed
twice for one token gets the sum of its weights, as in the per-slot definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch


@dataclass
class ExpertWork:
    """The work of one expert: ``rows`` of the plan (a slice), its rectangles and scattered pieces."""

    expert: int
    start: int  # first row of the plan that belongs to this expert
    stop: int
    all_tokens: bool = False  # the rows are exactly tokens 0..T-1 in order
    #: (a, b, n0, n1): rows start+a .. start+b compute sub-experts n0 .. n1-1 (all of them).
    blocks: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: (n, rows): sub-expert n for rows at these offsets (relative to start), not contiguous.
    scattered: list[tuple[int, np.ndarray]] = field(default_factory=list)


@dataclass
class ExpertPlan:
    """A routed batch grouped per expert (see the module docstring)."""

    tokens: np.ndarray  # [R] token of each row
    masks: np.ndarray  # [R] bitmask of the sub-experts each row computes
    weights: np.ndarray  # [R, N] float32 routing weight per row and sub-expert (0 where not computed)
    experts: list[ExpertWork]
    n_sub: int
    num_tokens: int

    @property
    def pieces(self) -> int:
        """Sub-expert computations (row x sub-expert) in the plan: the work actually done."""
        return int(np.bitwise_count(self.masks).sum())


@lru_cache(maxsize=16)
def _row_order_key(n_sub: int) -> np.ndarray:
    """Sort key of a mask so that rows sharing low sub-experts come first, longest prefix first.

    Reversing the bits makes sub-expert 0 the most significant; descending order then puts every
    prefix mask (1, 11, 111, ...) in nested order: each sub-expert's rows of a prefix-only expert form
    one run starting at row 0.
    """
    masks = np.arange(1 << n_sub)
    reversed_bits = np.zeros_like(masks)
    for n in range(n_sub):
        reversed_bits |= ((masks >> n) & 1) << (n_sub - 1 - n)
    return ((1 << n_sub) - 1 - reversed_bits).astype(np.int64)


@lru_cache(maxsize=4096)
def _runs(mask: int, n_sub: int) -> tuple[tuple[int, int], ...]:
    """Maximal runs of consecutive set bits: 0b1101 -> ((0, 1), (2, 4))."""
    runs, n = [], 0
    while n < n_sub:
        if mask >> n & 1:
            start = n
            while n < n_sub and mask >> n & 1:
                n += 1
            runs.append((start, n))
        else:
            n += 1
    return tuple(runs)


#: Up to this many (token, slot) pairs the rows are built in plain Python: for a decode step, a few
#: list operations cost less than the fixed overhead of a dozen numpy calls.
SMALL_BATCH_PAIRS = 64


def plan_experts(indices: torch.Tensor, weights: torch.Tensor, n_sub: int, num_groups: int,
                 blocks: tuple[torch.Tensor, tuple[int, ...]] | None = None) -> ExpertPlan:
    """Group ``indices [T, P]`` (sub-expert ids, ``num_groups`` = sentinel) and ``weights [T, P]`` per expert.

    ``blocks``: the routing's prefix shape where the router knows it (``expert [T, B]``, ``lengths``: token
    t's slots are block j = the first ``lengths[j]`` sub-experts of ``expert[t, j]``, in that order). The
    rows then come from the B blocks per token rather than from every slot: the same plan, for a
    fraction of the host-side work (at N = 8 a whole expert is 8 slots)."""
    if indices.dim() == 1:
        indices, weights = indices.unsqueeze(1), weights.unsqueeze(1)
    if indices.numel() <= SMALL_BATCH_PAIRS:
        return _plan_small(indices, weights, n_sub, num_groups)
    tokens = indices.shape[0]
    rows = _rows_large(indices, weights, n_sub, num_groups) if blocks is None else _rows_of_blocks(*blocks, weights, n_sub)
    if rows is None:
        return ExpertPlan(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_sub), np.float32), [], n_sub, tokens)
    row_tok, row_expert, masks, row_w = rows
    bounds = np.flatnonzero(row_expert[1:] != row_expert[:-1]) + 1
    e_start = [0, *bounds.tolist()]
    e_stop = [*bounds.tolist(), row_tok.size]
    uniform = [bool((masks[a:b] == masks[a]).all()) for a, b in zip(e_start, e_stop, strict=True)]
    if not all(uniform):
        key = _row_order_key(n_sub)[masks] + row_expert.astype(np.int64) * (1 << n_sub)
        perm = np.argsort(key, kind="stable")
        row_tok, masks, row_w = row_tok[perm], masks[perm], row_w[perm]
    experts = []
    for a, b, same in zip(e_start, e_stop, uniform, strict=True):
        experts.append(_expert_work(int(row_expert[a]), a, b, masks[a:b], same, tokens, n_sub))
    return ExpertPlan(row_tok, masks, row_w, experts, n_sub, tokens)


def _expert_work(expert: int, start: int, stop: int, masks: np.ndarray | list[int], same: bool, tokens: int,
                 n_sub: int) -> ExpertWork:
    # Rows of one expert are distinct tokens in token order (unless reordered by mask): all T of them
    # means the expert's rows are the batch itself, with no gather and no scatter.
    work = ExpertWork(expert, start, stop, all_tokens=same and stop - start == tokens)
    if same:
        work.blocks = [(0, stop - start, n0, n1) for n0, n1 in _runs(int(masks[0]), n_sub)]
    else:
        _blocks_of_mixed_expert(work, np.asarray(masks, dtype=np.int64), n_sub)
    return work


def _plan_small(indices: torch.Tensor, weights: torch.Tensor, n_sub: int, num_groups: int) -> ExpertPlan:
    """``plan_experts`` in plain Python, for a few pairs (a decode step): same plan, fewer fixed costs."""
    tokens = indices.shape[0]
    rows: dict[tuple[int, int], list] = {}
    for t, (ids, ws) in enumerate(zip(indices.tolist(), weights.float().tolist(), strict=True)):
        for g, w in zip(ids, ws, strict=True):
            if g >= num_groups:
                continue
            e, n = divmod(g, n_sub)
            row = rows.get((e, t))
            if row is None:
                row = rows[(e, t)] = [0, [0.0] * n_sub]
            row[0] |= 1 << n
            row[1][n] += w  # a sub-expert listed twice for one token: its weights add up
    keys = sorted(rows)
    order_key = _row_order_key(n_sub)
    row_tok: list[int] = []
    row_masks: list[int] = []
    row_w: list[list[float]] = []
    experts: list[ExpertWork] = []
    i = 0
    while i < len(keys):
        expert, j = keys[i][0], i
        while j < len(keys) and keys[j][0] == expert:
            j += 1
        group = keys[i:j]
        same = all(rows[k][0] == rows[group[0]][0] for k in group)
        if not same:
            group = sorted(group, key=lambda k: order_key[rows[k][0]])
        start = len(row_tok)
        row_tok += [t for _, t in group]
        row_masks += [rows[k][0] for k in group]
        row_w += [rows[k][1] for k in group]
        experts.append(_expert_work(expert, start, len(row_tok), row_masks[start:], same, tokens, n_sub))
        i = j
    return ExpertPlan(np.array(row_tok, dtype=np.int64), np.array(row_masks, dtype=np.int64),
                      np.array(row_w, dtype=np.float32).reshape(-1, n_sub), experts, n_sub, tokens)


def _rows_large(indices: torch.Tensor, weights: torch.Tensor, n_sub: int,
                num_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(token, expert) rows grouped by expert in token order: token, expert, mask and weight per sub-expert.

    Vectorised: pairs sorted by expert (a stable radix sort on small ints), a new row where the token or
    the expert changes."""
    slots = indices.shape[1]
    idx = indices.detach().reshape(-1).cpu().numpy()
    w = weights.detach().reshape(-1).float().cpu().numpy()
    if idx.max() >= num_groups:
        pair = np.flatnonzero(idx < num_groups)
        idx, w, tok = idx[pair], w[pair], pair // slots
    else:
        tok = np.arange(idx.size) // slots
    if idx.size == 0:
        return None
    expert = idx // n_sub
    sub = idx - expert * n_sub
    order = np.argsort(expert.astype(np.int32 if num_groups >= 1 << 15 else np.int16), kind="stable")
    expert, sub, tok, w = expert[order], sub[order], tok[order], w[order]
    new_row = np.empty(idx.size, dtype=bool)
    new_row[0] = True
    np.not_equal(tok[1:], tok[:-1], out=new_row[1:])
    new_row[1:] |= expert[1:] != expert[:-1]
    starts = np.flatnonzero(new_row)
    row_of_pair = np.cumsum(new_row) - 1
    masks = np.bitwise_or.reduceat(np.left_shift(1, sub, dtype=np.int64), starts)
    row_w = np.zeros((starts.size, n_sub), dtype=np.float32)
    if int(np.bitwise_count(masks).sum()) == idx.size:
        row_w[row_of_pair, sub] = w
    else:  # a sub-expert listed twice for one token: its weights add up
        np.add.at(row_w, (row_of_pair, sub), w)
    return tok[starts], expert[starts], masks, row_w


def _rows_of_blocks(expert: torch.Tensor, lengths: tuple[int, ...], weights: torch.Tensor,
                    n_sub: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_rows_large`` for prefix routing: one row per (token, block), its mask the block's prefix and its
    weights those of the block's slots, grouped by expert in token order (a token's blocks are distinct
    experts: the router's top-k)."""
    tokens, count = expert.shape
    e = expert.detach().reshape(-1).cpu().numpy()
    w = weights.detach().float().cpu().numpy()
    row_w = np.zeros((tokens, count, n_sub), dtype=np.float32)
    slot = 0
    for j, m in enumerate(lengths):
        row_w[:, j, :m] = w[:, slot : slot + m]
        slot += m
    order = np.argsort(e.astype(np.int16 if e.max() < 1 << 15 else np.int32), kind="stable")
    masks = np.tile(np.array([(1 << m) - 1 for m in lengths], dtype=np.int64), tokens)
    return order // count, e[order].astype(np.int64), masks[order], row_w.reshape(-1, n_sub)[order]


def _blocks_of_mixed_expert(work: ExpertWork, masks: np.ndarray, n_sub: int) -> None:
    """Rectangles for an expert whose rows take different subsets (rows already ordered by mask)."""
    spans: list[tuple[int, int, int] | None] = []  # per sub-expert: (a, b, n) when its rows are one run
    for n in range(n_sub):
        rows = np.flatnonzero((masks >> n) & 1)
        if rows.size == 0:
            spans.append(None)
        elif rows[-1] - rows[0] + 1 == rows.size:
            spans.append((int(rows[0]), int(rows[-1]) + 1, n))
        else:
            spans.append(None)
            work.scattered.append((n, rows))
    n = 0
    while n < n_sub:  # merge neighbouring sub-experts that share exactly the same rows
        span = spans[n]
        if span is None:
            n += 1
            continue
        end = n + 1
        while end < n_sub and spans[end] is not None and spans[end][:2] == span[:2]:
            end += 1
        work.blocks.append((span[0], span[1], n, end))
        n = end
