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

from prism_cli.errors import PrismError
from prism_cli.report import ResultTable
from prism_cli.serving.floors import PointSpace, parse_mix
from prism_cli.serving.runner import ScheduleSettings


def _mix(text: str, points: dict[str, dict]) -> dict[str, float]:
    """The floor mix (the schedule command's syntax and checks) as ``{point: share}``, over the bench's points."""
    full = max((p for p in points.values() if p["kind"] == "original"), key=lambda p: p["active"])
    top_k = int(full["point"].rpartition(":")[2])  # original:k
    gate = "neurons" if any(name.startswith(("topk", "threshold")) for name in points) else "linear"
    try:
        mix = parse_mix(text, PointSpace(gate, int(full["active"]) // top_k, top_k))
    except PrismError as exc:
        raise SystemExit(f"error: {exc}") from None
    if any(f.point is None for f, _ in mix):
        raise SystemExit("error: --floors: give points, not perplexity ceilings (this bound has no ladder)")
    return {str(f.point): share for f, share in mix}


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
    mix = _mix(args.floors, points)
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
