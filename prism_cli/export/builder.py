"""``prism export``: write a checkpoint whose experts are the partition's sub-experts.

The export is always the *flat* layout (SPEC 3.4b): the same model type with ``E * N`` experts of
width ``I / N`` (expert e's sub-expert n is expert ``e * N + n``; sub-expert 0 is the most important),
router rows (and every per-expert routing tensor) repeated N times, and ``down_proj`` rescaled
(``MoEAdapter.flat_down_scale``) so that the top-(N*k) operating point equals the original model.
Stock transformers loads it as is (the linear gate); vLLM and SGLang serve it as an ordinary
fine-grained MoE.

Sub-experts are cut neuron by neuron in the experts' own layout (``models/layout.py``: transposed,
interleaved gate/up as in GPT-OSS, per-neuron up-projection biases). A ``down_proj_bias`` is added once
per expert; sub-expert 0 carries it whole (``DOWN_BIAS``, measured in ``results/down_bias.md``).

``--gate neurons`` adds ``prism/gate_neurons.safetensors`` (each sub-expert's gate-neuron positions) and
makes the prism runtime route with the *original* router and the training-free gate (SPEC 3.4a).

Source weights are streamed one MoE layer at a time, converted to the module layout and back to the
family's hub format with transformers' own conversion mapping (``models/conversion.py``), and written
in bounded shards, so models larger than memory export. Before the output is renamed into place,
every MoE block of the source and of the export runs on probe inputs at the full operating point of
each gate (``export/exactness.py``); the measured differences go into the config (``prism.exactness``)
and an export that is not exact is refused (the linear gate: unless ``--allow-inexact``).
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

from prism_cli import __version__
from prism_cli.errors import PrismError
from prism_cli.export.checkpoint import ShardWriter
from prism_cli.export.exactness import GateCheck, check_export, probe_description
from prism_cli.export.format import EXPORT_FORMAT_VERSION, EXPORT_OUTPUT, GATE_FILE
from prism_cli.export.inexact import linear_gate_difference
from prism_cli.export.serving import serving_check
from prism_cli.io import atomic_dir, check_free_space, check_new_folder, check_not_input, save_tensors
from prism_cli.models.adapters import MoEAdapter, MoELayer, adapter_for_config
from prism_cli.models.checkpoint import INDEX, SINGLE, CheckpointReader
from prism_cli.models.checkpoint_files import check_checkpoint_files, checkpoint_tensors
from prism_cli.models.conversion import CheckpointNames, skeleton
from prism_cli.models.loading import checkpoint_dir, config_fingerprint, load_config, model_label, resolve_model, weights_fingerprint
from prism_cli.models.source_sized import MODELING_FILE, SOURCE_SIZED, find_source_sized, modeling_file
from prism_cli.operating_points import GATES, default_operating_points, parse_operating_point
from prism_cli.solvers.format import Partition, file_hash, read_partition

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


@dataclass
class ExportSettings:
    gate: str = "neurons"
    operating_point: str | None = None
    allow_inexact: bool = False
    max_shard_bytes: int = 4 * 2**30
    down_bias: str = "first"

    def validate(self) -> None:
        if self.gate not in GATES:
            raise PrismError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.max_shard_bytes < 1:
            raise PrismError(f"--max-shard-gb must be positive, got {self.max_shard_bytes / 2**30:g}")
        if self.down_bias not in DOWN_BIAS:
            raise PrismError(f"unknown --down-bias {self.down_bias!r}; choose one of {', '.join(DOWN_BIAS)}")


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
    exactness: dict[str, Any] | None = None


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


#: How a sub-expert carries its expert's ``down_proj_bias`` (added once per expert): ``first``, all of it
#: on sub-expert 0 (the most important, taken first by ``linear:K`` and the ``pattern`` policies);
#: ``uniform``, 1/N on each. At the full operating point both sum to the expert's bias. Measured at
#: small K in ``results/down_bias.md`` (``make down-bias``).
DOWN_BIAS = ("first", "uniform")


@dataclass
class _Job:
    """Everything an export reads, checked before anything is written."""

    name: str
    config: Any
    adapter: MoEAdapter
    source: Path
    partition: Partition
    reader: CheckpointReader
    plan: Any
    default_point: Any
    #: Why the linear gate cannot be exact for this family (declared), or None.
    inexact: str | None

    @property
    def n_sub(self) -> int:
        return self.partition.n_sub


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
    job = _check_inputs(model, partition_path, out, settings, force, inputs)
    # Where the linear gate is inexact and exported anyway, measure how far it is (runs the source model).
    difference = linear_gate_difference(job.name, job.n_sub) if settings.gate == "linear" and job.inexact else None
    flat = job.adapter.flat_config(job.n_sub)
    flat_names = _check_flat_shapes(job.adapter, flat, job.n_sub)
    scale = job.adapter.flat_down_scale(job.n_sub)
    with atomic_dir(out, force=force, replaceable=EXPORT_OUTPUT) as tmp:
        files = _write_weights(job, tmp, flat_names, scale, settings, on_progress)
        if settings.gate == "linear":
            _text_config(flat).__setattr__(job.adapter.top_k_key, job.default_point.value)
        flat.prism = _prism_section(job, partition_path, settings, scale, difference)
        flat.prism["serving"] = serving_check(flat, job.adapter, job.n_sub)
        if settings.gate == "neurons":
            files.append(_write_gate_neurons(job.partition, tmp))
        _copy_side_files(job.source, tmp)
        if getattr(flat, SOURCE_SIZED, None):
            _write_modeling_file(job.adapter, flat, tmp)
        flat.save_pretrained(tmp)
        inexact = _measure_exactness(job, tmp, flat, settings)
        flat.save_pretrained(tmp)
    adapter = job.adapter
    return ExportResult(out, settings.gate, job.n_sub, adapter.num_experts, adapter.width, adapter.top_k,
                        str(job.default_point), files, inexact, flat.prism["serving"], difference, flat.prism["exactness"])


def _check_inputs(model: str | None, partition_path: str | Path, out: Path, settings: ExportSettings, force: bool,
                  inputs: dict[str, Path] | None) -> _Job:
    """Every refusal an export can make before writing: the output's place, the source checkpoint, the
    partition against it, the gate against the family."""
    name = resolve_model(model)
    protected = {"source model": Path(name)} if Path(name).is_dir() else {}
    protected |= {"partition": Path(partition_path), **(inputs or {})}
    check_not_input(out, protected, inside=True)
    check_new_folder(out, force, EXPORT_OUTPUT)
    config = load_config(name)
    adapter = adapter_for_config(config)
    if settings.gate == "neurons" and (why := adapter.neurons_unsupported_reason()):
        raise PrismError(f"the neurons gate is not available for {adapter.model_type}: {why}; use --gate linear")
    source = checkpoint_dir(name)
    check_not_input(out, {"source model": source}, inside=True)  # a hub snapshot, once downloaded
    check_checkpoint_files(source)  # a truncated download: one line naming the file
    # The export holds the source's tensors re-cut (the router rows repeated N times: a few KiB more).
    check_free_space(out, sum(entry.nbytes for entry in checkpoint_tensors(source).values()))
    adapter.check_checkpoint(source)
    partition = read_partition(partition_path)
    check_partition(partition, config, adapter, weights_fingerprint(source, adapter), name)
    inexact = adapter.linear_gate_inexact_reason()
    if settings.gate == "linear" and inexact and not settings.allow_inexact:
        raise PrismError(
            f"the linear gate cannot be exact for this model: {inexact}; use --gate neurons (exact), "
            "or --allow-inexact to export anyway"
        )
    n_sub = partition.n_sub
    default_point = parse_operating_point(
        settings.operating_point or str(n_sub * adapter.top_k), settings.gate, n_sub, adapter.top_k
    )
    if default_point.policy == "layered":
        raise PrismError(f"{default_point} cannot be an export's default point: its layer ranking is made from the "
                         "export (`prism rank-layers DIR`); export at a linear point and choose it at load")
    reader = CheckpointReader(source)
    plan = _plan(reader, adapter)
    if sorted(plan.layers) != partition.layers:
        raise PrismError(
            f"partition covers layers {partition.layers} but the model has MoE layers {sorted(plan.layers)}; "
            "profile and partition every MoE layer to export"
        )
    return _Job(name, config, adapter, source, partition, reader, plan, default_point, inexact)


def _write_weights(job: _Job, tmp: Path, flat_names: CheckpointNames, scale: float, settings: ExportSettings,
                   on_progress: Callable[[int, int], None] | None) -> list[str]:
    """Every tensor of the flat checkpoint, in bounded shards: non-MoE tensors as they are, each MoE
    layer split by the partition. Returns the weight files written."""
    writer = ShardWriter(tmp, settings.max_shard_bytes)
    plan, reader = job.plan, job.reader
    total = len(plan.layers)
    if on_progress is not None:
        on_progress(0, total)
    for key in plan.plain:
        writer.add(key, reader.get(key))
    for done, index in enumerate(sorted(plan.layers), start=1):
        layer = plan.layers[index]
        tensors = _read_layer(reader, job.adapter, plan.moe_keys[index], layer)
        flat_tensors = _split_layer(tensors, layer, job.partition.experts[index], job.adapter, job.n_sub, scale,
                                    settings.down_bias)
        for key, tensor in flat_names.to_disk(flat_tensors).items():
            writer.add(key, tensor.contiguous())
        del tensors, flat_tensors
        reader.release()
        if on_progress is not None:
            on_progress(done, total)
    return writer.finish()


def _prism_section(job: _Job, partition_path: str | Path, settings: ExportSettings, scale: float,
                   difference: dict[str, Any] | None) -> dict[str, Any]:
    """The ``prism`` section of the export's config (``export/format.py`` for the files beside it)."""
    adapter, partition, n_sub = job.adapter, job.partition, job.n_sub
    has_bias = bool(job.plan.layers) and next(iter(job.plan.layers.values())).layout.bias
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "prism_version": __version__,
        "gate": settings.gate,
        "sub_experts": n_sub,
        "source": {
            "model": model_label(job.name),
            "model_type": adapter.model_type,
            "num_experts": adapter.num_experts,
            "expert_width": adapter.width,
            "top_k": adapter.top_k,
            "config_hash": partition.meta["config_hash"],
            "weights_hash": partition.meta["weights_hash"],
        },
        "partition": {
            "path": str(Path(partition_path).resolve()),
            "hash": file_hash(partition_path),
            "solver": partition.meta["solver"],
            "keep": partition.meta["keep"],
            "seed": partition.meta["seed"],
        },
        "down_scale": scale,
        "down_bias": settings.down_bias if has_bias else None,
        "linear_gate_exact": job.inexact is None,
        "linear_gate_note": job.inexact,
        **({"linear_gate_difference": difference} if difference is not None else {}),
        "layers": partition.layers,
        "operating_points": [str(p) for p in default_operating_points(settings.gate, n_sub, adapter.top_k)],
        "default_operating_point": str(job.default_point),
    }


