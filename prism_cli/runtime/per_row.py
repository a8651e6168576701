"""Per-row operating points: the tokens of one forward pass, each at its own point.

The ``mixed`` scheduling policy serves every request at its own quality floor inside one shared batch,
so the runtime must take an operating point per token. Two pieces, both additive:

* ``PerRowTopKPolicy`` (registered as ``per_row_topk``): the training-free gate's top-K with a K per
  token (``value`` is a ``[T]`` tensor): one top-K at the largest K, then every slot past a token's own
  K gets the sentinel id (which prism's experts implementation skips), so token t gets exactly what
  ``topk:K_t`` gives it.
* ``RowPointRouter``: wraps a MoE block's router. While row points are set it groups the tokens by
  point and runs the wrapped router once per group on that group's tokens, configured as
  ``set_operating_point`` would configure it (all ``topk`` tokens in one call through
  ``PerRowTopKPolicy``), and packs the picks into one ``[T, P]`` index tensor padded with sentinels.
  Routing is per token, so each token gets exactly what the whole model at its point would give it.
  Where every row is at a ``linear`` point of an untuned export (the copies of an expert tie), one
  call does: the linear gate at the whole blocks covering the largest K, then each token keeps the
  first ``K_t`` pairs of that order (its expert ranking is the same at every K), so a mixed batch
  routes for the cost of one router call, not one per point. The block shape rides on the indices
  with each token's K (``PrefixRouting.token_k``), so the experts compute per token only the blocks its
  K reaches, in one grouped product per projection (``runtime/grouped_mm.py``: ``prefix-padded``).

``set_row_points(model, points, tokens_per_row)`` installs the wrappers on first use (a module swap
of the block's router, kept for the model's life) and sets the points of the next forward;
``clear_row_points(model)`` goes back to the model's own point. Router logits are not returned while
row points are set (an empty tensor): nothing at inference reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint
from prism_cli.runtime.elastic import ElasticState, attach_elastic_state
from prism_cli.runtime.grouped_mm import PREFIX_ATTR, PrefixRouting
from prism_cli.runtime.policies import POLICIES, AllocationPolicy, register_policy


@register_policy
class PerRowTopKPolicy(AllocationPolicy):
    """``topk`` with a K per token: ``value`` is an integer tensor ``[T]`` (each in 1..k*N)."""

    name = "per_row_topk"

    def allocate(self, expert_idx, expert_w, scores, value):
        ids, weights, contribution = self._pairs(expert_idx, expert_w, scores)
        k = value.to(ids.device).long()
        top = torch.topk(contribution, int(k.max()), dim=-1, sorted=True).indices
        keep = torch.arange(top.shape[1], device=ids.device).unsqueeze(0) < k.unsqueeze(1)
        ids = torch.where(keep, ids.gather(1, top), torch.full_like(top, self.sentinel))
        return ids, torch.where(keep, weights.gather(1, top), torch.zeros_like(weights[:, : top.shape[1]]))


@dataclass(frozen=True)
class LinearRows:
    """Every token at a linear point: its K (``[T]``) and the slots past it (``[T, N*ceil(max K / N)]``, the
    whole blocks covering the largest K), the same in every layer, so computed once per forward."""

    k: torch.Tensor
    drop: torch.Tensor

    @classmethod
    def of(cls, k: torch.Tensor, n_sub: int) -> LinearRows:
        slots = n_sub * -(-int(k.max()) // n_sub)
        return cls(k, torch.arange(slots, device=k.device) >= k.unsqueeze(1))


class RowPointRouter(nn.Module):
    """One MoE block's router with per-token points (see the module docstring)."""

    def __init__(self, inner: nn.Module, layer: int, state: ElasticState) -> None:
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.state = state
        self.groups: list[tuple[OperatingPoint | str, torch.Tensor, Any]] | None = None
        #: Every row at a linear point of a tied router: each token's K, as ``LinearRows`` (else None).
        self.linear_rows: LinearRows | None = None

    @property
    def sentinel(self) -> int:
        return self.state.source_experts * self.state.n_sub

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.groups is None:
            return self.inner(hidden_states)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.linear_rows is not None and self._tied():
            return self._linear_rows(x, self.linear_rows)
        picks = []
        for point, tokens, value in self.groups:
            restore = self._configure(point, value)
            try:
                _, weights, ids = self.inner(x.index_select(0, tokens))
            finally:
                restore()
            picks.append((tokens, ids, weights))
        width = max(ids.shape[1] for _, ids, _ in picks)
        all_ids = torch.full((x.shape[0], width), self.sentinel, dtype=picks[0][1].dtype, device=x.device)
        all_w = torch.zeros((x.shape[0], width), dtype=picks[0][2].dtype, device=x.device)
        for tokens, ids, weights in picks:
            all_ids[tokens, : ids.shape[1]] = ids
            all_w[tokens, : weights.shape[1]] = weights.to(all_w.dtype)
        return x.new_empty(x.shape[0], 0), all_w, all_ids

    def _tied(self) -> bool:
        """Whether this layer's linear gate routes every K with one router whose copies tie (an untuned
        export; a router bank picks a router per K)."""
        s = self.state
        return bool(s.elastic_routers) and s.bank is None and s.flat_routers[self.layer].mode == "blocks"

    def _linear_rows(self, x: torch.Tensor, rows: LinearRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token t at ``linear:k[t]``, in one router call: the stock router at the whole blocks covering the
        largest K (what the linear gate runs there: ``_tied``), each block's sub-experts in index order,
        then every slot past a token's own K gets the sentinel. The copies of an expert weigh the same;
        where the family renormalises its top-k weights, each token's kept weights are renormalised over
        its own K, as ``LinearGateRouter`` does at that K."""
        flat, n = self.state.flat_routers[self.layer], self.state.n_sub
        router = flat.router
        saved = router.top_k
        router.top_k = rows.drop.shape[1]
        try:
            _, weights, ids = router(x)
        finally:
            router.top_k = saved
        expert = torch.div(ids[:, ::n], n, rounding_mode="floor")  # each block's expert, best first
        kept_ids = (expert.unsqueeze(-1) * n + flat.sub_offsets).view(ids.shape[0], -1).masked_fill_(rows.drop, self.sentinel)
        kept_w = weights.masked_fill(rows.drop, 0.0)  # a block's copies carry one weight
        if flat.renormalize:
            kept_w = kept_w * (weights.sum(dim=-1, keepdim=True) / kept_w.sum(dim=-1, keepdim=True))
        # The block shape, each token's K with it, for the experts (runtime/grouped_mm.py: prefix-padded).
        setattr(kept_ids, PREFIX_ATTR, PrefixRouting(expert, (n,) * expert.shape[1], token_k=rows.k))
        return x.new_empty(x.shape[0], 0), kept_w, kept_ids

    def _configure(self, point: OperatingPoint | str, value: Any):
        """Put this layer's router at ``point`` (as ``set_operating_point`` would); returns the undo."""
        s, i = self.state, self.layer
        if point == "per_row_topk" or point.policy not in ("linear", "original"):
            gate, elastic = s.gate_routers[i], s.elastic_routers[i]
            saved = (gate.policy, gate.value, elastic.use_neurons)
            name = point if isinstance(point, str) else point.policy
            gate.policy, gate.value, elastic.use_neurons = POLICIES.get(name)(s.n_sub, s.source_top_k, s.source_experts), value, True

            def undo() -> None:
                gate.policy, gate.value, elastic.use_neurons = saved

            return undo
        flat = s.flat_routers[i]
        saved_k, saved_rows, saved_mode = flat.top_k, flat.router.weight.data, flat.mode
        saved_neurons = s.elastic_routers[i].use_neurons if s.elastic_routers else None
        s.route_linear(i, int(point.value))  # a router-bank export: with that K's router
        if s.elastic_routers:
            s.elastic_routers[i].use_neurons = False

        def undo_flat() -> None:
            flat.top_k, flat.router.weight.data, flat.mode = saved_k, saved_rows, saved_mode
            if s.elastic_routers:
                s.elastic_routers[i].use_neurons = saved_neurons

        return undo_flat


def _routers(model: Any) -> list[RowPointRouter]:
    state: ElasticState = getattr(model, "prism_state", None) or attach_elastic_state(model, None)
    routers = []
    for i, layer in enumerate(state.layers):
        router = getattr(layer.block, layer.router_name)
        if not isinstance(router, RowPointRouter):
            router = RowPointRouter(router, i, state)
            setattr(layer.block, layer.router_name, router)
        routers.append(router)
    return routers


def set_row_points(model: Any, points: list[OperatingPoint], tokens_per_row: int) -> None:
    """The next forwards run row r (``tokens_per_row`` consecutive tokens) at ``points[r]``."""
    layered = [str(p) for p in points if p.policy == "layered"]
    if layered:  # its K is per layer, not per token
        raise PrismError(f"{layered[0]} cannot be a row's point: a layered point sets each layer's K for the whole batch")
    routers = _routers(model)
    device = next(model.parameters()).device
    per_token = [p for p in points for _ in range(tokens_per_row)]
    groups: list[tuple[OperatingPoint | str, torch.Tensor, Any]] = []
    topk = [t for t, p in enumerate(per_token) if p.policy == "topk"]
    if topk:
        groups.append(("per_row_topk", torch.tensor(topk, device=device),
                       torch.tensor([int(per_token[t].value) for t in topk], device=device)))
    for point in dict.fromkeys(p for p in per_token if p.policy != "topk"):
        tokens = [t for t, p in enumerate(per_token) if p == point]
        groups.append((point, torch.tensor(tokens, device=device), point.value))
    linear_rows = None
    if all(p.policy == "linear" for p in points):
        n_sub = routers[0].state.n_sub if routers else 1
        linear_rows = LinearRows.of(torch.tensor([int(p.value) for p in per_token], device=device), n_sub)
    for router in routers:
        router.groups, router.linear_rows = groups, linear_rows


def clear_row_points(model: Any) -> None:
    """Back to the model's own operating point for every token."""
    state = getattr(model, "prism_state", None)
    for layer in state.layers if state is not None else []:
        router = getattr(layer.block, layer.router_name)
        if isinstance(router, RowPointRouter):
            router.groups, router.linear_rows = None, None
