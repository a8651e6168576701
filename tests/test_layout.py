"""Expert layouts: a split expert's sub-experts, run by transformers' own experts implementation of the
family as separate experts, add up to the expert (standard, transposed, interleaved gate/up with
biases and a clamped activation), and the neuron accessors agree with the layout's definition."""

from __future__ import annotations

import pytest
import torch

from prism_cli.models.layout import ExpertLayout
from prism_cli.models.tiny import tiny_config

N_SUB = 4

#: Families whose experts cover the layouts transformers has, and the layout each must report.
LAYOUTS = {
    "olmoe": ExpertLayout(),
    "aria_text": ExpertLayout(transposed=True),
    "gpt_oss": ExpertLayout(transposed=True, interleaved=True, bias=True, custom_activation=True),
    "minimax_m3_vl_text": ExpertLayout(custom_activation=True),
}


def _experts(model_type: str, **changes):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **changes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block = next(m for m in model.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj"))
    experts = type(block.experts)(model.config.get_text_config()).to_empty(device="cpu")
    experts.config._experts_implementation = "eager"  # the class's own forward: the oracle
    return experts


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_sub_experts_add_up_under_the_familys_own_forward(model_type: str) -> None:
    torch.manual_seed(0)
    experts = _experts(model_type)
    layout = ExpertLayout.of(experts)
    assert layout == LAYOUTS[model_type]
    with torch.no_grad():
        for tensor in experts.parameters():
            tensor.normal_(0.0, 1.5)  # large enough that GPT-OSS's clamps (limit 7) bite
    width = layout.width_of(experts.gate_up_proj)
    config = experts.config
    flat = type(experts)(_flat_config(config, len(experts.gate_up_proj) * N_SUB, width // N_SUB)).to_empty(device="cpu")
    flat.config._experts_implementation = "eager"
    perms = [torch.randperm(width) for _ in range(len(experts.gate_up_proj))]
    stacked: dict[str, list[torch.Tensor]] = {k: [] for k in layout.tensor_names()}
    for e, perm in enumerate(perms):
        one = {k: getattr(experts, k)[e].detach() for k in layout.tensor_names()}
        for n in range(N_SUB):
            sub = layout.split(one, perm[n * (width // N_SUB) : (n + 1) * (width // N_SUB)])
            if layout.bias:
                sub["down_proj_bias"] = one["down_proj_bias"] if n == 0 else torch.zeros_like(one["down_proj_bias"])
            for k, v in sub.items():
                stacked[k].append(v)
    with torch.no_grad():
        for k, v in stacked.items():
            getattr(flat, k).copy_(torch.stack(v))
    x = torch.randn(16, experts.gate_up_proj.shape[1 if layout.transposed else 2])
    idx = torch.tensor([[e] for e in range(len(perms))] * 4)[:16]
    weights = torch.rand(16, 1)
    want = experts(x, idx, weights)
    flat_idx = idx * N_SUB + torch.arange(N_SUB)  # every sub-expert of the expert, same weight
    got = flat(x, flat_idx, weights.expand(-1, N_SUB))
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6


def _flat_config(config, experts: int, width: int):
    import copy

    flat = copy.deepcopy(config)
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if isinstance(getattr(flat, key, None), int):
            setattr(flat, key, experts)
    for key in ("moe_intermediate_size", "intermediate_size"):
        if isinstance(getattr(flat, key, None), int):
            setattr(flat, key, width)
    return flat


def test_neuron_accessors_follow_the_layout_definition() -> None:
    """W_gate / W_up rows and W_down columns of neuron j, by hand from the documented layouts."""
    e, h, width = 3, 5, 6
    for transposed in (False, True):
        for interleaved in (False, True):
            layout = ExpertLayout(transposed, interleaved, False)
            gate = torch.randn(e, width, h)
            up = torch.randn(e, width, h)
            rows = torch.stack([gate, up], dim=2).reshape(e, 2 * width, h) if interleaved else torch.cat([gate, up], 1)
            gate_up = rows.transpose(1, 2) if transposed else rows
            g, u = layout.gate_up_rows(gate_up)
            assert torch.equal(g, gate) and torch.equal(u, up)
            down = torch.randn(e, h, width)
            assert torch.equal(layout.down_columns(down.transpose(1, 2) if transposed else down), down)
            neurons = torch.tensor([4, 1])
            sub = layout.split({"gate_up_proj": gate_up[0], "down_proj": (down.transpose(1, 2) if transposed else down)[0]},
                               neurons)
            sg, su = layout.gate_up_rows(sub["gate_up_proj"].unsqueeze(0))
            assert torch.equal(sg[0], gate[0, neurons]) and torch.equal(su[0], up[0, neurons])
            assert torch.equal(layout.down_columns(sub["down_proj"].unsqueeze(0))[0], down[0][:, neurons])


def test_profiling_records_the_familys_own_activation(tmp_path) -> None:
    """GPT-OSS: what the profiler records is its clamped SwiGLU of x W + b (by hand, in its documented
    layout: each expert's summed |activation| per neuron and its routed count), and the recording
    forward equals the family's eager forward."""
    import numpy as np

    from prism_cli.profiling.budget import reservoir_caps
    from prism_cli.profiling.recorder import ActivationRecorder, LayerRecord, Reservoir, profiling_experts_forward
    from prism_cli.profiling.spill import LayerSpill, RowBuffer

    torch.manual_seed(1)
    experts = _experts("gpt_oss")
    with torch.no_grad():
        for tensor in experts.parameters():
            tensor.normal_(0.0, 1.5)
    num, width = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2] // 2
    caps = reservoir_caps(64, 0.5)
    spill = LayerSpill(tmp_path, 0, num, caps, width, torch.float32)
    rngs = np.random.SeedSequence(0).spawn(2 * num)
    record = LayerRecord(
        layer=0, routed=torch.zeros(num, dtype=torch.long), weight_sum=torch.zeros(num, dtype=torch.float64),
        l1_mass=torch.zeros(num, width, dtype=torch.float64), hot_count=torch.zeros(num, width, dtype=torch.long),
        reservoirs=[[Reservoir(cap, np.random.default_rng(rngs[k * num + e])) for e in range(num)] for k, cap in enumerate(caps)],
        spill=spill,
    )
    recorder = ActivationRecorder({0: record}, width, buffer=RowBuffer(1024, width, torch.float32), reserve=lambda _n: None)
    x = torch.randn(24, experts.gate_up_proj.shape[1])
    idx = torch.stack([torch.randperm(num)[:2] for _ in range(24)])
    weights = torch.rand(24, 2)
    recorder.begin_batch(0, 0, torch.zeros(24, dtype=torch.bool))
    experts._prism_recorder, experts._prism_layer = recorder, 0
    with torch.no_grad():
        out = profiling_experts_forward(experts, x, idx, weights)
        torch.testing.assert_close(out, experts(x, idx, weights), rtol=1e-5, atol=1e-4)
        for e in range(num):
            tokens = (idx == e).any(dim=1)
            pre = x[tokens].double() @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
            gate, up = pre[:, 0::2].clamp(max=experts.limit), pre[:, 1::2].clamp(-experts.limit, experts.limit)
            want = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
            torch.testing.assert_close(record.l1_mass[e], want.abs().sum(dim=0), rtol=1e-4, atol=1e-4)
            assert int(record.routed[e]) == int(tokens.sum())
    spill.close()

