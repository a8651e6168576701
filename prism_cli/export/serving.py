"""What vLLM and SGLang need from a flat (linear-gate) export, checked without either engine.

The flat export is a checkpoint of the source model's own architecture, so both engines load it with
the model class they already have for that family. What changes is the MoE shape: ``E * N`` experts of
width ``I / N``. The engines' fused-MoE layers split each expert's width over the tensor-parallel
ranks (``intermediate_size // tp``, without checking the remainder) and split experts over the
expert-parallel ranks, so the narrower experts decide which parallel sizes still work. The rules here
are the ones those model classes apply (attention heads divisible by the TP size, KV heads divisible
by it or dividing it, every MLP width divisible by it); the result is recorded in the export's config
and printed by ``prism export``. What is particular to a family (its MLP width fields, its engines'
quirks) comes from its adapter.
"""

from __future__ import annotations

from typing import Any

from prism_cli.models.adapters import MoEAdapter
from prism_cli.models.source_sized import MODELING_FILE, SOURCE_SIZED

#: Parallel sizes reported (one node).
PARALLEL_SIZES = (1, 2, 4, 8)


def _tp_problem(config: Any, adapter: MoEAdapter, tp: int) -> str | None:
    heads = int(config.num_attention_heads)
    if heads % tp:
        return f"{heads} attention heads"
    kv = getattr(config, "num_key_value_heads", None)
    if kv and not adapter.latent_attention and int(kv) % tp and tp % int(kv):
        return f"{kv} KV heads"
    for name, width in adapter.mlp_widths(config).items():
        if width % tp:
            return f"{name} {width}"
    return None


def serving_check(config: Any, adapter: MoEAdapter, n_sub: int, router_tuned: bool = False,
                  bank: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat export's parallel sizes and the engine behaviours a user should know about.

    ``config`` is the flat export's config; ``adapter`` the source model's adapter; ``router_tuned``
    for an export whose router was fine-tuned (``prism tune-gate``), whose copies are no longer tied.
    """
    experts = int(getattr(config, adapter.experts_key))
    tensor_parallel, refused = [], {}
    for tp in PARALLEL_SIZES:
        problem = _tp_problem(config, adapter, tp)
        if problem is None:
            tensor_parallel.append(tp)
        else:
            refused[str(tp)] = f"{problem} not divisible by {tp}"
    if bank is not None:
        serve = int(bank["serve_k"])
        notes = [
            f"the router switches with K in prism's runtime (prism select-routers: a router per K, chosen on validation "
            f"text); the checkpoint holds the one chosen for K = {serve}, so an engine serving num_experts_per_tok = {serve} "
            f"(vLLM's fused top-k softmax, SGLang, torch.topk) runs prism's linear:{serve}; to serve another K, write the "
            "bank again with --serve-k K",
        ]
    elif router_tuned:
        notes = [
            "the router was fine-tuned (prism tune-gate): an expert's sub-experts have their own router rows, so "
            "num_experts_per_tok = K selects the router's own top-K of all sub-experts in every engine (vLLM's fused "
            "top-k softmax, SGLang, torch.topk), which is prism's linear:K; the training-free gate keeps the "
            "original router (prism/source_router.safetensors)",
        ]
    else:
        notes = [
            f"num_experts_per_tok = K not a multiple of {n_sub} splits an expert's {n_sub} tied copies: prism's linear:K "
            "and vLLM's fused top-k softmax kernel take them lowest index first (sub-expert 0 holds the most activation "
            "mass); other top-k implementations (torch.topk in plain transformers, some SGLang and grouped top-k "
            "paths) may take any copy, which changes quality at such K but not at multiples of N",
        ]
    notes += adapter.engine_notes(config)
    sized = getattr(config, SOURCE_SIZED, None)
    if sized:
        modules = sorted({name.rpartition(".")[2] for name in sized["modules"]})
        fields = ", ".join(f"{k} = {v}" for k, v in sized["fields"].items())
        notes.append(
            f"{' and '.join(modules)} keep the source width ({fields}) while that field is the sub-experts' width here: "
            f"stock transformers loads this export with trust_remote_code=True ({MODELING_FILE}, which rebuilds them); "
            "an engine's own model class that sizes them from the same field, as transformers' does, cannot load it: "
            "serve it through transformers' modeling code"
        )
    return {
        "architecture": (getattr(config, "architectures", None) or [None])[0],
        "experts": experts,
        "expert_width": int(getattr(config, adapter.width_key)),
        "tensor_parallel": tensor_parallel,
        "tensor_parallel_refused": refused,
        "expert_parallel": [ep for ep in PARALLEL_SIZES if experts % ep == 0],
        "notes": notes,
    }
