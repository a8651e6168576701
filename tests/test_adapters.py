"""Architecture adapters: found per family, MoE blocks located, clear errors for dense and unknown MoE models,
and checkpoint key patterns that classify exactly the expert and router tensors on disk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors import safe_open
from tiny_models import CONFIGS, FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prism_cli.errors import PrismError
from prism_cli.models.adapters import ADAPTERS, MoEAdapter, adapter_for_config
from prism_cli.models.loading import load_config, load_model

#: Decoder layers of each tiny model that hold a sparse MoE block (DeepSeek's first layer is dense).
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


def test_every_family_is_registered() -> None:
    assert sorted(ADAPTERS.names()) == sorted(FAMILIES)


def test_adapter_is_found_and_reads_the_config(tiny_model_dir, family: str) -> None:
    adapter = adapter_for_config(load_config(str(tiny_model_dir(family))))
    assert isinstance(adapter, ADAPTERS.get(family)) and adapter.model_type == family
    assert (adapter.num_experts, adapter.width, adapter.top_k, adapter.hidden_size) == (8, 32, 2, 64)
    assert adapter.describe()["expert_width"] == 32


def test_moe_layers_finds_the_sparse_blocks(loaded, family: str) -> None:
    lm = loaded(family)
    layers = lm.adapter.moe_layers(lm.model)
    assert [layer.index for layer in layers] == MOE_LAYERS[family]
    for layer in layers:
        assert layer.block is lm.model.get_submodule(layer.name)
        assert layer.experts is layer.block.experts and layer.router is layer.block.gate
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
    with pytest.raises(PrismError, match=r"not the fused SwiGLU layout.*gate_up_proj \(8, 64, 64\)"):
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
        ("granitemoe", dict(num_local_experts=4, num_experts_per_tok=2), True),
        ("phimoe", dict(num_local_experts=4, num_experts_per_tok=2), True),
        ("jamba", dict(num_experts=4, num_experts_per_tok=2), True),
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
    assert "supported: " + ", ".join(ADAPTERS.names()) in message and "\n" not in message


def _checkpoint_keys(directory: Path) -> list[str]:
    keys: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            keys += list(fh.keys())
    return keys


def _classify(adapter: MoEAdapter, key: str) -> list[str]:
    patterns = adapter.key_patterns()
    return [kind for kind in ("expert", "fused", "router") if getattr(patterns, kind).match(key)]


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
        kinds = _classify(adapter, key)
        want = ["expert"] if key in routed else ["router"] if key in routers else []
        assert kinds == want, key
    # Every (MoE layer, expert, projection) appears exactly once, with the family's projection names.
    found = [patterns.expert.match(k) for k in routed]
    triples = sorted((int(m["layer"]), int(m["expert"]), m["proj"]) for m in found)
    want_triples = sorted(
        (layer, e, p) for layer in MOE_LAYERS[family] for e in range(adapter.num_experts) for p in adapter.proj_names
    )
    assert triples == want_triples
    router_weights = sorted(int(m["layer"]) for k in routers if (m := patterns.router.match(k)) and m["name"] == "weight")
    assert router_weights == MOE_LAYERS[family]
    # The prefix group is the module path up to the block, as the streaming export rebuilds names from it.
    block = {"mixtral": "block_sparse_moe"}.get(family, "mlp")
    assert {m["prefix"] for m in found} == {f"model.layers.{layer}.{block}" for layer in MOE_LAYERS[family]}


def test_key_patterns_match_the_fused_in_memory_names(loaded, family: str) -> None:
    lm = loaded(family)
    keys = list(lm.model.state_dict())
    fused = [k for k in keys if re.search(r"\.experts\.(gate_up_proj|down_proj)$", k) and "shared" not in k]
    assert len(fused) == 2 * len(MOE_LAYERS[family])
    for key in keys:
        kinds = _classify(lm.adapter, key)
        if key in fused:
            assert kinds == ["fused"], key
        elif key.endswith((".gate.weight", ".gate.e_score_correction_bias")):
            assert kinds == ["router"], key
        else:
            assert kinds == [], key


def test_tiny_configs_cover_every_family() -> None:
    assert set(CONFIGS) == set(FAMILIES)
