"""Exactness proven at export time: the source and the export, run on probe inputs at the full operating point.

The export changes only the sparse MoE blocks (every other tensor is copied byte for byte), so the
check runs block by block, which keeps memory at one block of each model whatever the model's size:
for every MoE layer it materialises the source block (read from the source checkpoint) and the
exported block (read back from the files just written), feeds both the same probe hidden states and
compares their outputs:

* ``linear``: the exported block as stock transformers runs it (``eager`` experts, the flat router at
  its own top-(N*k)), the gate a plain ``from_pretrained`` and the serving engines use;
* ``neurons``: the exported block under prism's runtime (``attach_elastic_state`` and the ``prism``
  experts implementation) at ``topk:N*k``, every sub-expert of the original top-k experts.

Probe inputs are unit-RMS Gaussian hidden states (a fixed seed), the scale of the normalised input
an MoE block sees. The largest difference relative to the largest source output, over all layers, is
recorded per gate in the export's config (``prism.exactness``). It is compared with a tolerance that
allows float32 summation order and, where the ``down_proj`` scale is not a power of two, the rounding
of the scaled weights in the checkpoint's dtype.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prism_cli.errors import PrismError
from prism_cli.models.adapters import MoEAdapter
from prism_cli.models.checkpoint import CheckpointReader
from prism_cli.models.conversion import CheckpointNames, skeleton

#: Probe tokens per MoE block, and their seed.
PROBE_TOKENS = 256
PROBE_SEED = 0
#: Largest relative difference that counts as exact (float32 summation order).
BASE_TOLERANCE = 1e-4


@dataclass
class GateCheck:
    """The measured difference of one gate at its full operating point."""

    gate: str
    point: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    per_layer: dict[int, float] = field(default_factory=dict)
    #: Why the gate could not run at all (the runtime refused the block), None when it ran.
    error: str | None = None

    @property
    def exact(self) -> bool:
        return self.error is None and self.max_rel_diff <= self.tolerance

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_layer"] = {str(k): v for k, v in self.per_layer.items()}
        out["exact"] = self.exact
        return out


def tolerance(scale: float, dtype: torch.dtype | None) -> float:
    """Exact up to float32 summation order, plus the rounding of a scale that is not a power of two
    (``dtype`` None: not a floating-point checkpoint, nothing rounded)."""
    power_of_two = scale > 0 and math.log2(scale).is_integer()
    if power_of_two or dtype is None:
        return BASE_TOLERANCE
    return max(BASE_TOLERANCE, 2 * torch.finfo(dtype).eps)


def _block_keys(names: CheckpointNames, reader: CheckpointReader, block: str) -> list[str]:
    prefix = block + "."
    return [k for k in reader.keys() if (m := names.module_key(k)) is not None and m.startswith(prefix)]


def materialize(model: nn.Module, names: CheckpointNames, reader: CheckpointReader, block: str) -> nn.Module:
    """The block ``block`` of the meta skeleton ``model``, on the CPU in float32, with its weights read
    from ``reader`` through the family's conversion mapping (the reader's files are released after)."""
    module = copy.deepcopy(model.get_submodule(block)).to_empty(device="cpu")
    prefix = block + "."
    tensors = names.to_module({k: reader.get(k) for k in _block_keys(names, reader, block)})
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    if missing:
        raise PrismError(f"{reader.directory}: tensors of {block} are missing ({', '.join(missing[:3])})")
    for key, value in state.items():
        if key in want and tuple(value.shape) != tuple(want[key].shape):
            raise PrismError(f"{reader.directory}: {block}.{key} is {tuple(value.shape)} on disk but the config gives "
                             f"{tuple(want[key].shape)}: the config and the weights disagree")
    unset = [name for name, _ in module.named_buffers() if name not in want]
    if unset:
        raise PrismError(f"{block} has buffers that are not saved ({', '.join(unset[:3])}); prism cannot rebuild the "
                         "block alone to check the export")
    module.load_state_dict(state, strict=False)
    del tensors, state
    reader.release()  # the block is copied out: its pages of the checkpoint need not stay mapped
    return module.float().eval()


def _holder(name: str, block: nn.Module, config: Any) -> nn.Module:
    """A module tree holding only ``block`` under its own path, with ``config``: what the runtime's
    ``attach_elastic_state`` needs to find and prepare the block."""
    root = nn.Module()
    node = root
    *path, last = name.split(".")
    for part in path:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(last, block)
    root.config = config
    return root


def _output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = block(x)
    return (out[0] if isinstance(out, tuple) else out).float().reshape(-1, x.shape[-1])


def _set_experts_implementation(block: nn.Module, implementation: str) -> None:
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = implementation


def check_export(
    adapter: MoEAdapter,
    source: CheckpointReader,
    export_dir: Path,
    flat_config: Any,
    gates: list[str],
    *,
    tokens: int = PROBE_TOKENS,
    seed: int = PROBE_SEED,
) -> dict[str, GateCheck]:
    """Run every MoE block of the source and of the export (``export_dir``, written) on the same probes;
    ``flat_config`` is the export's config (with its ``prism`` section)."""
    meta = flat_config.prism
    n_sub, top_k = int(meta["sub_experts"]), int(meta["source"]["top_k"])
    exported = CheckpointReader(export_dir)
    full_config = copy.deepcopy(flat_config)  # a linear export's config may default to a lower top-k
    text = full_config.get_text_config() if hasattr(full_config, "get_text_config") else full_config
    setattr(text, adapter.top_k_key, n_sub * top_k)
    flat_model = skeleton(full_config)
    flat_names = CheckpointNames(flat_model)
    scale = float(meta["down_scale"])
    points = {"linear": f"linear:{n_sub * top_k}", "neurons": f"topk:{n_sub * top_k}"}
    checks = {g: GateCheck(g, points[g], 0.0, 0.0, BASE_TOLERANCE) for g in gates}
    generator = torch.Generator().manual_seed(seed)
    for layer in adapter.moe_layers(adapter.skeleton):
        original = materialize(adapter.skeleton, adapter.names, source, layer.name)
        dtype = source.dtype(_block_keys(adapter.names, source, f"{layer.name}.experts")[0])
        x = torch.randn(1, tokens, adapter.hidden_size, generator=generator)
        _set_experts_implementation(original, "eager")
        want = _output(original, x)
        del original
        for gate in gates:
            check = checks[gate]
            if check.error is not None:
                continue
            got = _flat_output(flat_model, flat_names, exported, layer.name, gate, points[gate], flat_config,
                               export_dir, x)
            if isinstance(got, str):
                # The runtime's experts execution cannot run this layout: recorded, and refused by the caller.
                check.error = got
                check.max_rel_diff = check.max_abs_diff = math.inf
                continue
            diff = float((got - want).abs().max())
            rel = diff / max(float(want.abs().max()), 1e-30)
            check.per_layer[layer.index] = rel
            check.max_abs_diff = max(check.max_abs_diff, diff)
            check.max_rel_diff = max(check.max_rel_diff, rel)
            check.tolerance = max(check.tolerance, tolerance(scale, dtype))
    return checks


def _flat_output(flat_model: nn.Module, flat_names: CheckpointNames, exported: CheckpointReader, name: str, gate: str,
                 point: str, flat_config: Any, export_dir: Path, x: torch.Tensor) -> torch.Tensor | str:
    """The exported block ``name``'s output on ``x`` under ``gate`` at ``point``, or why the runtime refused
    to run it. The block lives only inside this call, so one exported block is in memory at a time."""
    from prism_cli.runtime.elastic import attach_elastic_state, set_operating_point
    from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION

    flat = materialize(flat_model, flat_names, exported, name)
    if gate == "linear":
        _set_experts_implementation(flat, "eager")
        return _output(flat, x)
    _set_experts_implementation(flat, EXPERTS_IMPLEMENTATION)
    holder = _holder(name, flat, flat_config)
    attach_elastic_state(holder, export_dir)
    set_operating_point(holder, point)
    try:
        return _output(flat, x)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        message = str(exc).strip()
        return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"


def probe_description(tokens: int = PROBE_TOKENS, seed: int = PROBE_SEED) -> dict[str, Any]:
    return {"tokens_per_block": tokens, "seed": seed, "inputs": "unit-RMS Gaussian hidden states at every MoE block",
            "reference": "the source block (eager experts), float32"}

