"""Capturing expert activations during a forward pass, with host memory bounded by a budget.

``profiling_experts_forward`` is registered with transformers' ``ExpertsInterface`` as
``"prism_profile"``: it computes the experts exactly like the eager implementation (tokens sorted by
expert, one matmul pair per expert, in the module's own layout, biases and activation) and hands each
expert's intermediate activations ``a(x) = _apply_gate(x W_gate_up + b)`` (SwiGLU
``silu(x W_gate^T) * (x W_up^T)`` for most families, GPT-OSS's clamped variant for GPT-OSS; neuron j
in column j whatever the layout) to the ``ActivationRecorder`` attached to the module, so the
activations are never computed twice.

The recorder keeps, per (layer, expert), the counters and two uniform reservoir samples of rows (fit
and held-out). Only the reservoirs' *decisions* (which token sits in which slot) and the counters live
in memory; the rows themselves go to a ``LayerSpill`` (``spill.py``) that buffers them within the
budget and writes them to disk at checkpoints. Every piece of state a reservoir has (its slot
contents, how many rows it has seen, its generator's exact position) is saved at a checkpoint, and
each layer keeps a cursor (batch, expert) of what it has recorded: a resumed run skips exactly what
was recorded before and draws the very numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers.integrations.moe import ExpertsInterface

from prism_cli.models.layout import ExpertLayout
from prism_cli.models.llama4 import pair_rows
from prism_cli.profiling.spill import LayerSpill, RowBuffer

PROFILE_IMPLEMENTATION = "prism_profile"
#: Reservoir kinds, in the order their streams are seeded and stored.
KINDS = ("fit", "heldout")


def reservoir_rng(seed: int, layer_position: int, num_experts: int, expert: int, kind: int) -> np.random.Generator:
    """The generator of one reservoir: a function of (seed, layer, expert, kind) only.

    ``layer_position`` is the layer's place among *all* MoE layers of the model, so a layer draws the
    same numbers whichever other layers are profiled, in whichever pass. Child ``i`` of
    ``SeedSequence(seed)`` (what ``spawn`` hands out) is built directly, without spawning the others.
    """
    index = 2 * (layer_position * num_experts + expert) + kind
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def rng_state(rng: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's exact position as six uint64 (128-bit state and increment split in halves)."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"cannot save a {st['bit_generator']} generator")
    mask = (1 << 64) - 1
    s, inc = st["state"]["state"], st["state"]["inc"]
    return np.array([s >> 64, s & mask, inc >> 64, inc & mask, st["has_uint32"], st["uinteger"]], dtype=np.uint64)


def set_rng_state(rng: np.random.Generator, saved: np.ndarray) -> None:
    s_hi, s_lo, i_hi, i_lo, has32, uint = (int(x) for x in saved)
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (s_hi << 64) | s_lo, "inc": (i_hi << 64) | i_lo},
        "has_uint32": has32,
        "uinteger": uint,
    }


class Reservoir:
    """Uniform sample of at most ``capacity`` stream elements (Algorithm R, vectorised per batch).

    Element ``t`` of the stream (0-based) replaces slot ``j ~ U{0..t}`` when ``j < capacity``; within a
    batch a later element that draws the same slot wins, exactly as one-by-one processing would. The
    reservoir keeps each slot's token and routing weight; ``offer`` says which slots the batch writes
    and from which of its elements, so the caller can store the rows wherever it keeps them.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int64)
        self.weights = np.zeros(capacity, dtype=np.float32)
        self.count = 0
        self.seen = 0
        self.rng = rng

    def offer(self, tokens: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offer a batch; returns ``(slots, src)``: slot ``slots[i]`` now holds batch element ``src[i]``.

        Slots are distinct and ascending.
        """
        n = tokens.shape[0]
        if n == 0 or self.capacity == 0:
            self.seen += n
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        fill = min(self.capacity - self.count, n)
        slots = [np.arange(self.count, self.count + fill)]
        src = [np.arange(fill)]
        self.count += fill
        if fill < n:
            stream_pos = self.seen + np.arange(fill, n)
            draws = np.floor(self.rng.random(n - fill) * (stream_pos + 1)).astype(np.int64)
            hit = np.nonzero(draws < self.capacity)[0]
            slots.append(draws[hit])
            src.append(hit + fill)
        all_slots, all_src = np.concatenate(slots), np.concatenate(src)
        # The last writer of each slot wins: reverse, keep first occurrences (np.unique sorts the slots).
        final_slots, first = np.unique(all_slots[::-1], return_index=True)
        final_src = all_src[::-1][first]
        self.tokens[final_slots] = tokens[final_src]
        self.weights[final_slots] = weights[final_src]
        self.seen += n
        return final_slots, final_src


@dataclass
class LayerRecord:
    """Everything recorded for one MoE layer, and how far it got (the cursor)."""

    layer: int
    routed: torch.Tensor  # [E] int64: tokens routed to each expert
    weight_sum: torch.Tensor  # [E] float64: their routing weights
    l1_mass: torch.Tensor  # [E, I] float64: sum of |a_j|
    hot_count: torch.Tensor  # [E, I] int64: tokens where neuron j is in the top quarter
    reservoirs: list[list[Reservoir]]  # [kind][expert]
    spill: LayerSpill
    #: Batches before ``batch`` are recorded, and the experts before ``expert`` of batch ``batch``.
    batch: int = 0
    expert: int = 0

    def done(self, batch: int, expert: int) -> bool:
        return (batch, expert) < (self.batch, self.expert)

    def state(self) -> dict[str, np.ndarray]:
        """The layer's state as arrays (a checkpoint stores exactly these)."""
        res = self.reservoirs
        return {
            "cursor": np.array([self.batch, self.expert], dtype=np.int64),
            "routed": self.routed.cpu().numpy(),
            "weight_sum": self.weight_sum.cpu().numpy(),
            "l1_mass": self.l1_mass.cpu().numpy(),
            "hot_count": self.hot_count.cpu().numpy(),
            **{f"{kind}_tokens": np.stack([r.tokens for r in res[k]]) for k, kind in enumerate(KINDS)},
            **{f"{kind}_weights": np.stack([r.weights for r in res[k]]) for k, kind in enumerate(KINDS)},
            **{f"{kind}_count": np.array([r.count for r in res[k]], dtype=np.int64) for k, kind in enumerate(KINDS)},
            **{f"{kind}_seen": np.array([r.seen for r in res[k]], dtype=np.int64) for k, kind in enumerate(KINDS)},
            **{f"{kind}_rng": np.stack([rng_state(r.rng) for r in res[k]]) for k, kind in enumerate(KINDS)},
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.batch, self.expert = (int(x) for x in state["cursor"])
        device = self.routed.device
        self.routed = torch.from_numpy(state["routed"]).to(device)
        self.weight_sum = torch.from_numpy(state["weight_sum"]).to(device)
        self.l1_mass = torch.from_numpy(state["l1_mass"]).to(device)
        self.hot_count = torch.from_numpy(state["hot_count"]).to(device)
        for k, kind in enumerate(KINDS):
            for e, r in enumerate(self.reservoirs[k]):
                r.tokens[:] = state[f"{kind}_tokens"][e]
                r.weights[:] = state[f"{kind}_weights"][e]
                r.count = int(state[f"{kind}_count"][e])
                r.seen = int(state[f"{kind}_seen"][e])
                set_rng_state(r.rng, state[f"{kind}_rng"][e])


class ActivationRecorder:
    """Per-(layer, expert) counters and fit / held-out reservoirs for the layers of one profiling pass.

    Kept rows are copied into ``buffer``; ``reserve(n_rows)`` is called first, and checkpoints every
    layer (which empties the buffer) when fewer rows are free, which is why the cursor is moved
    before it is called.
    """

    def __init__(
        self,
        records: dict[int, LayerRecord],
        width: int,
        *,
        buffer: RowBuffer,
        reserve: Callable[[int], None],
    ) -> None:
        self.records = records
        self.width = width
        self.buffer = buffer
        self._reserve = reserve
        self._batch = 0
        self._holdout: torch.Tensor | None = None
        self._token_offset = 0
        # The top quarter is the ceil(I/4) largest values (as ``hot_rate`` counts them from rows), so it
        # starts at the (I - ceil(I/4) + 1)-th smallest; ``I - I // 4`` would count one neuron too many.
        self._hot_k = width - max(1, math.ceil(width / 4)) + 1

    def begin_batch(self, batch: int, token_offset: int, holdout: torch.Tensor) -> None:
        """Next batch: its index, its first token's global position and a per-token held-out flag ``[tokens]``."""
        self._batch = batch
        self._token_offset = token_offset
        self._holdout = holdout

    def end_layer(self, layer: int) -> None:
        """The layer's experts have all run for this batch."""
        rec = self.records.get(layer)
        if rec is not None and not rec.done(self._batch + 1, 0):
            rec.batch, rec.expert = self._batch + 1, 0

    def record(self, layer: int, expert: int, act: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Record the activations ``act [n, I]`` of the batch tokens ``token_idx`` routed to ``expert``."""
        rec = self.records.get(layer)
        if rec is None or rec.done(self._batch, expert):
            return
        rec.batch, rec.expert = self._batch, expert
        assert self._holdout is not None, "begin_batch must be called before the forward pass"
        held = self._holdout.to(token_idx.device)[token_idx]
        n_held = int(held.sum())
        fit_res, held_res = rec.reservoirs[0][expert], rec.reservoirs[1][expert]
        most = min(act.shape[0] - n_held, fit_res.capacity) + min(n_held, held_res.capacity)
        self._reserve(most)

        mag = act.detach().abs()
        if rec.l1_mass.device != act.device:
            # With --device-map the layers live on different devices: keep each layer's counters on its own.
            rec.routed, rec.weight_sum = rec.routed.to(act.device), rec.weight_sum.to(act.device)
            rec.l1_mass, rec.hot_count = rec.l1_mass.to(act.device), rec.hot_count.to(act.device)
        rec.routed[expert] += act.shape[0]
        rec.weight_sum[expert] += weights.detach().double().sum()
        rec.l1_mass[expert] += mag.sum(dim=0, dtype=torch.float64)
        if self.width > 1:
            threshold = torch.kthvalue(mag.float(), self._hot_k, dim=1, keepdim=True).values
            rec.hot_count[expert] += (mag >= threshold).sum(dim=0)
        else:
            rec.hot_count[expert] += act.shape[0]
        global_tok = (token_idx + self._token_offset).cpu().numpy()
        weights_np = weights.detach().float().cpu().numpy()
        for kind, mask in enumerate((~held, held)):
            if not bool(mask.any()):
                continue
            mask_np = mask.cpu().numpy()
            slots, src = rec.reservoirs[kind][expert].offer(global_tok[mask_np], weights_np[mask_np])
            if slots.size:
                rows = self.buffer.take(slots.size)
                rows.copy_(act[mask][torch.from_numpy(src).to(act.device)].detach())
                rec.spill.write(kind, expert, slots, rows)
        rec.expert = expert + 1


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
            rows = pair_rows(self)  # Llama-4: one row per (token, expert) pair, its input already scaled
            if rows is None:
                recorder.record(layer, expert, act, token_idx, weights)
            else:
                recorder.record(layer, expert, act, rows[0][token_idx], rows[1][token_idx])
        y = layout.down(act, self.down_proj[expert], None if down_bias is None else down_bias[expert])
        y = y * weights[:, None].to(act.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    if recorder is not None:
        recorder.end_layer(layer)
    return out


ExpertsInterface.register(PROFILE_IMPLEMENTATION, profiling_experts_forward)
