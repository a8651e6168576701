"""``prism schedule sweep``: every policy at low, medium and high load, and the targets of issue 16.

Loads are fractions of the capacity of the baseline (FIFO on the original model), which the
simulator measures from a burst of requests on the cost model: ``low`` 0.3x, ``medium`` 0.7x,
``high`` 1.3x (the baseline saturates there; a policy serving more requests/s shows it). Every policy
runs on the export, and FIFO also on the export's source model, at the same floor mix and seed.

Real runs may be repeated in rounds (``rounds``): the policies run in order (``ORDER``: ``prism`` next to
its baseline), then in reverse, and so on, so that a drift of the machine's speed over the sweep weighs
on every policy alike; the targets compare each round's ``prism`` with the same round's baseline and
report the median.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism_cli.errors import PrismError, check_distinct, split_items
from prism_cli.report import ResultTable
from prism_cli.serving.costmodel import CostModel
from prism_cli.serving.runner import ScheduleResult, ScheduleSettings, check_load, run_schedule

LOADS = {"low": 0.3, "medium": 0.7, "high": 1.3}
#: (policy, on the original model) pairs of a sweep, in the order of its table; the last is the baseline of the targets.
RUNS = [("prism", False), ("mixed", False), ("fifo", False), ("fullbatch", False), ("static", False), ("fifo", True)]
#: The order they run in: ``prism`` next to its baseline, so that the machine's drift between the two runs the
#: targets compare is that of one run's length (in a three-round sweep it moved by half in 30 minutes).
ORDER = [("prism", False), ("fifo", True), ("mixed", False), ("fifo", False), ("fullbatch", False), ("static", False)]


def baseline_capacity(directory: str, settings: ScheduleSettings, cost_model: CostModel, burst: int = 200) -> float:
    """Requests/s that FIFO on the original model serves from a backlog (simulated on the cost model)."""
    probe = dataclasses.replace(settings, policy="fifo", original=True, sim=True, rate=1000.0, duration=burst / 1000.0)
    return run_schedule(directory, probe, cost_model).metrics["requests_per_s"]


def parse_loads(text: str) -> list[str]:
    """``--loads``: comma-separated names of ``LOADS``; at least one, every one known."""
    names = split_items(text, "--loads")
    check_loads(names)
    return names


def check_loads(names: list[str]) -> None:
    if not names:
        raise PrismError(f"--loads names no load; choose among {', '.join(LOADS)} (comma-separated), or give --rates")
    unknown = [name for name in names if name not in LOADS]
    if unknown:
        raise PrismError(f"--loads: unknown load {', '.join(unknown)}; choose among {', '.join(LOADS)}")
    check_distinct(names, "--loads")


def label(policy: str, original: bool) -> str:
    return f"{policy} (original)" if original else policy


def run_sweep(
    directory: str, settings: ScheduleSettings, cost_model: CostModel, loads: list[str], rates: list[float] | None = None,
    served: dict[bool, Any] | None = None, on_run: Callable[[str], None] | None = None, rounds: int = 1,
) -> tuple[list[tuple[str, float, ScheduleResult]], float | None]:
    """Every run of the sweep: ``(load, rate, result)``, by load, then policy, then round (``metrics["round"]``,
    from 1); and the baseline capacity (None with explicit rates). Round ``i`` runs the policies in ``ORDER``
    for odd ``i``, in reverse for even ``i``."""
    check_rounds(rounds, settings.sim)
    capacity = None
    if rates is None:
        check_loads(loads)
        capacity = baseline_capacity(directory, settings, cost_model)
        pairs = [(name, LOADS[name] * capacity) for name in loads]
    else:
        if not rates:
            raise PrismError("--rates names no arrival rate; give comma-separated requests per second, e.g. 1,2.5")
        check_distinct(rates, "--rates")
        for r in rates:
            check_load(r, settings.duration, "--rates")
        pairs = [(f"{r:g}/s", r) for r in rates]
    out = []
    for name, rate in pairs:
        simulated: dict[tuple[str, bool], float] = {}  # the simulator is deterministic: once per policy
        done = []
        for i in range(rounds):
            for policy, original in ORDER if i % 2 == 0 else ORDER[::-1]:
                if on_run is not None:
                    on_run(f"{name} load, {label(policy, original)}" + (f", round {i + 1}" if rounds > 1 else ""))
                run = dataclasses.replace(settings, policy=policy, original=original, rate=rate)
                result = run_schedule(directory, run, cost_model, served=(served or {}).get(original))
                result.metrics["round"] = i + 1
                if not settings.sim:  # the simulator at the same settings, to tell how far it can be trusted
                    if (policy, original) not in simulated:
                        simulated[(policy, original)] = run_schedule(directory, dataclasses.replace(run, sim=True),
                                                                     cost_model).metrics["requests_per_s"]
                    result.metrics["sim_requests_per_s"] = simulated[(policy, original)]
                    result.metrics["sim_over_real"] = simulated[(policy, original)] / result.metrics["requests_per_s"]
                done.append(((RUNS.index((policy, original)), i), result))
        out += [(name, rate, result) for _, result in sorted(done, key=lambda d: d[0])]
    return out, capacity


def check_rounds(rounds: int, sim: bool) -> None:
    if rounds < 1:
        raise PrismError(f"--rounds must be at least 1, got {rounds}")
    if sim and rounds > 1:
        raise PrismError("--rounds repeats real runs; a simulated run gives the same result every time (drop --sim or --rounds)")


def sweep_table(runs: list[tuple[str, float, ScheduleResult]], mode: str, machine: str) -> ResultTable:
    rounds = max(r.metrics.get("round", 1) for _, _, r in runs) > 1
    table = ResultTable(
        f"scheduling policies against load ({mode})",
        ["load", "offered req/s", "policy", *(["round"] if rounds else []), "req/s", "output tok/s", "TTFT p50 s", "TTFT p90 s",
         "TPOT p50 ms", "e2e p50 s", "e2e p90 s", "e2e p99 s", "floor violations", "sched us/decision", "sched / decode step"],
    )
    if mode == "real":
        table.columns += ["sim req/s", "sim / real"]
    for name, rate, r in runs:
        m = r.metrics
        table.add(name, rate, label(r.settings["policy"], r.model == "original"), *([m["round"]] if rounds else []),
                  m["requests_per_s"], m["output_tokens_per_s"],
                  m["ttft_s"]["p50"], m["ttft_s"]["p90"], _ms(m["tpot_s"]["p50"]), m["e2e_s"]["p50"], m["e2e_s"]["p90"],
                  m["e2e_s"]["p99"], m["floor_violations"], m["scheduler_us_per_decision"], m["scheduler_share_of_decode_step"],
                  *([m["sim_requests_per_s"], m["sim_over_real"]] if mode == "real" else []))
    table.notes.append(f"{'simulated on the cost model measured on' if mode == 'sim' else 'measured on'} {machine}; "
                       "req/s = requests served / (last completion - first arrival), every request served")
    return table


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def targets(runs: list[tuple[str, float, ScheduleResult]], load: str = "high",
            bound: dict[str, float] | None = None) -> dict[str, Any]:
    """Issue 16's targets at ``load``: prism on the export against FIFO on the original model; ``bound``
    (``decode_gain_bound``) is reported with them. Over rounds: each round's gain against the same round's
    baseline (``gains``), and the median of every figure (``gain`` is the median gain)."""
    at: dict[tuple[str, bool], dict[int, dict[str, Any]]] = {}
    for name, _, r in runs:
        if name == load:
            at.setdefault((r.settings["policy"], r.model == "original"), {})[r.metrics.get("round", 1)] = r.metrics
    if ("prism", False) not in at or ("fifo", True) not in at:
        return {}
    prism, base = at[("prism", False)], at[("fifo", True)]
    both = sorted(set(prism) & set(base))

    def median(metrics: dict[int, dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(metrics[i]) for i in both)

    rps = lambda m: m["requests_per_s"]  # noqa: E731
    p90 = lambda m: m["e2e_s"]["p90"]  # noqa: E731
    gains = [rps(prism[i]) / rps(base[i]) - 1.0 for i in both]
    out = {
        "load": load,
        "rounds": len(both),
        "prism_requests_per_s": median(prism, rps),
        "fifo_original_requests_per_s": median(base, rps),
        "gain": statistics.median(gains),
        "gains": gains,
        "gain_target": 0.20,
        "prism_e2e_p90_s": median(prism, p90),
        "fifo_original_e2e_p90_s": median(base, p90),
        "p90_no_worse": median(prism, p90) <= median(base, p90),
        "floor_violations": {label(p, o): sum(m["floor_violations"] for m in ms.values()) for (p, o), ms in at.items()},
        "scheduler_share_of_decode_step": median(prism, lambda m: m["scheduler_share_of_decode_step"]),
    }
    if bound:
        out["decode_gain_bound"] = bound
    if ("mixed", False) in at and set(both) <= set(at[("mixed", False)]):
        mixed = at[("mixed", False)]
        out["mixed_over_prism"] = statistics.median(rps(mixed[i]) / rps(prism[i]) - 1.0 for i in both)
    out["met"] = out["gain"] >= 0.20 and out["p90_no_worse"] and all(v == 0 for k, v in out["floor_violations"].items()
                                                                        if not k.startswith("static"))
    return out


def decode_gain_bound(cost_model: CostModel, mix: list[tuple[str, float]], full_original: str, rows: int) -> dict[str, float]:
    """The most any policy can gain over FIFO on the original in decode: every request decoding at its own
    floor in full batches of ``rows``, against the original at its full top-k, ``C(original) / sum share * C(floor)
    - 1`` (prefill and KV copies left out). By the engine's own costs per cache width where the cost model has
    them (as the simulator charges: each step plus the engine's time around it), else by the bench's decode
    steps. Empty where a floor has no timing."""
    if not all(cost_model.has(p) for p, _ in mix) or not cost_model.has(full_original):
        return {}
    engine = cost_model.engine
    if engine is not None and all(p in engine.decode_ms for p, _ in [*mix, (full_original, 0.0)]):
        widths, around = sorted(engine.decode_ms[full_original]), engine.step_overhead_ms
        return {f"engine, cache width {w}": (engine.decode(full_original, rows, w) + around)
                / (sum(share * engine.decode(p, rows, w) for p, share in mix) + around) - 1.0 for w in widths}
    return {"bench decode": cost_model.decode(full_original, rows) / sum(share * cost_model.decode(p, rows) for p, share in mix) - 1.0}


def plot_sweep(runs: list[tuple[str, float, ScheduleResult]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prism_cli.io import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    measured: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for _, rate, r in runs:  # the median over rounds
        key = label(r.settings["policy"], r.model == "original")
        measured.setdefault(key, {}).setdefault(rate, []).append((r.metrics["requests_per_s"], r.metrics["e2e_s"]["p90"] or 0.0))
    for key, by_rate in measured.items():
        pts = sorted((rate, statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
                     for rate, vals in by_rate.items())
        style = "--" if "original" in key else "-"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=key)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=key)
    ax1.set_xlabel("offered load (requests/s)")
    ax1.set_ylabel("served (requests/s)")
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_ylabel("end-to-end latency p90 (s)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
