"""Gate-neuron scores of the training-free gate (SPEC 3.4a), on the CPU and wherever the kernels do not run.

For every token and each of its k chosen experts: the mean ``|a_j(x)|`` over each sub-expert's ``s``
gate neurons, ``a_j(x) = silu(g_j . x) * (u_j . x)``. The gate rows of an expert are one matrix
``[2*N*s, H]`` (its N*s gate rows, then its N*s up rows), so an expert costs one matmul over the tokens
routed to it. Its FLOPs are ``2*N*s / (3*I/N)`` of one sub-expert per chosen expert: the time should be
about as small, so the planning is light (a radix sort of the expert ids), and for a few tokens (a
decode step) all experts are scored in one matmul and the chosen ones gathered: fewer, larger calls.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: At most this many tokens: score every expert in one matmul (a decode step), else only the chosen ones.
DENSE_MAX_TOKENS = 8


def gate_up_rows(gate_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """``[E, 2*N*s, H]``: each expert's gate-neuron rows of W_gate, then of W_up."""
    return torch.cat([gate_w, up_w], dim=1).contiguous()


def gate_scores(x: torch.Tensor, rows: torch.Tensor, expert_idx: torch.Tensor, n_sub: int) -> torch.Tensor:
    """Scores ``[T, k, N]`` of the sub-experts of each token's chosen experts (``rows`` from ``gate_up_rows``)."""
    tokens, k = expert_idx.shape
    experts, two_ns, hidden = rows.shape
    ns = two_ns // 2
    xf = x.float()
    if tokens <= DENSE_MAX_TOKENS:
        h = F.linear(xf, rows.reshape(experts * two_ns, hidden).float()).view(tokens, experts, two_ns)
        h = h.gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, two_ns))
        a = F.silu(h[..., :ns]).mul_(h[..., ns:]).abs_()
        return a.view(tokens, k, n_sub, ns // n_sub).mean(dim=-1)
    flat = expert_idx.reshape(-1).cpu().numpy()
    order = np.argsort(flat.astype(np.int16 if experts < 1 << 15 else np.int32), kind="stable")
    counts = np.bincount(flat, minlength=experts).tolist()
    order_t = torch.from_numpy(order).to(x.device)
    xs = xf.index_select(0, torch.div(order_t, k, rounding_mode="floor"))
    sorted_scores = torch.empty(tokens * k, n_sub, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        h = F.linear(xs[start : start + count], rows[e].float())
        a = F.silu(h[:, :ns]).mul_(h[:, ns:]).abs_()
        sorted_scores[start : start + count] = a.view(count, n_sub, ns // n_sub).mean(dim=-1)
        start += count
    scores = torch.empty_like(sorted_scores)
    scores.index_copy_(0, order_t, sorted_scores)
    return scores.view(tokens, k, n_sub)
