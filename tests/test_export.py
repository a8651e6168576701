"""prism export: exactness of the flat sub-expert checkpoint for every family and gate, loading with
plain transformers, sub-expert slices, streaming shards, and no half-written output (the one-line
refusals of bad input are in test_bad_input.py).

Partitions are built directly (random permutations, random gate neurons) instead of running the
profiler and solver: the exactness of an export must not depend on the quality of its partition.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FULL,
    N_SUB,
    TOP_K,
    assert_nothing_written,
    assert_one_line_failure,
    logits_of,
    original_logits,
    relative_error,
    token_batch,
    write_random_partition,
)
from tiny_models import build_tiny, tiny_tokenizer

from prism_cli.errors import PrismError
from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.export.format import GATE_FILE
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.checkpoint import INDEX
from prism_cli.models.loading import load_config

TOLERANCE = 1e-4  # max |difference| relative to max |logit|
INEXACT_FAMILIES = ("deepseek_v3",)  # group-limited routing scored by the sum of two experts


# ---------------------------------------------------------------------------------------------
# Fixtures: one partition per family, one export per (family, gate), built once per module.


@pytest.fixture(scope="module")
def partition_of(tiny_model_dir, tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = write_random_partition(tiny_model_dir(family), tmp_path_factory.mktemp("part") / f"{family}.h5")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exported(tiny_model_dir, partition_of, tmp_path_factory):
    """``exported(family, gate)`` -> export folder (N = 4, default operating point: all sub-experts)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, gate: str, **settings: Any) -> Path:
        key = (family, gate, *sorted(settings.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / f"{family}-{gate}"
            export_model(str(tiny_model_dir(family)), partition_of(family), out, ExportSettings(gate=gate, **settings))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference_logits(tiny_model_dir):
    cache: dict[str, torch.Tensor] = {}

    def get(family: str) -> torch.Tensor:
        if family not in cache:
            cache[family] = original_logits(tiny_model_dir(family), token_batch())
        return cache[family]

    return get


# ---------------------------------------------------------------------------------------------
# Exactness: the first test of every export (SPEC 3.4).


@pytest.mark.parametrize("gate", ["linear", "neurons"])
def test_full_operating_point_reproduces_the_original(family, gate, exported, reference_logits, tiny_model_dir, partition_of, tmp_path):
    from prism_cli import load_elastic, set_operating_point

    ref = reference_logits(family)
    if gate == "linear" and family in INEXACT_FAMILIES:
        # Refused without --allow-inexact; exported (and marked inexact) with it.
        with pytest.raises(PrismError, match="cannot be exact"):
            export_model(str(tiny_model_dir(family)), partition_of(family), tmp_path / "refused", ExportSettings(gate=gate))
        assert_nothing_written(tmp_path / "refused")
        out = exported(family, gate, allow_inexact=True)
        meta = json.loads((out / "config.json").read_text())["prism"]
        assert meta["linear_gate_exact"] is False
        assert "group" in meta["linear_gate_note"]
        return
    out = exported(family, gate)
    meta = json.loads((out / "config.json").read_text())["prism"]
    assert meta["gate"] == gate and meta["sub_experts"] == N_SUB
    assert meta["linear_gate_exact"] is (family not in INEXACT_FAMILIES)
    assert (out / GATE_FILE).exists() is (gate == "neurons")

    full = f"linear:{FULL}" if gate == "linear" else f"topk:{FULL}"
    model = load_elastic(str(out), operating_point=full)
    assert relative_error(logits_of(model, token_batch()), ref) <= TOLERANCE
    if gate == "neurons":
        # Every neurons-gate rule that selects all sub-experts of the top-k experts is exact too.
        for point in (f"pattern:{N_SUB},{N_SUB}", "threshold:1.0"):
            set_operating_point(model, point)
            assert relative_error(logits_of(model, token_batch()), ref) <= TOLERANCE, point
        if family not in INEXACT_FAMILIES:
            set_operating_point(model, f"linear:{FULL}")
            assert relative_error(logits_of(model, token_batch()), ref) <= TOLERANCE


@pytest.mark.parametrize("gate", ["linear", "neurons"])
def test_builtin_model_full_operating_point_is_exact(gate: str, tmp_path: Path) -> None:
    """The shipped model, exported with the committed table partition, equals itself at K = N*k."""
    from prism_cli import load_elastic
    from prism_cli.models.loading import resolve_model

    source = Path(resolve_model("builtin"))
    partition = Path(__file__).resolve().parent.parent / "tables" / "builtin" / "partition.h5"
    out = tmp_path / gate
    export_model("builtin", partition, out, ExportSettings(gate=gate))
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    full = "linear:8" if gate == "linear" else "topk:8"
    assert relative_error(logits_of(load_elastic(str(out), operating_point=full), ids), original_logits(source, ids)) <= TOLERANCE


@pytest.mark.parametrize(
    ("fam", "overrides", "n_sub"),
    [
        ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}, 4),  # sigmoid, no renorm: scale 1
        ("deepseek_v3", {"n_group": 2, "topk_group": 2}, 4),  # every group kept: the linear gate is exact
        ("deepseek_v2", {"topk_method": "greedy"}, 4),
        ("qwen2_moe", {"norm_topk_prob": True}, 4),
        ("qwen3_moe", {"num_experts_per_tok": 3}, 4),
        ("olmoe", {}, 2),
        ("mixtral", {}, 8),
    ],
    ids=["v3-nogroups-nonorm", "v3-allgroups", "v2-greedy", "qwen2-renorm", "qwen3-top3", "olmoe-N2", "mixtral-N8"],
)
def test_router_variants_and_other_n_are_exact(fam, overrides, n_sub, tmp_path):
    from prism_cli import load_elastic

    source = build_tiny(fam, tmp_path / "src", seed=2, **overrides)
    part = write_random_partition(source, tmp_path / "p.h5", n_sub=n_sub, seed=5)
    ref = original_logits(source, token_batch(seed=1))
    full = n_sub * int(load_config(str(source)).num_experts_per_tok)
    for gate, point in (("linear", f"linear:{full}"), ("neurons", f"topk:{full}")):
        export_model(str(source), part, tmp_path / gate, ExportSettings(gate=gate))
        assert json.loads((tmp_path / gate / "config.json").read_text())["prism"]["linear_gate_exact"] is True
        model = load_elastic(str(tmp_path / gate), operating_point=point)
        assert relative_error(logits_of(model, token_batch(seed=1)), ref) <= TOLERANCE, gate


