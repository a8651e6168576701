"""What a tuned router's linear gate costs in each of its modes: ``ranked`` (the stock router at top-(K+1),
kept as it comes when the K+1-th pair scores below the first K) against ``rule`` (the full top-(N*k) and
two stable sorts), on the hidden states the router really sees.

    python scripts/bench_router_modes.py --export runs/tune/bank --out results/router_modes
    (make bench-router-modes; the export is the router bank of make tune-gate)

One forward pass over windows of the calibration split records every MoE layer's input; then, for every
K below the full point whose router is tuned (a bank's untuned routers take the ``blocks`` mode), each
layer's linear gate is timed in both modes in turns, on a decode-sized call (the first 8 tokens) and on
the whole prefill, and the two results are checked to keep the same pairs with the same weights. The
table gives the median time of one call summed over the layers, and how many calls of the ranked mode
met a tie at its boundary and took the rule. Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from prism_cli.data import split_text
from prism_cli.data.windows import token_windows
from prism_cli.environment import environment, machine_label
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import export_meta, load_elastic_model, set_operating_point

ROUNDS = {8: 400, 2048: 30}


def _timed(call, x: torch.Tensor) -> float:
    start = time.perf_counter()
    call(x)
    return time.perf_counter() - start


def _ranked_call(router: torch.nn.Module, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The ranked call's outputs, and whether it met a tie at its boundary and ran the rule."""
    ran: list[bool] = []
    rule = router._by_rule
    router._by_rule = lambda *a: ran.append(True) or rule(*a)
    try:
        return router(x), bool(ran)
    finally:
        del router._by_rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/tune/bank"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("results/router_modes"))
    args = ap.parse_args()
    meta = export_meta(str(args.export)) if args.export.is_dir() else None
    if meta is None or not ("tuning" in meta or "router_bank" in meta):
        raise SystemExit(f"error: {args.export} is not a tuned prism export (make tune-gate builds runs/tune/bank)")
    loaded = load_elastic_model(str(args.export))
    model, state = loaded.model.eval(), loaded.model.prism_state
    full = state.n_sub * state.source_top_k
    ids = token_windows(loaded.tokenizer, split_text("calibration"), args.seq_len, args.batch * args.seq_len)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.block.register_forward_pre_hook(
        lambda _m, a, i=i: inputs.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]))) for i, layer in enumerate(state.layers)]
    with torch.inference_mode():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    table = ResultTable("linear gate of a tuned router, one call summed over the MoE layers: ranked against the rule",
                        ["K", "tokens", "ranked us", "rule us", "ranked / rule", "layers whose ranked call took the rule"])
    for k in range(1, full):
        set_operating_point(model, f"linear:{k}")
        routers = state.flat_routers
        if any(r.mode != "ranked" for r in routers):
            continue  # an untuned router of the bank: whole blocks, not this comparison
        for tokens, rounds in ROUNDS.items():
            xs = [inputs[i][:tokens] for i in range(len(routers))]
            took_rule = 0
            with torch.inference_mode():
                for r, x in zip(routers, xs, strict=True):  # both modes keep the same pairs and weights
                    (_, w1, i1), took = _ranked_call(r, x)
                    took_rule += took
                    r.mode = "rule"
                    _, w2, i2 = r(x)
                    r.mode = "ranked"
                    o1, o2 = i1.sort(dim=1), i2.sort(dim=1)
                    if not torch.equal(o1.values, o2.values) or not torch.allclose(w1.gather(1, o1.indices), w2.gather(1, o2.indices)):
                        raise SystemExit(f"error: ranked and rule differ at linear:{k}")
                times: dict[str, list[float]] = {"ranked": [], "rule": []}
                for _ in range(rounds):
                    for mode in ("ranked", "rule"):
                        total = 0.0
                        for r, x in zip(routers, xs, strict=True):
                            r.mode = mode
                            total += _timed(r, x)
                        times[mode].append(total)
                for r in routers:
                    r.mode = "ranked"
            ranked, rule_us = (statistics.median(times[m]) * 1e6 for m in ("ranked", "rule"))
            table.add(k, tokens, ranked, rule_us, ranked / rule_us, f"{took_rule} of {len(routers)}")
    table.notes += [
        f"Export {args.export} (N = {state.n_sub}, full point linear:{full}); hidden states of one forward over "
        f"{args.batch} x {args.seq_len} tokens of the calibration split; decode-sized calls take the first 8 tokens. "
        f"Float32, measured on {machine_label(environment())}; the modes take turns, {ROUNDS[8]} / {ROUNDS[2048]} rounds.",
        "Both modes keep the same (token, sub-expert) pairs with the same weights at every K (checked before timing).",
    ]
    table.publish(args.out)


if __name__ == "__main__":
    main()
