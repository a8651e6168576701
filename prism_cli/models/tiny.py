"""Tiny random checkpoints of any MoE model type of the installed transformers (no hub access).

Used by the family matrix (``prism_cli.evaluation.families``, ``make families``) and the tests: every
model type whose config counts experts is found in transformers' config registry, its default config
is shrunk to a few layers of width 64 with 8 experts of width 32 and top-2 routing (fields it does
not have are left alone), a few per-family fixes make the smallest config valid, and the model is
built with random weights (routers and experts re-drawn at a scale that makes routing meaningful)
and saved with a small byte-level BPE tokenizer trained on the calibration split.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

#: Config fields that count a model's experts.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

#: The tiny shape: fields set wherever the default config has them.
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=32, moe_intermediate_size=32, expert_intermediate_size=32, shared_expert_intermediate_size=48,
    shared_intermediate_size=48, intermediate_size_mlp=48, max_position_embeddings=256,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    n_group=2, topk_group=1, first_k_dense_replace=1,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    sliding_window=64, vocab_size_per_layer_input=None,
    index_n_heads=4, index_head_dim=16, index_topk=16,
)

#: Per-family fixes on top of ``TINY``: what the smallest valid config of that family needs.
OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(q_lora_rank=None, n_shared_experts=1, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                        n_group=2, topk_group=1, first_k_dense_replace=1),
    "deepseek_v3": dict(q_lora_rank=None, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm4_moe": dict(n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    "qwen3_moe": dict(norm_topk_prob=True),
    "qwen3_next": dict(norm_topk_prob=True),
    "mixtral": dict(num_key_value_heads=2),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"]),
    # Mamba layers run a slow sequential scan on the CPU: the tiny hybrid keeps attention layers only.
    "granitemoehybrid": dict(layer_types=["attention", "attention"]),
    "kimi_linear": dict(layer_types=["full_attention", "full_attention"], num_expert_group=2, topk_group=1),
    "bailing_hybrid": dict(layer_types=["full_attention", "full_attention"], num_expert_group=2, topk_group=1,
                           first_k_dense_replace=1),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
}


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers whose default config (or a sub-config) counts experts."""
    from transformers import CONFIG_MAPPING

    found = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001 - a config that cannot even be built with its defaults is skipped
            continue
        if _counts_experts(config):
            found.append(model_type)
    return found


def _get(config: Any, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer (heterogeneous) configs refuse global reads of some fields
        return "per-layer"


def _counts_experts(config: Any, depth: int = 0) -> bool:
    if any(_get(config, f) for f in EXPERT_COUNT_FIELDS):
        return True
    nested = [_get(config, name) for name in (getattr(config, "sub_configs", None) or {})]
    nested.append(_get(config, "ffn_config"))
    return depth < 2 and any(sub is not None and not isinstance(sub, str) and _counts_experts(sub, depth + 1) for sub in nested)


def is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def tiny_config(model_type: str, vocab_size: int = 512, special_id: int = 0, **overrides: Any) -> Any:
    """The smallest config of ``model_type`` prism's checks need (see the module docstring)."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    text = defaults.get("text_config")
    if isinstance(text, dict) and text.get("model_type") and text["model_type"] != model_type:
        # a composite (vision-language) config: its causal LM is built from the text config alone
        text_fields = tiny_config(text["model_type"], vocab_size, special_id, **overrides).to_dict()
        return AutoConfig.for_model(model_type, text_config=text_fields, vocab_size=vocab_size)
    fields = {k: v for k, v in TINY.items() if k in defaults}
    if defaults.get("first_k_dense_replace") in (None, 0):
        fields.pop("first_k_dense_replace", None)
    if not defaults.get("n_group"):
        fields.pop("n_group", None)
        fields.pop("topk_group", None)
    layers = defaults.get("num_hidden_layers")
    for key, value in defaults.items():
        # per-layer lists: the first layers' attention types; the first and the last layer's MLP (dense, sparse)
        if isinstance(value, list) and len(value) == layers and layers > TINY["num_hidden_layers"]:
            fields[key] = value[: TINY["num_hidden_layers"]] if key == "layer_types" else [value[0], value[-1]]
    if "qk_rope_head_dim" in defaults:  # latent attention: heads follow from the rope and nope parts, no GQA
        fields.pop("head_dim", None)
        fields["num_key_value_heads"] = TINY["num_attention_heads"]
    if isinstance(defaults.get("mlp_only_layers"), list):
        fields["mlp_only_layers"] = []
    fields |= OVERRIDES.get(model_type, {})
    fields |= overrides
    fields |= dict(vocab_size=vocab_size, bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    return AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if v is not None or k in defaults})


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A 512-token byte-level BPE trained on a slice of the calibration split (deterministic, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prism_cli.data import split_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(split_text("calibration")[:60_000].split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def randomize(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Re-draw routers, experts and per-expert biases: default inits leave some at zero, which makes
    routing ties everywhere and biases that test nothing."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.dtype.is_floating_point:
                continue
            if name.endswith(("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight")) or ".experts." in name:
                tensor.normal_(0.0, scale)
            elif "correction" in name or name.endswith("expert_bias"):
                tensor.normal_(0.0, 0.1)  # large enough to change which experts are picked
            elif "bias" in name and ("router" in name or "gate" in name):
                tensor.normal_(0.0, 0.05)


def build_tiny_model(model_type: str, directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides: Any) -> Path:
    """Save a tiny random ``model_type`` causal LM and the tiny tokenizer into ``directory``."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = tiny_config(model_type, len(tokenizer), special, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    randomize(model)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
