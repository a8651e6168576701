"""Gate-neuron ablation on one partition: how the training-free gate's choices move perplexity.

    python scripts/gate_ablation.py --profile runs/demo/profile.h5 --partition runs/demo/partition.h5 \
        --out results/gate_ablation

For each setting (number of gate neurons s, and the rule that picks them: the paper's summed
co-activation, or activation mass) the partition's gate neurons are re-chosen from the profile's fit
rows, the model is exported, and held-out perplexity is measured at topk:K for each K in --points,
next to the original model at top-1 (equal compute to K = N). Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from prism_cli.data import split_text
from prism_cli.evaluation.perplexity import perplexity, token_windows
from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.profiling.format import ProfileFile
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import load_elastic_model, set_operating_point
from prism_cli.solvers.base import PartitionProblem
from prism_cli.solvers.format import read_partition, write_partition
from prism_cli.solvers.runner import gate_positions

SETTINGS = [(4, "coact"), (4, "mass"), (8, "coact"), (8, "mass"), (16, "mass")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--partition", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--points", default="1,2,4")
    ap.add_argument("--out", type=Path, default=Path("results/gate_ablation"))
    args = ap.parse_args()
    ks = [int(k) for k in args.points.split(",")]

    base = read_partition(args.partition)
    n_sub = base.n_sub
    table = ResultTable(
        f"gate neurons: held-out perplexity at topk:K ({args.tokens:,} tokens, partition {args.partition.name})",
        ["gate neurons", "chosen by", *[f"topk:{k}" for k in ks]],
    )
    windows = None
    original = None
    with ProfileFile(args.profile) as profile, tempfile.TemporaryDirectory() as tmp:
        problems = {(layer, e): PartitionProblem(rows=profile.expert(layer, e).fit_rows, n_groups=n_sub)
                    for layer in base.layers for e in range(profile.num_experts)}
        for s, rule in SETTINGS:
            for layer in base.layers:
                for e, expert in enumerate(base.experts[layer]):
                    members = expert.permutation.reshape(n_sub, -1)
                    expert.gate_positions = gate_positions(problems[layer, e], members, s, rule)
            base.meta.update(gate_neurons=s, gate_selection=rule)
            part_path, export_dir = Path(tmp) / f"p{s}{rule}.h5", Path(tmp) / f"e{s}{rule}"
            write_partition(part_path, base)
            export_model(args.model, part_path, export_dir, ExportSettings(gate="neurons"))
            loaded = load_elastic_model(str(export_dir))
            if windows is None:
                windows = token_windows(loaded.tokenizer, split_text("eval"), 256, args.tokens)
                set_operating_point(loaded.model, "linear:" + str(n_sub))  # all copies of the top-1 expert
                original = perplexity(loaded.model, windows).perplexity
            row = []
            for k in ks:
                set_operating_point(loaded.model, f"topk:{k}")
                row.append(perplexity(loaded.model, windows).perplexity)
            table.add(s, rule, *row)
            print(f"s={s} {rule}: {np.round(row, 2).tolist()}", flush=True)
    table.notes.append(f"original model at top-1 (the compute of topk:{n_sub}): perplexity {original:.4g}")
    table.save(args.out)
    print(table.markdown())


if __name__ == "__main__":
    main()
