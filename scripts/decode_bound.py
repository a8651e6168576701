"""How much any scheduling policy could gain over FIFO on the original model, from the decode bench alone.

    python scripts/decode_bound.py --bench results/serving_bench_decode.json --out results/decode_bound
    (make decode-bound; the bench is make cost-model's)

Serving a floor mix, the best a policy can do is decode every request at its own floor in full batches;
FIFO on the original decodes every request with the full model. Per batch size of the bench, the gain of
the first over the second is ``step(original) / sum_f share_f * step(f) - 1`` (requests of every floor
decode the same number of tokens). Two versions: **measured**, with each floor's measured step, and
**ideal elasticity**, where a floor's MoE blocks take the original's MoE time times the fraction of its
sub-experts the floor computes and everything else in the step takes what it takes in the original's.
The first bounds what the scheduler can do with these executors; the second, what better executors
could give on this model and machine (its MoE share of a step is what elasticity can act on).
Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prism_cli.report import ResultTable
from prism_cli.serving.runner import ScheduleSettings


def _mix(text: str) -> dict[str, float]:
    """``linear:2=0.5,...`` -> shares summing to one (the schedule command's syntax)."""
    shares = {}
    for part in text.split(","):
        point, _, share = part.strip().rpartition("=")
        shares[point] = float(share)
    total = sum(shares.values())
    return {p: s / total for p, s in shares.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=Path("results/serving_bench_decode.json"))
    ap.add_argument("--floors", default=ScheduleSettings.floors)
    ap.add_argument("--out", type=Path, default=Path("results/decode_bound"))
    args = ap.parse_args()
    if not args.bench.is_file():
        raise SystemExit(f"error: {args.bench} does not exist (make cost-model writes it)")
    bench = json.loads(args.bench.read_text())
    points = {p["point"]: p for p in bench["points"]}
    mix = _mix(args.floors)
    missing = [p for p in mix if p not in points]
    if missing:
        raise SystemExit(f"error: {args.bench} has no timing of {', '.join(missing)}")
    full = max((p for p in points.values() if p["kind"] == "original"), key=lambda p: p["active"])
    batches = sorted(full["latency"], key=int)
    table = ResultTable(
        f"gain over FIFO on {full['point']} if every request decoded at its own floor ({args.floors})",
        ["batch", f"MoE share of {full['point']}'s step", *[f"{p} / {full['point']}" for p in mix],
         "gain, measured steps", "gain, ideal elasticity"],
    )
    for b in batches:
        step, moe = full["latency"][b]["median_ms"], full["latency"][b]["moe_ms"]
        measured = {p: points[p]["latency"][b]["median_ms"] for p in mix}
        ideal = {p: step - moe + moe * points[p]["active"] / full["active"] for p in mix}
        table.add(int(b), moe / step, *[measured[p] / step for p in mix],
                  step / sum(s * measured[p] for p, s in mix.items()) - 1,
                  step / sum(s * ideal[p] for p, s in mix.items()) - 1)
    env = bench.get("environment", {})
    table.notes += [
        f"From {args.bench} (prism bench --mode decode, {env.get('processor', '?')}, {env.get('torch_threads', '?')} "
        f"threads): median step and time inside the MoE blocks per point and batch. Ideal elasticity: a floor's "
        f"MoE time is {full['point']}'s times its active sub-experts over {full['point']}'s; the rest of its step "
        "as the original's. Neither counts what scheduling loses (partial batches, prefills, waits).",
    ]
    table.publish(args.out)


if __name__ == "__main__":
    main()
