"""An export checked against its own weights before it is loaded.

An export's ``config.json`` (the family's fields and the ``prism`` section) must describe the tensors
next to it; an edited or mismatched config otherwise fails deep inside transformers or the runtime
(an ``IndexError``, a load report about mismatched shapes). The weights are the reference: every
check reads only safetensors headers (and the small gate-neuron file) and names the config field
that disagrees with them and the value the weights imply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prism_cli.errors import PrismError
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.checkpoint_files import TensorEntry, checkpoint_tensors, read_header
from prism_cli.models.loading import load_config
from prism_cli.operating_points import GATES, parse_operating_point
from prism_cli.solvers.format import gate_positions_problem


def _field(meta: dict[str, Any], dotted: str, kind: type, where: Path) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    ok = isinstance(value, kind) and not isinstance(value, bool) and (kind is not int or value >= 1)
    if not ok:
        want = "a positive integer" if kind is int else kind.__name__
        raise PrismError(f"export {where}: config.json prism.{dotted} is {value!r}, not {want}: export the model again")
    return value


def _weights_layout(tensors: dict[str, TensorEntry], adapter: Any, where: Path) -> tuple[int, int, list[int]]:
    """(router rows, sub-expert width, MoE layers) as the weights hold them.

    The experts of each layer are converted to the module layout on meta tensors of the on-disk shapes
    (the family's own conversion: per-expert files are stacked, fused ones kept), so the count and width
    come from the weights whatever the family's checkpoint naming."""
    patterns = adapter.key_patterns()
    first = adapter.moe_layers(adapter.skeleton)[0]
    rows: dict[int, int] = {}
    on_disk: dict[int, dict[str, torch.Tensor]] = {}
    for name, entry in tensors.items():
        if (m := patterns.router.match(name)) and name.endswith("weight") and len(entry.shape) == 2:
            rows[int(m["layer"])] = entry.shape[0]
        elif m := patterns.experts.match(name):
            if not entry.dtype.startswith(("F", "BF")):  # I32, U8, BOOL: not weights the runtime computes with
                raise PrismError(f"export {where}: expert tensor {name} is stored as {entry.dtype}, not floating point: "
                                 "export the model again")
            # Every layer is read as the first one: the skeleton of an edited config may lack the others.
            as_first = name.replace(f"layers.{m['layer']}.", f"layers.{first.index}.", 1)
            on_disk.setdefault(int(m["layer"]), {})[as_first] = torch.empty(entry.shape, device="meta")
    widths: set[int] = set()
    experts: dict[int, int] = {}
    gate_up = f"{first.name}.experts.gate_up_proj"
    for layer, disk in on_disk.items():
        try:
            module = adapter.names.to_module(disk)[gate_up]
        except Exception:  # noqa: BLE001 - any conversion failure means tensors that do not form the layout
            raise PrismError(f"export {where}: the experts of layer {layer} do not form one fused experts tensor: "
                             "export the model again") from None
        widths.add(first.layout.width_of(module))
        experts[layer] = int(module.shape[0])
    if not rows or len(set(rows.values())) != 1 or len(widths) != 1:
        raise PrismError(f"export {where}: its weights do not hold one flat MoE layout (router rows "
                         f"{sorted(set(rows.values()))}, sub-expert widths {sorted(widths)}): export the model again")
    (n_rows,) = set(rows.values())
    short = {layer: count for layer, count in experts.items() if count != n_rows}
    if short or set(experts) != set(rows):
        raise PrismError(f"export {where}: its weights lack sub-experts (layers {sorted(short or set(rows) ^ set(experts))}): "
                         "export the model again")
    return n_rows, widths.pop(), sorted(rows)


def _span(layers: list[int]) -> str:
    """``0-3`` for consecutive layers, else the list."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return str(layers)


def validate_export(directory: str | Path, meta: dict[str, Any]) -> None:
    """Refuse, in one line naming the field, an export whose config disagrees with its weights."""
    from prism_cli.export.format import GATE_FILE

    where = Path(directory)
    gate = meta.get("gate")
    if gate not in GATES:
        raise PrismError(f"export {where}: config.json prism.gate is {gate!r}; it must be one of {', '.join(GATES)}")
    n_sub = _field(meta, "sub_experts", int, where)
    experts = _field(meta, "source.num_experts", int, where)
    width = _field(meta, "source.expert_width", int, where)
    top_k = _field(meta, "source.top_k", int, where)
    layers = meta.get("layers")
    config = load_config(str(where))
    adapter = adapter_for_config(config)
    rows, sub_width, moe_layers = _weights_layout(checkpoint_tensors(where), adapter, where)
    config_layers = [layer.index for layer in adapter.moe_layers(adapter.skeleton)]
    if config_layers != moe_layers:  # fewer layers: transformers loads the first ones and drops the rest unsaid
        depth = getattr(adapter.text_config, "num_hidden_layers", None)
        raise PrismError(f"export {where}: config.json builds MoE layers {_span(config_layers)} (num_hidden_layers "
                         f"{depth}) but its weights hold MoE layers {_span(moe_layers)}: set the config back")
    if adapter.num_experts != rows:
        raise PrismError(f"export {where}: config.json {adapter.experts_key} is {adapter.num_experts} but its weights hold "
                         f"{rows} sub-experts per layer: set {adapter.experts_key} back to {rows}")
    if adapter.width != sub_width:
        raise PrismError(f"export {where}: config.json {adapter.width_key} is {adapter.width} but its sub-experts have "
                         f"width {sub_width}: set {adapter.width_key} back to {sub_width}")
    if rows % experts:
        raise PrismError(f"export {where}: config.json prism.source.num_experts is {experts}, which does not divide the "
                         f"{rows} sub-experts of its weights: export the model again")
    if rows // experts != n_sub:
        raise PrismError(f"export {where}: config.json prism.sub_experts is {n_sub} but its weights hold {rows // experts} "
                         f"sub-experts per expert ({rows} for {experts} experts): set prism.sub_experts back to {rows // experts}")
    if width != sub_width * n_sub:
        raise PrismError(f"export {where}: config.json prism.source.expert_width is {width} but {n_sub} sub-experts of "
                         f"width {sub_width} make {sub_width * n_sub}: set it back to {sub_width * n_sub}")
    if not 1 <= top_k <= experts:
        raise PrismError(f"export {where}: config.json prism.source.top_k is {top_k}, outside 1..{experts}: export the model again")
    _check_checked_points(meta, n_sub * top_k, where)  # first: an edited top-k would be blamed on the config's own
    if not 1 <= adapter.top_k <= n_sub * top_k:
        raise PrismError(f"export {where}: config.json {adapter.top_k_key} is {adapter.top_k}, outside the export's "
                         f"operating points 1..{n_sub * top_k}")
    if layers != moe_layers:
        raise PrismError(f"export {where}: config.json prism.layers is {layers!r} but its weights have MoE layers "
                         f"{moe_layers}: set it back to {moe_layers}")
    scale = adapter.flat_down_scale(n_sub)
    given = meta.get("down_scale")
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not abs(float(given) - scale) <= 1e-6 * scale:  # NaN too
        raise PrismError(f"export {where}: config.json prism.down_scale is {meta.get('down_scale')!r} but its weights "
                         f"were scaled by {scale:g}: set it back to {scale:g}")
    default = meta.get("default_operating_point")
    if not isinstance(default, (str, int)) or isinstance(default, bool):
        raise PrismError(f"export {where}: config.json prism.default_operating_point is "
                         f"{'missing' if default is None else repr(default)}; give a point such as linear:{n_sub * top_k}")
    try:
        parse_operating_point(str(default), gate, n_sub, top_k)
    except PrismError as exc:
        raise PrismError(f"export {where}: config.json prism.default_operating_point: {exc}") from None
    if gate == "neurons":
        _check_gate_neurons(where / GATE_FILE, moe_layers, experts, n_sub, sub_width)


def _check_checked_points(meta: dict[str, Any], full: int, where: Path) -> None:
    """The points the export's exactness check ran at are its full point, N x the source's top-k: an edited
    ``prism.source.top_k`` (which nothing in the weights records) would offer points past the source model."""
    exactness = meta.get("exactness")
    for record in exactness.values() if isinstance(exactness, dict) else ():
        point = record.get("point") if isinstance(record, dict) else None
        policy, _, value = point.partition(":") if isinstance(point, str) else ("", "", "")
        if policy in ("linear", "topk") and value.isdigit() and int(value) != full:
            raise PrismError(f"export {where}: config.json prism.source.top_k x prism.sub_experts is {full}, but the export "
                             f"was checked exact at its full point {point}: set prism.source.top_k back")


def _check_gate_neurons(path: Path, layers: list[int], experts: int, n_sub: int, sub_width: int) -> None:
    if not path.exists():
        raise PrismError(f"{path.parent.parent} is a neurons-gate export but {path.name} is missing from {path.parent}: "
                         "copy the prism/ folder of the export it came from (save_pretrained writes only the weights "
                         "and config), or export the model again")
    read_header(path)  # a truncated file: one line
    positions = load_file(str(path))
    for layer in layers:
        key = f"layers.{layer}.gate_positions"
        value = positions.get(key)
        if value is None:
            raise PrismError(f"{path} has no gate neurons for layer {layer}: export the model again")
        if value.ndim != 3 or tuple(value.shape[:2]) != (experts, n_sub):
            raise PrismError(f"{path}: layer {layer} gate neurons have shape {tuple(value.shape)}, not ({experts}, {n_sub}, s) "
                             "for this export's config: export the model again")
        # numpy has no bfloat16: a floating dtype is named here, before the conversion
        problem = (f"are stored as {str(value.dtype).removeprefix('torch.')}, not integers" if value.is_floating_point()
                   else gate_positions_problem(value.numpy(), sub_width))
        if problem is not None:
            raise PrismError(f"{path}: layer {layer} gate positions {problem}: export the model again")