RENORMALISING = {"olmoe": False, "qwen2_moe": False, "qwen3_moe": True, "mixtral": True, "deepseek_v2": False,
                 "deepseek_v3": True}  # the tiny configs' top-k weight normalisation


def _check_rule(family: str, model, router, x: torch.Tensor) -> None:
    """Oracle for ``linear:K`` below and at the full point, from the full top-(N*k): the pairs by (the
    router's ranking score, descending; sub-expert index, ascending), the first K kept, with the family's
    weights (renormalised over the K where the family renormalises). Whole experts may list an expert's
    copies in any order (they weigh the same), and ``ranked`` mode its pairs in the router's order. The
    block shape rides on the indices in ``blocks`` mode only."""
    from prism_cli import set_operating_point
    from prism_cli.runtime.grouped_mm import PREFIX_ATTR, prefix_routing

    outputs = []
    for k in (FULL, 1, N_SUB - 1, N_SUB, N_SUB + 1):
        set_operating_point(model, f"linear:{k}")
        with torch.no_grad():
            outputs.append(router(x))
    (logits, w_full, idx_full), *partial = outputs
    # the router ranks experts by its logits, DeepSeek-V3 by sigmoid score plus correction bias
    rank = logits.float().sigmoid() + router.router.e_score_correction_bias if family == "deepseek_v3" else logits
    for (_, w, idx), k in zip(partial, (1, N_SUB - 1, N_SUB, N_SUB + 1), strict=True):
        assert idx.shape == (x.shape[0], k)
        for t in range(idx.shape[0]):
            full = dict(zip(idx_full[t].tolist(), w_full[t].tolist(), strict=True))
            order = sorted(full, key=lambda i: (-float(rank[t, i]), i))  # parents by rank, copies by index
            got = idx[t].tolist()
            if k % N_SUB and router.mode != "ranked":
                assert got == order[:k]
            else:  # whole experts: the same pairs, experts in rank order, copies in any order within one;
                # ranked: the same pairs, in the order the router returned them (the output is their sum)
                assert sorted(got) == sorted(order[:k])
                if router.mode == "blocks":
                    assert [i // N_SUB for i in got] == [i // N_SUB for i in order[:k]]
            want = torch.tensor([full[i] for i in got])
            if RENORMALISING[family]:
                want = want * (w_full[t].sum() / want.sum())
            torch.testing.assert_close(w[t], want.to(w.dtype))
        attached = getattr(idx, PREFIX_ATTR, None)
        assert (attached is not None) == (router.mode == "blocks")
        if attached is not None:  # the shape the router hands the experts is the shape its indices have
            canonical = idx.clone()
            if k % N_SUB == 0:  # whole blocks may list an expert's copies in any order: they weigh the same
                blocks = w.view(w.shape[0], -1, N_SUB)
                assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))
                canonical = canonical.view(idx.shape[0], -1, N_SUB).sort(dim=-1).values.view(idx.shape[0], -1)
            checked = prefix_routing(canonical, N_SUB, model.prism_state.source_experts * N_SUB)
            handed = prefix_routing(idx, N_SUB, model.prism_state.source_experts * N_SUB)
            assert checked is not None and attached.lengths == handed.lengths == checked.lengths
            assert torch.equal(handed.expert, checked.expert)


