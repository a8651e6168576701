"""The training-free gate as a router module (SPEC 3.4a).

``GateNeuronRouter`` replaces a flat export's router in each MoE block. It runs the *original*
router (rebuilt from the export's repeated rows, so routing is exactly the source model's, group
limits and score corrections included), scores the sub-experts of the chosen experts from their gate
neurons only, and lets an allocation policy pick the (expert, sub-expert) pairs. It returns the
router protocol of transformers v5 -- ``(logits, weights, indices)`` -- with sub-expert indices, so
the block's experts module (any experts implementation that accepts sentinel slots) does the rest.
"""

from __future__ import annotations

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
