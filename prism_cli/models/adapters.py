"""Architecture adapters: one small class per MoE family, chosen from a registry by ``model_type``.

Everything prism needs to know about a family lives here and nowhere else:

* where the sparse MoE blocks are (found generically: a module with a ``gate`` router and an
  ``experts`` module holding fused SwiGLU weights ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``);
* which config fields hold the routed-expert count, the expert width and the top-k;
* how the flat export (E*N sub-experts of width I/N, router rows repeated N times) must rescale
  ``down_proj`` so that its full operating point reproduces the original routing weights, and whether
  repeating router rows can reproduce the family's routing at all (DeepSeek-V3's group score cannot);
* the names the family's checkpoints use on disk, for the streaming export.

Shared experts (Qwen2-MoE, DeepSeek) and dense layers are left alone everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prism_cli.errors import PrismError
from prism_cli.registry import Registry

#: Config fields that mark a config as Mixture-of-Experts, whatever the family.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class KeyPatterns:
    """Regexes for a family's MoE tensors in checkpoint files (groups: prefix, layer, expert, proj, name)."""

    expert: re.Pattern[str]
    fused: re.Pattern[str]
    router: re.Pattern[str]


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block of a loaded model."""

    index: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module


class MoEAdapter:
    """Base adapter: softmax routers whose per-copy probability is ``p_e / N`` after row repetition."""

    model_type: ClassVar[str]
    experts_key: ClassVar[str] = "num_experts"
    width_key: ClassVar[str] = "intermediate_size"
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    #: Name of the MoE block in checkpoint keys (``model.layers.{i}.<block>.experts.{e}...``).
    checkpoint_block: ClassVar[str] = "mlp"
    #: On-disk names of an expert's gate, up and down projections.
    proj_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    #: Per-expert router tensors besides ``weight`` (repeated like router rows in the flat export).
    router_per_expert: ClassVar[tuple[str, ...]] = ()
    #: Multi-head latent attention: KV heads are not split over tensor-parallel ranks.
    latent_attention: ClassVar[bool] = False
    #: The router returns its top-k sorted by score (``torch.topk``'s default); DeepSeek's do not.
    router_sorted: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    # ---- shape -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.experts_key))

    @property
    def width(self) -> int:
        return int(getattr(self.config, self.width_key))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.top_k_key))

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_experts": self.num_experts,
            "expert_width": self.width,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
        }

    # ---- where the MoE blocks are -------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The sparse MoE blocks of ``model`` in layer order (dense layers are skipped)."""
        layers: list[MoELayer] = []
        for name, module in model.named_modules():
            experts = getattr(module, "experts", None)
            router = getattr(module, "gate", None)
            if experts is None or router is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
                continue
            match = re.search(r"layers\.(\d+)\.", name + ".")
            if match is None:
                continue
            self._check_experts(experts, name)
            layers.append(MoELayer(int(match.group(1)), name, module, router, experts))
        if not layers:
            raise PrismError(f"found no sparse MoE block with fused SwiGLU experts in this {self.model_type} model")
        return sorted(layers, key=lambda layer: layer.index)

    def _check_experts(self, experts: nn.Module, name: str) -> None:
        gate_up, down = experts.gate_up_proj, experts.down_proj
        want_gu = (self.num_experts, 2 * self.width, self.hidden_size)
        want_d = (self.num_experts, self.hidden_size, self.width)
        if tuple(gate_up.shape) != want_gu or tuple(down.shape) != want_d or getattr(experts, "has_bias", False):
            raise PrismError(
                f"{name}.experts is not the fused SwiGLU layout prism supports: gate_up_proj "
                f"{tuple(gate_up.shape)} (want {want_gu}), down_proj {tuple(down.shape)} (want {want_d})"
            )
        if getattr(self.config, "hidden_act", "silu") not in ("silu", "swish"):
            raise PrismError(f"experts use activation {self.config.hidden_act!r}; prism supports SwiGLU (silu) experts")

    # ---- checkpoints on disk ------------------------------------------------------------------
    def key_patterns(self) -> KeyPatterns:
        """How this family names its MoE tensors on disk: per-expert (hub format) or fused."""
        blocks = "|".join(dict.fromkeys((self.checkpoint_block, "mlp")))
        layer = rf"(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:{blocks}))"
        projs = "|".join(self.proj_names)
        router_names = "|".join(("weight", *self.router_per_expert))
        return KeyPatterns(
            expert=re.compile(layer + rf"\.experts\.(?P<expert>\d+)\.(?P<proj>{projs})\.weight$"),
            fused=re.compile(layer + r"\.experts\.(?P<proj>gate_up_proj|down_proj)$"),
            router=re.compile(layer + rf"\.gate\.(?P<name>{router_names})$"),
        )

    # ---- the flat (linear-gate) export ----------------------------------------------------------
    def flat_config_updates(self, n_sub: int) -> dict[str, Any]:
        """Config fields of the flat export with ``n_sub`` sub-experts per expert."""
        return {
            self.experts_key: self.num_experts * n_sub,
            self.width_key: self.width // n_sub,
            self.top_k_key: self.top_k * n_sub,
        }

    def flat_down_scale(self, n_sub: int) -> float:
        """Factor on sub-expert ``down_proj`` so the top-(N*k) flat model equals the original.

        A softmax over N identical logits per expert gives each copy ``p_e / N`` (and a renormalised
        top-k divides by N too), so the sub-experts' outputs must be scaled back by N.
        """
        return float(n_sub)

    def linear_gate_inexact_reason(self) -> str | None:
        """Why repeating router rows cannot reproduce this model's routing, or None when it can."""
        return None

    def source_router_config(self, flat_config: Any, n_sub: int) -> dict[str, Any]:
        """Fields to set on a copy of the flat config to build the original router module again."""
        return {self.experts_key: self.num_experts // n_sub, self.top_k_key: self.top_k // n_sub}

    # ---- routing semantics, for a top-K below the router's own ------------------------------------
    def renormalizes(self) -> bool:
        """Whether the router divides its top-k weights by their sum (``norm_topk_prob``)."""
        return bool(getattr(self.config, "norm_topk_prob", False))

    def selection_scores(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The scores the router ranks experts by (any monotone transform will do): softmax routers
        rank by their logits."""
        return logits


ADAPTERS: Registry[type[MoEAdapter]] = Registry("MoE family")


def register_adapter(cls: type[MoEAdapter]) -> type[MoEAdapter]:
    return ADAPTERS.register(cls.model_type)(cls)


@register_adapter
class OlmoeAdapter(MoEAdapter):
    model_type = "olmoe"


@register_adapter
class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE / Qwen1.5-MoE: the shared expert and its sigmoid gate stay whole and always on."""

    model_type = "qwen2_moe"
    width_key = "moe_intermediate_size"


@register_adapter
class Qwen3MoeAdapter(MoEAdapter):
    model_type = "qwen3_moe"
    width_key = "moe_intermediate_size"


@register_adapter
class MixtralAdapter(MoEAdapter):
    """Mixtral renormalises its top-k softmax: copies get ``p_e / (N * sum)``, so the scale is N."""

    model_type = "mixtral"
    experts_key = "num_local_experts"
    checkpoint_block = "block_sparse_moe"
    proj_names = ("w1", "w3", "w2")

    def renormalizes(self) -> bool:
        return True


class _DeepseekAdapter(MoEAdapter):
    """DeepSeek-V2/V3: shared experts sized ``moe_intermediate_size * n_shared_experts`` stay whole."""

    experts_key = "n_routed_experts"
    width_key = "moe_intermediate_size"
    latent_attention = True
    router_sorted = False

    def flat_config_updates(self, n_sub: int) -> dict[str, Any]:
        updates = super().flat_config_updates(n_sub)
        # The shared experts' width is derived from moe_intermediate_size: keep it unchanged.
        shared = getattr(self.config, "n_shared_experts", None) or 0
        if shared:
            updates["n_shared_experts"] = shared * n_sub
        return updates


@register_adapter
class DeepseekV2Adapter(_DeepseekAdapter):
    """Group-limited greedy scores a group by its best expert: N copies leave that maximum unchanged."""

    model_type = "deepseek_v2"

    def renormalizes(self) -> bool:
        return False  # V2 scales its softmax top-k by routed_scaling_factor, never by their sum


@register_adapter
class DeepseekV3Adapter(_DeepseekAdapter):
    """Sigmoid scores; a group is scored by the sum of its two best experts, which copies change."""

    model_type = "deepseek_v3"
    router_per_expert = ("e_score_correction_bias",)

    def selection_scores(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        # V3 ranks by sigmoid score plus the per-expert correction bias, and weights by the score alone.
        return logits.float().sigmoid() + router.e_score_correction_bias

    def flat_down_scale(self, n_sub: int) -> float:
        # Sigmoid scores are per expert, not shared out: copies only split the weight if renormalised.
        return float(n_sub) if self.renormalizes() else 1.0

    def linear_gate_inexact_reason(self) -> str | None:
        n_group = getattr(self.config, "n_group", 1) or 1
        topk_group = getattr(self.config, "topk_group", n_group) or n_group
        if n_group > 1 and topk_group < n_group:
            return (
                f"DeepSeek-V3 routing keeps {topk_group} of {n_group} expert groups, scoring each group by the sum "
                "of its two best experts; two copies of one expert change that sum, so repeated router rows "
                "cannot reproduce it"
            )
        return None


def _declares_experts(config: Any) -> bool:
    """True when ``config`` or one of its sub-configs counts experts.

    Some MoE families keep the expert count in a nested config (DBRX's ``ffn_config``, the
    ``text_config`` of a vision-language MoE); looking only at the top level would call them dense.
    """
    nested = [getattr(config, name, None) for name in (getattr(config, "sub_configs", None) or {})]
    return any(getattr(c, field, None) for c in (config, *nested) if c is not None for field in _EXPERT_COUNT_FIELDS)


def adapter_for_config(config: Any) -> MoEAdapter:
    """The adapter for ``config``, or a one-line error naming what was found."""
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type in ADAPTERS:
        return ADAPTERS.get(model_type)(config)
    arch = ", ".join(getattr(config, "architectures", None) or []) or "no architecture listed"
    supported = ", ".join(ADAPTERS.names())
    if _declares_experts(config):
        raise PrismError(f"unsupported MoE family {model_type!r} ({arch}); supported: {supported}")
    raise PrismError(
        f"model type {model_type!r} ({arch}) is not a Mixture-of-Experts model: its config lists no experts; "
        f"prism supports: {supported}"
    )
