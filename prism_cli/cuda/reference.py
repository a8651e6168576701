"""Torch reference of every sub-expert MoE op: the CPU path of the runtime and the oracle for the kernels.

Layout (the flat sub-expert export): ``G = E * N`` sub-experts of width ``Is = I / N``;
``gate_up [G, 2*Is, H]`` (gate rows first, then up rows), ``down [G, H, Is]``. Routing hands over
``indices [T, P]`` (sub-expert ids; the value ``G`` is a sentinel for an unused slot) and
``weights [T, P]``. ``experts_forward`` computes ``out[t] = sum_p weights[t, p] * SubExpert_{indices[t, p]}(x[t])``.

Every op here has a compiled CUDA twin in ``kernels.cu`` with the same signature and semantics.
Matmuls accumulate in float32 on every device (``x.float()``), and the per-token reduction is a
fixed-order sum over slots, so results are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_pairs(indices: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs by sub-expert.

    Returns ``order [S]`` (int64: flat pair ids ``t * P + p`` sorted by sub-expert, stable, sentinels
    dropped) and ``offsets [G + 1]`` (int64: pairs of group g are ``order[offsets[g]:offsets[g + 1]]``).
    """
    flat = indices.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_groups + 1)[:num_groups]
    offsets = torch.zeros(num_groups + 1, dtype=torch.long, device=indices.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order[: int(offsets[-1])], offsets


def _groups(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """Non-empty groups as (group, start, end) on the host: one sync per layer, not per group."""
    off = offsets.tolist()
    return [(g, off[g], off[g + 1]) for g in range(len(off) - 1) if off[g + 1] > off[g]]


def grouped_swiglu(
    x: torch.Tensor, gate_up: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, slots: int
) -> torch.Tensor:
    """``act[i] = silu(x[t] Wg^T) * (x[t] Wu^T)`` for the i-th sorted pair (t = order[i] // slots)."""
    width = gate_up.shape[1] // 2
    act = torch.empty(order.shape[0], width, dtype=x.dtype, device=x.device)
    tokens = order // slots
    for g, start, end in _groups(offsets):
        h = x[tokens[start:end]].float() @ gate_up[g].float().T
        act[start:end] = (F.silu(h[:, :width]) * h[:, width:]).to(x.dtype)
    return act


def grouped_down(
    act: torch.Tensor,
    down: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """``out[t] = sum_p weights[t, p] * (down[g] @ act[pair])``, reduced over slots in a fixed order."""
    slots = weights.shape[1]
    hidden = down.shape[1]
    per_pair = torch.zeros(num_tokens * slots, hidden, dtype=torch.float32, device=act.device)
    flat_w = weights.reshape(-1).float()
    for g, start, end in _groups(offsets):
        pairs = order[start:end]
        per_pair[pairs] = (act[start:end].float() @ down[g].float().T) * flat_w[pairs, None]
    return per_pair.view(num_tokens, slots, hidden).sum(dim=1).to(act.dtype)


def experts_forward(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The whole sub-expert MoE step: sort pairs, SwiGLU up-projection, weighted down-projection.

    On the CPU (where this *is* the runtime) the two projections run in one pass per group and add
    into the output with ``index_add_``, which is serial there, so the result stays deterministic
    while the per-group overhead halves. Elsewhere the op-by-op form above is used, whose fixed-order
    slot reduction is what the CUDA kernels reproduce.
    """
    order, offsets = sort_pairs(indices, gate_up.shape[0])
    if x.device.type != "cpu":
        act = grouped_swiglu(x, gate_up, order, offsets, indices.shape[1])
        return grouped_down(act, down, order, offsets, weights, x.shape[0])
    width = gate_up.shape[1] // 2
    tokens = order // indices.shape[1]
    pair_w = weights.reshape(-1)[order].float().unsqueeze(-1)
    xf = x.float()
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)
    for g, start, end in _groups(offsets):
        t = tokens[start:end]
        h = F.linear(xf.index_select(0, t), gate_up[g].float())
        out.index_add_(0, t, F.linear(F.silu(h[:, :width]) * h[:, width:], down[g].float()) * pair_w[start:end])
    return out.to(x.dtype)


def gate_scores(
    x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, expert_idx: torch.Tensor, n_sub: int
) -> torch.Tensor:
    """Training-free gate (SPEC 3.4a): score of every sub-expert of each chosen expert.

    ``gate_w, up_w [E, N * s, H]`` hold the gate neurons' rows, sub-expert by sub-expert;
    ``expert_idx [T, k]`` the experts the router chose. Returns ``[T, k, N]``: the mean ``|a_j(x)|``
    over each sub-expert's ``s`` gate neurons, computed for the chosen experts only.
    """
    tokens, k = expert_idx.shape
    n_gate = gate_w.shape[1]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_w.shape[0]).tolist()
    # Gather the tokens once in expert order (index_select: contiguous rows, much cheaper on the CPU
    # than advanced indexing), score each expert's slice, reduce to [pairs, N] before scattering back.
    xs = x.float().index_select(0, order // k)
    sorted_scores = torch.empty(tokens * k, n_sub, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        xt = xs[start : start + count]
        a = (F.silu(xt @ gate_w[e].float().T) * (xt @ up_w[e].float().T)).abs_()
        sorted_scores[start : start + count] = a.view(count, n_sub, n_gate // n_sub).mean(dim=-1)
        start += count
    scores = torch.empty_like(sorted_scores)
    scores.index_copy_(0, order, sorted_scores)
    return scores.view(tokens, k, n_sub)
