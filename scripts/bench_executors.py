"""Which experts executor is faster for a call of T tokens: the plan executor or grouped products.

    python scripts/bench_executors.py --export runs/serving/export --out results/executors
    (make bench-executors)

Times one MoE layer's experts call of the export (layer 0) with ``grouped`` (the plan executor,
``runtime/grouped.py``), with grouped products (``runtime/grouped_mm.py``) and, for arbitrary subsets,
with one product per sub-expert (``flat-loop``) at the routing shapes the
runtime produces: ``linear:K`` (whole experts, then the first sub-experts of the next, in order: the
prefix path; where its blocks differ in length, also every block padded whole: ``prefix-padded``) and the
training-free gate's arbitrary subsets of K sub-experts (the flat path); and, as
the reference both must be compared with, the source model's experts at the same routing (``linear:Nj``
is ``original:j``) under transformers' own ``grouped_mm``. Calls alternate round-robin, so drift on a
shared machine hits all alike; each cell is the median of ``--repeats`` calls. The executor's bounds for
this machine (``runtime/bounds.py``: min tokens, max prefix rows, max pairs) are derived from this table
(``derive_bounds``) and, with ``--save-bounds``, saved where the runtime reads them. Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.integrations.moe import ExpertsInterface

from prism_cli.allocator import configure_cpu_allocator
from prism_cli.environment import environment, machine_label
from prism_cli.models.loading import load_model
from prism_cli.report import ResultTable
from prism_cli.runtime import bounds, grouped_mm
from prism_cli.runtime.elastic import export_meta, load_elastic_model
from prism_cli.runtime.grouped import grouped_experts_forward

TOKENS = [1, 2, 4, 8, 16, 32, 256, 2048, 8192]


def experts_module(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if hasattr(m, "gate_up_proj"))


def shapes(tokens: int, experts: int, n_sub: int, top_k: int, k: int, gen: torch.Generator) -> dict[str, tuple]:
    """Routing of ``tokens`` at linear:k, as the linear gate hands it over (each expert's weight on all its
    slots, the block shape attached), and at k random sub-experts of the top experts (topk-like)."""
    chosen = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    blocks = [(r, min(n_sub, k - r * n_sub)) for r in range(-(-k // n_sub))]
    linear = torch.cat([chosen[:, r : r + 1] * n_sub + torch.arange(m) for r, m in blocks], dim=1)
    expert_w = torch.rand(tokens, top_k, generator=gen) + 0.1
    linear_w = torch.cat([expert_w[:, r : r + 1].expand(-1, m) for r, m in blocks], dim=1)
    setattr(linear, grouped_mm.PREFIX_ATTR, grouped_mm.PrefixRouting(chosen[:, : len(blocks)], tuple(m for _, m in blocks),
                                                                     uniform=True))
    pairs = (chosen[:, :, None] * n_sub + torch.arange(n_sub)).reshape(tokens, -1)
    pick = torch.rand(pairs.shape, generator=gen).argsort(dim=1)[:, :k]
    subsets = pairs.gather(1, pick.sort(dim=1).values)  # in candidate order, as the topk policy lists them
    w = torch.rand(tokens, k, generator=gen) + 0.1
    whole = chosen[:, : k // n_sub] if k % n_sub == 0 else None
    return {"linear": (linear, linear_w, whole), "subsets": (subsets, w, None)}


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in calls.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/serving/export"))
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--points", default="2,4,6,8", help="K of linear:K and of the K-sub-expert subsets.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/executors"))
    ap.add_argument("--if-missing", action="store_true",
                    help="Do nothing where this machine already has bounds for the export's sub-expert width.")
    ap.add_argument("--save-bounds", action="store_true",
                    help="Save the bounds this table implies for this machine (where the runtime reads them).")
    args = ap.parse_args()
    configure_cpu_allocator("reuse")  # as `prism bench` and the serving engine run on the CPU
    torch.set_num_threads(2)
    meta = export_meta(str(args.export)) if args.export.is_dir() else None
    if meta is None:
        raise SystemExit(f"error: {args.export} is not a prism export folder (make serving-export builds the default one)")
    n_sub, top_k = int(meta["sub_experts"]), int(meta["source"]["top_k"])
    elastic = experts_module(load_elastic_model(str(args.export)).model)
    source = experts_module(load_model(meta["source"]["model"]).model)
    reference = ExpertsInterface._global_mapping["grouped_mm"]
    experts = source.gate_up_proj.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    width = elastic.gate_up_proj.shape[1] // 2
    in_effect = bounds.current_bounds(width)
    if args.if_missing and in_effect.source.startswith(f"measured here for sub-experts of {width},"):
        print(f"executor bounds for sub-experts of {width} on this machine: {in_effect.describe()}")
        return
    timings: list[bounds.Timing] = []
    table = ResultTable(
        f"experts executors: one MoE layer's experts call (ms, median of {args.repeats})",
        ["tokens", "routing", "plan (grouped)", "grouped products", "path", "grouped products / plan",
         "one product per sub-expert (flat-loop)", "blocks padded whole (prefix-padded)", "single token (prefix-one)",
         "original, transformers grouped_mm",
         "taken by the runtime"],
    )
    with torch.no_grad():
        for tokens in TOKENS:
            x = torch.randn(tokens, source.gate_up_proj.shape[-1], generator=gen)
            for k in (int(v) for v in args.points.split(",")):
                for kind, (idx, w, whole) in shapes(tokens, experts, n_sub, top_k, k, gen).items():
                    calls = {
                        "plan": lambda x=x, idx=idx, w=w: grouped_experts_forward(elastic, x, idx, w, n_sub),
                        "mm": lambda x=x, idx=idx, w=w: grouped_mm.grouped_mm_forward(elastic, x, idx, w, n_sub, "mm"),
                    }
                    if kind == "subsets":
                        calls["loop"] = lambda x=x, idx=idx, w=w: grouped_mm.grouped_mm_forward(
                            elastic, x, idx, w, n_sub, "flat-loop")
                    if whole is not None and kind == "linear":
                        ww = torch.rand(whole.shape, generator=gen)
                        calls["original"] = lambda x=x, whole=whole, ww=ww: reference(source, x, whole, ww)
                    found = grouped_mm.prefix_routing(idx, n_sub, elastic.gate_up_proj.shape[0])
                    if found is not None and len(set(found.lengths)) > 1:  # blocks of different lengths
                        calls["padded"] = lambda x=x, idx=idx, w=w: grouped_mm.grouped_mm_forward(
                            elastic, x, idx, w, n_sub, "prefix-padded")
                    if tokens == 1 and found is not None:  # as the linear gate hands one token over
                        handed = idx.clone()
                        setattr(handed, grouped_mm.PREFIX_ATTR, found)
                        calls["one"] = lambda x=x, handed=handed, w=w: grouped_mm.grouped_mm_forward(
                            elastic, x, handed, w, n_sub, "prefix-one")
                    ms = median_ms(calls, args.repeats)
                    path = "prefix-mm" if found is not None else "flat-mm"
                    size = tokens * len(found.lengths) if found is not None else idx.numel()
                    timings.append(bounds.Timing(tokens, found is not None, size, ms["plan"], ms["mm"], ms.get("loop"),
                                                 ms.get("padded")))
                    taken, _ = grouped_mm.choose_path(handed if "one" in calls else idx, n_sub,
                                                      elastic.gate_up_proj.shape[0], width)
                    table.add(tokens, f"linear:{k}" if kind == "linear" else f"{k} of {n_sub * top_k} subsets",
                              ms["plan"], ms["mm"], path, ms["mm"] / ms["plan"], ms.get("loop"), ms.get("padded"), ms.get("one"),
                              ms.get("original"), taken)
    key = bounds.machine_key(width=width)
    derived = bounds.derive_bounds(timings, source=f"make bench-executors, {key}")
    saved = None
    if args.save_bounds:
        by = " ".join(["scripts/bench_executors.py", *sys.argv[1:]])
        saved = bounds.save_bounds(derived, key, measured_by=by)
        if bounds.current_bounds().source == "default":  # the machine's entry, for widths never measured
            bounds.save_bounds(derived, bounds.machine_key(), measured_by=by)
    table.notes += [
        f"Export {args.export} (layer 0: {elastic.gate_up_proj.shape[0]} sub-experts of width "
        f"{elastic.gate_up_proj.shape[1] // 2}, hidden {elastic.gate_up_proj.shape[2]}), float32, "
        f"measured on {machine_label(environment())}, CPU allocator {environment()['cpu_allocator']}.",
        f"original: the source model's experts at the same routing (linear:{n_sub}j = original:j), transformers' own "
        "grouped_mm; the elastic model's calls should cost what it costs. single token: one token with the block "
        "shape attached, as the linear gate hands it over (the runtime's path for it, whatever the bounds).",
        f"taken by the runtime: under the bounds in effect for this run ({in_effect.describe()}): grouped "
        f"products for calls of >= {in_effect.min_tokens} tokens and (on the CPU) <= "
        f"{in_effect.max_prefix_rows:,} rows of prefix routing (a row: a token's block, so linear:{n_sub}j has the "
        f"rows of original:j; blocks of different lengths in <= {in_effect.max_padded_rows:,} rows padded whole, "
        f"with zero weights: prefix-padded) or <= {in_effect.max_pairs:,} (token, sub-expert) pairs of arbitrary subsets; "
        "beyond that the plan executor for prefix routing and one product per sub-expert (flat-loop) for "
        "subsets; the plan executor below the token bound.",
        f"Bounds this table implies (runtime/bounds.py derive_bounds: each the threshold that maximises the "
        f"summed log(alternative / grouped products) of the calls it gives to grouped products; a call within 3 % is a "
        f"tie, and ties keep grouped products): {derived.describe()}"
        + (f", saved to {saved} for {key}." if saved else " (not saved: --save-bounds saves them)."),
        "Command: python " + " ".join(["scripts/bench_executors.py", *sys.argv[1:]]) + " (make bench-executors).",
    ]
    table.save(args.out)
    print(table.markdown())


if __name__ == "__main__":
    main()
