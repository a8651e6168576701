"""Architecture adapters: found per family, MoE blocks located, clear errors for dense and unknown MoE models,
checkpoint key patterns that classify exactly the expert and router tensors on disk, and the disk <-> module
conversion against transformers' own loading and saving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import CONFIGS, FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prism_cli.errors import PrismError
from prism_cli.models.adapters import FAMILIES as REGISTRY
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.layout import ExpertLayout
from prism_cli.models.loading import load_config, load_model

#: Decoder layers of each tiny model that hold a sparse MoE block (DeepSeek's first layer is dense).
ADAPTER_NAMES = REGISTRY.names()
MOE_LAYERS = {family: [1] if family.startswith("deepseek") else [0, 1] for family in FAMILIES}
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
              vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """``loaded(family)`` -> the tiny model of that family loaded through prism (cached per module)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(str(tiny_model_dir(family)))
        return cache[family]

    return get


def test_every_tiny_family_is_registered() -> None:
    assert set(FAMILIES) <= set(ADAPTER_NAMES)


def test_adapter_is_found_and_reads_the_config(tiny_model_dir, family: str) -> None:
    adapter = adapter_for_config(load_config(str(tiny_model_dir(family))))
    assert adapter.family is REGISTRY.get(family) and adapter.model_type == family
    assert (adapter.num_experts, adapter.width, adapter.top_k, adapter.hidden_size) == (8, 32, 2, 64)
    assert adapter.describe()["expert_width"] == 32


def test_moe_layers_finds_the_sparse_blocks(loaded, family: str) -> None:
    lm = loaded(family)
    layers = lm.adapter.moe_layers(lm.model)
    assert [layer.index for layer in layers] == MOE_LAYERS[family]
    for layer in layers:
        assert layer.block is lm.model.get_submodule(layer.name)
        assert layer.experts is layer.block.experts and layer.router is layer.block.gate and layer.router_name == "gate"
        assert layer.layout == ExpertLayout()  # standard: [E, 2I, H], gate rows then up rows, no bias
        assert tuple(layer.experts.gate_up_proj.shape) == (8, 64, 64)
        assert tuple(layer.experts.down_proj.shape) == (8, 64, 32)
    if family.startswith("deepseek"):
        # The dense first layer has an MLP but no experts, and must not be mistaken for a MoE block.
        assert not hasattr(lm.model.model.layers[0].mlp, "experts")


def test_moe_layers_refuses_a_wrong_expert_layout(tiny_model_dir) -> None:
    """A config whose width disagrees with the weights is reported, naming the tensor shapes."""
    config = load_config(str(tiny_model_dir("olmoe")))
    model = AutoModelForCausalLM.from_config(config)
    config.intermediate_size = 16
    with pytest.raises(PrismError, match=r"config and the weights disagree.*gate_up_proj \(8, 64, 64\)"):
        adapter_for_config(config).moe_layers(model)


def _save_checkpoint(directory: Path, config, weights: bool) -> Path:
    """A tiny random checkpoint, or only its config.json (all prism reads before refusing a family)."""
    if weights:
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
    return directory


def test_dense_model_is_not_moe(tmp_path) -> None:
    config = LlamaConfig(**_SMALL)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(PrismError) as exc:
        load_model(str(tmp_path / "llama"))
    message = str(exc.value)
    assert "not a Mixture-of-Experts model" in message and "'llama'" in message and "LlamaForCausalLM" in message
    assert all(f in message for f in FAMILIES) and "\n" not in message


@pytest.mark.parametrize(
    "model_type, extra, weights",
    [
        ("jetmoe", dict(num_local_experts=4, num_experts_per_tok=2), True),
        # DBRX keeps its expert count in a nested ffn_config: still MoE, not "dense". (Its tiny model
        # does not build in this transformers version, so only the config is saved.)
        ("dbrx", dict(d_model=32, n_heads=4, n_layers=2, ffn_config=dict(moe_num_experts=4, moe_top_k=2)), False),
    ],
)
def test_unsupported_moe_family(tmp_path, model_type: str, extra: dict, weights: bool) -> None:
    small = {} if model_type == "dbrx" else _SMALL
    config = AutoConfig.for_model(model_type, **{**small, **extra})
    directory = _save_checkpoint(tmp_path / model_type, config, weights)
    assert (directory / "config.json").exists()
    with pytest.raises(PrismError) as exc:
        load_model(str(directory))
    message = str(exc.value)
    assert f"unsupported MoE family {model_type!r}" in message
    assert "supported: " + ", ".join(ADAPTER_NAMES) in message and "\n" not in message


def _checkpoint_keys(directory: Path) -> list[str]:
    keys: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            keys += list(fh.keys())
    return keys


def test_key_patterns_classify_the_saved_checkpoint(tiny_model_dir, family: str) -> None:
    directory = tiny_model_dir(family)
    adapter = adapter_for_config(load_config(str(directory)))
    patterns = adapter.key_patterns()
    keys = _checkpoint_keys(directory)
    # What the patterns should pick out, by plain string rules independent of the regexes.
    routed = [k for k in keys if ".experts." in k and "shared_expert" not in k]
    routers = [k for k in keys if k.endswith((".gate.weight", ".gate.e_score_correction_bias"))]
    assert routed and routers
    for key in keys:
        kinds = [kind for kind in ("experts", "router") if getattr(patterns, kind).match(key)]
        want = ["experts"] if key in routed else ["router"] if key in routers else []
        assert kinds == want, key
    # Every (MoE layer, expert, projection) appears exactly once, in the family's hub names.
    found = sorted((int(patterns.experts.match(k)["layer"]), int(re.search(r"experts\.(\d+)\.", k)[1]), k.rsplit(".", 2)[-2])
                   for k in routed)
    projections = {"mixtral": ("w1", "w2", "w3")}.get(family, ("down_proj", "gate_proj", "up_proj"))
    want_triples = sorted(
        (layer, e, p) for layer in MOE_LAYERS[family] for e in range(adapter.num_experts) for p in projections
    )
    assert found == want_triples
    router_weights = sorted(int(m["layer"]) for k in routers if (m := patterns.router.match(k)) and k.endswith(".weight"))
    assert router_weights == MOE_LAYERS[family]


def test_checkpoint_conversion_matches_transformers(tiny_model_dir, family: str) -> None:
    """to_module gives what from_pretrained loads, and to_disk what save_pretrained wrote, layer by layer."""
    directory = tiny_model_dir(family)
    adapter = adapter_for_config(load_config(str(directory)))
    on_disk = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            on_disk |= {k: fh.get_tensor(k) for k in fh.keys()}
    loaded = AutoModelForCausalLM.from_pretrained(str(directory)).state_dict()
    for layer in MOE_LAYERS[family]:
        disk = {k: v for k, v in on_disk.items() if f"layers.{layer}." in k}
        module = adapter.names.to_module(disk)
        assert module and set(module) == {k for k in loaded if f"layers.{layer}." in k}
        for key, tensor in module.items():
            assert torch.equal(tensor, loaded[key]), key
        back = adapter.names.to_disk(module)
        assert set(back) == set(disk) and all(torch.equal(back[k], disk[k]) for k in disk)


def test_tiny_configs_cover_every_family() -> None:
    assert set(CONFIGS) == set(FAMILIES)
