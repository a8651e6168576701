"""What an elastic model holds in memory on the CPU, against its source model, after every kind of point ran.

    python scripts/runtime_memory.py --export runs/serving/export --out results/runtime_memory
    (make runtime-memory; the export is make serving-export's, the built-in model's committed partition)

Counts the bytes of every distinct tensor storage reachable from the model (parameters, buffers, and the
layouts and caches the runtime keeps on its modules), split into the MoE layers' experts, the routers
(for the export: the flat router, the source router and the gate neurons' rows) and the rest, once
after loading and once after a prefill and a decode step at every point given. Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prism_cli.report import ResultTable

SOURCE_POINTS = ("original:1", "original:2")
EXPORT_POINTS = ("linear:1", "linear:2", "linear:4", "linear:5", "linear:8", "topk:3", "threshold:0.7")


def storages(obj: object, found: dict[int, int], seen: set[int]) -> None:
    """Add every tensor storage under ``obj`` (a module's parameters, buffers and attributes, tuples, lists
    and dicts) to ``found`` (data pointer -> bytes)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            storages(item, found, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            storages(item, found, seen)
    elif isinstance(obj, torch.nn.Module) and id(obj) not in seen:
        seen.add(id(obj))
        for tensor in [*obj.parameters(recurse=False), *obj.buffers(recurse=False)]:
            storages(tensor, found, seen)
        for name, value in vars(obj).items():
            if name == "_modules":
                for child in value.values():
                    storages(child, found, seen)
            elif not name.startswith("_") or name.startswith("_prism"):
                storages(value, found, seen)


def held(model: torch.nn.Module) -> dict[str, float]:
    """MiB held by the experts, the routers and the rest of ``model`` (each storage counted once, first
    under the experts, then the routers)."""
    state = model.prism_state
    parts = {"experts": [layer.experts for layer in state.layers],
             "routers": [*state.flat_routers, *state.gate_routers, *state.elastic_routers]}
    counted: dict[int, int] = {}
    out: dict[str, float] = {}
    seen: set[int] = set()
    for name, modules in parts.items():
        found: dict[int, int] = {}
        for module in modules:
            storages(module, found, seen)
        found = {k: v for k, v in found.items() if k not in counted}
        counted |= found
        out[name] = sum(found.values()) / 2**20
    everything: dict[int, int] = {}
    storages(model, everything, set())
    out["rest"] = sum(v for k, v in everything.items() if k not in counted) / 2**20
    out["total"] = sum(everything.values()) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/serving/export"))
    ap.add_argument("--out", type=Path, default=Path("results/runtime_memory"))
    args = ap.parse_args()
    if not (args.export / "config.json").is_file():
        raise SystemExit(f"error: {args.export} is not an export (make serving-export writes it)")
    from prism_cli.models.loading import load_model
    from prism_cli.runtime.elastic import attach_elastic_state, export_meta, load_elastic, set_operating_point
    from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION

    meta = export_meta(str(args.export))
    if meta is None:
        raise SystemExit(f"error: {args.export} is a model, not a prism export (make serving-export writes one)")
    source = load_model(meta["source"]["model"], experts_implementation=EXPERTS_IMPLEMENTATION).model.eval()
    attach_elastic_state(source, None)
    elastic = load_elastic(str(args.export)).eval()
    ids = torch.randint(1, source.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
    table = ResultTable("tensors an elastic model holds on the CPU, against its source model (MiB)",
                        ["model", "when", "experts", "routers", "rest", "total"])
    for name, model, points in (("source", source, SOURCE_POINTS), ("export", elastic, EXPORT_POINTS)):
        before = held(model)
        table.add(name, "loaded", before["experts"], before["routers"], before["rest"], before["total"])
        with torch.inference_mode():
            for point in points:
                set_operating_point(model, point)
                model(input_ids=ids, use_cache=False)
                model(input_ids=ids[:, :1], use_cache=False)
        after = held(model)
        table.add(name, "after " + ", ".join(points), after["experts"], after["routers"], after["rest"], after["total"])
    table.notes += [f"export: {args.export} ({meta['sub_experts']} sub-experts per expert, gate {meta['gate']}); each "
                    "point ran a prefill of 8 x 256 tokens and a step of 8 x 1. Every distinct tensor storage "
                    "reachable from the model counted once: parameters, buffers and what the runtime keeps on its "
                    "modules (layouts of down_proj, views, plans)."]
    table.publish(args.out)


if __name__ == "__main__":
    main()
