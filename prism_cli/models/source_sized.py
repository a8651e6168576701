"""Modules a flat export keeps at the source model's size when the config field that sizes them shrinks.

A flat export divides the routed experts' width field by N. In most families that field sizes the
routed experts only; in some it also sizes another module: Hunyuan-MoE's shared MLP and Jamba's
dense MLPs are built from ``intermediate_size``, the experts' width. Stock transformers then builds
those modules N times too narrow, and no other config field can say otherwise.

Such a module is rebuilt, after the model is built, from a copy of the config with the source width
put back (``type(module)(config)``: every such module found so far is built from the config alone).
The flat config records what to rebuild under ``prism_source_sized`` (the fields and the module
paths). prism builds its models through ``causal_lm_class`` and ``rebuild_source_sized``; for plain
transformers, the export ships ``prism_flat_modeling.py`` (the same rebuild, no prism import) and
``auto_map``, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

#: The flat config's attribute: ``{"fields": {name: source value}, "modules": [module path, ...]}``.
SOURCE_SIZED = "prism_source_sized"
#: The modeling file an export with source-sized modules ships for plain transformers.
MODELING_FILE = "prism_flat_modeling.py"


def rebuild_source_sized(model: nn.Module, config: Any) -> None:
    """Replace, in ``model``, each module listed in ``config.prism_source_sized`` by one built from the config
    with the source model's width fields (a no-op for a config without the attribute)."""
    sized = getattr(config, "prism_source_sized", None)
    if not sized:
        return
    source = copy.deepcopy(config)
    text = source.get_text_config() if hasattr(source, "get_text_config") else source
    for key, value in sized["fields"].items():
        setattr(text, key, value)
    for name in sized["modules"]:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        model.get_submodule(parent).add_module(child, type(old)(text))


def flat_class(native: type) -> type:
    """``native`` (a transformers causal LM class) with the source-sized modules rebuilt after ``__init__``."""
    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        native.__init__(self, config, *args, **kwargs)
        rebuild_source_sized(self, config)

    return type(f"PrismFlat{native.__name__}", (native,), {"__init__": __init__, "__module__": native.__module__})


def causal_lm_class(config: Any) -> type | None:
    """The class prism builds ``config``'s causal LM with (None where transformers has none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    native = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if native is None or not getattr(config, SOURCE_SIZED, None):
        return native
    return flat_class(native)


def modeling_file(native: type) -> tuple[str, str]:
    """``(source text, class name)`` of the modeling file for plain transformers (``auto_map``)."""
    name = f"PrismFlat{native.__name__}"
    text = (
        '"""Written by `prism export`: a flat (sub-expert) export of a model whose routed experts share a width\n'
        "field with another module. transformers would build that module N times too narrow; this class rebuilds it\n"
        'at the source width. Load with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)."""\n\n'
        "from __future__ import annotations\n\nimport copy\n\n"
        f"from {native.__module__} import {native.__name__}\n\n\n"
        + inspect.getsource(rebuild_source_sized)
        + f"\n\nclass {name}({native.__name__}):\n"
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        "        rebuild_source_sized(self, config)\n"
    )
    return text, name


def _built_from_config(cls: type) -> bool:
    """True when ``cls(config)`` is a complete call (its other parameters have defaults)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return bool(params) and params[0].name == "config" and all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[1:])


def find_source_sized(flat_model: nn.Module, source_model: nn.Module, source_text_config: Any, fields: dict[str, Any],
                      keep_out: set[str], skip: set[str]) -> tuple[dict[str, Any] | None, str | None]:
    """What a flat model must rebuild so that every tensor outside ``skip`` has its source shape.

    ``flat_model`` / ``source_model`` are meta skeletons; ``fields`` the width fields to put back;
    ``keep_out`` module paths a rebuilt module may not contain (the MoE blocks: their experts and
    routers are flat on purpose); ``skip`` the tensors that change on purpose. Returns the
    ``prism_source_sized`` record (None when nothing differs), or ``(None, key)`` naming the first
    tensor no rebuild restores.
    """
    source_shapes = {k: tuple(v.shape) for k, v in source_model.state_dict().items()}
    differing = [k for k, v in flat_model.state_dict().items() if k not in skip and source_shapes.get(k) != tuple(v.shape)]
    if not differing:
        return None, None
    modules: list[str] = []
    for key in differing:
        if any(key.startswith(m + ".") for m in modules):
            continue
        path = key.rpartition(".")[0]
        while path and not any(block == path or block.startswith(path + ".") for block in keep_out):
            module = flat_model.get_submodule(path)
            if _built_from_config(type(module)) and _rebuilds_to_source(module, path, source_model, source_text_config):
                modules.append(path)
                break
            path = path.rpartition(".")[0]
        else:
            return None, key
    return {"fields": dict(fields), "modules": sorted(modules)}, None


def _rebuilds_to_source(module: nn.Module, path: str, source_model: nn.Module, source_text_config: Any) -> bool:
    try:
        with torch.device("meta"):
            rebuilt = type(module)(source_text_config)
    except Exception:  # noqa: BLE001 - a constructor that needs more than the config: not this module
        return False
    want = {k: tuple(v.shape) for k, v in source_model.get_submodule(path).state_dict().items()}
    return {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == want
