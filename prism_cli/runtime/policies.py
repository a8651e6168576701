"""Allocation policies of the training-free gate: which (expert, sub-expert) pairs each token computes.

A policy sees, per token, the router's chosen experts ``expert_idx [T, k]`` with their weights
``expert_w [T, k]`` and the gate-neuron scores ``scores [T, k, N]`` of their sub-experts (SPEC 3.4a),
and returns flat sub-expert ids ``[T, P]`` (expert e's sub-expert n is ``e * N + n``; the value
``E * N`` marks an unused slot) with their routing weights (the parent expert's weight).
New policies are one small class registered in ``POLICIES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from prism_cli.registry import Registry


class AllocationPolicy(ABC):
    """Base class; ``value`` is the operating point's parameter (a count, a per-rank pattern or a
    threshold), already validated by ``operating_points.parse_operating_point``."""

    name: ClassVar[str]

    def __init__(self, n_sub: int, top_k: int, num_experts: int) -> None:
        self.n_sub = n_sub
        self.top_k = top_k
        self.num_experts = num_experts

    @property
    def sentinel(self) -> int:
        return self.num_experts * self.n_sub

    @abstractmethod
    def allocate(
        self, expert_idx: torch.Tensor, expert_w: torch.Tensor, scores: torch.Tensor, value: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sub_expert_ids [T, P], weights [T, P])``."""

    def _pairs(self, expert_idx: torch.Tensor, expert_w: torch.Tensor, scores: torch.Tensor):
        """Flatten to ``k * N`` candidate pairs per token: ids, weights and estimated contributions."""
        tokens = expert_idx.shape[0]
        ids = (expert_idx.unsqueeze(-1) * self.n_sub + torch.arange(self.n_sub, device=expert_idx.device)).reshape(tokens, -1)
        weights = expert_w.unsqueeze(-1).expand(-1, -1, self.n_sub).reshape(tokens, -1)
        contribution = (expert_w.unsqueeze(-1).float() * scores).reshape(tokens, -1)
        return ids, weights, contribution


POLICIES: Registry[type[AllocationPolicy]] = Registry("allocation policy")


def register_policy(cls: type[AllocationPolicy]) -> type[AllocationPolicy]:
    return POLICIES.register(cls.name)(cls)


@register_policy
class TopKPolicy(AllocationPolicy):
    """The K pairs with the largest router weight x gate score, over all the token's chosen experts.

    They are listed in candidate order (the router's experts in its order, each expert's sub-experts
    ascending), so that where every token keeps whole experts (K = N*k) the routing has the prefix shape
    the executors run fastest (``runtime/grouped_mm.py``)."""

    name = "topk"

    def allocate(self, expert_idx, expert_w, scores, value):
        ids, weights, contribution = self._pairs(expert_idx, expert_w, scores)
        keep = torch.topk(contribution, int(value), dim=-1, sorted=False).indices.sort(dim=-1).values
        return ids.gather(1, keep), weights.gather(1, keep)


@register_policy
class PatternPolicy(AllocationPolicy):
    """The paper's per-rank pattern: the r-th expert by router weight gets ``pattern[r]`` sub-experts,
    its highest-scoring ones."""

    name = "pattern"

    def allocate(self, expert_idx, expert_w, scores, value):
        rank = torch.argsort(expert_w.float(), dim=-1, descending=True, stable=True)
        ids_out, w_out = [], []
        for r, count in enumerate(value):
            if count == 0:
                continue
            slot = rank[:, r : r + 1]
            e = expert_idx.gather(1, slot)
            best = torch.topk(scores.gather(1, slot.unsqueeze(-1).expand(-1, -1, self.n_sub)).squeeze(1), count, dim=-1).indices
            ids_out.append(e * self.n_sub + best)
            w_out.append(expert_w.gather(1, slot).expand(-1, count))
        return torch.cat(ids_out, dim=1), torch.cat(w_out, dim=1)


@register_policy
class ThresholdPolicy(AllocationPolicy):
    """Variable compute: per token, pairs in order of estimated contribution until their share of the
    token's estimated mass reaches ``tau`` (at least one pair); unused slots get the sentinel id."""

    name = "threshold"

    def allocate(self, expert_idx, expert_w, scores, value):
        ids, weights, contribution = self._pairs(expert_idx, expert_w, scores)
        order = torch.argsort(contribution, dim=-1, descending=True, stable=True)
        sorted_c = contribution.gather(1, order)
        share = torch.cumsum(sorted_c, dim=-1) / sorted_c.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sorted_c.dtype).tiny)
        # keep pair i when the mass before it has not yet reached tau (so the first pair always runs)
        keep = torch.cat([torch.ones_like(share[:, :1], dtype=torch.bool), share[:, :-1] < float(value)], dim=1)
        ids = torch.where(keep, ids.gather(1, order), torch.full_like(ids, self.sentinel))
        weights = torch.where(keep, weights.gather(1, order), torch.zeros_like(weights))
        width = int(keep.sum(dim=1).max())  # kept pairs are a prefix: drop all-sentinel columns
        return ids[:, :width], weights[:, :width]
