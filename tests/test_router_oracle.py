"""The gate-neuron router (SPEC 3.4a) at partial points, end to end: one MoE block of the elastic tiny OLMoE model
at ``topk:K`` against a float64 brute force built from the *source* checkpoint and the partition only."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import N_SUB, random_neurons_export, token_batch

from prism_cli.models.checkpoint import CheckpointReader
from prism_cli.solvers.format import read_partition

GAP = 1e-4  # tokens whose float64 choices are this close to a tie are not checked (float32 may pick either)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    import prism_cli

    source_dir = tiny_model_dir("olmoe")
    export = random_neurons_export(source_dir, tmp_path_factory.mktemp("router-oracle"), seed=11)
    model = prism_cli.load_elastic(str(export), operating_point=f"topk:{N_SUB * 2}")
    return model, source_dir, read_partition(export.parent / "p.h5")


def brute_force(x, reader, layer, partition, k_keep, top_k, renormalize):
    """Per token, in float64: the source router's top-k experts and weights; each chosen expert's sub-experts
    scored by the mean |silu(g.x) (u.x)| over their gate neurons (source rows ``permutation[n*size + pos]``);
    the ``k_keep`` pairs of largest weight x score kept; their sum of w * W_down[:, slice] (silu(W_g x) * W_u x).
    Returns the outputs and, per token, whether the float64 choices are clear of ties."""
    prefix = f"model.layers.{layer}.mlp"
    router = reader.get(f"{prefix}.gate.weight").double()
    experts = router.shape[0]
    gate = [reader.get(f"{prefix}.experts.{e}.gate_proj.weight").double() for e in range(experts)]
    up = [reader.get(f"{prefix}.experts.{e}.up_proj.weight").double() for e in range(experts)]
    down = [reader.get(f"{prefix}.experts.{e}.down_proj.weight").double() for e in range(experts)]
    parts = partition.experts[layer]
    size = gate[0].shape[0] // N_SUB
    outs, clear = [], []
    for xt in x.double():
        probs = torch.softmax(router @ xt, dim=0).tolist()
        order = sorted(range(experts), key=lambda e: -probs[e])
        chosen = order[:top_k]
        w = [probs[e] for e in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        ok = probs[order[top_k - 1]] - probs[order[top_k]] > GAP
        pairs = []  # (contribution, weight, expert, neurons of the sub-expert)
        for we, e in zip(w, chosen, strict=True):
            perm = parts[e].permutation
            for n in range(N_SUB):
                rows = [int(perm[n * size + int(pos)]) for pos in parts[e].gate_positions[n]]
                score = sum(abs(F.silu(gate[e][r] @ xt) * (up[e][r] @ xt)) for r in rows) / len(rows)
                pairs.append((we * float(score), we, e, [int(i) for i in perm[n * size : (n + 1) * size]]))
        pairs.sort(key=lambda p: -p[0])
        if k_keep < len(pairs):
            ok = ok and pairs[k_keep - 1][0] - pairs[k_keep][0] > GAP * max(pairs[0][0], 1e-12)
        out = torch.zeros_like(xt)
        for _, we, e, neurons in pairs[:k_keep]:
            a = F.silu(gate[e][neurons] @ xt) * (up[e][neurons] @ xt)
            out += we * (down[e][:, neurons] @ a)
        outs.append(out)
        clear.append(ok)
    return torch.stack(outs), clear


@pytest.mark.parametrize("shape", [(2, 12), (1, 6)], ids=["grouped", "dense"])  # 24 tokens, and <= DENSE_MAX_TOKENS
@pytest.mark.parametrize("k_keep", [1, 3, 5])
def test_gate_neuron_topk_block_output_equals_a_float64_brute_force_from_the_source(setup, k_keep, shape):
    """Oracle: ``brute_force`` above (source checkpoint + partition, no library code); the block's input is
    hooked from a real forward of the elastic model at ``topk:K``, in both MoE layers, for a batch large
    enough for the grouped scoring path and for one of decode size (all experts scored in one matmul)."""
    import prism_cli

    model, source_dir, partition = setup
    config = json.loads((source_dir / "config.json").read_text())
    reader = CheckpointReader(source_dir)
    seen = {}
    blocks = {layer.index: layer.block for layer in model.prism_state.layers}
    hooks = [block.register_forward_hook(lambda _m, args, out, i=i: seen.__setitem__(i, (args[0].detach(), out.detach())))
             for i, block in blocks.items()]
    try:
        prism_cli.set_operating_point(model, f"topk:{k_keep}")
        with torch.inference_mode():
            model(input_ids=token_batch(seed=21, batch=shape[0], length=shape[1]), use_cache=False)
    finally:
        prism_cli.set_operating_point(model, f"topk:{N_SUB * 2}")
        for h in hooks:
            h.remove()
    assert sorted(seen) == sorted(blocks) and len(blocks) == 2
    for layer, (x, y) in seen.items():
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        want, clear = brute_force(x, reader, layer, partition, k_keep, config["num_experts_per_tok"], config.get("norm_topk_prob", False))
        assert sum(clear) >= 0.8 * len(clear), "too many near-ties to check"
        mask = torch.tensor(clear)
        torch.testing.assert_close(y.double()[mask], want[mask], rtol=1e-4, atol=1e-5)
