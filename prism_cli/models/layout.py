"""Where neuron j of an expert lives in a fused experts module, for every layout transformers uses.

transformers v5 stores an MoE layer's routed experts as a few 3-D tensors and describes their layout
with the flags of ``integrations.moe.use_experts_implementation``:

* ``is_transposed``: ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` (GPT-OSS, Aria) instead
  of ``[E, 2I, H]`` and ``[E, H, I]``;
* ``is_concatenated``: the 2I axis is ``[gate_0 .. gate_{I-1}, up_0 .. up_{I-1}]``; when False it is
  interleaved, ``[gate_0, up_0, gate_1, up_1, ...]`` (GPT-OSS);
* ``has_bias``: ``gate_up_proj_bias [E, 2I]`` (per neuron, laid out like the 2I axis) and
  ``down_proj_bias [E, H]`` (once per expert);
* the module's own ``_apply_gate`` turns the ``[.., 2I]`` projection into the ``[.., I]`` activation
  (SwiGLU by default, GPT-OSS's clamped variant), neuron j at position j whatever the layout.

Neuron j of expert e is therefore its gate row, its up row, its down column and its two up-projection
biases, wherever the layout puts them; ``ExpertLayout`` is the one place that knows where. Splitting an
expert into sub-experts (export), recording activations (profiling) and reading gate-neuron rows
(runtime) all go through it, so a layout is handled the same way everywhere or refused everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate

from prism_cli.errors import PrismError


@dataclass(frozen=True)
class ExpertLayout:
    """The layout of one fused experts module (see the module docstring)."""

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    #: The experts class has its own ``_apply_gate`` (e.g. a clamped SwiGLU), not transformers' default.
    custom_activation: bool = False

    @classmethod
    def of(cls, experts: nn.Module, name: str = "experts") -> ExpertLayout:
        """Read the layout from an experts module, refusing what prism cannot split neuron by neuron."""
        if not hasattr(experts, "is_transposed"):
            raise PrismError(
                f"{name} ({type(experts).__name__}) is not dispatched through transformers' experts interface "
                "(use_experts_implementation), so its layout is not declared; prism splits only such experts"
            )
        if not getattr(experts, "has_gate", True):
            raise PrismError(
                f"{name} ({type(experts).__name__}) has no gate projection (plain up/down MLP experts); prism splits "
                "gated experts (gate_up_proj) only"
            )
        if getattr(experts, "has_post_expert_norm", False):
            raise PrismError(
                f"{name} ({type(experts).__name__}) normalises each expert's output (has_post_expert_norm): a norm of "
                "the whole expert's output is not a sum over sub-experts, so no split can reproduce it"
            )
        custom = getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate
        return cls(bool(experts.is_transposed), not bool(experts.is_concatenated), bool(experts.has_bias), custom)

    # ---- names and shapes ----------------------------------------------------------------------
    def tensor_names(self) -> tuple[str, ...]:
        """The experts module's parameters, in a fixed order."""
        return ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias") if self.bias else ("gate_up_proj", "down_proj")

    def shapes(self, experts: int, width: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """The shape of every experts tensor for ``experts`` experts of width ``width``."""
        gate_up = (experts, hidden, 2 * width) if self.transposed else (experts, 2 * width, hidden)
        down = (experts, width, hidden) if self.transposed else (experts, hidden, width)
        shapes = {"gate_up_proj": gate_up, "down_proj": down}
        if self.bias:
            shapes |= {"gate_up_proj_bias": (experts, 2 * width), "down_proj_bias": (experts, hidden)}
        return shapes

    def width_of(self, gate_up: torch.Tensor) -> int:
        return int(gate_up.shape[-1 if self.transposed else -2]) // 2

    # ---- neurons -------------------------------------------------------------------------------
    def gate_up_positions(self, neurons: torch.Tensor, width: int) -> torch.Tensor:
        """Positions on the 2I axis of the gate and up entries of ``neurons``, in the layout's own order,
        so that indexing with them gives the same layout over ``len(neurons)`` neurons."""
        neurons = neurons.long()
        if self.interleaved:
            return torch.stack([2 * neurons, 2 * neurons + 1], dim=-1).reshape(-1)
        return torch.cat([neurons, neurons + width])

    def split(self, tensors: dict[str, torch.Tensor], neurons: torch.Tensor) -> dict[str, torch.Tensor]:
        """One expert's tensors (no expert axis) restricted to ``neurons``, in their order.

        ``down_proj_bias`` is not per neuron: it is left out (the caller decides which sub-expert
        carries it, see ``prism_cli.export.builder``).
        """
        width = self.width_of(tensors["gate_up_proj"].unsqueeze(0))
        positions = self.gate_up_positions(neurons, width)
        out = {
            "gate_up_proj": tensors["gate_up_proj"].index_select(-1 if self.transposed else 0, positions),
            "down_proj": tensors["down_proj"].index_select(0 if self.transposed else -1, neurons.long()),
        }
        if self.bias:
            out["gate_up_proj_bias"] = tensors["gate_up_proj_bias"].index_select(0, positions)
        return out

    def gate_up_rows(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_gate, W_up)``, each ``[..., I, H]`` (neuron rows), from ``gate_up_proj`` in this layout."""
        rows = gate_up.transpose(-1, -2) if self.transposed else gate_up
        if self.interleaved:
            return rows[..., 0::2, :], rows[..., 1::2, :]
        width = rows.shape[-2] // 2
        return rows[..., :width, :], rows[..., width:, :]

    def down_columns(self, down: torch.Tensor) -> torch.Tensor:
        """``W_down`` as ``[..., H, I]`` (column j is neuron j's output direction)."""
        return down.transpose(-1, -2) if self.transposed else down

    # ---- computing one expert ------------------------------------------------------------------
    def up(self, x: torch.Tensor, gate_up: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[T, 2I]`` pre-activation of one expert, in the layout's order (what ``_apply_gate`` takes)."""
        out = x @ gate_up if self.transposed else x @ gate_up.T
        return out if bias is None else out + bias

    def down(self, act: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = act @ down if self.transposed else act @ down.T
        return out if bias is None else out + bias
