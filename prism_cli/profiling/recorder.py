"""Capturing expert activations during a forward pass, with memory bounded by the row caps.

``profiling_experts_forward`` is registered with transformers' ``ExpertsInterface`` as
``"prism_profile"``: it computes the experts exactly like the eager implementation (tokens sorted by
expert, one matmul pair per expert, in the module's own layout, biases and activation) and hands each
expert's intermediate activations ``a(x) = _apply_gate(x W_gate_up + b)`` (SwiGLU
``silu(x W_gate^T) * (x W_up^T)`` for most families, GPT-OSS's clamped variant for GPT-OSS; neuron j
in column j whatever the layout) to the ``ActivationRecorder`` attached to the module, so the
activations are never computed twice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.integrations.moe import ExpertsInterface

from prism_cli.models.layout import ExpertLayout

PROFILE_IMPLEMENTATION = "prism_profile"


class Reservoir:
    """Uniform sample of at most ``capacity`` rows from a stream (Algorithm R, vectorised per batch).

    Row ``t`` of the stream (0-based) replaces slot ``j ~ U{0..t}`` when ``j < capacity``; within a
    batch a later row that draws the same slot wins, exactly as one-by-one processing would.
    """

    def __init__(self, capacity: int, width: int, dtype: torch.dtype, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rows = torch.empty(0, width, dtype=dtype)
        self.tokens = torch.empty(0, dtype=torch.long)
        self.weights = torch.empty(0, dtype=torch.float32)
        self.seen = 0
        self._rng = rng

    def offer(self, rows: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0 or self.capacity == 0:
            self.seen += n
            return
        rows = rows.to("cpu", self.rows.dtype)
        tokens, weights = tokens.to("cpu"), weights.to("cpu", torch.float32)
        fill = min(max(self.capacity - self.rows.shape[0], 0), n)
        if fill:
            self.rows = torch.cat([self.rows, rows[:fill]])
            self.tokens = torch.cat([self.tokens, tokens[:fill]])
            self.weights = torch.cat([self.weights, weights[:fill]])
        if fill < n:
            stream_pos = self.seen + np.arange(fill, n)
            slots = np.floor(self._rng.random(n - fill) * (stream_pos + 1)).astype(np.int64)
            hit = np.nonzero(slots < self.capacity)[0]
            if hit.size:
                # keep the last row per slot: reverse, take first occurrences
                rev_slots = slots[hit][::-1]
                _, first = np.unique(rev_slots, return_index=True)
                chosen = hit[::-1][first]
                dst = torch.from_numpy(slots[chosen])
                src = torch.from_numpy(chosen + fill)
                self.rows[dst] = rows[src]
                self.tokens[dst] = tokens[src]
                self.weights[dst] = weights[src]
        self.seen += n


class ActivationRecorder:
    """Per-(layer, expert) statistics and fit / held-out row reservoirs for one profiling run."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        width: int,
        *,
        max_rows: int,
        holdout_fraction: float,
        row_dtype: torch.dtype,
        seed: int,
        device: torch.device,
    ) -> None:
        heldout_cap = int(round(max_rows * holdout_fraction))
        fit_cap = max_rows - heldout_cap
        self.layers = layers
        self.num_experts = num_experts
        self.width = width
        self.routed = {layer: torch.zeros(num_experts, dtype=torch.long, device=device) for layer in layers}
        self.weight_sum = {layer: torch.zeros(num_experts, dtype=torch.float64, device=device) for layer in layers}
        self.l1_mass = {layer: torch.zeros(num_experts, width, dtype=torch.float64, device=device) for layer in layers}
        self.hot_count = {layer: torch.zeros(num_experts, width, dtype=torch.long, device=device) for layer in layers}
        seeds = np.random.SeedSequence(seed).spawn(len(layers) * num_experts * 2)
        self.fit: dict[tuple[int, int], Reservoir] = {}
        self.heldout: dict[tuple[int, int], Reservoir] = {}
        for i, (layer, e) in enumerate((layer, e) for layer in layers for e in range(num_experts)):
            self.fit[layer, e] = Reservoir(fit_cap, width, row_dtype, np.random.default_rng(seeds[2 * i]))
            self.heldout[layer, e] = Reservoir(heldout_cap, width, row_dtype, np.random.default_rng(seeds[2 * i + 1]))
        self._token_offset = 0
        self._holdout: torch.Tensor | None = None
        # The top quarter is the ceil(I/4) largest values (as ``hot_rate`` counts them from rows), so it
        # starts at the (I - ceil(I/4) + 1)-th smallest; ``I - I // 4`` would count one neuron too many.
        self._hot_k = width - max(1, math.ceil(width / 4)) + 1

    def begin_batch(self, token_offset: int, holdout: torch.Tensor) -> None:
        """Next batch: its first token's global position and a per-token held-out flag ``[tokens]``."""
        self._token_offset = token_offset
        self._holdout = holdout

    def record(self, layer: int, expert: int, act: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Record the activations ``act [n, I]`` of the batch tokens ``token_idx`` routed to ``expert``."""
        mag = act.detach().abs()
        if self.l1_mass[layer].device != act.device:
            # With --device-map the layers live on different devices: keep each layer's counters on its own.
            for stats in (self.routed, self.weight_sum, self.l1_mass, self.hot_count):
                stats[layer] = stats[layer].to(act.device)
        self.routed[layer][expert] += act.shape[0]
        self.weight_sum[layer][expert] += weights.detach().double().sum()
        self.l1_mass[layer][expert] += mag.sum(dim=0, dtype=torch.float64)
        if self.width > 1:
            threshold = torch.kthvalue(mag.float(), self._hot_k, dim=1, keepdim=True).values
            self.hot_count[layer][expert] += (mag >= threshold).sum(dim=0)
        else:
            self.hot_count[layer][expert] += act.shape[0]
        assert self._holdout is not None, "begin_batch must be called before the forward pass"
        held = self._holdout.to(token_idx.device)[token_idx]
        global_tok = token_idx + self._token_offset
        for mask, reservoirs in ((~held, self.fit), (held, self.heldout)):
            if bool(mask.any()):
                reservoirs[layer, expert].offer(act[mask].detach(), global_tok[mask], weights[mask].detach())


def profiling_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Eager-equivalent experts forward that reports each expert's activations to ``self._prism_recorder``."""
    recorder: ActivationRecorder | None = getattr(self, "_prism_recorder", None)
    layer: int = getattr(self, "_prism_layer", -1)
    layout = ExpertLayout.of(self)
    gate_up_bias = self.gate_up_proj_bias if layout.bias else None
    down_bias = self.down_proj_bias if layout.bias else None
    num_top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)
    flat_weights = top_k_weights.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
    out = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts[: self.num_experts]):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        token_idx = pairs // num_top_k
        weights = flat_weights[pairs]
        proj = layout.up(hidden_states[token_idx], self.gate_up_proj[expert],
                         None if gate_up_bias is None else gate_up_bias[expert])
        act = self._apply_gate(proj)
        if recorder is not None:
            recorder.record(layer, expert, act, token_idx, weights)
        y = layout.down(act, self.down_proj[expert], None if down_bias is None else down_bias[expert])
        y = y * weights[:, None].to(act.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


ExpertsInterface.register(PROFILE_IMPLEMENTATION, profiling_experts_forward)
