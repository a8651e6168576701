"""The training-free gate as a router module (SPEC 3.4a).

``GateNeuronRouter`` replaces a flat export's router in each MoE block. It runs the *original*
router (rebuilt from the export's repeated rows, so routing is exactly the source model's, group
limits and score corrections included), scores the sub-experts of the chosen experts from their gate
neurons only, and lets an allocation policy pick the (expert, sub-expert) pairs. It returns the
router protocol of transformers v5 -- ``(logits, weights, indices)`` -- with sub-expert indices, so
the block's experts module (any experts implementation that accepts sentinel slots) does the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prism_cli.cuda import get_ops
from prism_cli.runtime.policies import AllocationPolicy


class GateNeuronRouter(nn.Module):
    """Original top-k routing, then gate-neuron scores, then an allocation policy."""

    def __init__(
        self,
        router: nn.Module,
        gate_w: torch.Tensor,
        up_w: torch.Tensor,
        n_sub: int,
        down_scale: float,
        policy: AllocationPolicy,
        value: object,
    ) -> None:
        super().__init__()
        self.router = router
        self.register_buffer("gate_w", gate_w, persistent=False)
        self.register_buffer("up_w", up_w, persistent=False)
        self.n_sub = n_sub
        self.down_scale = down_scale
        self.policy = policy
        self.value = value
        self.hidden_dim = gate_w.shape[-1]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, expert_w, expert_idx = self.router(hidden_states)
        x = hidden_states.reshape(-1, self.hidden_dim)
        scores = get_ops(x.device).gate_scores(x, self.gate_w, self.up_w, expert_idx, self.n_sub)
        ids, weights = self.policy.allocate(expert_idx, expert_w, scores, self.value)
        # The flat export's down_proj carries the linear gate's rescaling; undo it for original weights.
        return logits, (weights / self.down_scale).to(expert_w.dtype), ids


class LinearGateRouter(nn.Module):
    """The linear gate (SPEC 3.4b) at any K, with a defined order among an expert's copies.

    The flat router gives the N sub-experts of an expert N identical scores, so its stock top-K for
    K not a multiple of N picks among tied copies in whatever order ``torch.topk`` happens to return.
    This wrapper runs the stock router at its full top-(N*k) (every copy of the original top-k experts:
    no ties at that boundary) and keeps the first K pairs by (expert score, descending; sub-expert
    index, ascending). Sub-expert 0 holds the most activation mass (the partition orders them so),
    and lowest-index-first is also how vLLM's fused top-k softmax kernel breaks ties, so what prism
    measures at ``linear:K`` is what vLLM serves at ``num_experts_per_tok = K``.
    Where the family renormalises its top-k weights, the kept weights are renormalised over the K.
    """

    def __init__(self, router: nn.Module, full_k: int, renormalize: bool,
                 selection_scores: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.router = router
        self.router.top_k = full_k
        self.full_k = full_k
        self.top_k = full_k
        self.renormalize = renormalize
        self.selection_scores = selection_scores

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, weights, indices = self.router(hidden_states)
        if self.top_k >= self.full_k:
            return logits, weights, indices
        by_index, perm = torch.sort(indices, dim=-1, stable=True)
        score = self.selection_scores(self.router, logits).gather(1, by_index)
        order = torch.argsort(score, dim=-1, descending=True, stable=True)[:, : self.top_k]
        keep = perm.gather(1, order)
        kept_w = weights.gather(1, keep)
        if self.renormalize:
            kept_w = kept_w * (weights.sum(dim=-1, keepdim=True) / kept_w.sum(dim=-1, keepdim=True))
        return logits, kept_w, indices.gather(1, keep)