def test_linear_gate_below_full_takes_sub_experts_in_order(family, exported):
    """linear:K with K not a multiple of N: an expert's copies tie, and prism breaks the tie by sub-expert
    index (sub-expert 0 holds the most mass), as vLLM's fused top-k kernel does; weights are the
    family's (renormalised over the K kept pairs where the family renormalises)."""
    from prism_cli import load_elastic, set_operating_point

    out = exported(family, "neurons")  # its flat routers serve the linear points too (exact or not)
    model = load_elastic(str(out))
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for router in model.prism_state.flat_routers:
        set_operating_point(model, f"linear:{FULL}")
        with torch.no_grad():
            _, _, idx_full = router(x)
        # at the full point: all N copies of each of the top-k experts
        parents = (idx_full // N_SUB).sort(dim=1).values.view(-1, TOP_K, N_SUB)
        assert (parents == parents[..., :1]).all()
        _check_rule(family, model, router, x)


def test_a_tuned_router_keeps_its_own_top_k_and_the_rule_where_copies_still_tie(family, exported):
    """``ranked`` mode (a tuned export's routers) runs the stock router at top-(K+1) and keeps the first K
    without sorting when the K+1-th pair scores strictly below them. Its result is the rule's, checked on
    untied rows and, where the check must fall back to the rule, on tied copies (an untuned router's, or a
    tuned router's copies of an expert that training never moved)."""
    from prism_cli import load_elastic

    out = exported(family, "neurons")
    if json.loads((out / "config.json").read_text())["prism"]["linear_gate_exact"] is False:
        pytest.skip("an inexact linear gate routes by the rule")
    model = load_elastic(str(out), operating_point=f"linear:{FULL}")
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    for router in model.prism_state.flat_routers:
        router.mode = "ranked"
        _check_rule(family, model, router, x)  # tied copies: the boundary splits a block, the rule decides
        with torch.no_grad():
            weight = router.router.weight
            weight.add_(torch.randn(weight.shape, generator=gen).to(weight.dtype) * 0.05 * weight.abs().mean())
        _check_rule(family, model, router, x)


def test_linear_gate_keeps_no_tensor_alive_between_calls(exported):
    """Every call's outputs are freed with the caller's last reference to them. The block shape the linear
    gate hands the experts rides on its indices (``PREFIX_ATTR``); had it held a view of those same
    indices, each call would leave its tensors in a reference cycle through torch's C++ view tracking
    that Python's garbage collector cannot see: under ``torch.no_grad`` (``generate()``, an eval loop),
    where torch tracks views, memory then grows with every step. Oracle: the number of live tensors,
    counted by the garbage collector, before and after."""
    import gc

    from prism_cli import load_elastic, set_operating_point

    model = load_elastic(str(exported("olmoe", "linear")), operating_point=f"linear:{FULL}")
    router = model.prism_state.elastic_routers[0]
    x = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    for k in (1, N_SUB, N_SUB + 1, FULL):
        set_operating_point(model, f"linear:{k}")
        with torch.no_grad():
            router(x)  # first call: anything built once (cached views) exists before counting
            before = live_tensors()
            for _ in range(20):
                router(x)
        assert live_tensors() - before < 20, f"linear:{k} leaks tensors"


def test_default_operating_point_is_recorded(exported, tiny_model_dir, partition_of, tmp_path):
    from prism_cli.runtime.elastic import load_elastic_model

    out = tmp_path / "k3"
    export_model(str(tiny_model_dir("olmoe")), partition_of("olmoe"), out, ExportSettings(gate="neurons", operating_point="pattern:3"))
    meta = json.loads((out / "config.json").read_text())["prism"]
    assert meta["default_operating_point"] == "pattern:3,0"
    assert str(load_elastic_model(str(out)).model.prism_state.point) == "pattern:3,0"
    linear = json.loads((exported("olmoe", "linear") / "config.json").read_text())
    assert linear["num_experts"] == 8 * N_SUB and linear["intermediate_size"] == 32 // N_SUB
    assert linear["num_experts_per_tok"] == FULL
    # a linear export's default point is the checkpoint's own top-k: what plain transformers runs
    export_model(str(tiny_model_dir("olmoe")), partition_of("olmoe"), tmp_path / "lin3", ExportSettings(gate="linear", operating_point="3"))
    lin3 = json.loads((tmp_path / "lin3" / "config.json").read_text())
    assert lin3["num_experts_per_tok"] == 3 and lin3["prism"]["default_operating_point"] == "linear:3"
    assert lin3["prism"]["source"]["top_k"] == TOP_K


# ---------------------------------------------------------------------------------------------
# The linear export is an ordinary checkpoint: stock transformers, no prism.


_PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    text, out, directories = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {}
    for directory in directories:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        results[directory] = {"ids": ids, "logits": logits}
        print(json.dumps({"dir": directory, "shape": list(logits.shape), "max": float(logits.abs().max())}))
    torch.save(results, out)
    assert not any(name.startswith("prism_cli") for name in sys.modules), "prism was imported"
    """
)


def test_linear_export_loads_with_plain_transformers(exported, tiny_model_dir, tmp_path):
    families = ("olmoe", "mixtral")
    outs = [str(exported(fam, "linear")) for fam in families]
    text = "Call me Ishmael. Some years ago, never mind how long precisely"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, text, str(tmp_path / "logits.pt"), *outs],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    got = torch.load(tmp_path / "logits.pt")
    for fam, out, stat in zip(families, outs, stats, strict=True):
        assert stat["dir"] == out and stat["shape"] == list(got[out]["logits"].shape)
        ref = original_logits(tiny_model_dir(fam), got[out]["ids"])
        assert relative_error(got[out]["logits"].float(), ref) <= TOLERANCE, fam


# ---------------------------------------------------------------------------------------------
# Sub-experts are slices of their expert; their outputs add up to it.


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_sub_experts_are_slices_that_add_up(family, exported, tiny_model_dir, partition_of):
    """Both checkpoints as stock transformers loads them: every sub-expert is its expert's gate and up rows
    and down columns at the partition's neurons (down scaled), and the sub-experts' outputs add up."""
    from transformers import AutoModelForCausalLM

    from prism_cli.solvers.format import read_partition

    source = tiny_model_dir(family)
    adapter = adapter_for_config(load_config(str(source)))
    partition = read_partition(partition_of(family))
    src = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).state_dict()
    out = AutoModelForCausalLM.from_pretrained(str(exported(family, "neurons")), dtype=torch.float32).state_dict()
    scale = adapter.flat_down_scale(N_SUB)
    width, size = adapter.width, adapter.width // N_SUB
    x = torch.randn(5, adapter.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    block = {layer: next(k.removesuffix(".experts.gate_up_proj") for k in src
                         if k.endswith(".experts.gate_up_proj") and f"layers.{layer}." in k and "shared" not in k)
             for layer in partition.layers}
    for layer in partition.layers:
        gate_up, down = src[f"{block[layer]}.experts.gate_up_proj"], src[f"{block[layer]}.experts.down_proj"]
        flat_gate_up, flat_down = out[f"{block[layer]}.experts.gate_up_proj"], out[f"{block[layer]}.experts.down_proj"]
        for e in (0, adapter.num_experts - 1):
            gate, up = gate_up[e, :width], gate_up[e, width:]
            total = torch.zeros(5, adapter.hidden_size, dtype=torch.float64)
            for n in range(N_SUB):
                idx = torch.from_numpy(partition.experts[layer][e].permutation[n * size : (n + 1) * size].astype(np.int64))
                g, u = flat_gate_up[e * N_SUB + n, :size], flat_gate_up[e * N_SUB + n, size:]
                d = flat_down[e * N_SUB + n]
                assert torch.equal(g, gate[idx]) and torch.equal(u, up[idx])
                torch.testing.assert_close(d, down[e][:, idx] * scale, rtol=0, atol=0)
                total += _swiglu(x, g.double(), u.double(), d.double() / scale)
            torch.testing.assert_close(total, _swiglu(x, gate.double(), up.double(), down[e].double()), rtol=1e-10, atol=1e-12)
        # router rows are repeated N times, in order
        router = f"{block[layer]}.gate.weight"
        assert torch.equal(out[router], src[router].repeat_interleave(N_SUB, dim=0))


# ---------------------------------------------------------------------------------------------
# Streaming: bounded output shards, sharded sources.


def test_small_shards_write_an_index_and_load_exactly(cli, tiny_model_dir, partition_of, reference_logits, tmp_path):
    from prism_cli import load_elastic

    out = tmp_path / "sharded"
    result = cli("export", tiny_model_dir("olmoe"), partition_of("olmoe"), "--out", out, "--max-shard-gb", "0.00005")
    assert result.code == 0, result
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / INDEX).exists() and not (out / "model.safetensors").exists()
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not list(out.glob(".shard-*"))
    model = load_elastic(str(out), operating_point=f"topk:{FULL}")
    assert relative_error(logits_of(model, token_batch()), reference_logits("olmoe")) <= TOLERANCE


def test_sharded_source_checkpoint_exports(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from prism_cli import load_elastic

    source = tmp_path / "sharded-source"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("qwen2_moe")), dtype=torch.float32)
    model.save_pretrained(source, max_shard_size="50KB")
    tiny_tokenizer().save_pretrained(source)
    assert (source / INDEX).exists() and len(list(source.glob("*.safetensors"))) > 2
    part = write_random_partition(source, tmp_path / "p.h5", seed=3)
    export_model(str(source), part, tmp_path / "out", ExportSettings(gate="neurons"))
    elastic = load_elastic(str(tmp_path / "out"), operating_point=f"topk:{FULL}")
    ref = logits_of(model.eval(), token_batch())
    assert relative_error(logits_of(elastic, token_batch()), ref) <= TOLERANCE


def _linear_gate_mismatch_oracle(source_dir: Path, export_dir: Path, n_sub: int) -> float:
    """Share of (token, MoE layer) pairs where the export's own router, loaded by stock transformers from
    the export, does not pick the N copies of the source router's experts on the source's hidden states."""
    from transformers import AutoModelForCausalLM

    from prism_cli.data import split_text
    from prism_cli.data.windows import token_windows
    from prism_cli.export import inexact

    source = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32).eval()
    flat = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    windows = token_windows(tiny_tokenizer(), split_text("calibration"), inexact.SEQ_LEN, inexact.TOKENS)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    blocks = {i: layer.mlp for i, layer in enumerate(source.model.layers) if hasattr(layer.mlp, "gate")}
    handles = [block.gate.register_forward_hook(lambda _m, args, out, i=i: seen.append((i, args[0], out[2])))
               for i, block in blocks.items()]
    with torch.inference_mode():
        source(input_ids=windows, use_cache=False)
        for handle in handles:
            handle.remove()
        mismatched = total = 0
        for i, hidden, picked in seen:
            _, _, flat_picked = flat.model.layers[i].mlp.gate(hidden)
            for a, b in zip((flat_picked // n_sub).tolist(), picked.tolist(), strict=True):
                mismatched += sorted(a) != sorted(e for e in b for _ in range(n_sub))
                total += 1
    return mismatched / total


def test_allow_inexact_records_the_measured_difference(cli, tiny_model_dir, partition_of, tmp_path):
    model, out = tiny_model_dir("deepseek_v3"), tmp_path / "v3-linear"
    result = cli("export", model, partition_of("deepseek_v3"), "--out", out, "--gate", "linear", "--allow-inexact")
    assert result.code == 0, result
    recorded = json.loads((out / "config.json").read_text())["prism"]["linear_gate_difference"]
    oracle = _linear_gate_mismatch_oracle(model, out, N_SUB)
    assert 0 < oracle < 1  # the tiny V3 keeps 1 of 2 expert groups: the copies do change its routing
    assert recorded["routing_mismatch"] == pytest.approx(oracle)
    assert recorded["max_weight_error"] < 1e-5  # where the picks agree, the rescaled weights are the source's
    assert f"{oracle:.2%}" in result.out
    # Evaluated at a linear point, it says the point routes only approximately (it printed a perplexity only).
    evaluated = cli("eval", out, "-K", f"linear:{N_SUB}", "--tokens", "256", "--seq-len", "32")
    assert evaluated.code == 0 and "not exact" in evaluated.out and "only approximately" in evaluated.out, evaluated


def test_the_difference_is_zero_where_the_linear_gate_is_exact(tiny_model_dir):
    from prism_cli.export.inexact import linear_gate_difference

    measured = linear_gate_difference(str(tiny_model_dir("olmoe")), N_SUB)  # exact (the exactness tests above)
    assert measured["routing_mismatch"] == 0 and measured["max_weight_error"] < 1e-5 and measured["pairs"] > 0


# ---------------------------------------------------------------------------------------------
# --force and failures mid-export: nothing half-written, the old output spared (bad input: test_bad_input.py).


def test_existing_output_needs_force(cli, tiny_model_dir, partition_of, tmp_path):
    model, part, out = tiny_model_dir("olmoe"), partition_of("olmoe"), tmp_path / "out"
    assert cli("export", model, part, "--out", out, "--gate", "linear").code == 0
    assert_one_line_failure(cli("export", model, part, "--out", out), "already exists", "--force")
    assert not (out / GATE_FILE).exists()
    result = cli("export", model, part, "--out", out, "--force")  # an earlier export: replaced
    assert result.code == 0, result
    assert (out / GATE_FILE).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


@pytest.mark.parametrize("error", [PrismError("disk trouble"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failure_mid_export_keeps_nothing_and_spares_the_old_output(error, tiny_model_dir, partition_of, tmp_path, monkeypatch):
    import prism_cli.export.builder as export_module

    real = export_module._split_layer
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "_split_layer", failing)
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        export_model(str(tiny_model_dir("olmoe")), partition_of("olmoe"), out, ExportSettings())
    assert_nothing_written(out)
    out.mkdir()
    (out / "config.json").write_text('{"prism": {}}')  # an earlier export: what --force may replace
    (out / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(type(error)):
        export_model(str(tiny_model_dir("olmoe")), partition_of("olmoe"), out, ExportSettings(), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# ---------------------------------------------------------------------------------------------
# What serving engines need from the flat export (checked without them).


def _serving(family: str, n_sub: int = 4, **fields: Any) -> dict[str, Any]:
    from transformers import AutoConfig

    from prism_cli.export.serving import serving_check
    from prism_cli.models.adapters import adapter_for_config

    config = AutoConfig.for_model(family, **fields)
    return serving_check(config, adapter_for_config(config), n_sub)


@pytest.mark.parametrize("gate", ["linear", "neurons"])
def test_top_level_safetensors_hold_only_model_weights(exported, gate):
    """Without an index, vLLM and SGLang load every top-level *.safetensors file as model weights."""
    from safetensors import safe_open

    out = exported("olmoe", gate)
    top_level = sorted(path.name for path in out.glob("*.safetensors"))
    assert top_level == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(key.startswith(("model.", "lm_head.")) and "gate_positions" not in key for key in keys)
    assert (out / GATE_FILE).exists() is (gate == "neurons") and "/" in GATE_FILE


def test_serving_check_tensor_and_expert_parallel_sizes():
    base = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, num_experts_per_tok=8)
    ok = _serving("olmoe", num_experts=32, intermediate_size=256, **base)
    assert ok["tensor_parallel"] == [1, 2, 4, 8] and ok["expert_parallel"] == [1, 2, 4, 8]
    assert ok["architecture"] is None and ok["experts"] == 32 and ok["expert_width"] == 256
    # a sub-expert width of 12 splits over 4 ranks, not 8 (engines would floor 12 / 8 silently)
    narrow = _serving("olmoe", num_experts=12, intermediate_size=12, **base)
    assert narrow["tensor_parallel"] == [1, 2, 4]
    assert narrow["tensor_parallel_refused"] == {"8": "sub-expert width 12 not divisible by 8"}
    assert narrow["expert_parallel"] == [1, 2, 4]
    heads = _serving("olmoe", num_experts=32, intermediate_size=256, **{**base, "num_attention_heads": 4,
                                                                        "num_key_value_heads": 4})
    assert heads["tensor_parallel_refused"] == {"8": "4 attention heads not divisible by 8"}
    # Qwen2-MoE's shared expert keeps its width, and it is split over the ranks too
    shared = _serving("qwen2_moe", num_experts=32, moe_intermediate_size=64, shared_expert_intermediate_size=20, **base)
    assert shared["tensor_parallel"] == [1, 2, 4] and "shared expert width 20" in shared["tensor_parallel_refused"]["8"]
    # DeepSeek: latent attention (no KV-head rule); dense layers' width counts only where there are dense layers
    mla = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=3, n_routed_experts=32, moe_intermediate_size=64,
               n_shared_experts=4, num_experts_per_tok=8, intermediate_size=36, kv_lora_rank=16, q_lora_rank=None,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    assert _serving("deepseek_v2", first_k_dense_replace=0, **mla)["tensor_parallel"] == [1, 2, 4, 8]
    dense = _serving("deepseek_v2", first_k_dense_replace=1, **mla)
    assert dense["tensor_parallel_refused"] == {"8": "dense MLP width 36 not divisible by 8"}


def test_serving_check_notes():
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_experts=32, intermediate_size=64,
                num_experts_per_tok=8)
    plain = _serving("olmoe", **base)["notes"]
    assert len(plain) == 1 and "lowest index first" in plain[0] and "not a multiple of 4" in plain[0]
    renorm = _serving("olmoe", norm_topk_prob=True, **base)["notes"]
    assert any("never renormalises" in note for note in renorm)


def test_export_records_the_serving_check(cli, tiny_model_dir, partition_of, tmp_path):
    out = tmp_path / "lin"
    result = cli("export", tiny_model_dir("olmoe"), partition_of("olmoe"), "--out", out, "--gate", "linear")
    assert result.code == 0, result
    serving = json.loads((out / "config.json").read_text())["prism"]["serving"]
    # tiny OLMoE: 4 heads, 2 KV heads, 8 experts of width 32 -> 32 sub-experts of width 8
    assert serving["architecture"] == "OlmoeForCausalLM" and serving["experts"] == 8 * N_SUB
    assert serving["expert_width"] == 32 // N_SUB
    assert serving["tensor_parallel"] == [1, 2, 4] and serving["expert_parallel"] == [1, 2, 4, 8]
    assert "tensor-parallel 1, 2, 4" in " ".join(result.out.split())
