"""Benchmark: partition solvers' time and held-out quality per expert at a given expert shape.

    OMP_NUM_THREADS=1 python -m prism_cli.solvers.benchmark --out results/bench_partition.json

Rows are synthetic (``synthetic.realistic_rows``: mostly idle neurons, a few large, shared low-rank
structure) at OLMoE-1B-7B's expert shape by default: width 1024, 4096 fit rows, N = 4, plus 1024
held-out rows from the same generator. Run it single-threaded (one core per expert is how
``prism partition`` uses the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from prism_cli.report import ResultTable
from prism_cli.solvers import SOLVERS, PartitionProblem
from prism_cli.solvers.objectives import group_loads, paper_cost, retained_mass
from prism_cli.solvers.synthetic import realistic_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", default="nsga2,ga,anneal,alternating,rate-chunk,random")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--heldout-rows", type=int, default=1024)
    ap.add_argument("--sub-experts", type=int, default=4)
    ap.add_argument("--experts", type=int, default=3, help="independent synthetic experts (seeds) per solver")
    ap.add_argument("--out", type=Path, default=Path("results/bench_partition.json"))
    args = ap.parse_args()

    table = ResultTable(
        f"solvers at expert width {args.width}, {args.rows} fit rows, N = {args.sub_experts} (synthetic rows, one core)",
        ["solver", "s / expert (median)", "held-out cost", "held-out mean R"],
    )
    results = {}
    for name in args.solvers.split(","):
        times, costs, means = [], [], []
        for seed in range(args.experts):
            rows = realistic_rows(args.rows + args.heldout_rows, args.width, np.random.default_rng(1000 + seed))
            problem = PartitionProblem(rows=rows[: args.rows], n_groups=args.sub_experts)
            start = time.perf_counter()
            labels = SOLVERS.get(name)().solve(problem, np.random.default_rng(seed)).labels
            times.append(time.perf_counter() - start)
            held = group_loads(rows[args.rows :], labels, args.sub_experts)
            costs.append(paper_cost(held, 1))
            means.append(float(retained_mass(held).mean()))
        results[name] = {"seconds": times, "heldout_cost": costs, "heldout_mean_r": means}
        table.add(name, statistics.median(times), float(np.mean(costs)), float(np.mean(means)))
        print(f"{name}: {statistics.median(times):.1f} s / expert, held-out cost {np.mean(costs):.4f}", flush=True)
    table.notes.append("target: nsga2 <= 30 s per expert on one core at OLMoE's shape")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.save(args.out.with_suffix(""), extra={"settings": vars(args) | {"out": str(args.out)}, "solvers": results})
    print(table.markdown())


if __name__ == "__main__":
    main()