def _write_gate_neurons(partition: Partition, tmp: Path) -> str:
    """The gate neurons' positions within each sub-expert, per layer (``GATE_FILE``)."""
    gates = {
        f"layers.{layer}.gate_positions": torch.from_numpy(
            np.stack([x.gate_positions for x in partition.experts[layer]]).astype(np.int32)
        )
        for layer in partition.layers
    }
    (tmp / GATE_FILE).parent.mkdir()
    save_tensors(gates, tmp / GATE_FILE)
    return GATE_FILE


def _measure_exactness(job: _Job, tmp: Path, flat: Any, settings: ExportSettings) -> str | None:
    """Exactness of each gate, measured on what was written and recorded in ``flat.prism``; a refusal
    here leaves nothing behind (``atomic_dir``). Returns the linear gate's inexactness note, or None."""
    gates_checked = ["linear"] if settings.gate == "linear" else ["linear", "neurons"]
    checks = check_export(job.adapter, job.reader, tmp, flat, gates_checked)
    _refuse_inexact(checks, settings, job.inexact)
    linear = checks["linear"]
    flat.prism["exactness"] = {"probe": probe_description(), **{g: c.record() for g, c in checks.items()}}
    flat.prism["linear_gate_exact"] = job.inexact is None and linear.exact
    if not linear.exact and job.inexact is None:
        flat.prism["linear_gate_note"] = f"measured max relative difference {linear.max_rel_diff:.3g} at {linear.point}"
    return flat.prism["linear_gate_note"]


