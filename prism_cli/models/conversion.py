"""Checkpoint tensors on disk <-> a model's module tensors, by transformers' own conversion mapping.

transformers v5 loads most MoE checkpoints through a *conversion mapping*: per-expert hub tensors
(``experts.{e}.gate_proj.weight``) are stacked and concatenated into the fused module parameters
(``experts.gate_up_proj``), Granite's ``input_linear`` is renamed, Mixtral's ``block_sparse_moe`` becomes
``mlp``..., and ``save_pretrained`` reverts the mapping so that checkpoints keep the hub format.
prism's streaming export reads and writes checkpoints one MoE layer at a time, so it applies the same
mapping itself, on a layer's tensors only: ``to_module`` as ``from_pretrained`` does, ``to_disk`` as
``save_pretrained`` does. No family's disk names are written down in prism; the model skeleton (built
on the meta device, no memory) decides, so every family transformers ships is read and written in its
own format, and a checkpoint already saved in the fused format is read as well.
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import Any

import torch
from torch import nn

from prism_cli.errors import PrismError

try:  # transformers >= 5: the weight-conversion machinery of from_pretrained / save_pretrained
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
        revert_weight_conversion,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(f"prism needs transformers 5's weight-conversion mapping: {exc}") from None


def skeleton(config: Any) -> nn.Module:
    """The causal LM of ``config`` on the meta device: its module tree and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    from prism_cli.models.source_sized import rebuild_source_sized

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
            rebuild_source_sized(model, config)
            return model
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrismError(
            f"transformers cannot build a {getattr(config, 'model_type', '?')} model from this config: {first}"
        ) from None


class CheckpointNames:
    """The conversion between disk and module tensors of one model (``model`` may be a meta skeleton)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._meta = model.state_dict()
        self._module_keys: dict[str, str | None] = {}

    @cached_property
    def _load_transforms(self) -> tuple[list, list, dict]:
        transforms = get_model_conversion_mapping(self.model, add_legacy=True)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        return renamings, converters, {p: c for c in converters for p in c.source_patterns}

    def module_key(self, disk_key: str) -> str | None:
        """The module tensor a checkpoint tensor loads into (None when the model has no such tensor)."""
        if disk_key not in self._module_keys:
            renamings, converters, _ = self._load_transforms
            renamed, _ = rename_source_key(disk_key, renamings, converters, self.model.base_model_prefix, self._meta)
            self._module_keys[disk_key] = renamed if renamed in self._meta else disk_key if disk_key in self._meta else None
        return self._module_keys[disk_key]

    def to_module(self, disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module tensors from a group of checkpoint tensors (all the checkpoint tensors they come from)."""
        renamings, converters, by_pattern = self._load_transforms
        pending: dict[str, Any] = {}
        for key, tensor in sorted(disk.items(), key=lambda kv: dot_natural_key(kv[0])):
            renamed, pattern = rename_source_key(key, renamings, converters, self.model.base_model_prefix, self._meta)
            if renamed not in self._meta and key in self._meta:
                renamed, pattern = key, None
            if pattern is not None:
                transform = pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
            else:
                transform = pending.setdefault(renamed, WeightRenaming(key, renamed))
                pattern = key
            transform.add_tensor(renamed, key, pattern, tensor)
        out: dict[str, torch.Tensor] = {}
        for name, transform in pending.items():
            for key, value in transform.convert(name, model=self.model, config=self.model.config).items():
                out[key] = value[0] if isinstance(value, list) else value
        return out

    def to_disk(self, module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors, in the family's hub format, for a group of module tensors."""
        return revert_weight_conversion(self.model, dict(module))

    def disk_keys(self, module_keys: list[str]) -> list[str]:
        """The checkpoint names ``save_pretrained`` gives ``module_keys`` (computed on meta tensors)."""
        return list(self.to_disk({k: self._meta[k] for k in module_keys}))
