"""``prism export``: write a checkpoint whose experts are the partition's sub-experts.

The export is always the *flat* layout (SPEC 3.4b): the same model type with ``E * N`` experts of
width ``I / N`` (expert e's sub-expert n is expert ``e * N + n``; sub-expert 0 is the most important),
router rows repeated N times, and ``down_proj`` rescaled (``MoEAdapter.flat_down_scale``) so that the
top-(N*k) operating point equals the original model. Stock transformers loads it as is (the linear
gate); vLLM and SGLang serve it as an ordinary fine-grained MoE.

``--gate neurons`` adds ``prism/gate_neurons.safetensors`` (each sub-expert's gate-neuron positions) and
makes the prism runtime route with the *original* router and the training-free gate (SPEC 3.4a).

Source weights are streamed tensor by tensor from safetensors and written in bounded shards, in the
family's hub naming (``...experts.{i}.gate_proj.weight``), so models larger than memory export.
"""

from __future__ import annotations

import copy
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from prism_cli import __version__
from prism_cli.errors import PrismError
from prism_cli.export.checkpoint import INDEX, SINGLE, CheckpointReader, ShardWriter
from prism_cli.export.inexact import linear_gate_difference
from prism_cli.export.serving import serving_check
from prism_cli.io import atomic_dir, check_new_folder, check_not_input
from prism_cli.models.adapters import MoEAdapter, adapter_for_config
from prism_cli.models.loading import checkpoint_dir, config_fingerprint, load_config, model_label, resolve_model, weights_fingerprint
from prism_cli.runtime.elastic import EXPORT_FORMAT_VERSION, GATE_FILE
from prism_cli.runtime.operating_points import GATES, default_operating_points, parse_operating_point
from prism_cli.solvers.format import Partition, file_hash, read_partition

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


@dataclass
class ExportSettings:
    gate: str = "neurons"
    operating_point: str | None = None
    allow_inexact: bool = False
    max_shard_bytes: int = 4 * 2**30

    def validate(self) -> None:
        if self.gate not in GATES:
            raise PrismError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.max_shard_bytes < 1:
            raise PrismError(f"--max-shard-gb must be positive, got {self.max_shard_bytes / 2**30:g}")


@dataclass
class ExportResult:
    out: Path
    gate: str
    n_sub: int
    num_experts: int
    width: int
    top_k: int
    default_point: str
    files: list[str]
    inexact_reason: str | None
    serving: dict[str, Any]
    linear_gate_difference: dict[str, Any] | None = None


def check_partition(partition: Partition, config: Any, adapter: MoEAdapter, weights_hash: str, model: str) -> None:
    """Refuse a partition made for another model, naming the first field that differs."""
    meta = partition.meta
    expected = {
        "model_type": adapter.model_type,
        "num_experts": adapter.num_experts,
        "expert_width": adapter.width,
        "hidden_size": adapter.hidden_size,
        "top_k": adapter.top_k,
        "config_hash": config_fingerprint(config),
        "weights_hash": weights_hash,
    }
    for key, value in expected.items():
        if str(meta.get(key)) != str(value):
            raise PrismError(
                f"partition was made for another model: {key} is {meta.get(key)!r} in the partition "
                f"(profiled from {meta.get('model')}) but {value!r} in {model}: export the model it was made from, "
                "or profile and partition this one"
            )
    if adapter.width % partition.n_sub:
        raise PrismError(f"partition has N = {partition.n_sub}, which does not divide this model's expert width {adapter.width}")


