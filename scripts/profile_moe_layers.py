"""Where an MoE layer's time goes: the training-free gate's parts, and whole blocks against the original.

Two measurements on the built-in model's exports, written to ``--out`` (.md/.json/.csv):

* **gate breakdown** (``--export``, one MoE block, ``--tokens`` tokens): for ``linear:K`` and ``topk:K`` the
  block, its router and its experts call; for ``topk:K`` also the router's parts (the source router, the
  gate-neuron scores, the allocation policy). Medians of calls alternated round-robin.
* **blocks against the original** (``--export-wide``, every MoE block of the model in sequence, ``--wide-tokens``
  tokens, ``--wide-point``): the export under the runtime's own choice of path and forced onto grouped
  products, next to the source model at the same routing under transformers' ``grouped_mm`` and under
  prism's runtime; then a profile of one block (self CPU time per op) of the export against the original's
  faster implementation, its largest differences listed.

Run: ``python scripts/profile_moe_layers.py`` (``make profile-moe``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bench_executors import median_ms
from torch.profiler import ProfilerActivity, profile

from prism_cli.allocator import configure_cpu_allocator
from prism_cli.environment import environment, machine_label
from prism_cli.models.loading import load_model
from prism_cli.report import ResultTable
from prism_cli.runtime import grouped_mm
from prism_cli.runtime.bounds import ExecutorBounds
from prism_cli.runtime.elastic import attach_elastic_state, load_elastic_model, set_operating_point
from prism_cli.runtime.scoring import gate_scores


def gate_breakdown(export: Path, tokens: int, points: list[int], repeats: int) -> ResultTable:
    model = load_elastic_model(str(export)).model
    model.set_experts_implementation("prism")
    block = model.model.layers[1].mlp
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    table = ResultTable(f"one MoE block at {tokens:,} tokens ({export}): ms, median of {repeats}",
                        ["point", "block", "router", "experts", "source router", "gate-neuron scores", "policy"])
    for k in points:
        for policy in ("linear", "topk"):
            set_operating_point(model, f"{policy}:{k}")
            _, w, idx = block.gate(x)
            calls = {"block": lambda: block(x[None]), "router": lambda: block.gate(x),
                     "experts": lambda w=w, idx=idx: block.experts(x, idx, w)}
            if policy == "topk":
                gate = block.gate.neurons
                _, ew, ei = gate.router(x)
                scores = gate_scores(x, gate.rows, ei, gate.n_sub)
                calls |= {"source router": lambda gate=gate: gate.router(x),
                          "scores": lambda gate=gate, ei=ei: gate_scores(x, gate.rows, ei, gate.n_sub),
                          "policy": lambda gate=gate, ei=ei, ew=ew, s=scores: gate.policy.allocate(ei, ew, s, gate.value)}
            ms = median_ms(calls, repeats)
            table.add(f"{policy}:{k}", ms["block"], ms["router"], ms["experts"], ms.get("source router"),
                      ms.get("scores"), ms.get("policy"))
    return table


def blocks_against_original(export: Path, tokens: int, point: str, repeats: int) -> tuple[ResultTable, ResultTable]:
    elastic = load_elastic_model(str(export)).model
    elastic.set_experts_implementation("prism")
    set_operating_point(elastic, point)
    source = load_model("builtin").model
    attach_elastic_state(source, None)
    original = f"original:{int(point.split(':')[1]) // elastic.prism_state.n_sub}"
    set_operating_point(source, original)
    x = torch.randn(1, tokens, elastic.config.hidden_size, generator=torch.Generator().manual_seed(0))
    in_effect = grouped_mm.current_bounds

    def run(model: torch.nn.Module, impl: str | None = None, forced: bool = False) -> None:
        if impl:
            model.set_experts_implementation(impl)
        if forced:
            grouped_mm.current_bounds = lambda width=None: ExecutorBounds(1, sys.maxsize, sys.maxsize, "forced")
        try:
            for layer in model.model.layers:
                layer.mlp(x)
        finally:
            grouped_mm.current_bounds = in_effect

    calls = {f"{point}, runtime's path": lambda: run(elastic), f"{point}, grouped products": lambda: run(elastic, forced=True),
             f"{original}, transformers grouped_mm": lambda: run(source, "grouped_mm"),
             f"{original}, prism": lambda: run(source, "prism")}
    ms = median_ms(calls, repeats)
    layers = len(elastic.model.layers)
    best = min(ms[f"{original}, transformers grouped_mm"], ms[f"{original}, prism"])
    table = ResultTable(f"every MoE block in sequence at {tokens:,} tokens ({export}): ms per block, median of {repeats}",
                        ["configuration", "ms per block", "over the original's faster"])
    for name, value in ms.items():
        table.add(name, value / layers, value / best)
    source_impl = "prism" if ms[f"{original}, prism"] <= ms[f"{original}, transformers grouped_mm"] else "grouped_mm"
    ops = {}
    for name, model, impl in ((point, elastic, "prism"), (original, source, source_impl)):
        model.set_experts_implementation(impl)
        block = model.model.layers[1].mlp
        block(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                block(x)
        ops[name] = {e.key: (e.count / repeats, e.self_cpu_time_total / repeats / 1e3) for e in prof.key_averages()}
    keys = sorted(set(ops[point]) | set(ops[original]),
                  key=lambda key: -abs(ops[point].get(key, (0, 0))[1] - ops[original].get(key, (0, 0))[1]))
    profile_table = ResultTable(f"one MoE block at {tokens:,} tokens, self CPU time per op (ms): {point} against {original} "
                                f"({source_impl}), the largest differences first",
                                ["op", f"{point} calls", f"{point} ms", f"{original} calls", f"{original} ms"])
    for key in keys[:12]:
        a, b = ops[point].get(key, (0, 0.0)), ops[original].get(key, (0, 0.0))
        profile_table.add(key, a[0], a[1], b[0], b[1])
    return table, profile_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/serving/export"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--points", default="1,2,8", help="K of linear:K and topk:K in the gate breakdown.")
    ap.add_argument("--export-wide", type=Path, default=Path("runs/serving/export-n8"))
    ap.add_argument("--wide-tokens", type=int, default=8192)
    ap.add_argument("--wide-point", default="linear:16")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("results/moe_layer_profile"))
    args = ap.parse_args()
    for path in (args.export, args.export_wide):
        if not (path / "config.json").is_file():
            sys.exit(f"error: no export at {path} (make serving-export serving-export-n8)")
    configure_cpu_allocator("reuse")
    torch.set_grad_enabled(False)
    breakdown = gate_breakdown(args.export, args.tokens, [int(k) for k in args.points.split(",")], args.repeats * 2)
    blocks, ops = blocks_against_original(args.export_wide, args.wide_tokens, args.wide_point, args.repeats)
    note = (f"measured on {machine_label(environment())}, float32, CPU allocator {environment()['cpu_allocator']}; "
            f"command: python {' '.join(['scripts/profile_moe_layers.py', *sys.argv[1:]])} (make profile-moe)")
    for table, suffix in ((breakdown, "_gate"), (blocks, "_blocks"), (ops, "_ops")):
        table.notes.append(note)
        table.save(args.out.with_name(args.out.name + suffix))
        print(table.markdown())


if __name__ == "__main__":
    main()
