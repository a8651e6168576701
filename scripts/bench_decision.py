"""What one scheduling decision costs, warm and right after a decode step, against the decode step itself.

    python scripts/bench_decision.py --export runs/serving/export --out results/decision_time
    (make bench-decision)

Every policy runs the sweep's high load in the simulator (the same workload, seed and limits as
``prism schedule sweep``), and ``--states`` of the engine states that ask the policy for a decision,
spread over the run, are kept (deep copies). Each kept state is then decided again on a fresh copy, timed twice: right after one
decode step of the real engine (``ModelExecutor.decode``, a batch of ``max_batch`` rows at the full
point), as the engine decides; and at once again on another fresh copy (warm: the policy's code and
memos in the processor's caches). A decode step streams the model's weights through the caches and
evicts the interpreter's working set, which the decision after it reads back from memory: the first
timing is the one ``prism schedule`` reports. Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from prism_cli.console import console
from prism_cli.environment import environment, machine_label
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import export_meta
from prism_cli.serving.costmodel import CostModel
from prism_cli.serving.engine import Batch, Engine
from prism_cli.serving.executor import ModelExecutor, load_served_model
from prism_cli.serving.policies import SCHEDULING_POLICIES
from prism_cli.serving.requests import Request, SamplingParams
from prism_cli.serving.runner import ScheduleSettings, run_schedule
from prism_cli.serving.sweep import LOADS, baseline_capacity

POLICIES = ["prism", "mixed", "fifo", "fullbatch", "static"]
PROMPT, MAX_WIDTH = 64, 256


def _copy(engine: Engine) -> Engine:
    """A copy of what a decision reads: the engine less its history and its requests still to arrive (a
    threading.Event does not copy; the decision does not read it)."""
    empty = {id(engine._wake): engine._wake, id(engine._scheduled): type(engine._scheduled)(),
             id(engine.finished): type(engine.finished)(), id(engine.stats): None}
    return copy.deepcopy(engine, empty)


def snapshots(directory: str, settings: ScheduleSettings, cost: CostModel, states: int) -> list[Engine]:
    """Copies of the engine at ``states`` decisions spread evenly over one simulated run (a first run counts them)."""
    cls = SCHEDULING_POLICIES.get(settings.policy)
    admit, kept, seen = cls.admit, [], [0]
    every = [0]

    def keeping(self, engine: Engine):  # type: ignore[no-untyped-def]
        seen[0] += 1
        if every[0] and seen[0] % every[0] == 0 and len(kept) < states:
            kept.append(_copy(engine))
        return admit(self, engine)

    cls.admit = keeping
    try:
        run_schedule(directory, settings, cost)  # counts the decisions
        every[0], seen[0] = max(1, seen[0] // states), 0
        run_schedule(directory, settings, cost)
    finally:
        cls.admit = admit
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/serving/export"))
    ap.add_argument("--cost-model", type=Path, default=Path("results/serving_cost_model.json"))
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds of each policy's run")
    ap.add_argument("--states", type=int, default=40, help="engine states kept per policy (spread over its run)")
    ap.add_argument("--repeats", type=int, default=5, help="timings of each kept state, each way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/decision_time"))
    args = ap.parse_args()
    if not args.export.is_dir() or export_meta(str(args.export)) is None:
        raise SystemExit(f"error: {args.export} is not a prism export folder (make serving-export builds the default one)")
    if args.states < 1 or args.repeats < 1 or not args.duration > 0:
        raise SystemExit("error: --states and --repeats must be >= 1 and --duration positive")
    cost = CostModel.load(args.cost_model)
    directory = str(args.export)
    base = ScheduleSettings(sim=True, duration=args.duration, seed=args.seed)
    rate = LOADS["high"] * baseline_capacity(directory, base, cost)

    served = load_served_model(directory)
    executor = ModelExecutor(served, seed=args.seed)
    full, rows = served.space.full(), base.limits.max_batch
    vocab = served.model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    batch: Batch | None = None
    steps: list[float] = []

    def decode_step() -> None:
        """One decode step of a full batch at the full point; a new batch once its cache is ``MAX_WIDTH`` wide."""
        nonlocal batch
        if batch is None or batch.kv.mask.shape[1] >= MAX_WIDTH:
            requests = [Request(torch.randint(0, vocab, (PROMPT,), generator=generator).tolist(),
                                SamplingParams(temperature=0.0), full, 0.0) for _ in range(rows)]
            batch = Batch(requests, executor.prefill(requests, [full] * rows)[0])
        steps.append(executor.decode(batch, [full] * rows)[1])

    for _ in range(10):
        decode_step()  # untimed: the first steps of a process are slower
    steps.clear()
    table = ResultTable("one scheduling decision, warm and right after a decode step (high load, simulated states)",
                        ["policy", "states", "after a decode step us (median)", "warm us (median)", "after / warm",
                         "decode step ms (median)", "decision / decode step"])
    for policy in POLICIES:
        states = snapshots(directory, dataclasses.replace(base, policy=policy, rate=rate), cost, args.states)
        cold: list[float] = []
        warm: list[float] = []
        for state in states:
            for _ in range(args.repeats):
                first = _copy(state)
                decode_step()
                t = time.perf_counter()
                first.policy.admit(first)
                cold.append(time.perf_counter() - t)
                second = _copy(state)
                first.policy.admit(first)  # the code and memos warm
                t = time.perf_counter()
                second.policy.admit(second)
                warm.append(time.perf_counter() - t)
        after_us, warm_us = statistics.median(cold) * 1e6, statistics.median(warm) * 1e6
        step = statistics.median(steps)
        table.add(policy, len(states), after_us, warm_us, after_us / warm_us, step, after_us / 1e3 / step)
        console.print(f"{policy}: {len(states)} states, {after_us:.0f} us after a decode step, {warm_us:.0f} us warm")
    env = environment()
    table.notes += [
        f"Export {args.export}, float32, measured on {machine_label(env)}; the sweep's high load ({rate:.2f} requests/s: "
        f"{LOADS['high']}x FIFO on the original's simulated capacity), {args.duration:g} simulated seconds, seed "
        f"{args.seed}, {args.states} engine states kept per policy (spread over its run), {args.repeats} timings each way; "
        f"the decode step: {rows} rows at {full}, cache width {PROMPT}-{MAX_WIDTH}.",
        f"Command: python scripts/bench_decision.py --export {args.export} --cost-model {args.cost_model} "
        f"--out {args.out} (make bench-decision).",
    ]
    table.publish(args.out)


if __name__ == "__main__":
    main()
