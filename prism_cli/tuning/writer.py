"""The tuned export: the input export with its flat router replaced, and the training recorded.

Everything but the router tensors is copied byte for byte (tokenizer, gate neurons, other weights),
except the layer ranking (``layer_ranking.json``): it ranks the layers by what one more sub-expert
gains under the old router, and ``layered:K+j`` points would take it for the new one's;
the safetensors files are rewritten one at a time with the tuned router rows in the dtype the
checkpoint stores. Added under ``prism/`` (where engines that load every top-level ``*.safetensors``
do not look):

* ``source_router.safetensors``: the untuned source router (every N-th row before tuning), which the
  training-free gate keeps routing with, so ``topk:K`` / ``threshold:T`` mean what they meant before
  tuning and the distillation teacher of a later run is still the original model;
* ``tuning_curve.json``: the loss of every step.

The config's ``prism`` section gains ``tuning`` (data and its hash, steps, schedule, seed, the curve
file ...), and its ``serving`` notes say that router copies are no longer tied.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from prism_cli.errors import PrismError
from prism_cli.export.format import EXPORT_OUTPUT, SOURCE_ROUTER_FILE, read_source_router_file
from prism_cli.export.serving import serving_check
from prism_cli.io import atomic_dir, save_tensors
from prism_cli.models.adapters import MoEAdapter
from prism_cli.models.loading import load_config
from prism_cli.runtime.layers import RANKING_FILE

CURVE_FILE = "prism/tuning_curve.json"


def router_keys(directory: Path, adapter: MoEAdapter) -> dict[str, tuple[int, str]]:
    """Checkpoint key -> (layer, ``"weight"``) of every MoE layer's router weight in the export (the
    tensor tuning changes; the other routing tensors are copied as they are)."""
    from prism_cli.models.checkpoint import CheckpointReader

    on_disk = set(CheckpointReader(directory).keys())
    found = {}
    for layer in adapter.moe_layers(adapter.skeleton):
        (key,) = adapter.names.disk_keys([f"{layer.name}.{layer.router_name}.weight"])
        if key not in on_disk:
            raise PrismError(f"{directory} has no router weight {key}: export the model again")
        found[key] = (layer.index, "weight")
    if not found:
        raise PrismError(f"found no MoE router weights in {directory}")
    return found


def read_source_router(directory: Path, adapter: MoEAdapter, n_sub: int) -> dict[str, torch.Tensor]:
    """The source model's router rows (``layers.{i}.{name}``) as the export stores them.

    A tuned export has them in ``SOURCE_ROUTER_FILE`` (refused without it, even where its copies happen to
    be still tied); an untuned one holds N identical copies of each row, and every N-th row is the source
    router (checked: copies that differ without the file mean a router changed by something other than prism).
    """
    meta = json.loads((directory / "config.json").read_text()).get("prism") or {}
    stored = read_source_router_file(directory, meta)
    if stored is not None:
        return stored
    from prism_cli.models.checkpoint import CheckpointReader

    reader = CheckpointReader(directory)
    rows = {}
    for key, (layer, name) in router_keys(directory, adapter).items():
        flat = reader.get(key)
        copies = flat.view(-1, n_sub, *flat.shape[1:])
        if not torch.equal(copies, copies[:, :1].expand_as(copies)):
            raise PrismError(f"{directory}: the {n_sub} router copies of each expert in layer {layer} differ, but the "
                             f"export has no {SOURCE_ROUTER_FILE} with the original router; export it again from the source model")
        rows[f"layers.{layer}.{name}"] = flat[::n_sub].clone()
    return rows


def write_tuned_export(
    export_dir: Path,
    out: Path,
    tuned: dict[int, torch.Tensor],
    source_rows: dict[str, torch.Tensor],
    tuning: dict[str, Any],
    curve: list[dict[str, Any]],
    adapter: MoEAdapter,
    *,
    force: bool = False,
) -> None:
    """Copy ``export_dir`` to ``out`` with the flat router weights of layer i replaced by ``tuned[i]``."""
    def record(config: dict[str, Any], tmp: Path) -> None:
        (tmp / CURVE_FILE).write_text(json.dumps(curve, indent=1) + "\n")
        config["prism"]["tuning"] = {**tuning, "curve": CURVE_FILE, "source_router": SOURCE_ROUTER_FILE}

    write_router_export(export_dir, out, tuned, source_rows, adapter, record, force=force)


def write_router_export(
    export_dir: Path,
    out: Path,
    routers: dict[int, torch.Tensor],
    source_rows: dict[str, torch.Tensor],
    adapter: MoEAdapter,
    record: Callable[[dict[str, Any], Path], None],
    *,
    force: bool = False,
) -> None:
    """Copy ``export_dir`` to ``out`` with the flat router weights of layer i replaced by ``routers[i]`` and
    the source router stored apart; ``record(config, tmp)`` adds its files under ``tmp`` and its fields to
    the config (a dict of ``config.json``) before the folder is renamed into place."""
    keys = {key: layer for key, (layer, name) in router_keys(export_dir, adapter).items() if name == "weight"}
    if sorted(keys.values()) != sorted(routers):
        raise PrismError(f"{export_dir} has router weights for layers {sorted(keys.values())}, given: {sorted(routers)}")
    with atomic_dir(out, force=force, replaceable=EXPORT_OUTPUT) as tmp:
        for path in sorted(export_dir.rglob("*")):
            rel = path.relative_to(export_dir)
            target = tmp / rel
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif rel.name in ("config.json", RANKING_FILE) and len(rel.parts) == 1:
                continue  # the config is written below; a ranking measured under the old router is dropped
            elif path.suffix == ".safetensors" and len(rel.parts) == 1:
                _rewrite_shard(path, target, keys, routers)
            else:
                shutil.copy2(path, target)
        (tmp / SOURCE_ROUTER_FILE).parent.mkdir(exist_ok=True)
        save_tensors({k: v.contiguous() for k, v in source_rows.items()}, tmp / SOURCE_ROUTER_FILE)
        config = json.loads((export_dir / "config.json").read_text())
        record(config, tmp)
        prism = config["prism"]
        prism["serving"] = serving_check(load_config(str(export_dir)), adapter, int(prism["sub_experts"]), router_tuned=True,
                                         bank=prism.get("router_bank"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _rewrite_shard(path: Path, target: Path, keys: dict[str, int], tuned: dict[int, torch.Tensor]) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key in tensors.keys() & keys.keys():
        old = tensors[key]
        new = tuned[keys[key]]
        if new.shape != old.shape:
            raise PrismError(f"tuned router for {key} has shape {tuple(new.shape)}, the export {tuple(old.shape)}")
        tensors[key] = new.to(old.dtype).contiguous()
    save_tensors(tensors, target, metadata=metadata)