def export_model(
    model: str | None,
    partition_path: str | Path,
    out: str | Path,
    settings: ExportSettings,
    *,
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    inputs: dict[str, Path] | None = None,
) -> ExportResult:
    """Export ``model`` split by the partition at ``partition_path`` into the folder ``out``.

    ``out`` may not be, hold or lie inside the source model, the partition or any of ``inputs``
    (``{"config file": path}``): ``force`` replaces an old export, never an input. ``on_progress(done,
    total)`` is called with ``done = 0`` once every check has passed and writing starts (so a caller
    can show progress only for an export that will run), then as MoE layers are written.
    """
    settings.validate()
    out = Path(out)
    name = resolve_model(model)
    protected = {"source model": Path(name)} if Path(name).is_dir() else {}
    protected |= {"partition": Path(partition_path), **(inputs or {})}
    check_not_input(out, protected, inside=True)
    check_new_folder(out, force)
    config = load_config(name)
    adapter = adapter_for_config(config)
    source = checkpoint_dir(name)
    check_not_input(out, {"source model": source}, inside=True)  # a hub snapshot, once downloaded
    partition = read_partition(partition_path)
    check_partition(partition, config, adapter, weights_fingerprint(source, adapter), name)
    n_sub = partition.n_sub
    inexact = adapter.linear_gate_inexact_reason()
    if settings.gate == "linear" and inexact and not settings.allow_inexact:
        raise PrismError(
            f"the linear gate cannot be exact for this model: {inexact}; use --gate neurons (exact), "
            "or --allow-inexact to export anyway"
        )
    default_point = parse_operating_point(
        settings.operating_point or str(n_sub * adapter.top_k), settings.gate, n_sub, adapter.top_k
    )
    reader = CheckpointReader(source)
    plan = _plan(reader, adapter)
    if sorted(plan.moe_layers) != partition.layers:
        raise PrismError(
            f"partition covers layers {partition.layers} but the model has MoE layers {sorted(plan.moe_layers)}; "
            "profile and partition every MoE layer to export"
        )
    # Where the linear gate is inexact and exported anyway, measure how far it is (runs the source model).
    difference = linear_gate_difference(name, n_sub) if settings.gate == "linear" and inexact else None
    with atomic_dir(out, force=force) as tmp:
        writer = ShardWriter(tmp, settings.max_shard_bytes)
        total = len(plan.moe_layers)
        if on_progress is not None:
            on_progress(0, total)
        for key in plan.plain:
            writer.add(key, reader.get(key))
        for done, layer in enumerate(sorted(plan.moe_layers), start=1):
            _write_layer(reader, writer, plan, layer, partition, adapter)
            if on_progress is not None:
                on_progress(done, total)
        files = writer.finish()
        flat = copy.deepcopy(config)
        for key, value in adapter.flat_config_updates(n_sub).items():
            setattr(flat, key, value)
        if settings.gate == "linear":
            setattr(flat, adapter.top_k_key, default_point.value)
        flat.prism = {
            "format_version": EXPORT_FORMAT_VERSION,
            "prism_version": __version__,
            "gate": settings.gate,
            "sub_experts": n_sub,
            "source": {
                "model": model_label(name),
                "model_type": adapter.model_type,
                "num_experts": adapter.num_experts,
                "expert_width": adapter.width,
                "top_k": adapter.top_k,
                "config_hash": partition.meta["config_hash"],
                "weights_hash": partition.meta["weights_hash"],
            },
            "partition": {
                "path": str(partition_path),
                "hash": file_hash(partition_path),
                "solver": partition.meta["solver"],
                "keep": partition.meta["keep"],
                "seed": partition.meta["seed"],
            },
            "down_scale": adapter.flat_down_scale(n_sub),
            "linear_gate_exact": inexact is None,
            "linear_gate_note": inexact,
            **({"linear_gate_difference": difference} if difference is not None else {}),
            "layers": partition.layers,
            "operating_points": [str(p) for p in default_operating_points(settings.gate, n_sub, adapter.top_k)],
            "default_operating_point": str(default_point),
        }
        flat.prism["serving"] = serving_check(flat, adapter, n_sub)
        flat.save_pretrained(tmp)
        if settings.gate == "neurons":
            gates = {
                f"layers.{layer}.gate_positions": torch.from_numpy(
                    np.stack([x.gate_positions for x in partition.experts[layer]]).astype(np.int32)
                )
                for layer in partition.layers
            }
            (tmp / GATE_FILE).parent.mkdir()
            save_file(gates, str(tmp / GATE_FILE))
            files.append(GATE_FILE)
        _copy_side_files(source, tmp)
    return ExportResult(out, settings.gate, n_sub, adapter.num_experts, adapter.width, adapter.top_k,
                        str(default_point), files, inexact, flat.prism["serving"], difference)


@dataclass
class _Plan:
    plain: list[str]
    moe_layers: dict[int, str]
    experts: dict[int, dict[tuple[int, str], str]]
    fused: dict[int, dict[str, str]]
    routers: dict[int, dict[str, str]]


def _plan(reader: CheckpointReader, adapter: MoEAdapter) -> _Plan:
    """Sort the checkpoint's tensors into plain ones (copied) and MoE ones (split or repeated)."""
    patterns = adapter.key_patterns()
    plan = _Plan(plain=[], moe_layers={}, experts=defaultdict(dict), fused=defaultdict(dict), routers=defaultdict(dict))
    for key in reader.keys():
        if m := patterns.expert.match(key):
            plan.experts[int(m["layer"])][int(m["expert"]), m["proj"]] = key
            plan.moe_layers[int(m["layer"])] = m["prefix"]
        elif m := patterns.fused.match(key):
            plan.fused[int(m["layer"])][m["proj"]] = key
            plan.moe_layers[int(m["layer"])] = m["prefix"]
        elif m := patterns.router.match(key):
            plan.routers[int(m["layer"])][m["name"]] = key
        else:
            plan.plain.append(key)
    return plan


def _write_layer(
    reader: CheckpointReader, writer: ShardWriter, plan: _Plan, layer: int, partition: Partition, adapter: MoEAdapter
) -> None:
    n_sub = partition.n_sub
    prefix = plan.moe_layers[layer]
    gate_name, up_name, down_name = adapter.proj_names
    width, size = adapter.width, adapter.width // n_sub
    scale = adapter.flat_down_scale(n_sub)
    for key in plan.routers.get(layer, {}).values():
        writer.add(key, reader.get(key).repeat_interleave(n_sub, dim=0))
    if set(plan.routers.get(layer, {})) != {"weight", *adapter.router_per_expert}:
        raise PrismError(f"layer {layer}: router tensors are missing from the checkpoint")
    fused = plan.fused.get(layer)
    gate_up = reader.get(fused["gate_up_proj"]) if fused else None
    down_all = reader.get(fused["down_proj"]) if fused else None
    for e, expert in enumerate(partition.experts[layer]):
        if fused:
            gate, up, down = gate_up[e, :width], gate_up[e, width:], down_all[e]
        else:
            keys = plan.experts[layer]
            try:
                gate, up, down = (reader.get(keys[e, p]) for p in adapter.proj_names)
            except KeyError:
                raise PrismError(f"layer {layer}: weights of expert {e} are missing from the checkpoint") from None
        for n in range(n_sub):
            idx = torch.from_numpy(expert.permutation[n * size : (n + 1) * size].astype(np.int64))
            sub = f"{prefix}.experts.{e * n_sub + n}"
            writer.add(f"{sub}.{gate_name}.weight", gate[idx].clone())
            writer.add(f"{sub}.{up_name}.weight", up[idx].clone())
            writer.add(f"{sub}.{down_name}.weight", (down[:, idx].float() * scale).to(down.dtype))


def _copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template ...: every top-level file that is not weights or config."""
    for path in source.iterdir():
        side_file = not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in (INDEX, SINGLE, "config.json")
        if path.is_file() and side_file and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
