"""Bad input around MoE families: quantized experts, configs that disagree with their weights, hybrid
models whose MoE layers are a subset, model types that are not causal LMs, layouts prism cannot split,
and exports whose measured difference is not exact. One line on stderr each, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_nothing_written, write_random_partition

from prism_cli.models.tiny import build_tiny_model, tiny_config

PROFILE = ["--tokens", "1024", "--seq-len", "32", "--max-rows", "64", "--row-dtype", "float32"]


def _edited(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("method", "step"),
    [("mxfp4", "Mxfp4Config(dequantize=True)"), ("fp8", "FineGrainedFP8Config(dequantize=True)"),
     ("bitsandbytes", "dequantize it to bfloat16 first")],
)
def test_quantized_checkpoint_is_refused_with_the_dequantization_step(cli, tiny_model_dir, tmp_path, method, step):
    model = _edited(tiny_model_dir("olmoe"), tmp_path / "quantized", quantization_config={"quant_method": method})
    out = tmp_path / "p.h5"
    result = cli("profile", model, *PROFILE, "--out", out)
    assert result.code == 2
    result.assert_one_line_error("quantized", method, step)
    assert not out.exists()


@pytest.mark.parametrize("changes", [{"intermediate_size": 16}, {"num_experts": 4}], ids=["width", "experts"])
def test_config_that_disagrees_with_the_weights_is_refused(cli, tiny_model_dir, tmp_path, changes):
    model = _edited(tiny_model_dir("olmoe"), tmp_path / "edited", **changes)
    result = cli("profile", model, *PROFILE, "--out", tmp_path / "p.h5")
    assert result.code == 2
    result.assert_one_line_error("config and the weights disagree", "in the checkpoint")
    # export reads the weights layer by layer and refuses the same checkpoint (its partition was made for
    # the edited config, so only the weights can tell)
    partition = write_random_partition(model, tmp_path / "part.h5")
    out = tmp_path / "export"
    result = cli("export", model, partition, "--out", out)
    result.assert_one_line_error("disagree")
    assert_nothing_written(out)


def test_hybrid_model_profiles_its_moe_layers_and_says_which(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "p.h5"
    result = cli("profile", tiny_model_dir("deepseek_v3"), *PROFILE, "--out", out)
    assert result.code == 0, result
    assert "MoE layers: 1 of 2 decoder layers; the others (0) have no routed experts" in " ".join(result.out.split())


def test_a_model_type_without_a_causal_lm_is_refused(cli, tmp_path):
    model = tmp_path / "vl"
    tiny_config("qwen3_vl_moe").save_pretrained(model)
    result = cli("profile", model, *PROFILE, "--out", tmp_path / "p.h5")
    assert result.code == 2
    result.assert_one_line_error("no causal LM class", "qwen3_vl_moe_text")


@pytest.mark.parametrize(
    ("model_type", "needle"),
    [("ergo", "no gate projection"), ("nemotron_h", "no gate projection")],
)
def test_experts_prism_cannot_split_are_refused(cli, tmp_path, model_type, needle):
    model = build_tiny_model(model_type, tmp_path / model_type)
    result = cli("profile", model, *PROFILE, "--out", tmp_path / "p.h5")
    assert result.code == 2
    result.assert_one_line_error(needle)


def test_a_shared_mlp_sized_by_the_experts_width_keeps_the_source_width(cli, tmp_path):
    """Hunyuan's shared MLP is built from intermediate_size, the experts' width: the flat export rebuilds it at
    the source width, and plain transformers (with the export's modeling file) reproduces the source model."""
    import torch
    from conftest import logits_of, original_logits, token_batch
    from transformers import AutoModelForCausalLM

    import prism_cli

    model = build_tiny_model("hunyuan_v1_moe", tmp_path / "hunyuan")
    partition = write_random_partition(model, tmp_path / "part.h5")
    out = tmp_path / "export"
    assert cli("export", model, partition, "--out", out, "--gate", "linear").code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prism_source_sized"] == {"fields": {"intermediate_size": 32},
                                            "modules": ["model.layers.0.mlp.shared_mlp", "model.layers.1.mlp.shared_mlp"]}
    assert "trust_remote_code=True" in " ".join(config["prism"]["serving"]["notes"])
    ids = token_batch(seed=3)
    want = original_logits(model, ids)
    stock = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32, moe_topk=8)
    assert stock.model.layers[0].mlp.shared_mlp.gate_proj.weight.shape == (32, 64)
    elastic = prism_cli.load_elastic(str(out), operating_point="linear:8")
    for got in (logits_of(stock, ids), logits_of(elastic, ids)):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_a_module_that_cannot_be_rebuilt_from_the_config_is_refused(cli, tmp_path, monkeypatch):
    from prism_cli.models import source_sized

    monkeypatch.setattr(source_sized, "_built_from_config", lambda cls: False)
    model = build_tiny_model("hunyuan_v1_moe", tmp_path / "hunyuan")
    partition = write_random_partition(model, tmp_path / "part.h5")
    out = tmp_path / "export"
    result = cli("export", model, partition, "--out", out, "--gate", "neurons")
    result.assert_one_line_error("shared_mlp", "intermediate_size", "cannot be rebuilt from the config alone")
    assert_nothing_written(out)


def test_a_linear_gate_measured_inexact_is_refused_unless_allowed(cli, tiny_model_dir, tmp_path, monkeypatch):
    """DeepSeek-V3's group routing, with its declared reason taken away: the measurement alone refuses it."""
    from prism_cli.models.adapters import MoEAdapter

    monkeypatch.setattr(MoEAdapter, "linear_gate_inexact_reason", lambda self: None)
    model = tiny_model_dir("deepseek_v3")
    partition = write_random_partition(model, tmp_path / "part.h5")
    out = tmp_path / "export"
    result = cli("export", model, partition, "--out", out, "--gate", "linear")
    result.assert_one_line_error("measured max relative difference", "--allow-inexact")
    assert_nothing_written(out)
    result = cli("export", model, partition, "--out", out, "--gate", "linear", "--allow-inexact")
    assert result.code == 0, result
    meta = json.loads((out / "config.json").read_text())["prism"]
    linear = meta["exactness"]["linear"]
    assert linear["exact"] is False and linear["max_rel_diff"] > 1e-2 and meta["linear_gate_exact"] is False
    assert "measured" in meta["linear_gate_note"]
