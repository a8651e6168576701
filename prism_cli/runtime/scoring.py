"""Gate-neuron scores of the training-free gate (SPEC 3.4a), on the CPU and wherever the kernels do not run.

For every token and each of its k chosen experts: the mean ``|a_j(x)|`` over each sub-expert's ``s``
gate neurons, ``a_j(x) = silu(g_j . x) * (u_j . x)``. The gate rows of an expert are one matrix
``[2*N*s, H]`` (its N*s gate rows, then its N*s up rows), so an expert costs one matmul over the tokens
routed to it. Its FLOPs are ``2*N*s / (3*I/N)`` of one sub-expert per chosen expert: the time should be
about as small, so the (token, expert) pairs are sorted by expert and scored in one grouped product
(as the experts themselves run, ``runtime/grouped_mm.py``), and for a few tokens (a decode step) all
experts are scored in one matmul and the chosen ones gathered: fewer, larger calls.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from prism_cli.runtime.grouped_mm import GROUPED_MM, group_ends

#: At most this many tokens: score every expert in one matmul (a decode step), else only the chosen ones.
DENSE_MAX_TOKENS = 8


def gate_up_rows(gate_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """``[E, 2*N*s, H]``: each expert's gate-neuron rows of W_gate, then of W_up."""
    return torch.cat([gate_w, up_w], dim=1).contiguous()


def gate_scores(x: torch.Tensor, rows: torch.Tensor, expert_idx: torch.Tensor, n_sub: int) -> torch.Tensor:
    """Scores ``[T, k, N]`` of the sub-experts of each token's chosen experts (``rows`` from ``gate_up_rows``)."""
    tokens, k = expert_idx.shape
    experts, two_ns, hidden = rows.shape
    xf = x.float()
    if tokens <= DENSE_MAX_TOKENS:
        h = F.linear(xf, rows.reshape(experts * two_ns, hidden).float()).view(tokens, experts, two_ns)
        h = h.gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, two_ns))
        return _mean_activation(h.view(tokens * k, two_ns), n_sub).view(tokens, k, n_sub)
    if GROUPED_MM is not None:  # one grouped product over the (token, expert) pairs sorted by expert
        by_expert, order = torch.sort(expert_idx.reshape(-1), stable=True)
        offs = torch.searchsorted(by_expert, group_ends(experts, x.device), out_int32=True)
        h = GROUPED_MM(xf.index_select(0, torch.div(order, k, rounding_mode="floor")), rows.transpose(1, 2).float(), offs=offs)
        sorted_scores = _mean_activation(h, n_sub)
    else:  # torch without grouped products: one product per expert over its pairs
        flat = expert_idx.reshape(-1).cpu().numpy()
        order = torch.from_numpy(np.argsort(flat.astype(np.int16 if experts < 1 << 15 else np.int32), kind="stable")).to(x.device)
        xs = xf.index_select(0, torch.div(order, k, rounding_mode="floor"))
        sorted_scores = torch.empty(tokens * k, n_sub, dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(np.bincount(flat, minlength=experts).tolist()):
            if count:
                sorted_scores[start : start + count] = _mean_activation(F.linear(xs[start : start + count], rows[e].float()), n_sub)
                start += count
    scores = torch.empty_like(sorted_scores)
    scores.index_copy_(0, order, sorted_scores)
    return scores.view(tokens, k, n_sub)


def _mean_activation(h: torch.Tensor, n_sub: int) -> torch.Tensor:
    """``[rows, N]``: the mean ``|silu(g) * u|`` over each sub-expert's gate neurons, from ``h = [g | u]``."""
    ns = h.shape[-1] // 2
    return F.silu(h[:, :ns]).mul_(h[:, ns:]).abs_().view(h.shape[0], n_sub, ns // n_sub).mean(dim=-1)
