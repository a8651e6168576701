"""Llama-4's MoE block in transformers v5's protocol, so prism can profile, split and run it.

transformers' Llama-4 block does not follow the v5 MoE block: its router returns a dense ``[T, E]``
score matrix (the sigmoid of the top-k logits, zero elsewhere), its experts (``Llama4TextExperts``,
``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, gate rows first) run a dense batched product
over *every* expert, and it scales each expert's **input** by the expert's score: ``f_e(s_e x)``, not
``s_e f_e(x)`` (a SwiGLU expert is not homogeneous, so the two differ).

``convert_llama4`` swaps, in place, the classes of every Llama-4 MoE block, router and experts module
for subclasses that speak the v5 protocol; parameters and their names are unchanged, so checkpoints
load and save as before:

* the router returns ``(logits, sigmoid of the top-k logits, indices)``;
* the experts are dispatched through transformers' ``ExpertsInterface`` (prism's runtime, its profiler,
  transformers' own implementations), declared transposed, with an eager loop as the default;
* the block turns each (token, expert) pair into one row ``s x`` and runs the experts on those rows
  at weight 1, then adds the pairs of each token and the shared expert. The experts module carries the
  rows' tokens and scores (``prism_pair_rows``) for the profiler, which records per token.

A sub-expert of expert e gets the expert's score as input scale, so its N sub-experts sum to
``f_e(s_e x)``: the flat export (``E*N`` experts, router rows repeated, each copy scored ``s_e``) is exact
in stock transformers too, and its down projections need no scale (an unnormalised sigmoid).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate

try:
    from transformers.models.llama4 import modeling_llama4 as _llama4
except ImportError:  # pragma: no cover - depends on the installed transformers
    _llama4 = None


def _eager_experts(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_p w[t, p] * Expert_{idx[t, p]}(x[t])``, one expert at a time (the reference)."""
    out = torch.zeros_like(hidden_states)
    flat, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)
    rows = torch.arange(top_k_index.shape[0], device=flat.device).repeat_interleave(top_k_index.shape[1])
    for expert in flat.unique().tolist():
        if expert >= self.num_experts:  # a sentinel slot
            continue
        pick = flat == expert
        x = hidden_states[rows[pick]]
        act = self._apply_gate(x @ self.gate_up_proj[expert])
        y = (act @ self.down_proj[expert]) * weights[pick, None].to(act.dtype)
        out.index_add_(0, rows[pick], y.to(out.dtype))
    return out


class _Experts(nn.Module):
    """``Llama4TextExperts`` through the experts interface (the class swapped in by ``convert_llama4``)."""

    _apply_gate = _default_apply_gate

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        implementation = getattr(self.config, "_experts_implementation", None)
        return ALL_EXPERTS_FUNCTIONS.get_interface(implementation, _eager_experts)(self, hidden_states, top_k_index,
                                                                                    top_k_weights)


class _Router(nn.Module):
    """``Llama4Router`` returning v5's ``(logits, weights, indices)``: weights are the sigmoid of the top-k logits."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden_states, self.weight)
        top, indices = torch.topk(logits, self.top_k, dim=1)
        return logits, torch.sigmoid(top.float()).to(logits.dtype), indices


class _Block(nn.Module):
    """``Llama4TextMoe`` with the v5 router and experts; each pair's input scaled by its score."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits, weights, indices = self.router(x)
        tokens, k = indices.shape
        rows = (x.unsqueeze(1) * weights.unsqueeze(-1).to(x.dtype)).reshape(tokens * k, -1)
        self.experts.prism_pair_rows = (torch.arange(tokens, device=x.device).repeat_interleave(k), weights.reshape(-1))
        try:
            routed = self.experts(rows, indices.reshape(-1, 1), torch.ones_like(weights.reshape(-1, 1)))
        finally:
            self.experts.prism_pair_rows = None
        out = self.shared_expert(x)
        out.add_(routed.view(tokens, k, -1).sum(dim=1).to(out.dtype))
        return out, logits


def _swap(module: nn.Module, mixin: type) -> None:
    base = type(module)
    if not issubclass(base, mixin):
        module.__class__ = type(f"Prism{base.__name__}", (mixin, base), {})


def convert_llama4(model: nn.Module) -> int:
    """Put every Llama-4 MoE block of ``model`` in the v5 protocol (idempotent); returns how many there are."""
    if _llama4 is None:
        return 0
    blocks = [m for m in model.modules() if isinstance(m, _llama4.Llama4TextMoe)]
    for block in blocks:
        experts = block.experts
        if not isinstance(experts, _Experts):
            _swap(experts, _Experts)
            # the config its layer was built from: the one from_pretrained's experts_implementation goes to
            experts.config = block.shared_expert.config
            experts.has_gate, experts.has_bias, experts.has_post_expert_norm = True, False, False
            experts.is_transposed, experts.is_concatenated, experts._is_expert_parallel = True, True, False
            experts.prism_pair_rows = None
        _swap(block.router, _Router)
        _swap(block, _Block)
    return len(blocks)


def allow_experts_implementation() -> None:
    """transformers decides whether a model takes ``experts_implementation`` by finding the
    ``@use_experts_implementation`` decorator in its modeling file, which Llama-4's lacks; with its blocks
    converted (``convert_llama4``) it does take one. Called before prism loads a Llama-4 model."""
    if _llama4 is None:
        return
    # transformers caches its answer on each class it asked about: set it on every Llama-4 model class.
    for cls in vars(_llama4).values():
        if isinstance(cls, type) and issubclass(cls, _llama4.Llama4PreTrainedModel):
            cls._can_set_experts_implementation_cached_value = True


def pair_rows(experts: nn.Module) -> Any:
    """``(token of each row, score of each row)`` while a converted block runs its experts on pair rows, else None."""
    return getattr(experts, "prism_pair_rows", None)