def _refuse_inexact(checks: dict[str, GateCheck], settings: ExportSettings, declared: str | None) -> None:
    """Refuse an export whose gate is measured inexact (the linear gate: unless ``--allow-inexact``)."""
    neurons = checks.get("neurons")
    if neurons is not None and neurons.error is not None and not settings.allow_inexact:
        raise PrismError(
            f"prism's runtime cannot run this model's experts at {neurons.point} ({neurons.error}); this expert layout "
            "needs runtime support: use --gate linear (checked exact), or --allow-inexact to export anyway"
        )
    if neurons is not None and not neurons.exact and not settings.allow_inexact:
        raise PrismError(
            f"prism's runtime does not reproduce this model at {neurons.point}: measured max relative difference "
            f"{neurons.max_rel_diff:.3g} on probe inputs (tolerance {neurons.tolerance:.1g}); this expert layout needs "
            "runtime support, or --allow-inexact to export anyway"
        )
    linear = checks["linear"]
    if settings.gate == "linear" and not linear.exact and not settings.allow_inexact and declared is None:
        raise PrismError(
            f"the linear gate is not exact for this model: measured max relative difference {linear.max_rel_diff:.3g} "
            f"at {linear.point} on probe inputs (tolerance {linear.tolerance:.1g}); use --gate neurons, "
            "or --allow-inexact to export anyway"
        )


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class _Plan:
    plain: list[str]
    layers: dict[int, MoELayer]
    moe_keys: dict[int, list[str]]


