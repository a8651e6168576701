"""The routers of an elastic model: what replaces a flat export's router in each MoE block.

``ElasticRouter`` is installed once, at load, and holds both gates; ``set_operating_point`` only switches
which runs. Each returns the router protocol of transformers v5 -- ``(logits, weights, indices)`` --
with sub-expert indices, so the block's experts module (any experts implementation that accepts
sentinel slots) does the rest.

* ``LinearGateRouter`` (SPEC 3.4b): the stock flat router at ``linear:K``, with a defined order among an
  expert's tied copies, found in one of three ways (``mode``: whole blocks of tied copies, a tuned
  router's own top-K, or the general rule).
* ``GateNeuronRouter`` (SPEC 3.4a, the training-free gate): runs the *original* router (rebuilt from the
  export's repeated rows, so routing is exactly the source model's, group limits and score corrections
  included), scores the sub-experts of the chosen experts from their gate neurons only, and lets an
  allocation policy pick the (expert, sub-expert) pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prism_cli import cuda
from prism_cli.runtime.grouped import cached_on
from prism_cli.runtime.grouped_mm import PREFIX_ATTR, PrefixRouting
from prism_cli.runtime.policies import AllocationPolicy
from prism_cli.runtime.scoring import gate_scores, gate_up_rows


@dataclass(eq=False)
class GateRowsSource:
    """Where a training-free gate's rows come from: the gate neurons (``positions [E, N, s]`` within each
    sub-expert) of one MoE layer's experts, read through its family adapter."""

    adapter: Any
    layer: Any  # models.adapters.MoELayer
    positions: torch.Tensor
    n_sub: int

    def key(self) -> tuple:
        """The identity and version of the weights the rows are taken from."""
        w = self.layer.experts.gate_up_proj
        return w.data_ptr(), w._version, w.device, w.dtype

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``gate_w``, ``up_w``: ``[E, N*s, H]`` each."""
        return self.adapter.gate_neuron_rows(self.layer, self.positions, self.n_sub)


class GateNeuronRouter(nn.Module):
    """Original top-k routing, then gate-neuron scores, then an allocation policy."""

    #: Whether ``router`` is every N-th row of the flat router (so loading flat router weights updates it),
    #: or the source router stored apart from a tuned flat router (``prism tune-gate``), which must not follow it.
    router_from_flat: bool = True

    def __init__(
        self,
        router: nn.Module,
        source: GateRowsSource,
        n_sub: int,
        down_scale: float,
        policy: AllocationPolicy,
        value: object,
    ) -> None:
        super().__init__()
        self.router = router
        # One buffer, [E, 2*N*s, H] (one matmul per expert on the CPU); the CUDA kernels take the gate and up
        # rows apart, split from it where they run. A copy of the experts' rows: taken again when they change.
        self.source = source
        self._source_key = source.key()
        self.register_buffer("rows", gate_up_rows(*source.rows()), persistent=False)
        self.n_sub = n_sub
        self.down_scale = down_scale
        self.policy = policy
        self.value = value
        self.hidden_dim = self.rows.shape[-1]

    @property
    def gate_w(self) -> torch.Tensor:
        """``[E, N*s, H]``: each expert's gate-neuron rows of W_gate (a view of ``rows``)."""
        return self.rows[:, : self.rows.shape[1] // 2]

    @property
    def up_w(self) -> torch.Tensor:
        """``[E, N*s, H]``: the same neurons' rows of W_up (a view of ``rows``)."""
        return self.rows[:, self.rows.shape[1] // 2 :]

    def _split_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``gate_w`` and ``up_w`` contiguous, as the kernels take them: kept while ``rows`` is unchanged."""
        rows = self.rows
        return cached_on(self, "_prism_gate_split", (rows.data_ptr(), rows._version, rows.device, rows.dtype),
                         lambda: (self.gate_w.contiguous(), self.up_w.contiguous()))

    def _follow_weights(self) -> None:
        """Take the rows again where the experts' weights changed since (``load_state_dict``, an optimizer
        step): a stale copy scored sub-experts by weights the model no longer has. They stay where
        ``model.to()`` put them."""
        key = self.source.key()
        if key != self._source_key:
            # Not an inference tensor, though the call that notices may run under inference_mode: the rows
            # outlive it (a later training step, the kernels' cached split, which reads their version).
            with torch.inference_mode(False), torch.no_grad():
                self.rows = gate_up_rows(*self.source.rows()).to(self.rows.device, self.rows.dtype)
            self._source_key = key

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._follow_weights()
        logits, expert_w, expert_idx = self.router(hidden_states)
        x = hidden_states.reshape(-1, self.hidden_dim).detach()  # the scores only choose: no gradient through them
        if x.device.type == "cuda" and x.dtype in cuda.KERNEL_DTYPES and cuda.available():
            scores = cuda.get_ops(x.device).gate_scores(x, *self._split_rows(), expert_idx, self.n_sub)
        else:
            scores = gate_scores(x, self.rows, expert_idx, self.n_sub)
        ids, weights = self.policy.allocate(expert_idx, expert_w, scores, self.value)
        # The flat export's down_proj carries the linear gate's rescaling; undo it for original weights.
        return logits, (weights / self.down_scale).to(expert_w.dtype), ids


#: How a linear gate finds its K pairs (``LinearGateRouter.mode``).
RouteMode = Literal["blocks", "ranked", "rule"]


class LinearGateRouter(nn.Module):
    """The linear gate (SPEC 3.4b) at any K, with a defined order among an expert's copies.

    The flat router gives the N sub-experts of an expert N identical scores, so its stock top-K for
    K not a multiple of N picks among tied copies in whatever order ``torch.topk`` happens to return.
    The rule prism applies keeps the first K pairs of the full top-(N*k) (every copy of the original
    top-k experts: no ties at that boundary) by (expert score, descending; sub-expert index, ascending).
    Sub-expert 0 holds the most activation mass (the partition orders them so), and lowest-index-first
    is also how vLLM's fused top-k softmax kernel breaks ties, so what prism measures at ``linear:K`` is
    what vLLM serves at ``num_experts_per_tok = K``. Where the family renormalises its top-k weights, the
    kept weights are renormalised over the K.

    The rule is applied in one of three ways (``mode``), all giving its result:

    * ``"blocks"``: the copies tie exactly and the stock router returns its top-k sorted by score (an
      untuned export). The pairs then come in blocks of N copies per expert, best expert first, so the
      rule needs no ranking: the stock router runs at the whole blocks that cover K (top-N*ceil(K/N), no
      tie at that boundary either), a partial last block is its expert's first ``K % N`` sub-experts, and
      the block shape is handed to the experts with the indices (``PREFIX_ATTR``). A decode step pays for
      every op it runs, so at K = N*j this is the stock router and nothing else.
    * ``"ranked"``: a tuned router, whose copies no longer tie (``prism tune-gate``). The stock router runs
      at top-(K+1); where every token's K+1-th pair scores strictly below its first K, those K are the
      rule's (whatever the order the router returned them in), and they are kept as they are: no sort.
      Otherwise (an expert's copies that training never untied, met at the boundary) the call is routed
      by the rule. The check reads one flag back from the device, so off the CPU the rule runs instead.
    * ``"rule"``: the stock router at the full top-(N*k), then the rule's two stable sorts (tied copies
      from a router that does not sort its top-k, e.g. DeepSeek's; an inexact router; training).
    """

    def __init__(self, router: nn.Module, full_k: int, renormalize: bool,
                 selection_scores: Callable[[nn.Module, torch.Tensor], torch.Tensor], n_sub: int = 1,
                 mode: RouteMode = "rule") -> None:
        super().__init__()
        self.router = router
        self.full_k = full_k
        self.renormalize = renormalize
        self.selection_scores = selection_scores
        self.n_sub = n_sub
        self._mode: RouteMode = mode
        self.top_k = full_k
        self.register_buffer("sub_offsets", torch.arange(n_sub), persistent=False)

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        self._top_k = k
        self._sync_router_k()

    @property
    def mode(self) -> RouteMode:
        return self._mode

    @mode.setter
    def mode(self, value: RouteMode) -> None:
        if value not in ("blocks", "ranked", "rule"):
            raise ValueError(f"unknown linear gate mode {value!r}")
        self._mode = value
        self._sync_router_k()

    def _sync_router_k(self) -> None:
        """The stock router's top-k: the whole blocks covering K (``blocks``), K+1 (``ranked``, below the
        full K), else the full N*k."""
        n, k = self.n_sub, self._top_k
        if self._mode == "blocks":
            self.router.top_k = n * -(-k // n)
        elif self._mode == "ranked" and k < self.full_k:
            self.router.top_k = k + 1
        else:
            self.router.top_k = self.full_k

    def use_bank_rows(self, index: int, mode: RouteMode) -> None:
        """Route with router ``index`` of a router bank (its rows are the buffer ``bank_{index}``)."""
        self.router.weight.data = getattr(self, f"bank_{index}")
        self.mode = mode

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self._top_k
        if self._mode == "ranked" and k < self.full_k and hidden_states.device.type != "cpu":
            return self._by_rule(hidden_states, *self._full_top_k(hidden_states))
        logits, weights, indices = self.router(hidden_states)
        if self._mode == "blocks":
            n = self.n_sub
            whole, part = divmod(k, n)
            # The blocks are known by construction: the experts need not find them (runtime/grouped_mm.py).
            # Each block's expert is a new tensor, not a view: the blocks ride on the indices they describe,
            # and a view of those indices would tie them in a cycle through torch's view tracking that no
            # collector frees.
            expert = torch.div(indices[:, ::n], n, rounding_mode="floor")
            blocks = PrefixRouting(expert, (n,) * whole + ((part,) if part else ()), uniform=True)
            if part == 0:  # whole blocks: the stock routing as it is (copies in any order within a block)
                setattr(indices, PREFIX_ATTR, blocks)
                return logits, weights, indices
            # the last block's first `part` sub-experts, in index order
            kept_idx = (expert.unsqueeze(-1) * n + self.sub_offsets).view(indices.shape[0], -1)[:, :k]
            kept_w = weights[:, :k]  # the copies of an expert carry the same weight
            setattr(kept_idx, PREFIX_ATTR, blocks)
        elif k >= self.full_k:
            return logits, weights, indices
        elif self._mode == "ranked":
            score = self.selection_scores(self.router, logits).gather(1, indices)
            if not bool((score[:, :k].amin(dim=1) > score[:, k]).all()):
                return self._by_rule(hidden_states, *self._full_top_k(hidden_states))
            kept_w, kept_idx = weights[:, :k], indices[:, :k]
        else:
            return self._by_rule(hidden_states, logits, weights, indices)
        return logits, self._renormalized(kept_w, weights), kept_idx

    def _full_top_k(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stock router at the full top-(N*k), whatever K the mode has it at."""
        saved, self.router.top_k = self.router.top_k, self.full_k
        try:
            return self.router(hidden_states)
        finally:
            self.router.top_k = saved

    def _by_rule(self, hidden_states: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rule over the full top-(N*k) ``indices``: two stable sorts (by index, then by score)."""
        by_index, perm = torch.sort(indices, dim=-1, stable=True)
        score = self.selection_scores(self.router, logits).gather(1, by_index)
        order = torch.argsort(score, dim=-1, descending=True, stable=True)[:, : self._top_k]
        keep = perm.gather(1, order)
        return logits, self._renormalized(weights.gather(1, keep), weights), indices.gather(1, keep)

    def _renormalized(self, kept_w: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Where the family renormalises, the kept weights sum to what all the returned ones sum to."""
        if not self.renormalize:
            return kept_w
        return kept_w * (weights.sum(dim=-1, keepdim=True) / kept_w.sum(dim=-1, keepdim=True))


class ElasticRouter(nn.Module):
    """The router of an exported MoE block under prism: the linear gate or the gate neurons, in place.

    It replaces the block's stock (flat) router once, at load; ``set_operating_point`` only switches
    which branch runs. Both branches stay in the module tree, so ``model.to()`` / ``.half()`` move them
    all, and state-dict hooks make the block save and load as the stock flat router it replaced: an
    elastic model's ``state_dict()`` / ``save_pretrained`` has exactly the export's keys. (The gate
    neurons' rows are a copy of the experts' rows, taken again when those weights change.)
    """

    def __init__(self, linear: LinearGateRouter, neurons: GateNeuronRouter | None) -> None:
        super().__init__()
        self.linear = linear
        self.neurons = neurons
        self.use_neurons = False
        self.register_state_dict_post_hook(_save_as_flat_router)
        self.register_load_state_dict_pre_hook(_load_as_flat_router)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.neurons if self.use_neurons else self.linear)(hidden_states)


def _save_as_flat_router(module: ElasticRouter, state_dict: dict, prefix: str, _metadata: object) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    for name, tensor in module.linear.router.state_dict().items():
        state_dict[prefix + name] = tensor


def _load_as_flat_router(module: ElasticRouter, state_dict: dict, prefix: str, *_args: object) -> None:
    """Stock keys go to the flat router, and every N-th expert's rows to the gate neurons' source router
    (unless that router is stored apart, for a tuned export: it keeps its own rows)."""
    for name in module.linear.router.state_dict():
        if prefix + name not in state_dict:
            continue
        value = state_dict.pop(prefix + name)
        state_dict[f"{prefix}linear.router.{name}"] = value
        if module.neurons is not None:
            gate = module.neurons
            state_dict[f"{prefix}neurons.router.{name}"] = value[:: gate.n_sub] if gate.router_from_flat else gate.router.state_dict()[name]
