"""How many steps a point needs, after steps of another point, before its steps take their steady time.

    python scripts/bench_settle.py --export runs/serving/export --out results/bench_settle
    (make bench-settle)

``prism bench`` times every point round-robin (drift on a shared machine hits every point alike) and runs
``--settle`` untimed steps of a point right before each of its timed steps (``evaluation/bench.py``,
``SETTLE_STEPS``). This measures what that default rests on, for two kinds of switch: of model (the export
at ``linear:N`` and its source model at ``original:1``: the same routing) and of point within the export
(``linear:N/2`` and ``linear:N``: part of each expert and another layout of ``down_proj``, then whole
experts); and, as the control, turns of one point with nothing else between them. The sides take turns
of consecutive steps, round after round, and each step's time is kept by its place in the turn. The
table gives the median per place, relative to the steady time (the median of the last three places), and
the first place from which no median is more than 3 % over it (a step right after a switch is slower;
one faster than the steady time is noise). Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from prism_cli.allocator import configure_cpu_allocator
from prism_cli.environment import environment, machine_label
from prism_cli.evaluation.bench import SETTLE_STEPS
from prism_cli.evaluation.timing import StepTimer
from prism_cli.models.loading import load_model
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import export_meta, load_elastic_model, set_operating_point

#: (mode, batch, sequence length, steps per turn, rounds): decode at the batches the tables report, and
#: the prefill of the built-in table (8 x 256), whose steps are long enough that a few rounds suffice.
CASES = [("decode", 1, 128, 16, 30), ("decode", 8, 128, 16, 30), ("decode", 32, 128, 16, 20), ("prefill", 8, 256, 4, 8)]
WITHIN = 0.03


def settled_at(medians: list[float]) -> int:
    """The first place (1-based) from which no median is more than ``WITHIN`` over the steady time."""
    steady = statistics.median(medians[-3:])
    place = len(medians)
    while place > 1 and medians[place - 2] / steady - 1 <= WITHIN:
        place -= 1
    return place


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/serving/export"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/bench_settle"))
    args = ap.parse_args()
    configure_cpu_allocator("reuse")  # as `prism bench` runs on the CPU
    meta = export_meta(str(args.export)) if args.export.is_dir() else None
    if meta is None:
        raise SystemExit(f"error: {args.export} is not a prism export folder (make serving-export builds the default one)")
    n_sub = int(meta["sub_experts"])
    elastic = load_elastic_model(str(args.export), operating_point=f"linear:{n_sub}").model
    source = load_model(meta["source"]["model"]).model  # transformers' default experts implementation
    switches = {"model": [(f"linear:{n_sub}", elastic), ("original:1", source)],
                "point": [(f"linear:{n_sub // 2}", elastic), (f"linear:{n_sub}", elastic)],
                "nothing (control)": [(f"linear:{n_sub}", elastic)]}
    vocab = source.config.vocab_size
    longest = max(c[3] for c in CASES)
    table = ResultTable(
        "step time by place in a point's turn, over its steady time (median of the last three places)",
        ["mode", "batch", "switch of", "point", "steady ms", *[f"place {i}" for i in range(1, longest + 1)],
         "at most 3 % over from place"],
    )
    for mode, batch, seq_len, steps, rounds in CASES:
        for switch, turns in switches.items():
            timers = {id(m): StepTimer(m, batch, seq_len, mode, vocab, args.seed) for _, m in turns}
            by_place: dict[str, list[list[float]]] = {point: [[] for _ in range(steps)] for point, _ in turns}
            for _ in range(rounds):
                for point, model in turns:
                    set_operating_point(model, point)
                    for place in range(steps):
                        by_place[point][place].append(timers[id(model)].sample()[0])
            for timer in timers.values():
                timer.close()
            for point, _ in turns:
                medians = [statistics.median(v) for v in by_place[point]]
                steady = statistics.median(medians[-3:])
                table.add(mode, batch, switch, point, steady, *[m / steady for m in medians], *[None] * (longest - steps),
                          settled_at(medians))
        print(f"{mode} batch {batch}: done")
    table.notes += [
        f"Export {args.export} and its source model (transformers' default experts implementation); switch of model: "
        f"linear:{n_sub} and original:1 (the same routing) in turns; switch of point: linear:{n_sub // 2} and "
        f"linear:{n_sub} of the export in turns. Decode over a KV cache of 128 tokens, prefill of 256 tokens; float32, "
        f"measured on {machine_label(environment())}, CPU allocator {environment()['cpu_allocator']}.",
        f"`prism bench` runs --settle untimed steps of a point right before each of its timed steps: default "
        f"{SETTLE_STEPS['decode']} in decode, {SETTLE_STEPS['prefill']} in prefill (a timed step is at place settle + 1).",
    ]
    table.publish(args.out)


if __name__ == "__main__":
    main()
