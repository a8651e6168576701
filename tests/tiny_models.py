"""Tiny random-weight models of every supported MoE family, built from configs (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prism_cli.models.tiny import tiny_tokenizer

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)
CONFIGS: dict[str, dict] = {
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16,
                      norm_topk_prob=True),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, **_MLA),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, **_MLA),
}


def build_tiny(family: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save a tiny ``family`` model with random weights and the tiny tokenizer into ``directory``."""
    tokenizer = tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = AutoConfig.for_model(
        family, **{**_COMMON, **CONFIGS[family], **overrides, "vocab_size": len(tokenizer),
                   "bos_token_id": special, "eos_token_id": special, "pad_token_id": special}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Default init leaves routers at zero for some families; random routers make routing meaningful.
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                param.normal_(0.0, 0.2)
            if name.endswith("e_score_correction_bias"):
                param.normal_(0.0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
