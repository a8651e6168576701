"""Real MoE models' dimensions, for offloading studies without their weights.

Each shape is the public config of a hub model (no weights). Its parameter counts are taken from the
stock transformers model built on the ``meta`` device (exact, nothing allocated): how many bytes are
routed experts (offloaded) and how many stay on the device (attention, embeddings, routers, norms,
shared experts, dense layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from prism_cli.registry import Registry


@dataclass(frozen=True)
class ModelShape:
    """A model's dimensions; ``dtype_bytes`` is the serving precision (bf16)."""

    name: str
    hub_id: str
    config: dict[str, Any] = field(hash=False)
    dtype_bytes: int = 2

    @cached_property
    def _counts(self) -> dict[str, int]:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from prism_cli.models.adapters import adapter_for_config

        cfg = AutoConfig.for_model(**self.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        adapter = adapter_for_config(cfg)
        layers = adapter.moe_layers(model)
        expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
        params = {id(p): p for p in model.parameters()}
        experts = sum(p.numel() for i, p in params.items() if i in expert_ids)
        embed = model.get_input_embeddings().weight.numel()
        return {
            "total": sum(p.numel() for p in params.values()),
            "experts": experts,
            "embedding": embed,
            "moe_layers": len(layers),
            "layers": int(cfg.num_hidden_layers),
            "num_experts": adapter.num_experts,
            "top_k": adapter.top_k,
            "hidden": adapter.hidden_size,
            "width": adapter.width,
        }

    def __getattr__(self, name: str) -> int:
        if name in ("moe_layers", "layers", "num_experts", "top_k", "hidden", "width"):
            return self._counts[name]
        raise AttributeError(name)

    def expert_bytes(self) -> int:
        """All routed experts of all layers."""
        return self._counts["experts"] * self.dtype_bytes

    def non_expert_bytes(self) -> int:
        """Everything that stays on the device."""
        return (self._counts["total"] - self._counts["experts"]) * self.dtype_bytes

    def non_expert_bytes_read_per_token(self) -> int:
        """Weights a decode step reads besides routed experts: all but the embedding table (one row)."""
        return self.non_expert_bytes() - self._counts["embedding"] * self.dtype_bytes

    def expert_unit_bytes(self, n_sub: int = 1) -> int:
        """One expert (``n_sub`` = 1) or one of its ``n_sub`` sub-experts."""
        return 3 * self.hidden * self.width // n_sub * self.dtype_bytes

    def cache_fraction(self, budget_bytes: int, reserve_fraction: float = 0.0, reserve_bytes: int = 0) -> float:
        """The share of the routed experts a budget caches (after the non-expert weights and the reserve, a
        share of the budget or a size)."""
        cache = budget_bytes * (1 - reserve_fraction) - reserve_bytes - self.non_expert_bytes()
        return cache / self.expert_bytes()

    def describe(self) -> dict[str, Any]:
        return {"shape": self.name, "hub_id": self.hub_id, "moe_layers": self.moe_layers, "experts": self.num_experts,
                "top_k": self.top_k, "hidden": self.hidden, "expert_width": self.width,
                "expert_bytes": self.expert_bytes(), "non_expert_bytes": self.non_expert_bytes()}


SHAPES: Registry[ModelShape] = Registry("model shape")


def register_shape(shape: ModelShape) -> ModelShape:
    return SHAPES.register(shape.name)(shape)


register_shape(ModelShape("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "first_k_dense_replace": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "num_attention_heads": 16, "num_key_value_heads": 16,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
}))
register_shape(ModelShape("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", {
    "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
    "tie_word_embeddings": False,
}))
register_shape(ModelShape("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}))