def _plan(reader: CheckpointReader, adapter: MoEAdapter) -> _Plan:
    """Sort the checkpoint's tensors into plain ones (copied) and each MoE layer's experts and routing
    tensors (split or repeated), by the module tensor each one loads into."""
    layers = {layer.index: layer for layer in adapter.moe_layers(adapter.skeleton)}
    owner: dict[str, int] = {}
    for layer in layers.values():
        for key in (*(f"experts.{k}" for k in layer.layout.tensor_names()), *layer.routing_tensors()):
            owner[f"{layer.name}.{key}"] = layer.index
    plan = _Plan(plain=[], layers=layers, moe_keys=defaultdict(list))
    for key in reader.keys():
        index = owner.get(adapter.names.module_key(key) or "")
        if index is None:
            plan.plain.append(key)
        else:
            plan.moe_keys[index].append(key)
    missing = sorted(set(layers) - set(plan.moe_keys))
    if missing:
        raise PrismError(f"{reader.directory} has no expert tensors for MoE layers {missing}")
    return plan


def _check_flat_shapes(adapter: MoEAdapter, flat_config: Any, n_sub: int) -> CheckpointNames:
    """The flat config must change the routed experts and routing tensors only. A config field that also
    sizes another module (a shared expert, a dense MLP) would shrink it: such a module is rebuilt at the
    source width (``prism_cli.models.source_sized``, recorded in the flat config) where it can be built
    from the config alone; otherwise the export is refused, naming the tensor."""
    layers = adapter.moe_layers(adapter.skeleton)
    moe = {layer.name for layer in layers}
    routing = {f"{layer.name}.{k}" for layer in layers for k in layer.routing_tensors()}
    flat_model = skeleton(flat_config)
    skip = {k for k in flat_model.state_dict() if any(k.startswith(f"{block}.experts.") for block in moe) or k in routing}
    changed = [k for k in adapter.flat_config_updates(n_sub) if k not in (adapter.experts_key, adapter.top_k_key)]
    source_fields = {adapter.width_key: adapter.width}
    restored = copy.deepcopy(_text_config(flat_config))  # the flat config at the source width, as the rebuild makes it
    setattr(restored, adapter.width_key, adapter.width)
    sized, stuck = find_source_sized(flat_model, adapter.skeleton, restored, source_fields, moe, skip)
    if stuck is not None:
        shapes = {k: tuple(v.shape) for k, v in adapter.skeleton.state_dict().items()}
        raise PrismError(
            f"a flat {adapter.model_type} checkpoint cannot keep {stuck} at {shapes.get(stuck)}: the config field(s) "
            f"{', '.join(changed)} that set the routed experts' width also size it (it would become "
            f"{tuple(flat_model.state_dict()[stuck].shape)}), and its module cannot be rebuilt from the config alone"
        )
    if sized is not None:
        setattr(flat_config, SOURCE_SIZED, sized)
        flat_model = skeleton(flat_config)
    return CheckpointNames(flat_model)


