"""Random-weight OLMoE checkpoints at real models' dimensions, written with memory bounded by one layer.

The scale benchmarks (``scripts/bench_scale.py``) and ``prism plan calibrate`` need checkpoints with a
real model's expert shapes (OLMoE-1B-7B: hidden 2048, 64 experts of width 1024, top-8) without its
weights. ``write_synthetic_olmoe`` writes a stock ``OlmoeForCausalLM`` checkpoint, in the hub's
per-expert tensor layout, one safetensors shard per decoder layer, from a config (a published
``config.json``) with any number of layers; the built-in model's 4,096-token tokenizer replaces the
original vocabulary. Every tensor is drawn from its own seeded generator (projections with standard
deviation ``1/sqrt(fan_in)``, so activations keep their scale through the layers; norms are ones).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prism_cli.models.loading import builtin_model_dir

#: Config fields replaced so that the checkpoint fits the built-in tokenizer.
_TOKENIZER_FIELDS = {"vocab_size": 4096, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def olmoe_config(base: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """``base`` (an OLMoE ``config.json``) with ``num_layers`` layers and the built-in tokenizer's vocabulary."""
    if base.get("model_type") != "olmoe":
        raise ValueError(f"an OLMoE config is needed, got model_type {base.get('model_type')!r}")
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    return {**config, **_TOKENIZER_FIELDS, "num_hidden_layers": num_layers, "torch_dtype": "bfloat16"}


def _layer_shapes(config: dict[str, Any], layer: int) -> Iterator[tuple[str, tuple[int, ...], float]]:
    """(name, shape, init std; 0 means ones) of one decoder layer's tensors, in the hub's layout."""
    h, width = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = h // heads
    p = f"model.layers.{layer}."
    yield p + "input_layernorm.weight", (h,), 0.0
    yield p + "post_attention_layernorm.weight", (h,), 0.0
    yield p + "self_attn.q_proj.weight", (heads * head_dim, h), h**-0.5
    yield p + "self_attn.k_proj.weight", (kv * head_dim, h), h**-0.5
    yield p + "self_attn.v_proj.weight", (kv * head_dim, h), h**-0.5
    yield p + "self_attn.o_proj.weight", (h, heads * head_dim), (heads * head_dim) ** -0.5
    yield p + "self_attn.q_norm.weight", (heads * head_dim,), 0.0
    yield p + "self_attn.k_norm.weight", (kv * head_dim,), 0.0
    yield p + "mlp.gate.weight", (config["num_experts"], h), h**-0.5
    for e in range(config["num_experts"]):
        yield p + f"mlp.experts.{e}.gate_proj.weight", (width, h), h**-0.5
        yield p + f"mlp.experts.{e}.up_proj.weight", (width, h), h**-0.5
        yield p + f"mlp.experts.{e}.down_proj.weight", (h, width), width**-0.5


def _outer_shapes(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], float]]:
    h, vocab = config["hidden_size"], config["vocab_size"]
    yield "model.embed_tokens.weight", (vocab, h), 1.0
    yield "model.norm.weight", (h,), 0.0
    yield "lm_head.weight", (vocab, h), h**-0.5


def _tensor(shape: tuple[int, ...], std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if std == 0.0:
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def write_synthetic_olmoe(out: Path, base_config: dict[str, Any], num_layers: int, *, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint into the new folder ``out`` (config, tokenizer, sharded weights, index)."""
    config = olmoe_config(base_config, num_layers)
    out.mkdir(parents=True)
    shards = [list(_outer_shapes(config))] + [list(_layer_shapes(config, i)) for i in range(num_layers)]
    weight_map: dict[str, str] = {}
    total = 0
    index = 0
    for s, shard in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape, std in shard:
            tensors[key] = _tensor(shape, std, seed * 1_000_003 + index, dtype)
            index += 1
            weight_map[key] = name
            total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, out / name, metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(builtin_model_dir() / file, out / file)
    return out
