"""How far a flat export's linear gate is from the source model's routing, where it cannot be exact.

Repeating router rows reproduces the routing of most families exactly (the tests check it), but not
DeepSeek-V3's group-limited routing, which scores an expert group by the sum of its two best experts
(``MoEAdapter.linear_gate_inexact_reason``). ``prism export --gate linear --allow-inexact`` exports such
a model anyway and records the difference measured here in the export's ``prism.linear_gate_difference``.

Measured on the source model's own hidden states: calibration text runs through the source model,
and at every MoE block the original router and the flat router (its rows repeated N times, the
export's router) see the same input. A (token, layer) pair *mismatches* when the flat router's
N*k picks are not exactly the N copies of the original router's k experts; where they are, the
routing weights are compared too (a copy's weight times the export's ``down_proj`` scale against
the original expert's weight).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from prism_cli.data import load_text
from prism_cli.data.windows import token_windows
from prism_cli.errors import PrismError
from prism_cli.models.adapters import MoEAdapter
from prism_cli.models.loading import load_model

#: Calibration tokens the difference is measured on (in windows of ``SEQ_LEN``).
TOKENS = 2048
SEQ_LEN = 128


def _flat_router(router: torch.nn.Module, config: Any, adapter: MoEAdapter, n_sub: int) -> torch.nn.Module:
    """The export's router for one block: the same class over ``E*N`` experts, every per-expert routing
    tensor repeated N times as the export writes it."""
    flat_config = copy.deepcopy(config)
    for key, value in adapter.flat_config_updates(n_sub).items():
        setattr(flat_config, key, value)
    flat = type(router)(flat_config).to(device=router.weight.device)
    flat.load_state_dict({name: adapter.flat_routing_tensor(name, tensor, n_sub)
                          for name, tensor in router.state_dict().items()})
    return flat


@torch.inference_mode()
def linear_gate_difference(model: str, n_sub: int) -> dict[str, Any]:
    """Share of (token, MoE layer) pairs the linear gate routes differently from ``model``, and the
    largest routing-weight error where it routes alike (see the module docstring)."""
    loaded = load_model(model)
    adapter = loaded.adapter
    assert adapter is not None
    text, data_name = load_text(None, "calibration")
    try:
        windows = token_windows(loaded.tokenizer, text, SEQ_LEN, TOKENS)
    except ValueError as exc:
        raise PrismError(str(exc)) from None
    scale = adapter.flat_down_scale(n_sub)
    totals = {"pairs": 0, "mismatched": 0, "weight_error": 0.0}
    handles = []

    def compare(flat: torch.nn.Module):
        def hook(_module: torch.nn.Module, args: tuple, output: tuple) -> None:
            _, weights, picked = output
            _, flat_weights, flat_picked = flat(args[0])
            if flat_picked.shape[-1] != picked.shape[-1] * n_sub:  # a router with a fixed pick count (Phi-MoE's 2)
                totals["pairs"] += picked.shape[0]
                totals["mismatched"] += picked.shape[0]
                return
            experts = flat_picked // n_sub
            same = (experts.sort(dim=-1).values == picked.sort(dim=-1).values.repeat_interleave(n_sub, dim=-1)).all(-1)
            totals["pairs"] += same.numel()
            totals["mismatched"] += int((~same).sum())
            if same.any():
                dense = torch.zeros(picked.shape[0], adapter.num_experts, dtype=torch.float64, device=picked.device)
                dense.scatter_(1, picked, weights.double())
                expected = dense.gather(1, experts)
                error = (flat_weights.double() * scale - expected).abs()[same].max()
                totals["weight_error"] = max(totals["weight_error"], float(error))
        return hook

    for layer in adapter.moe_layers(loaded.model):
        flat = _flat_router(layer.router, loaded.model.config, adapter, n_sub)
        handles.append(layer.router.register_forward_hook(compare(flat)))
    try:
        for first in range(0, windows.shape[0], 8):
            loaded.model(input_ids=windows[first : first + 8].to(loaded.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "routing_mismatch": totals["mismatched"] / max(totals["pairs"], 1),
        "max_weight_error": totals["weight_error"],
        "pairs": totals["pairs"],
        "tokens": int(windows.numel()),
        "data": data_name,
        "definition": "share of (token, MoE layer) pairs whose N*k flat-router picks are not the N copies of the "
                      "original router's k experts, on the source model's hidden states; max_weight_error: largest "
                      "|copy weight x down_proj scale - original weight| where they are",
    }