def _read_layer(reader: CheckpointReader, adapter: MoEAdapter, keys: list[str], layer: MoELayer) -> dict[str, torch.Tensor]:
    """One MoE layer's experts and routing tensors in the module layout, by name relative to the block."""
    tensors = adapter.names.to_module({k: reader.get(k) for k in keys})
    prefix = layer.name + "."
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = {f"experts.{k}": tuple(getattr(layer.experts, k).shape) for k in layer.layout.tensor_names()}
    want |= {k: tuple(v.shape) for k, v in layer.routing_tensors().items()}
    for key, shape in want.items():
        if key not in out:
            raise PrismError(f"layer {layer.index}: {layer.name}.{key} is missing from the checkpoint")
        if tuple(out[key].shape) != shape:
            raise PrismError(
                f"layer {layer.index}: {layer.name}.{key} is {tuple(out[key].shape)} in the checkpoint but {shape} by the "
                "config: the config and the weights disagree"
            )
        if not out[key].dtype.is_floating_point:
            raise PrismError(f"layer {layer.index}: {layer.name}.{key} is stored as {out[key].dtype}: quantized weights; "
                             "dequantize the checkpoint to bfloat16 first")
    return out


def _split_layer(
    tensors: dict[str, torch.Tensor],
    layer: MoELayer,
    experts: list[Any],
    adapter: MoEAdapter,
    n_sub: int,
    scale: float,
    down_bias: str,
) -> dict[str, torch.Tensor]:
    """The flat layer: every expert cut into its partition's sub-experts, routing tensors repeated."""
    layout = layer.layout
    size = adapter.width // n_sub
    # Each sub-expert is written straight into its row of the flat tensors (allocated at the first one):
    # the layer is held once in the source layout and once split, never a third time as a list of pieces.
    flat: dict[str, torch.Tensor] = {}
    for e, expert in enumerate(experts):
        one = {k: tensors[f"experts.{k}"][e] for k in layout.tensor_names()}
        for n in range(n_sub):
            neurons = torch.from_numpy(expert.permutation[n * size : (n + 1) * size].astype(np.int64))
            sub = layout.split(one, neurons)
            sub["down_proj"] = (sub["down_proj"].float() * scale).to(sub["down_proj"].dtype)
            if layout.bias:
                share = (1.0 if n == 0 else 0.0) if down_bias == "first" else 1.0 / n_sub
                sub["down_proj_bias"] = (one["down_proj_bias"].float() * (scale * share)).to(one["down_proj_bias"].dtype)
            for k, v in sub.items():
                name = f"{layer.name}.experts.{k}"
                if name not in flat:
                    flat[name] = torch.empty((len(experts) * n_sub, *v.shape), dtype=v.dtype)
                flat[name][e * n_sub + n].copy_(v)
    for key in layer.routing_tensors():
        flat[f"{layer.name}.{key}"] = adapter.flat_routing_tensor(key, tensors[key], n_sub)
    return flat


def _write_modeling_file(adapter: MoEAdapter, flat: Any, tmp: Path) -> None:
    """The modeling file plain transformers loads a source-sized export with (``trust_remote_code=True``)."""
    text, name = modeling_file(type(adapter.skeleton))
    (tmp / MODELING_FILE).write_text(text)
    flat.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{name}"}


def _copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template ...: every top-level file that is not weights or config."""
    for path in source.iterdir():
        side_file = not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in (INDEX, SINGLE, "config.json")
        if path.is_file() and side_file and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
