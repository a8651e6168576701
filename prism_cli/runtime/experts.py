"""prism's experts implementation, registered with transformers' ``ExpertsInterface`` as ``"prism"``.

It computes ``out[t] = sum_p w[t, p] * Expert_{idx[t, p]}(x[t])`` for any fused SwiGLU experts module
(whole experts or flat sub-experts), accepts sentinel slots (``idx == num_experts``, e.g. from the
threshold policy's variable compute) and runs prism's compiled CUDA kernels on a GPU where they are
built, the torch reference elsewhere (``prism_cli.cuda.get_ops``).
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface

from prism_cli.cuda import get_ops

EXPERTS_IMPLEMENTATION = "prism"


def prism_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    ops = get_ops(hidden_states.device)
    return ops.experts_forward(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, prism_experts_forward)
