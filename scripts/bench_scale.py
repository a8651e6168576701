"""Benchmark: prism at OLMoE-1B-7B's expert shapes, on synthetic checkpoints (``make bench-scale``).

    OMP_NUM_THREADS=1 python scripts/bench_scale.py --work runs/scale --out results/scale

A stock ``OlmoeForCausalLM`` with OLMoE-1B-7B's exact MoE dimensions (hidden 2048, 64 experts of
width 1024, top-8; config ``tests/data/olmoe-1b-7b.json``), random bfloat16 weights and 2 or 4
layers (``prism_cli.models.synthetic``). Every step runs the ``prism`` command in a fresh process
and records its wall time, CPU time and peak resident memory (``wait4``):

1. ``prism profile`` of each checkpoint, 65,536 tokens, ``--max-memory 512M``: peak RSS against the
   model's size + the budget + 1 GiB, and whether the profiler's share grows with the layers;
2. the 2-layer profile killed with SIGKILL once its checkpoints have passed half the batches, then
   ``--resume``: the same datasets as the uninterrupted file?
3. ``prism partition`` (alternating, 2 workers) of the 2-layer profile: uninterrupted; killed once
   half the experts are saved, then resumed; layers 0 and 1 as separate runs joined by ``merge``:
   the same file as the uninterrupted run? (solver times aside)
4. NSGA-II on a few experts of that profile, one core: seconds per expert;
5. ``prism export`` of the 2-layer checkpoint with the partition;
6. ``prism plan``'s predictions for the two synthetic checkpoints against 1-5 (same settings), and
   its plans for OLMoE-1B-7B, Qwen3-30B-A3B, Mixtral-8x7B and DeepSeek-V3 from their configs.

Each measurement is kept in ``WORK/measurements.json`` and skipped when rerun, so a failed step can
be repeated alone. Run it single-threaded (``OMP_NUM_THREADS=1``): on a machine shared with other
jobs, a single-threaded process's CPU time is the work itself, while wall time (also reported)
depends on the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data"
TOKENS = 65_536
BUDGET = "512M"
BUDGET_BYTES = 512 * 2**20


def run(args: list[str], *, kill_when=None, poll: float = 2.0) -> dict[str, Any]:
    """Run ``prism ARGS`` in a new session; wall, CPU and peak RSS from ``wait4``; SIGKILL it when ``kill_when()``."""
    cmd = [sys.executable, "-m", "prism_cli", *map(str, args)]
    print("$ prism " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    if kill_when is not None:
        while proc.poll() is None:
            if kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(poll)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"prism {' '.join(map(str, args))} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"command": "prism " + " ".join(map(str, args)), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "killed": killed, "exit_code": proc.returncode, "output_tail": out[-1500:]}


def datasets(path: Path, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) and not n.endswith(skip) else None)
    return out


def same_data(a: Path, b: Path, skip: tuple[str, ...] = ()) -> bool:
    """Every dataset equal (names, dtypes, values) and every root attribute but the timestamp."""
    da, db = datasets(a, skip), datasets(b, skip)
    with h5py.File(a, "r") as ha, h5py.File(b, "r") as hb:
        attrs_a = {k: str(v) for k, v in ha.attrs.items() if k != "created"}
        attrs_b = {k: str(v) for k, v in hb.attrs.items() if k != "created"}
    return (attrs_a == attrs_b and sorted(da) == sorted(db)
            and all(da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]) for k in da))


def profile_cursor(work: Path) -> int:
    """Batches every layer has checkpointed in a profiling work folder (0 if none yet)."""
    states = sorted(work.glob("layer*.state.npz"))
    if not states:
        return 0
    cursors = []
    for path in states:
        try:
            with np.load(path) as npz:
                cursors.append(int(npz["cursor"][0]))
        except (OSError, ValueError, KeyError):
            return 0
    return min(cursors)


class Measurements:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def step(self, name: str, fn) -> Any:
        if name not in self.data:
            self.data[name] = fn()
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        return self.data[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/scale"))
    ap.add_argument("--out", type=Path, default=Path("results/scale"))
    ap.add_argument("--costs", type=Path, default=ROOT / "prism_cli" / "data" / "plan_costs.json")
    ap.add_argument("--layers", default="2,4", help="synthetic checkpoints to build and profile")
    ap.add_argument("--nsga2-experts", type=int, default=4)
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    m = Measurements(work / "measurements.json")
    base = json.loads((CONFIGS / "olmoe-1b-7b.json").read_text())
    sizes = [int(x) for x in args.layers.split(",")]
    small = sizes[0]

    from prism_cli.models.synthetic import write_synthetic_olmoe

    for n in sizes:
        folder = work / f"olmoe-{n}l"
        if not (folder / "config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            print(f"writing {folder}", flush=True)
            write_synthetic_olmoe(folder, base, n)
        m.step(f"model_{n}l_bytes", lambda folder=folder: sum(f.stat().st_size for f in folder.glob("*.safetensors")))

    common = ["--dtype", "bfloat16", "--tokens", TOKENS, "--max-memory", BUDGET, "--checkpoint-every", "60"]
    for n in sizes:
        out = work / f"profile-{n}l.h5"

        def profile(n=n, out=out):
            out.unlink(missing_ok=True)
            shutil.rmtree(work / f"profile-{n}l.h5.partial", ignore_errors=True)
            result = run(["profile", work / f"olmoe-{n}l", *common, "--out", out])
            return {**result, "profile_bytes": out.stat().st_size}

        m.step(f"profile_{n}l", profile)

    # Killed at half-way, resumed.
    resumed = work / f"profile-{small}l-resumed.h5"
    partial = work / f"profile-{small}l-resumed.h5.partial"
    batches = TOKENS // (8 * 256)

    def killed_profile():
        resumed.unlink(missing_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        args_ = ["profile", work / f"olmoe-{small}l", *common[:-1], "15", "--out", resumed]
        first = run(args_, kill_when=lambda: profile_cursor(partial) >= batches // 2)
        at = profile_cursor(partial)
        second = run([*args_, "--resume"])
        return {"killed_run": first, "killed_at_batch": at, "batches": batches, "resumed_run": second,
                "same_file": same_data(work / f"profile-{small}l.h5", resumed)}

    m.step("profile_killed_resumed", killed_profile)

    # Partition: uninterrupted, killed + resumed, two layer ranges merged.
    prof = work / f"profile-{small}l.h5"
    part_args = ["partition", prof, "--solver", "alternating", "--workers", "2", "--seed", "0"]
    whole = work / "partition.h5"
    m.step("partition", lambda: (whole.unlink(missing_ok=True), run([*part_args, "--out", whole]))[1])

    def killed_partition():
        out = work / "partition-resumed.h5"
        folder = work / "partition-resumed.h5.partial"
        out.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        total = small * 64
        first = run([*part_args, "--out", out], kill_when=lambda: len(list(folder.glob("*.npz"))) >= total // 2, poll=0.5)
        saved = len(list(folder.glob("*.npz")))
        second = run([*part_args, "--out", out, "--resume"])
        return {"killed_run": first, "experts_saved_when_killed": saved, "experts": total, "resumed_run": second,
                "same_file": same_data(whole, out, skip=("/seconds",))}

    m.step("partition_killed_resumed", killed_partition)

    def merged_partition():
        parts = []
        runs = []
        for layer in range(small):
            part = work / f"partition-layer{layer}.h5"
            part.unlink(missing_ok=True)
            runs.append(run([*part_args, "--layers", str(layer), "--out", part]))
            parts.append(part)
        merged = work / "partition-merged.h5"
        merged.unlink(missing_ok=True)
        runs.append(run(["partition", "merge", *parts, "--out", merged]))
        return {"runs": runs, "same_file": same_data(whole, merged, skip=("/seconds",))}

    m.step("partition_merged", merged_partition)
    m.step("nsga2_per_expert", lambda: nsga2_seconds(prof, args.nsga2_experts))

    def export():
        out = work / "export"
        result = run(["export", work / f"olmoe-{small}l", whole, "--out", out, "--force"])
        return {**result, "written_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}

    m.step("export", export)
    write_results(m.data, args, sizes)


def nsga2_seconds(profile: Path, n: int) -> dict[str, Any]:
    """NSGA-II with its default settings on the first ``n`` experts of layer 0, one core, in this process."""
    from prism_cli.profiling.format import ProfileFile
    from prism_cli.solvers.runner import PartitionSettings, solve_expert

    walls, cpus = [], []
    with ProfileFile(profile) as pf:
        experts = [pf.expert(0, e) for e in range(n)]
    for rows in experts:
        wall, cpu = time.perf_counter(), time.process_time()
        solve_expert(rows, PartitionSettings(solver="nsga2"))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"experts": n, "fit_rows": [int(r.fit_rows.shape[0]) for r in experts], "wall_s": walls, "cpu_s": cpus}


def write_results(data: dict[str, Any], args, sizes: list[int]) -> None:
    import torch

    from prism_cli.evaluation.bench import environment
    from prism_cli.planner import MachineCosts, PlanSettings, make_plan, measure_profile_costs, model_shape, read_config
    from prism_cli.profiling.budget import format_size
    from prism_cli.report import ResultTable

    costs = MachineCosts.load(args.costs)
    small = sizes[0]
    gib = 2**30
    checks = ResultTable(
        f"prism at OLMoE-1B-7B's expert shapes (synthetic checkpoints, {TOKENS:,} tokens, --max-memory {BUDGET}, bfloat16)",
        ["check", "measured", "target", "met"],
    )
    scale = ResultTable("prism plan against the synthetic runs (same settings; plan made with this machine's unit costs)",
                        ["quantity", "planned", "measured", "measured / planned", "within 25 %"])
    plans: dict[str, Any] = {}
    for n in sizes:
        p = data[f"profile_{n}l"]
        model_bytes = data[f"model_{n}l_bytes"]
        limit = model_bytes + BUDGET_BYTES + gib
        checks.add(f"profile, {n} layers: peak RSS", format_size(p["peak_rss_bytes"]),
                   f"<= model {format_size(model_bytes)} + budget 512 MiB + 1 GiB = {format_size(limit)}",
                   "yes" if p["peak_rss_bytes"] <= limit else "no")
        config, name = read_config(str(args.work / f"olmoe-{n}l"))
        shape = model_shape(config, name)
        settings = PlanSettings(tokens=TOKENS, dtype="bfloat16", max_memory=BUDGET_BYTES, solver="alternating", workers=2)
        unit = measure_profile_costs(shape, config, dtype="bfloat16", device="cpu", batch_size=8, seq_len=256,
                                     max_rows=settings.max_rows, holdout_fraction=settings.holdout_fraction)
        plan = make_plan(shape, settings, unit, costs)
        plans[f"{n}l"] = plan
        stage = plan.stage("profile")
        for label, planned, measured, fmt in (
            ("CPU time", stage.cpu_seconds, p["cpu_s"], lambda x: f"{x:,.0f} s"),
            ("wall time", stage.seconds, p["wall_s"], lambda x: f"{x:,.0f} s"),
            ("peak memory", stage.memory_bytes, p["peak_rss_bytes"], format_size),
            ("profile file", plan_profile_bytes(plan), p["profile_bytes"], format_size),
        ):
            scale.add(f"profile, {n} layers: {label}", fmt(planned), fmt(measured), f"{measured / planned:.2f}",
                      "yes" if abs(measured / planned - 1) <= 0.25 else "no")
    share = {n: data[f"profile_{n}l"]["peak_rss_bytes"] - data[f"model_{n}l_bytes"] for n in sizes}
    checks.add("profiler memory (peak RSS - model) by layers",
               ", ".join(f"{n} layers: {format_size(v)}" for n, v in share.items()), "does not grow with layers",
               "yes" if max(share.values()) <= min(share.values()) * 1.1 else "no")
    k = data["profile_killed_resumed"]
    checks.add(f"profile, {small} layers, SIGKILL at batch {k['killed_at_batch']} of {k['batches']} then --resume",
               "same datasets" if k["same_file"] else "DIFFERENT", "the uninterrupted file", "yes" if k["same_file"] else "no")
    kp = data["partition_killed_resumed"]
    checks.add(f"partition, SIGKILL with {kp['experts_saved_when_killed']} of {kp['experts']} experts saved, then --resume",
               "same datasets" if kp["same_file"] else "DIFFERENT", "the uninterrupted file (solver times aside)",
               "yes" if kp["same_file"] else "no")
    merged = data["partition_merged"]
    checks.add("partition --layers 0 and --layers 1, merged", "same datasets" if merged["same_file"] else "DIFFERENT",
               "the one-run file (solver times aside)", "yes" if merged["same_file"] else "no")

    plan = plans[f"{small}l"]
    experts = small * 64
    part = data["partition"]
    from prism_cli.profiling.format import ProfileFile

    with ProfileFile(args.work / f"profile-{small}l.h5") as pf:
        fit_rows = float(np.mean(np.concatenate([pf.row_counts(layer)[0] for layer in pf.layers])))
    planned, _ = costs.partition_seconds("alternating", 1024, fit_rows)
    scale.add(f"partition alternating, {experts} experts: CPU s / expert", f"{planned.cpu:.2f}",
              f"{part['cpu_s'] / experts:.2f}", f"{part['cpu_s'] / experts / planned.cpu:.2f}",
              "yes" if abs(part["cpu_s"] / experts / planned.cpu - 1) <= 0.25 else "no")
    ns = data["nsga2_per_expert"]
    planned_ns, _ = costs.partition_seconds("nsga2", 1024, float(np.mean(ns["fit_rows"])))
    measured_ns = float(np.mean(ns["cpu_s"]))
    scale.add(f"partition nsga2, {ns['experts']} experts: CPU s / expert", f"{planned_ns.cpu:.1f}", f"{measured_ns:.1f}",
              f"{measured_ns / planned_ns.cpu:.2f}", "yes" if abs(measured_ns / planned_ns.cpu - 1) <= 0.25 else "no")
    ex = data["export"]
    planned_export = plan.stage("export")
    for label, planned_s, measured_s in (("CPU time", planned_export.cpu_seconds, ex["cpu_s"]),
                                         ("wall time", planned_export.seconds, ex["wall_s"])):
        scale.add(f"export, {small} layers: {label}", f"{planned_s:,.0f} s", f"{measured_s:,.0f} s",
                  f"{measured_s / planned_s:.2f}", "yes" if abs(measured_s / planned_s - 1) <= 0.25 else "no")
    scale.add(f"export, {small} layers: peak memory", format_size(planned_export.memory_bytes), format_size(ex["peak_rss_bytes"]),
              f"{ex['peak_rss_bytes'] / planned_export.memory_bytes:.2f}",
              "yes" if abs(ex["peak_rss_bytes"] / planned_export.memory_bytes - 1) <= 0.25 else "no")
    scale.add(f"export, {small} layers: disk", format_size(planned_export.disk_bytes), format_size(ex["written_bytes"]),
              f"{ex['written_bytes'] / planned_export.disk_bytes:.2f}",
              "yes" if abs(ex["written_bytes"] / planned_export.disk_bytes - 1) <= 0.25 else "no")
    scale.notes += [
        "CPU time: user + system seconds of the whole `prism` process (single-threaded), against the plan's CPU time; "
        "wall time depends on the other jobs sharing this machine and is shown for reference",
        f"unit costs: profiling measured by `prism plan` at the model's shapes just before this table; the rest from {args.costs}",
    ]
    env = environment(torch.device("cpu"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    checks.save(args.out, extra={"measurements": data, "environment": env})
    scale.save(args.out.with_name(args.out.name + "_plan_check"), extra={"environment": env})
    write_model_plans(args, costs)
    print(checks.markdown())
    print(scale.markdown())


def plan_profile_bytes(plan) -> int:
    from prism_cli.profiling.budget import ProfileGeometry

    s, st = plan.shape, plan.settings
    geometry = ProfileGeometry(num_experts=s.num_experts, width=s.width, top_k=s.top_k, n_layers=len(s.moe_layers),
                               max_rows=st.max_rows, holdout_fraction=st.holdout_fraction, row_bytes=2)
    return geometry.profile_bytes(st.tokens)


def write_model_plans(args, costs) -> None:
    """`prism plan` for the published configs, at bfloat16 with the default settings otherwise."""
    from prism_cli.commands.plan import plan_table
    from prism_cli.planner import PlanSettings, make_plan, measure_profile_costs, model_shape, read_config

    tables = []
    for name in ("olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"):
        config, label = read_config(str(CONFIGS / f"{name}.json"))
        shape = model_shape(config, label)
        settings = PlanSettings(dtype="bfloat16")
        unit = measure_profile_costs(shape, config, dtype="bfloat16", device="cpu", batch_size=8, seq_len=256,
                                     max_rows=settings.max_rows, holdout_fraction=settings.holdout_fraction)
        tables.append(plan_table(make_plan(shape, settings, unit, costs), costs))
    text = "\n".join(t.markdown() for t in tables)
    (args.out.parent / (args.out.name + "_models.md")).write_text(
        "# `prism plan` for published MoE configs on this machine\n\n"
        "Command: `prism plan tests/data/NAME.json --dtype bfloat16` (the defaults otherwise: 131,072 tokens, "
        "5,120 rows per expert, NSGA-II, N = 4), run by `scripts/bench_scale.py` single-threaded.\n\n" + text
    )


if __name__ == "__main__":
    main()
