"""Gate-neuron ablation on one partition: how the training-free gate's choices move perplexity.

    python scripts/gate_ablation.py --profile runs/demo/profile.h5 --partition runs/demo/partition.h5 \
        --out results/gate_ablation

For each setting (number of gate neurons s, and the rule that picks them: the paper's summed
co-activation, or activation mass) the partition's gate neurons are re-chosen from the profile's fit
rows, the model is exported, and perplexity is measured at topk:K for each K in --points, next to the
original model at top-1 (equal compute to K = N).

The setting is CHOSEN on the calibration split (the text the profile was taken from): the lowest mean
log-perplexity over the K points among the settings whose gate scoring costs at most ``--max-cost`` of
one sub-expert per token: scoring reads 2*s rows for each of the N sub-experts of each of the k
chosen experts, 2*k*N*s rows per token, and one sub-expert computes 3*I/N rows. The evaluation split is
measured too and only reported.
Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np

from prism_cli.data import split_text
from prism_cli.data.windows import token_windows
from prism_cli.evaluation.perplexity import perplexity
from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.profiling.format import ProfileFile
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import load_elastic_model, set_operating_point
from prism_cli.solvers.base import PartitionProblem
from prism_cli.solvers.format import read_partition, write_partition
from prism_cli.solvers.runner import gate_positions

SETTINGS = "4:coact,4:mass,8:coact,8:mass,16:mass"


def parse_settings(text: str) -> list[tuple[int, str]]:
    """``"4:coact,8:mass"`` -> [(4, "coact"), (8, "mass")]."""
    out = []
    for item in text.split(","):
        s, _, rule = item.partition(":")
        if not s.strip().isdigit() or int(s) < 1 or rule not in ("coact", "mass"):
            raise SystemExit(f"error: --settings item {item!r} is not COUNT:coact or COUNT:mass")
        out.append((int(s), rule))
    return out


def scoring_cost(top_k: int, n_sub: int, s: int, width: int) -> float:
    """Gate scoring per token in sub-experts: 2*s rows for each of the N sub-experts of the k chosen
    experts, against 3*width rows for one sub-expert."""
    return top_k * n_sub * 2 * s / (3 * width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--partition", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--points", default="1,2,4")
    ap.add_argument("--max-cost", type=float, default=1 / 3, help="Most gate-scoring compute per token, in sub-experts.")
    ap.add_argument("--settings", default=SETTINGS, help="Gate-neuron settings to try, COUNT:RULE (coact or mass).")
    ap.add_argument("--out", type=Path, default=Path("results/gate_ablation"))
    args = ap.parse_args()
    ks = [int(k) for k in args.points.split(",")]

    base = read_partition(args.partition)
    n_sub = base.n_sub
    table = ResultTable(
        f"gate neurons: perplexity at topk:K ({args.tokens:,} tokens per split, partition {args.partition.name})",
        ["gate neurons", "chosen by", "scoring cost (sub-experts/token)", *[f"calibration topk:{k}" for k in ks],
         "calibration mean log-ppl", *[f"eval topk:{k}" for k in ks], "chosen"],
    )
    windows: dict[str, object] = {}
    original: dict[str, float] = {}
    rows = []
    with ProfileFile(args.profile) as profile, tempfile.TemporaryDirectory() as tmp:
        problems = {(layer, e): PartitionProblem(rows=profile.expert(layer, e).fit_rows, n_groups=n_sub)
                    for layer in base.layers for e in range(profile.num_experts)}
        for s, rule in parse_settings(args.settings):
            for layer in base.layers:
                for e, expert in enumerate(base.experts[layer]):
                    members = expert.permutation.reshape(n_sub, -1)
                    expert.gate_positions = gate_positions(problems[layer, e], members, s, rule)
            base.meta.update(gate_neurons=s, gate_selection=rule)
            part_path, export_dir = Path(tmp) / f"p{s}{rule}.h5", Path(tmp) / f"e{s}{rule}"
            write_partition(part_path, base)
            export_model(args.model, part_path, export_dir, ExportSettings(gate="neurons"))
            loaded = load_elastic_model(str(export_dir))
            if not windows:
                for split in ("calibration", "eval"):
                    windows[split] = token_windows(loaded.tokenizer, split_text(split), 256, args.tokens)
                    set_operating_point(loaded.model, "linear:" + str(n_sub))  # all copies of the top-1 expert
                    original[split] = perplexity(loaded.model, windows[split]).perplexity
            ppl = {}
            for split in ("calibration", "eval"):
                for k in ks:
                    set_operating_point(loaded.model, f"topk:{k}")
                    ppl[split, k] = perplexity(loaded.model, windows[split]).perplexity
            width = loaded.model.prism_state.layers[0].experts.down_proj.shape[-1]  # I / N
            cost = scoring_cost(int(base.meta["top_k"]), n_sub, s, width)
            mean_log = sum(math.log(ppl["calibration", k]) for k in ks) / len(ks)
            rows.append([s, rule, cost, *[ppl["calibration", k] for k in ks], mean_log, *[ppl["eval", k] for k in ks]])
            print(f"s={s} {rule}: calibration {np.round([ppl['calibration', k] for k in ks], 2).tolist()}", flush=True)
    eligible = [r for r in rows if r[2] <= args.max_cost + 1e-12]
    best = min(eligible, key=lambda r: r[3 + len(ks)]) if eligible else None
    for r in rows:
        table.add(*r, r is best)
    table.notes += [
        f"chosen on the calibration split: lowest mean log-perplexity among settings costing <= {args.max_cost:.3g} "
        "sub-experts per token; the eval columns only report",
        f"original model at top-1 (the compute of topk:{n_sub}): perplexity {original['calibration']:.4g} (calibration), "
        f"{original['eval']:.4g} (eval)",
    ]
    table.save(args.out)
    print(table.markdown())


if __name__ == "__main__":
    main()
